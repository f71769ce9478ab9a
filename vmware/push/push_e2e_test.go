//go:build e2e

package push_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/asrdr/asr/vmware/push"
	"github.com/asrdr/asr/vmware/push/sshdtest"
)

// waitTimeout is a safety net for what the tests await (an agent's start or
// exit), generous for a loaded machine.
const waitTimeout = 2 * time.Minute

const (
	vmUUID     = "4c4c4544-0042-3510-8052-b4c04f384d32"
	passphrase = "correct horse battery staple 'quoted' $(touch /tmp/pwned)"
)

// fakeAgents are testdata/fakeagent built as version 1 and version 2.
var (
	buildOnce  sync.Once
	buildDir   string
	buildErr   error
	fakeAgents [2]string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

func mustFakeAgent(t testing.TB, version int) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "asr-push-fake-")
		if buildErr != nil {
			return
		}
		for i := range fakeAgents {
			out := filepath.Join(buildDir, fmt.Sprintf("fakeagent%d", i+1))
			cmd := exec.Command("go", "build", "-ldflags", fmt.Sprintf("-X main.version=%d", i+1), "-o", out, "./testdata/fakeagent")
			if b, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build fakeagent: %v: %s", err, b)
				return
			}
			fakeAgents[i] = out
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return fakeAgents[version-1]
}

// started is what a fake agent reports when it starts.
type started struct {
	Pid     int      `json:"pid"`
	Args    []string `json:"args"`
	Version string   `json:"version"`
	conn    net.Conn
}

// exited waits until the agent's process has exited (its connection ends).
func (s *started) exited(t *testing.T) {
	t.Helper()
	s.conn.SetReadDeadline(time.Now().Add(waitTimeout))
	var b [1]byte
	if _, err := s.conn.Read(b[:]); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("agent %d did not exit: %v", s.Pid, err)
	}
}

// running reports whether the agent is still connected (has not exited).
func (s *started) running() bool {
	s.conn.SetReadDeadline(time.Now())
	var b [1]byte
	_, err := s.conn.Read(b[:])
	return errors.Is(err, os.ErrDeadlineExceeded)
}

// env is one test's guest: sshd, an install directory that does not exist
// yet, a disk, a UUID file, and the socket fake agents report to.
type env struct {
	srv    *sshdtest.Server
	dir    string
	opts   push.Options
	starts chan *started
	steps  []push.Step
	mu     sync.Mutex
}

// newEnv sets up a guest; tinyParent runs its sshd in a private mount
// namespace where the install directory's parent is a 2 MiB tmpfs.
func newEnv(t testing.TB, tinyParent bool) *env {
	t.Helper()
	e := &env{starts: make(chan *started, 8)}
	tmp := t.TempDir()
	e.dir = filepath.Join(tmp, "opt", "asr")
	parent := filepath.Dir(e.dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	var sopts *sshdtest.Options
	if tinyParent {
		sopts = &sshdtest.Options{Wrap: func(sshd []string) []string {
			return append([]string{"unshare", "-m", "sh", "-c", `mount -t tmpfs -o size=2m tmpfs "$0" && exec "$@"`, parent}, sshd...)
		}}
	}
	e.srv = sshdtest.Start(t, sopts)
	disk := filepath.Join(tmp, "disk.img")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	uuidFile := filepath.Join(tmp, "product_uuid")
	if err := os.WriteFile(uuidFile, []byte(strings.ToUpper(vmUUID)+"\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(tmp, "notify.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			var s started
			line, err := bufio.NewReader(c).ReadBytes('\n')
			if err != nil || json.Unmarshal(line, &s) != nil {
				c.Close()
				continue
			}
			s.conn = c
			e.starts <- &s
		}
	}()
	// A listener standing for the server's control port, which the guest
	// must reach.
	ctl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctl.Close() })
	e.opts = push.Options{
		Target: push.Target{
			Addr:       e.srv.Addr,
			User:       "root",
			Key:        e.srv.ClientKey,
			KnownHosts: []byte(knownhosts.Line([]string{knownhosts.Normalize(e.srv.Addr)}, e.srv.HostKeyPublic()) + "\n"),
			RecordFile: filepath.Join(tmp, "server", "known_hosts"),
		},
		InstallDir: e.dir,
		Binary:     mustFakeAgent(t, 1),
		Name:       "web-01",
		ServerURL:  "https://" + ctl.Addr().String(),
		Reach:      []string{ctl.Addr().String()},
		Passphrase: []byte(passphrase),
		Disks:      []push.Disk{{Name: "sda", Device: disk}, {Name: "data-1", Device: disk, Scan: true}},
		ExpectUUID: vmUUID,
		UUIDPath:   uuidFile,
		ExtraArgs:  []string{"--notify", sock},
	}
	t.Cleanup(func() {
		// Whatever a test left running is stopped.
		push.Uninstall(context.Background(), e.opts.Target, e.dir, nil)
	})
	return e
}

