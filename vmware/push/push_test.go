package push

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// hostile are strings a shell would treat specially.
var hostile = []string{
	"",
	"plain",
	"with space",
	"it's",
	"'",
	"''",
	`"double"`,
	"$(touch /tmp/pwned)",
	"`touch /tmp/pwned`",
	"${HOME}",
	"$HOME",
	"a;b&&c||d|e",
	"new\nline",
	"tab\there",
	"back\\slash",
	"*?[a-z]",
	"~root",
	"-n",
	"--flag=x",
	"#comment",
	"a'b'c'\\''d",
	"!bang",
	"<in >out 2>&1",
	"\x01\x7f",
	"ünïcödé",
}

// TestShellQuote runs each quoted string through sh and checks that it comes
// back as the one argument it was.
func TestShellQuote(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Fatalf("no sh: %v", err)
	}
	for _, s := range hostile {
		out, err := exec.Command(sh, "-c", "printf '%s\\0' "+shellQuote(s)).Output()
		if err != nil {
			t.Errorf("shellQuote(%q) = %s: sh: %v", s, shellQuote(s), err)
			continue
		}
		if got := string(out); got != s+"\x00" {
			t.Errorf("shellQuote(%q) = %s: sh made %q", s, shellQuote(s), got)
		}
	}
	// All at once, as words of one command.
	out, err := exec.Command(sh, "-c", "printf '%s\\0' "+shellJoin(hostile...)).Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00"); !slices.Equal(got, hostile) {
		t.Errorf("shellJoin: sh made %q, want %q", got, hostile)
	}
	for s, want := range map[string]string{"/opt/asr": "/opt/asr", "a b": "'a b'", "it's": `'it'\''s'`, "": "''"} {
		if got := shellQuote(s); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", s, got, want)
		}
	}
}

func FuzzShellQuote(f *testing.F) {
	for _, s := range hostile {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if strings.ContainsRune(s, 0) {
			return // no argument holds a NUL
		}
		out, err := exec.Command("sh", "-c", "printf '%s' "+shellQuote(s)).Output()
		if err != nil {
			t.Fatalf("shellQuote(%q): %v", s, err)
		}
		if string(out) != s {
			t.Fatalf("shellQuote(%q): sh made %q", s, out)
		}
	})
}

// TestAgentScript runs agent.sh with hostile values through sh, with echo
// standing in for the binary.
func TestAgentScript(t *testing.T) {
	o := validOptions(t)
	o.Name = "web $(id) 'x'"
	o.ExtraArgs = []string{"--pre-freeze", "/usr/local/bin/freeze; rm -rf /"}
	o.SkipUUIDCheck = true
	o, err := o.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	script := o.agentScript()
	script = strings.Replace(script, "exec "+o.InstallDir+"/asr", "printf '%s\\0'", 1)
	out, err := exec.Command("sh", "-c", script).Output()
	if err != nil {
		t.Fatalf("agent.sh: %v\n%s", err, script)
	}
	got := strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
	want := []string{"agent", "--server", "https://10.0.0.1:8443",
		"--passphrase-file", "/opt/asr/passphrase", "--state", "/opt/asr/state",
		"--name", "web $(id) 'x'", "--nbd", "unix:/opt/asr/nbd.sock",
		"--disk", "sda=/dev/sda", "--disk", "data=/dev/sdb,mode=scan",
		"--bios-uuid", "4c4c4544-0042-3510-8052-b4c04f384d32",
		"--pre-freeze", "/usr/local/bin/freeze; rm -rf /"}
	if !slices.Equal(got, want) {
		t.Errorf("agent args\n %q\nwant\n %q", got, want)
	}
}

func validOptions(t *testing.T) Options {
	t.Helper()
	return Options{
		Target:     Target{Addr: "10.0.0.5:22", User: "root", Key: mustKey(t)},
		Binary:     "/usr/bin/asr",
		Name:       "web-01",
		ServerURL:  "https://10.0.0.1:8443",
		Reach:      []string{"10.0.0.1:8443", "10.0.0.1:8444"},
		Passphrase: []byte("secret"),
		Disks:      []Disk{{Name: "sda", Device: "/dev/sda"}, {Name: "data", Device: "/dev/sdb", Scan: true}},
		ExpectUUID: "4C4C4544-0042-3510-8052-B4C04F384D32",
	}
}

func mustKey(t *testing.T) []byte {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	blk, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(blk)
}

