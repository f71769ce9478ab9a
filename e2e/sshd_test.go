//go:build e2e

package e2e

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// sshd is a real OpenSSH server (Debian openssh-server) on a loopback port,
// standing for a guest that asr pushes its agent to: root logs in with the
// test's key. Its host key is made by the test.
type sshd struct {
	t       *testing.T
	dir     string
	Addr    string // 127.0.0.1:PORT
	KeyFile string // the client's private key (authorized for root)
	HostPub string // the host key's public half (for ssh-keygen -lf)
	proc    *proc
}

const sshdPath = "/usr/sbin/sshd"

// startSSHD starts sshd; it fails the test if OpenSSH is not installed
// (make test installs it).
func startSSHD(t *testing.T) *sshd {
	t.Helper()
	if _, err := os.Stat(sshdPath); err != nil {
		t.Fatalf("OpenSSH server missing (%v): install openssh-server (make test does)", err)
	}
	dir := t.TempDir()
	s := &sshd{t: t, dir: dir, KeyFile: filepath.Join(dir, "client_key"), HostPub: filepath.Join(dir, "host_key.pub")}
	for _, k := range [][]string{{"-f", filepath.Join(dir, "host_key")}, {"-f", s.KeyFile}} {
		if out, err := exec.Command("ssh-keygen", append([]string{"-q", "-t", "ed25519", "-N", ""}, k...)...).CombinedOutput(); err != nil {
			t.Fatalf("ssh-keygen: %v: %s", err, out)
		}
	}
	pub, err := os.ReadFile(s.KeyFile + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "authorized_keys"), pub, 0o600); err != nil {
		t.Fatal(err)
	}
	s.start()
	return s
}

// start (re)starts sshd on its port (a new one the first time).
func (s *sshd) start() {
	t := s.t
	t.Helper()
	for attempt := 1; ; attempt++ {
		if s.Addr == "" || attempt > 1 {
			s.Addr = "127.0.0.1:" + freePort(t)
		}
		_, port, _ := net.SplitHostPort(s.Addr)
		conf := filepath.Join(s.dir, "sshd_config")
		cfg := fmt.Sprintf(`Port %s
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
Subsystem sftp internal-sftp
`, port, filepath.Join(s.dir, "host_key"), filepath.Join(s.dir, "authorized_keys"))
		if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		// sshd wants its privilege-separation directory.
		os.MkdirAll("/run/sshd", 0o755)
		s.proc = startProcCmd(t, "sshd", filepath.Join(s.dir, "sshd.log"), sshdPath, "-D", "-e", "-f", conf)
		if s.up() {
			return
		}
		if attempt < 5 && strings.Contains(s.proc.logTail(), "Address already in use") {
			continue
		}
		t.Fatalf("sshd did not start: %s", s.proc.logTail())
	}
}

// up waits until sshd accepts connections (true) or exits (false).
func (s *sshd) up() bool {
	deadline := time.Now().Add(hungAfter)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", s.Addr); err == nil {
			c.Close()
			return true
		}
		if s.proc.exited() {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// stop stops sshd.
func (s *sshd) stop() { s.proc.stop() }

// fingerprint is the host key's SHA256 fingerprint, as ssh-keygen shows it.
func (s *sshd) fingerprint() string {
	s.t.Helper()
	out, err := exec.Command("ssh-keygen", "-lf", s.HostPub).Output()
	if err != nil {
		s.t.Fatal(err)
	}
	f := strings.Fields(string(out))
	if len(f) < 2 {
		s.t.Fatalf("ssh-keygen -lf: %q", out)
	}
	return f[1]
}

// newHostKey replaces the host key (a reinstalled guest, or an impostor)
// and restarts sshd on the same port; newHostKeyBack puts the old one back.
func (s *sshd) newHostKey() {
	s.t.Helper()
	s.stop()
	for _, f := range []string{"host_key", "host_key.pub"} {
		if err := os.Rename(filepath.Join(s.dir, f), filepath.Join(s.dir, f+".old")); err != nil {
			s.t.Fatal(err)
		}
	}
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(s.dir, "host_key")).CombinedOutput(); err != nil {
		s.t.Fatalf("ssh-keygen: %v: %s", err, out)
	}
	s.start()
}

func (s *sshd) newHostKeyBack() {
	s.t.Helper()
	s.stop()
	for _, f := range []string{"host_key", "host_key.pub"} {
		if err := os.Rename(filepath.Join(s.dir, f+".old"), filepath.Join(s.dir, f)); err != nil {
			s.t.Fatal(err)
		}
	}
	s.start()
}

// alive reports whether a process runs (a zombie left to an init that
// does not reap does not count).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z'
}