func (e *env) progress(s push.Step) {
	if os.Getenv("PUSH_DEBUG") != "" {
		fmt.Fprintf(os.Stderr, "%s %+v\n", time.Now().Format("15:04:05.000"), s)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.steps = append(e.steps, s)
}

func (e *env) install(t *testing.T, o push.Options) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	e.mu.Lock()
	e.steps = nil
	e.mu.Unlock()
	err := push.Install(ctx, o, e.progress)
	if err != nil {
		mustNoSecrets(t, err.Error(), o)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, s := range e.steps {
		mustNoSecrets(t, s.Detail, o)
	}
	return err
}

// mustStart waits for the agent Install started.
func (e *env) mustStart(t *testing.T) *started {
	t.Helper()
	select {
	case s := <-e.starts:
		t.Cleanup(func() { s.conn.Close() })
		return s
	case <-time.After(waitTimeout):
		t.Fatal("the agent did not start")
		return nil
	}
}

// mustNoSecrets fails the test if s shows the private key or the passphrase.
func mustNoSecrets(t *testing.T, s string, o push.Options) {
	t.Helper()
	if strings.Contains(s, string(o.Passphrase)) || strings.Contains(s, "correct horse") {
		t.Errorf("the passphrase shows in %q", s)
	}
	for _, line := range strings.Split(string(o.Key), "\n") {
		if len(line) > 16 && !strings.HasPrefix(line, "-----") && strings.Contains(s, line) {
			t.Errorf("the private key shows in %q", s)
		}
	}
}

// mustNothingLeft checks that a failed Install left no install directory
// and started no agent.
func (e *env) mustNothingLeft(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(e.dir); !errors.Is(err, os.ErrNotExist) {
		entries, _ := os.ReadDir(e.dir)
		t.Errorf("install directory %s left behind (%v): %v", e.dir, err, entries)
	}
	select {
	case s := <-e.starts:
		t.Errorf("an agent was started: %+v", s)
	default:
	}
	if pids := agentPids(e.dir); len(pids) > 0 {
		t.Errorf("agent processes running: %v", pids)
	}
}

// agentPids lists live processes running dir/asr.
func agentPids(dir string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		pid, err := strconv.Atoi(en.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err != nil || len(cmdline) == 0 {
			continue // gone, or a zombie
		}
		argv0, _, _ := strings.Cut(string(cmdline), "\x00")
		if argv0 == filepath.Join(dir, "asr") {
			pids = append(pids, pid)
		}
	}
	return pids
}

func mustStepsDone(t *testing.T, e *env, names ...string) {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	final := map[string]string{}
	for _, s := range e.steps {
		final[s.Name] = s.State
	}
	for _, n := range names {
		if final[n] != push.StateDone {
			t.Errorf("step %s: %q, want done (steps %+v)", n, final[n], e.steps)
		}
	}
}

func mustMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != want {
		t.Errorf("%s: mode %v, want %v", path, got, want)
	}
}