func TestOptionsValidation(t *testing.T) {
	o, err := validOptions(t).withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if o.InstallDir != DefaultInstallDir || o.NBD != "unix:/opt/asr/nbd.sock" || o.UUIDPath != DefaultUUIDPath {
		t.Errorf("defaults: %q %q %q", o.InstallDir, o.NBD, o.UUIDPath)
	}
	for _, tc := range []struct {
		name string
		mod  func(*Options)
	}{
		{"no addr", func(o *Options) { o.Addr = "10.0.0.5" }},
		{"no user", func(o *Options) { o.User = "" }},
		{"no key", func(o *Options) { o.Key = nil }},
		{"bad accept", func(o *Options) { o.AcceptHostKey = "MD5:aa:bb" }},
		{"relative dir", func(o *Options) { o.InstallDir = "opt/asr" }},
		{"root dir", func(o *Options) { o.InstallDir = "/" }},
		{"dotdot dir", func(o *Options) { o.InstallDir = "/opt/../etc" }},
		{"dot dir", func(o *Options) { o.InstallDir = "/opt/./asr" }},
		{"space dir", func(o *Options) { o.InstallDir = "/opt/my asr" }},
		{"quote dir", func(o *Options) { o.InstallDir = "/opt/a'b" }},
		{"trailing slash", func(o *Options) { o.InstallDir = "/opt/asr/" }},
		{"no binary", func(o *Options) { o.Binary = "" }},
		{"no name", func(o *Options) { o.Name = "" }},
		{"control name", func(o *Options) { o.Name = "a\nb" }},
		{"http url", func(o *Options) { o.ServerURL = "http://10.0.0.1:8443" }},
		{"bad url", func(o *Options) { o.ServerURL = "10.0.0.1:8443" }},
		{"bad reach", func(o *Options) { o.Reach = []string{"10.0.0.1"} }},
		{"reach port", func(o *Options) { o.Reach = []string{"10.0.0.1:http"} }},
		{"no passphrase", func(o *Options) { o.Passphrase = nil }},
		{"no disks", func(o *Options) { o.Disks = nil }},
		{"bad disk name", func(o *Options) { o.Disks = []Disk{{Name: "a=b", Device: "/dev/sda"}} }},
		{"twice", func(o *Options) { o.Disks = []Disk{{Name: "a", Device: "/dev/sda"}, {Name: "a", Device: "/dev/sdb"}} }},
		{"relative device", func(o *Options) { o.Disks = []Disk{{Name: "a", Device: "sda"}} }},
		{"comma device", func(o *Options) { o.Disks = []Disk{{Name: "a", Device: "/dev/sda,mode=scan"}} }},
		{"no uuid", func(o *Options) { o.ExpectUUID = "" }},
		{"bad uuid", func(o *Options) { o.ExpectUUID = "not-a-uuid" }},
		{"relative uuid path", func(o *Options) { o.UUIDPath = "product_uuid" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := validOptions(t)
			tc.mod(&o)
			if _, err := o.withDefaults(); err == nil {
				t.Error("accepted")
			}
			// Install refuses before connecting anywhere.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := Install(ctx, o, nil); err == nil || errors.Is(err, ErrConnect) {
				t.Errorf("Install: %v", err)
			}
		})
	}
}

// TestSecretsNotInErrors: a bad key or a validation failure never shows the
// key or the passphrase.
func TestSecretsNotInErrors(t *testing.T) {
	o := validOptions(t)
	o.Key = []byte("-----BEGIN OPENSSH PRIVATE KEY-----\nTOPSECRETKEYMATERIAL\n-----END OPENSSH PRIVATE KEY-----\n")
	o.Passphrase = []byte("TOPSECRETPASSPHRASE")
	o.Addr = "127.0.0.1:1"
	o.Binary = os.Args[0]
	err := Install(context.Background(), o, func(s Step) {
		if strings.Contains(s.Detail, "TOPSECRET") {
			t.Errorf("step detail shows a secret: %q", s.Detail)
		}
	})
	if err == nil || strings.Contains(err.Error(), "TOPSECRET") {
		t.Errorf("Install: %v", err)
	}
	err = Uninstall(context.Background(), o.Target, "", nil)
	if err == nil || strings.Contains(err.Error(), "TOPSECRET") {
		t.Errorf("Uninstall: %v", err)
	}
}