func TestInstallUpgradeUninstall(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	if err := e.install(t, e.opts); err != nil {
		t.Fatal(err)
	}
	mustStepsDone(t, e, push.StepConnect, push.StepPrerequisites, push.StepCopy, push.StepReachability, push.StepConfigure, push.StepService)
	a1 := e.mustStart(t)
	if a1.Version != "1" {
		t.Errorf("version %q, want 1", a1.Version)
	}
	want := []string{filepath.Join(e.dir, "asr"), "agent",
		"--server", e.opts.ServerURL,
		"--passphrase-file", filepath.Join(e.dir, "passphrase"),
		"--state", filepath.Join(e.dir, "state"),
		"--name", "web-01",
		"--nbd", "unix:" + filepath.Join(e.dir, "nbd.sock"),
		"--disk", "sda=" + e.opts.Disks[0].Device,
		"--disk", "data-1=" + e.opts.Disks[1].Device + ",mode=scan",
		"--notify", e.opts.ExtraArgs[1],
	}
	if !slices.Equal(a1.Args, want) {
		t.Errorf("agent args\n %q\nwant\n %q", a1.Args, want)
	}
	pp, err := os.ReadFile(filepath.Join(e.dir, "passphrase"))
	if err != nil || string(pp) != passphrase {
		t.Errorf("passphrase file: %q, %v", pp, err)
	}
	mustMode(t, filepath.Join(e.dir, "passphrase"), 0o600)
	mustMode(t, filepath.Join(e.dir, "state"), 0o700)
	mustMode(t, filepath.Join(e.dir, "asr"), 0o755)
	pidb, err := os.ReadFile(filepath.Join(e.dir, "agent.pid"))
	if err != nil || strings.TrimSpace(string(pidb)) != strconv.Itoa(a1.Pid) {
		t.Errorf("agent.pid %q (%v), the agent's pid is %d", pidb, err, a1.Pid)
	}
	if pids := agentPids(e.dir); !slices.Equal(pids, []int{a1.Pid}) {
		t.Errorf("agent processes %v, want [%d]", pids, a1.Pid)
	}
	for _, f := range []string{"asr.new", "passphrase.new", "agent.sh.new"} {
		if _, err := os.Stat(filepath.Join(e.dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left: %v", f, err)
		}
	}
	// The key is recorded nowhere: the guest was known.
	if _, err := os.Stat(e.opts.RecordFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record file written for a known host: %v", err)
	}

	// A failed re-run leaves the running install as it was.
	bad := e.opts
	bad.Binary = mustFakeAgent(t, 2)
	bad.Disks = []push.Disk{{Name: "sda", Device: "/nonexistent/disk"}}
	if err := e.install(t, bad); !errors.Is(err, push.ErrDiskMissing) {
		t.Fatalf("install with a missing disk: %v, want ErrDiskMissing", err)
	}
	if !a1.running() {
		t.Fatal("a failed re-run stopped the running agent")
	}
	if _, err := os.Stat(filepath.Join(e.dir, "asr")); err != nil {
		t.Errorf("a failed re-run removed the binary: %v", err)
	}

	// The upgrade: the old agent stops, the new binary starts, alone.
	up := e.opts
	up.Binary = mustFakeAgent(t, 2)
	up.SkipUUIDCheck = true
	if err := e.install(t, up); err != nil {
		t.Fatal(err)
	}
	a1.exited(t)
	a2 := e.mustStart(t)
	if a2.Version != "2" || a2.Pid == a1.Pid {
		t.Errorf("after the upgrade: version %q pid %d (was %d)", a2.Version, a2.Pid, a1.Pid)
	}
	if !slices.Contains(a2.Args, "--bios-uuid") || a2.Args[slices.Index(a2.Args, "--bios-uuid")+1] != vmUUID {
		t.Errorf("SkipUUIDCheck: args %q lack --bios-uuid %s", a2.Args, vmUUID)
	}
	if pids := agentPids(e.dir); !slices.Equal(pids, []int{a2.Pid}) {
		t.Errorf("agent processes %v, want [%d]", pids, a2.Pid)
	}

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	e.mu.Lock()
	e.steps = nil
	e.mu.Unlock()
	if err := push.Uninstall(ctx, e.opts.Target, e.dir, e.progress); err != nil {
		t.Fatal(err)
	}
	mustStepsDone(t, e, push.StepConnect, push.StepStop, push.StepRemove)
	a2.exited(t)
	if _, err := os.Stat(e.dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("install directory left: %v", err)
	}
	if pids := agentPids(e.dir); len(pids) > 0 {
		t.Errorf("agent processes left: %v", pids)
	}
	// Again: nothing to do.
	if err := push.Uninstall(ctx, e.opts.Target, e.dir, nil); err != nil {
		t.Errorf("second uninstall: %v", err)
	}
}

func TestUninstallRefusesForeignDirectory(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	if err := os.MkdirAll(e.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	keep := filepath.Join(e.dir, "precious")
	if err := os.WriteFile(keep, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := push.Uninstall(context.Background(), e.opts.Target, e.dir, nil)
	if !errors.Is(err, push.ErrNotInstalled) {
		t.Fatalf("uninstall of a foreign directory: %v, want ErrNotInstalled", err)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Errorf("the foreign directory was touched: %v", err)
	}
}

func TestWrongKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	other := sshdtest.Start(t, nil) // its client key is not authorized by e.srv
	o := e.opts
	o.Key = other.ClientKey
	err := e.install(t, o)
	if !errors.Is(err, push.ErrAuth) {
		t.Fatalf("install with the wrong key: %v, want ErrAuth", err)
	}
	if !strings.Contains(err.Error(), e.srv.Addr) {
		t.Errorf("error %q does not name the host", err)
	}
	e.mustNothingLeft(t)
}

func TestHostKeyChanged(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	o := e.opts
	o.KnownHosts = nil
	// The server's record holds the key the guest had.
	if err := os.MkdirAll(filepath.Dir(o.RecordFile), 0o700); err != nil {
		t.Fatal(err)
	}
	line := knownhosts.Line([]string{knownhosts.Normalize(e.srv.Addr)}, e.srv.HostKeyPublic()) + "\n"
	if err := os.WriteFile(o.RecordFile, []byte(line), 0o600); err != nil {
		t.Fatal(err)
	}
	e.srv.NewHostKey()
	// Even with the new key "confirmed", a known host with another key is
	// never accepted.
	o.AcceptHostKey = e.srv.Fingerprint()
	err := e.install(t, o)
	if !errors.Is(err, push.ErrHostKeyMismatch) {
		t.Fatalf("install after the host key changed: %v, want ErrHostKeyMismatch", err)
	}
	if !strings.Contains(err.Error(), e.srv.Fingerprint()) {
		t.Errorf("error %q does not show the presented key", err)
	}
	if b, _ := os.ReadFile(o.RecordFile); string(b) != line {
		t.Errorf("record file changed:\n%s", b)
	}
	e.mustNothingLeft(t)
	// The same through KnownHosts.
	o.RecordFile = ""
	o.KnownHosts = []byte(line)
	if err := e.install(t, o); !errors.Is(err, push.ErrHostKeyMismatch) {
		t.Fatalf("install after the host key changed (KnownHosts): %v, want ErrHostKeyMismatch", err)
	}
	e.mustNothingLeft(t)
}

func TestUnknownHostKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	o := e.opts
	o.KnownHosts = nil
	want := e.srv.Fingerprint()
	err := e.install(t, o)
	var uk *push.UnknownHostKeyError
	if !errors.As(err, &uk) || !errors.Is(err, push.ErrHostKeyUnknown) {
		t.Fatalf("install on an unknown host: %v, want an UnknownHostKeyError", err)
	}
	if uk.Fingerprint != want || uk.Host != e.srv.Addr || !strings.Contains(err.Error(), want) {
		t.Errorf("UnknownHostKeyError %+v (%q), want fingerprint %s of %s", uk, err, want, e.srv.Addr)
	}
	e.mustNothingLeft(t)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	fp, err := push.HostKeyFingerprint(ctx, e.srv.Addr)
	if err != nil || fp != want {
		t.Errorf("HostKeyFingerprint: %q, %v; want %s", fp, err, want)
	}
	// A different confirmed key is not this one.
	o.AcceptHostKey = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
	if err := e.install(t, o); !errors.As(err, &uk) {
		t.Fatalf("install with another confirmed key: %v, want an UnknownHostKeyError", err)
	}
	e.mustNothingLeft(t)

	o.AcceptHostKey = want
	if err := e.install(t, o); err != nil {
		t.Fatal(err)
	}
	a := e.mustStart(t)
	mustMode(t, o.RecordFile, 0o600)
	rec, err := os.ReadFile(o.RecordFile)
	if err != nil || !strings.HasPrefix(string(rec), knownhosts.Normalize(e.srv.Addr)+" ssh-ed25519 ") {
		t.Errorf("record file %q (%v)", rec, err)
	}
	// Now known: no confirmation needed, and the key is not recorded twice.
	o.AcceptHostKey = ""
	if err := e.install(t, o); err != nil {
		t.Fatal(err)
	}
	a.exited(t)
	e.mustStart(t)
	if rec2, _ := os.ReadFile(o.RecordFile); string(rec2) != string(rec) {
		t.Errorf("record file changed on a known host:\n%s", rec2)
	}
}

func TestDiskMissing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	o := e.opts
	o.Disks = append(slices.Clone(o.Disks), push.Disk{Name: "sdz", Device: "/dev/does-not-exist; touch /tmp/pwned"})
	err := e.install(t, o)
	if !errors.Is(err, push.ErrDiskMissing) || !strings.Contains(err.Error(), "/dev/does-not-exist") {
		t.Fatalf("install with a missing disk: %v, want ErrDiskMissing naming it", err)
	}
	e.mustNothingLeft(t)
	// A directory is no disk.
	o.Disks = []push.Disk{{Name: "sda", Device: filepath.Dir(e.dir)}}
	if err := e.install(t, o); !errors.Is(err, push.ErrDiskMissing) {
		t.Fatalf("install with a directory as disk: %v, want ErrDiskMissing", err)
	}
	e.mustNothingLeft(t)
}

func TestUnreachable(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	o := e.opts
	o.Reach = append(slices.Clone(o.Reach), closed)
	err = e.install(t, o)
	if !errors.Is(err, push.ErrUnreachable) || !strings.Contains(err.Error(), closed) {
		t.Fatalf("install with an unreachable port: %v, want ErrUnreachable naming %s", err, closed)
	}
	e.mustNothingLeft(t)
}

func TestNoSpace(t *testing.T) {
	t.Parallel()
	e := newEnv(t, true)
	// The binary (over 2 MiB) does not fit.
	err := e.install(t, e.opts)
	if !errors.Is(err, push.ErrNoSpace) {
		t.Fatalf("install onto a 2 MiB file system: %v, want ErrNoSpace", err)
	}
	// Nothing in the tmpfs either, seen through sshd's mount namespace.
	inNS := filepath.Join("/proc", strconv.Itoa(e.srv.Pid()), "root", e.dir)
	if _, err := os.Stat(inNS); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s in sshd's namespace: %v, want it absent", e.dir, err)
	}
	e.mustNothingLeft(t)
}

func TestUUIDMismatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	if err := os.Remove(e.opts.UUIDPath); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.opts.UUIDPath, []byte("00000000-1111-2222-3333-444444444444\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	err := e.install(t, e.opts)
	if !errors.Is(err, push.ErrUUIDMismatch) {
		t.Fatalf("install on another machine: %v, want ErrUUIDMismatch", err)
	}
	e.mustNothingLeft(t)
}