// TestHostKeyCheck drives the host-key callback without a network: known,
// unknown, confirmed (recorded), mismatched.
func TestHostKeyCheck(t *testing.T) {
	key := func() ssh.PublicKey {
		pub, _, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		k, err := ssh.NewPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	k1, k2 := key(), key()
	addr := "10.0.0.5:2222"
	remote := &net.TCPAddr{IP: net.ParseIP("10.0.0.5"), Port: 2222}
	record := filepath.Join(t.TempDir(), "data", "known_hosts")

	// Unknown.
	tg := Target{Addr: addr, RecordFile: record}
	cb, algos, err := hostKeyCheck(tg)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(algos, newHostAlgorithms) {
		t.Errorf("algorithms for an unknown host: %v", algos)
	}
	err = cb(addr, remote, k1)
	var uk *UnknownHostKeyError
	if !errors.As(err, &uk) || uk.Fingerprint != ssh.FingerprintSHA256(k1) || uk.Host != addr || uk.KeyType != ssh.KeyAlgoED25519 {
		t.Fatalf("unknown host: %v", err)
	}
	if !strings.Contains(err.Error(), "ssh_host_ed25519_key.pub") {
		t.Errorf("message %q: no hint of the key file to check", err)
	}
	if !strings.HasPrefix(uk.Fingerprint, "SHA256:") || strings.HasSuffix(uk.Fingerprint, "=") {
		t.Errorf("fingerprint %q: want ssh-keygen's form", uk.Fingerprint)
	}
	if _, err := os.Stat(record); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record file made for an unknown host: %v", err)
	}

	// Confirmed: recorded.
	tg.AcceptHostKey = ssh.FingerprintSHA256(k1)
	cb, _, err = hostKeyCheck(tg)
	if err != nil {
		t.Fatal(err)
	}
	if err := cb(addr, remote, k2); !errors.As(err, &uk) || uk.Offered != tg.AcceptHostKey {
		t.Fatalf("another key than the confirmed one: %v", err)
	}
	if err := cb(addr, remote, k1); err != nil {
		t.Fatalf("confirmed key: %v", err)
	}
	fi, err := os.Stat(record)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("record file: %v %v", fi, err)
	}
	b, _ := os.ReadFile(record)
	if want := knownhosts.Line([]string{"[10.0.0.5]:2222"}, k1) + "\n"; string(b) != want {
		t.Errorf("record file %q, want %q", b, want)
	}

	// Known now: k1 passes without confirmation, k2 is a mismatch even when
	// confirmed, and only ed25519 is asked for.
	for _, accept := range []string{"", ssh.FingerprintSHA256(k2)} {
		tg.AcceptHostKey = accept
		cb, algos, err = hostKeyCheck(tg)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(algos, []string{ssh.KeyAlgoED25519}) {
			t.Errorf("algorithms %v", algos)
		}
		if err := cb(addr, remote, k1); err != nil {
			t.Errorf("known key: %v", err)
		}
		var mm *hostKeyMismatch
		if err := cb(addr, remote, k2); !errors.As(err, &mm) {
			t.Errorf("changed key (accept %q): %v", accept, err)
		}
	}
	if b2, _ := os.ReadFile(record); !bytes.Equal(b2, b) {
		t.Errorf("record file changed: %q", b2)
	}
	if err := translateHandshake(addr, "root", &hostKeyMismatch{fingerprint: "SHA256:x"}); !errors.Is(err, ErrHostKeyMismatch) || !strings.Contains(err.Error(), addr) {
		t.Errorf("translated mismatch: %v", err)
	}

	// Through KnownHosts, without a record file.
	cb, _, err = hostKeyCheck(Target{Addr: addr, KnownHosts: []byte(knownhosts.Line([]string{"[10.0.0.5]:2222"}, k2) + "\n")})
	if err != nil {
		t.Fatal(err)
	}
	if err := cb(addr, remote, k2); err != nil {
		t.Errorf("key in KnownHosts: %v", err)
	}
	var mm *hostKeyMismatch
	if err := cb(addr, remote, k1); !errors.As(err, &mm) {
		t.Errorf("key not in KnownHosts: %v", err)
	}
}

func TestProbe(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := c.Addr().String()
	c.Close()
	var out, errb bytes.Buffer
	if code := probe(context.Background(), &out, &errb, []string{l.Addr().String()}, 5*time.Second); code != 0 || out.String() != "ok "+l.Addr().String()+"\n" {
		t.Errorf("open port: %d %q %q", code, out.String(), errb.String())
	}
	out.Reset()
	code := probe(context.Background(), &out, &errb, []string{l.Addr().String(), closed}, 5*time.Second)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if code != 1 || len(lines) != 2 || lines[0] != "ok "+l.Addr().String() || !strings.HasPrefix(lines[1], "fail "+closed+": ") {
		t.Errorf("closed port: %d %q", code, out.String())
	}
	for _, args := range [][]string{nil, {"no-port"}} {
		if code := probe(context.Background(), &out, &errb, args, time.Second); code != 2 {
			t.Errorf("probe %q: exit %d, want 2", args, code)
		}
	}
}

func TestParseDF(t *testing.T) {
	out := "Filesystem     1024-blocks    Used Available Capacity Mounted on\n/dev/sda1         10255636 5024308   4690656      52% /\n"
	if n, err := parseDF(out); err != nil || n != 4690656<<10 {
		t.Errorf("parseDF: %d %v", n, err)
	}
	for _, bad := range []string{"", "Filesystem 1024-blocks Used Available\n", "h\n/dev/sda1 1 2 x 5% /\n", "h\n/dev/sda1 1 2 -3 5% /\n"} {
		if _, err := parseDF(bad); err == nil {
			t.Errorf("parseDF(%q) accepted", bad)
		}
	}
}

func TestCapped(t *testing.T) {
	var c capped
	big := bytes.Repeat([]byte("x"), maxOutput+100)
	if n, err := c.Write(big); n != len(big) || err != nil {
		t.Fatalf("write: %d %v", n, err)
	}
	c.Write([]byte("more"))
	if len(c.String()) != maxOutput {
		t.Errorf("kept %d bytes, want %d", len(c.String()), maxOutput)
	}
}

func TestGuestArch(t *testing.T) {
	if got := guestArch("amd64"); !slices.Equal(got, []string{"x86_64"}) {
		t.Errorf("amd64: %v", got)
	}
	if got := guestArch("arm64"); !slices.Contains(got, "aarch64") {
		t.Errorf("arm64: %v", got)
	}
}