func TestUUIDUnreadable(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	o := e.opts
	o.UUIDPath = filepath.Join(t.TempDir(), "no-such-uuid")
	err := e.install(t, o)
	if !errors.Is(err, push.ErrUUIDUnreadable) || !strings.Contains(err.Error(), "--skip-uuid-check") {
		t.Fatalf("install without a readable UUID: %v, want ErrUUIDUnreadable mentioning --skip-uuid-check", err)
	}
	e.mustNothingLeft(t)

	// The operator's word: the agent gets the VM's UUID.
	o.SkipUUIDCheck = true
	if err := e.install(t, o); err != nil {
		t.Fatal(err)
	}
	a := e.mustStart(t)
	i := slices.Index(a.Args, "--bios-uuid")
	if i < 0 || i+1 >= len(a.Args) || a.Args[i+1] != vmUUID {
		t.Errorf("args %q lack --bios-uuid %s", a.Args, vmUUID)
	}
}

// TestCancelDuringCopy: a caller giving up in the middle of the copy leaves
// nothing behind.
func TestCancelDuringCopy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var copying bool
	err := push.Install(ctx, e.opts, func(s push.Step) {
		if s.Name == push.StepCopy && s.State == push.StateRunning && s.Total > 0 {
			copying = true
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) || !copying {
		t.Fatalf("install cancelled during the copy (copying %v): %v, want context.Canceled", copying, err)
	}
	e.mustNothingLeft(t)
}
