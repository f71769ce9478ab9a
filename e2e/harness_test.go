//go:build e2e

// Package e2e holds asr's end-to-end tests: the real binary as separate
// processes (server, agents, operator CLI), driven by real NBD clients
// (qemu-io, fio, nbdcopy), killed with SIGKILL at awkward moments, and
// checked byte for byte. Run with `make test` (or `go test -tags e2e ./e2e/`
// with ASR_BIN pointing at a built binary; without it the binary is built).
//
// The tests mostly wait (on agents, intervals, guests), so every one calls
// t.Parallel(): each has its own directory, ports (freePort; a server
// whose port was taken meanwhile tries others), network namespaces,
// browser and peers; nothing in this package is shared but read-only
// tables, and no test sets the process's environment (t.Setenv): a
// cluster's processes get theirs from cluster.env. scripts/e2e.sh
// runs them 3 at a time (-parallel): more on a 2-core machine only slows
// each, and must pass all the same.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/asrdr/asr/e2e/freeport"
	"github.com/asrdr/asr/server/api"
)

var asrBin string

// hungAfter bounds the tests' waits for a state or an event. It is a safety
// net that ends a hung run with a clear message, never the pace a loaded
// machine has to keep: every wait is for something that holds once reached.
const hungAfter = 3 * time.Minute

func TestMain(m *testing.M) {
	// Drills use TCG, the same on every machine with or without /dev/kvm:
	// set here for every server the tests start, as tests that run in
	// parallel cannot set it each (t.Setenv).
	os.Setenv("ASR_DRILL_ACCEL", "tcg")
	asrBin = os.Getenv("ASR_BIN")
	if asrBin == "" {
		dir, err := os.MkdirTemp("", "asr-e2e-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		asrBin = filepath.Join(dir, "asr")
		cmd := exec.Command("go", "build", "-o", asrBin, "..")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build asr:", err)
			os.Exit(1)
		}
		defer os.RemoveAll(dir)
	}
	os.Exit(m.Run())
}

// contain makes a child process die with the test: it gets its own process
// group, which a cancelled context kills as a whole (tools such as fio fork
// workers that would otherwise outlive their parent), and SIGKILL when the
// test binary itself dies.
func contain(cmd *exec.Cmd) *exec.Cmd {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if cmd.Cancel != nil { // made by CommandContext
		cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
		cmd.WaitDelay = 10 * time.Second
	}
	return cmd
}

// proc is a running asr process whose output goes to a log file.
type proc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func startProc(t *testing.T, name, logPath string, args ...string) *proc {
	t.Helper()
	return startProcCmd(t, name, logPath, asrBin, args...)
}

// startProcCmd starts any program (e.g. ip netns exec ... asr).
func startProcCmd(t *testing.T, name, logPath, prog string, args ...string) *proc {
	t.Helper()
	return startProcEnv(t, name, logPath, nil, prog, args...)
}

// startProcEnv starts a program with variables added to the environment.
func startProcEnv(t *testing.T, name, logPath string, env []string, prog string, args ...string) *proc {
	t.Helper()
	lf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := contain(exec.Command(prog, args...))
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(append(os.Environ(), "ASR_LOG_LEVEL=info"), env...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{t: t, name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	t.Cleanup(func() { p.stop() })
	return p
}

// kill sends SIGKILL and waits: the process gets no chance to clean up.
func (p *proc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// stop asks the process to exit (SIGTERM) and waits.
func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.cmd.Process.Signal(syscall.SIGCONT) // in case the test left it paused
	select {
	case <-p.done:
	case <-time.After(hungAfter):
		p.t.Errorf("%s did not stop on SIGTERM; killing it", p.name)
		p.kill()
	}
}

// pause stops the process (SIGSTOP) and waits until every thread of it is
// stopped, so that nothing it does can happen after pause returns.
func (p *proc) pause() {
	p.t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		p.t.Fatalf("stop %s: %v", p.name, err)
	}
	// A thread in an uninterruptible wait (I/O) stops once it returns; a
	// wait past hungAfter is a hung run.
	deadline := time.Now().Add(hungAfter)
	for time.Now().Before(deadline) {
		if p.exited() {
			p.t.Fatalf("%s exited: %v\n%s", p.name, p.err, p.logTail())
		}
		if p.stopped() {
			return
		}
		time.Sleep(time.Millisecond)
	}
	p.t.Fatalf("%s: not every thread stopped %v after SIGSTOP", p.name, hungAfter)
}

// stopped reports whether every thread of the process is stopped.
func (p *proc) stopped() bool {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", p.cmd.Process.Pid))
	for _, task := range tasks {
		b, err := os.ReadFile(task)
		if err != nil {
			continue // the thread is gone
		}
		// pid (comm) state ...: comm may hold spaces, so look after the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) || (b[i+2] != 'T' && b[i+2] != 't') {
			return false
		}
	}
	return len(tasks) > 0
}

// resume continues a paused process (SIGCONT).
func (p *proc) resume() {
	p.t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		p.t.Fatalf("continue %s: %v", p.name, err)
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitLog waits until the process's log contains s.
func (p *proc) waitLog(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(hungAfter) // a hung process, not a slow one
	for {
		if b, _ := os.ReadFile(p.log); bytes.Contains(b, []byte(s)) {
			return
		}
		if p.exited() || time.Now().After(deadline) {
			t.Fatalf("%s never logged %q:\n%s", p.name, s, p.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *proc) logTail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 6000 {
		b = b[len(b)-6000:]
	}
	return string(b)
}

// cluster is a server and its agents in one test directory.
type cluster struct {
	t        *testing.T
	dir      string
	srvDir   string
	listen   string
	dataPort string
	dataHost string // data listener address (default 127.0.0.1)
	server   *proc
	agents   map[string]*agentProc
	// serverArgs are extra arguments for asr server.
	serverArgs []string
	// env is added to the environment of every asr process the cluster
	// starts and of its commands (e.g. a target's credentials): tests that
	// run in parallel cannot set the process's own (t.Setenv).
	env  []string
	gate *dataGate // between the agents and the data listener, if any
}

type agentProc struct {
	*proc
	name  string
	state string
	sock  string
	args  []string
	ns    *netns // the namespace it runs in, if any
}

func freePort(t *testing.T) string {
	t.Helper()
	port, err := freeport.Port()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

func newCluster(t *testing.T) *cluster { return newClusterArgs(t) }

// newClusterArgs starts a cluster whose server gets extra arguments.
func newClusterArgs(t *testing.T, serverArgs ...string) *cluster {
	return newClusterEnv(t, nil, serverArgs...)
}

// newClusterEnv starts a cluster whose processes get variables added to
// their environment (cluster.env) and whose server gets extra arguments.
func newClusterEnv(t *testing.T, env []string, serverArgs ...string) *cluster {
	c := &cluster{t: t, dir: t.TempDir(), agents: map[string]*agentProc{}, serverArgs: serverArgs, env: env}
	c.srvDir = filepath.Join(c.dir, "srv")
	t.Cleanup(c.dumpLogsOnFailure)
	c.listen = "127.0.0.1:" + freePort(t)
	c.dataPort = freePort(t)
	c.startServer()
	// Automatic resyncs wait for the vault's resync window; with the
	// default (22:00-06:00) a test run at night would see them start, and
	// maybe end, before it looks. The window is put half a day away: a
	// resync starts when a test asks for it, as an operator's does, at
	// whatever time the suite runs. (A test about the window sets its own.)
	away := time.Now().Add(12 * time.Hour)
	c.mustCLI("resync", "--window", away.Format("15:04")+"-"+away.Add(time.Hour).Format("15:04"))
	return c
}

// dumpLogsOnFailure logs the tail of every process's log if the test
// failed.
func (c *cluster) dumpLogsOnFailure() {
	if !c.t.Failed() {
		return
	}
	logs, _ := filepath.Glob(filepath.Join(c.dir, "*.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		if len(b) > 8000 {
			b = b[len(b)-8000:]
		}
		c.t.Logf("--- %s (tail) ---\n%s", filepath.Base(l), b)
	}
}

func (c *cluster) url() string { return "https://" + c.listen }

func (c *cluster) startServer() {
	c.t.Helper()
	host := c.dataHost
	if host == "" {
		host = "127.0.0.1"
	}
	for attempt := 1; ; attempt++ {
		args := []string{"server", "--data", c.srvDir, "--listen", c.listen, "--data-listen", host + ":" + c.dataPort}
		if !slices.Contains(c.serverArgs, "--nbd-listen") {
			// Failovers' exports on a port of the kernel's choosing (the
			// URIs say which): never the default one another server holds.
			args = append(args, "--nbd-listen", "127.0.0.1:0")
		}
		args = append(args, c.serverArgs...)
		c.server = startProcEnv(c.t, "server", filepath.Join(c.dir, "server.log"), c.env, asrBin, args...)
		if c.serverUp() {
			return
		}
		// Another process on the machine (other tests run here too) took
		// a port between freePort and the server's bind. Before any agent
		// knows the addresses, the server can take others.
		if attempt < 5 && len(c.agents) == 0 && strings.Contains(c.server.logTail(), "address already in use") {
			c.t.Logf("server start %d: a port was taken meanwhile; trying others", attempt)
			lhost, _, _ := net.SplitHostPort(c.listen)
			c.listen = net.JoinHostPort(lhost, freePort(c.t))
			if c.gate == nil { // a gate forwards to the data port it has
				c.dataPort = freePort(c.t)
			}
			continue
		}
		c.t.Fatalf("server exited: %v\n%s", c.server.err, c.server.logTail())
	}
}

// serverUp waits until the server answers (true) or exits (false).
func (c *cluster) serverUp() bool {
	c.t.Helper()
	deadline := time.Now().Add(hungAfter) // a hung server, not a slow one
	for time.Now().Before(deadline) {
		// Ended when the server exits: if it did not get its port,
		// whatever holds the port may never answer.
		ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
		go func() {
			select {
			case <-c.server.done:
				cancel()
			case <-ctx.Done():
			}
		}()
		_, err := runAsrEnv(ctx, c.env, "status", "--data", c.srvDir, "--server", c.url())
		cancel()
		if err == nil {
			return true
		}
		if c.server.exited() {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("server did not come up:\n%s", c.server.logTail())
	return false
}

// startAgent starts (or restarts, keeping its state) an agent.
func (c *cluster) startAgent(name string, extra []string, disks ...string) *agentProc {
	c.t.Helper()
	return c.startAgentIn(nil, name, extra, disks...)
}

// startAgentIn starts an agent inside a network namespace (nil: the host's).
func (c *cluster) startAgentIn(ns *netns, name string, extra []string, disks ...string) *agentProc {
	c.t.Helper()
	a, ok := c.agents[name]
	if !ok {
		a = &agentProc{name: name, state: filepath.Join(c.dir, name), sock: filepath.Join(c.dir, name+".sock")}
		a.args = []string{"agent", "--server", c.url(), "--passphrase-file", filepath.Join(c.srvDir, "passphrase"),
			"--state", a.state, "--name", name, "--nbd", "unix:" + a.sock, "--crash-interval", "1h"}
		for _, d := range disks {
			a.args = append(a.args, "--disk", d)
		}
		a.args = append(a.args, extra...)
		c.agents[name] = a
	}
	if ns != nil {
		a.ns = ns
	}
	args := a.args
	if a.ns != nil {
		args = append([]string{"netns", "exec", a.ns.name, asrBin}, args...)
		a.proc = startProcCmd(c.t, name, filepath.Join(c.dir, name+".log"), "ip", args...)
	} else {
		a.proc = startProcEnv(c.t, name, filepath.Join(c.dir, name+".log"), c.env, asrBin, args...)
	}
	// Ready when its NBD socket answers.
	deadline := time.Now().Add(hungAfter) // a hung agent, not a slow one
	for time.Now().Before(deadline) {
		if conn, err := net.Dial("unix", a.sock); err == nil {
			conn.Close()
			return a
		}
		if a.exited() {
			c.t.Fatalf("agent %s exited: %v\n%s", name, a.err, a.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Fatalf("agent %s did not come up:\n%s", name, a.logTail())
	return nil
}

// uri is the NBD URI of an agent's disk.
func (a *agentProc) uri(disk string) string { return "nbd+unix:///" + disk + "?socket=" + a.sock }

// cli runs an operator command against the cluster's server and returns its
// standard output.
func (c *cluster) cli(args ...string) (string, error) {
	return c.asr(append(args, "--data", c.srvDir, "--server", c.url())...)
}

// asr runs an asr command with the cluster's environment (cluster.env),
// without the server's address (e.g. one that reads the target itself).
func (c *cluster) asr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return runAsrEnv(ctx, c.env, args...)
}

func runAsr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return runAsrCtx(ctx, args...)
}

// runAsrCtx runs an asr command, killed when ctx is done.
func runAsrCtx(ctx context.Context, args ...string) (string, error) {
	return runAsrEnv(ctx, nil, args...)
}

// runAsrEnv runs an asr command with variables added to the environment.
func runAsrEnv(ctx context.Context, env []string, args ...string) (string, error) {
	cmd := contain(exec.CommandContext(ctx, asrBin, args...))
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("asr %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (c *cluster) mustCLI(args ...string) string {
	c.t.Helper()
	out, err := c.cli(args...)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

// machineStatus is a machine as `asr status --json` shows it.
type machineStatus struct{ api.Machine }

// copying reports whether the machine's disks are known (a machine with
// none yet shows as initial, at 100%) and in their initial copy, at least
// at progress p.
func (st machineStatus) copying(p float64) bool {
	return len(st.Disks) > 0 && st.State == "initial" && st.Progress >= p && st.Progress < 1
}

func (c *cluster) status(name string) machineStatus {
	c.t.Helper()
	out, err := c.cli("status", "--json", "--machine", name)
	if err != nil {
		return machineStatus{}
	}
	var ms []machineStatus
	if err := json.Unmarshal([]byte(out), &ms); err != nil || len(ms) != 1 {
		c.t.Fatalf("status --json: %v: %s", err, out)
	}
	return ms[0]
}

// waitState waits until a machine is in a state. The timeout is a safety
// net for a hung run, at least hungAfter.
func (c *cluster) waitState(name, state string, timeout time.Duration) machineStatus {
	c.t.Helper()
	deadline := time.Now().Add(max(timeout, hungAfter))
	for {
		st := c.status(name)
		if st.State == state {
			return st
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("machine %s: state %+v, want %s\nserver log:\n%s", name, st, state, c.server.logTail())
		}
		if a, ok := c.agents[name]; ok && a.proc != nil && a.exited() {
			c.t.Fatalf("agent %s exited: %v\n%s", name, a.err, a.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitStatus waits until a machine's status satisfies ok. The condition
// must be one that holds once reached (the test holds what would move it
// on); the timeout only ends a hung run.
func (c *cluster) waitStatus(name, what string, ok func(machineStatus) bool) machineStatus {
	c.t.Helper()
	deadline := time.Now().Add(hungAfter)
	for {
		st := c.status(name)
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("machine %s: %+v; waited for: %s\nserver log:\n%s", name, st, what, c.server.logTail())
		}
		if a, ok := c.agents[name]; ok && a.proc != nil && a.exited() {
			c.t.Fatalf("agent %s exited: %v\n%s", name, a.err, a.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitReceived waits until the server has received at least n bytes from
// a machine's agent.
func (c *cluster) waitReceived(name string, n int64) machineStatus {
	c.t.Helper()
	return c.waitStatus(name, fmt.Sprintf("%d bytes received", n), func(st machineStatus) bool { return st.BytesReceived >= n })
}

// tagTimeout is how long the tests let `asr tag --wait` wait for a point:
// a safety net (the CLI's default, 2 min, can pass on a loaded machine with
// a backlog to apply first).
const tagTimeout = "5m"

// tag asks for a point and returns its id (the last line of the output).
func (c *cluster) tag(machine string) string {
	c.t.Helper()
	out := c.mustCLI("tag", "--machine", machine, "--wait", "--timeout", tagTimeout)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	return lines[len(lines)-1]
}

// recoverAndCheck recovers a point through the server and compares each disk
// with the expected sha256.
func (c *cluster) recoverAndCheck(machine, point string, want map[string]string, extra ...string) {
	c.t.Helper()
	out := filepath.Join(c.dir, "recovered", machine+"-"+point)
	if _, err := os.Stat(out); err == nil { // recovered before: asr recover replaces no image
		if out, err = os.MkdirTemp(filepath.Dir(out), machine+"-"+point+"-"); err != nil {
			c.t.Fatal(err)
		}
	}
	args := append([]string{"recover", "--machine", machine, "--point", point, "--out", out}, extra...)
	var err error
	if len(extra) > 0 {
		_, err = c.asr(args...)
	} else {
		_, err = c.cli(args...)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	for disk, sum := range want {
		if got := sha256File(c.t, filepath.Join(out, disk+".img")); got != sum {
			c.t.Fatalf("machine %s point %s disk %s: recovered sha256 %s, source had %s", machine, point, disk, got, sum)
		}
	}
	os.RemoveAll(out)
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, bufio.NewReaderSize(f, 1<<20)); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// makeDisk creates a disk image: a third zero, a third text-like, a third
// random (by 1 MiB stripes), like the benchmark's mixed disk.
func makeDisk(t *testing.T, path string, size int64, seed uint64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, 7))
	buf := make([]byte, 1<<20)
	words := []string{"alpha ", "beta ", "gamma ", "delta ", "replica ", "journal ", "\n"}
	for off, i := int64(0), 0; off < size; off, i = off+int64(len(buf)), i+1 {
		switch i % 3 {
		case 0:
			continue
		case 1:
			for j := 0; j < len(buf); {
				j += copy(buf[j:], words[r.IntN(len(words))])
			}
		case 2:
			for j := 0; j+8 <= len(buf); j += 8 {
				v := r.Uint64()
				for k := 0; k < 8; k++ {
					buf[j+k] = byte(v >> (8 * k))
				}
			}
		}
		n := min(int64(len(buf)), size-off)
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
	}
}

// makeRandomDisk creates a disk of incompressible data, so bytes on the wire
// measure how much of the disk was sent.
func makeRandomDisk(t *testing.T, path string, size int64, seed uint64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := rand.NewChaCha8([32]byte{byte(seed)})
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		r.Read(buf)
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
			t.Fatal(err)
		}
	}
}

// background runs functions in goroutines; wait returns the first error.
type background struct {
	wg  sync.WaitGroup
	mu  sync.Mutex
	err error
}

func (b *background) run(fn func() error) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		if err := fn(); err != nil {
			b.mu.Lock()
			if b.err == nil {
				b.err = err
			}
			b.mu.Unlock()
		}
	}()
}

func (b *background) wait() error { b.wg.Wait(); return b.err }

// runTool runs an external tool and returns its combined output (at most
// the last 256 KiB: a tool whose server was killed may log without end, so
// the output is kept in memory as a bounded tail, never on disk).
func runTool(ctx context.Context, t *testing.T, name string, args ...string) (string, error) {
	if name == "fio" {
		args = append([]string{"--thread"}, args...) // one process, no forked workers
	}
	cmd := contain(exec.CommandContext(ctx, nbdPeerTool(t, name), args...))
	cmd.Dir = t.TempDir()
	out := &tailBuffer{max: 256 << 10}
	cmd.Stdout, cmd.Stderr = out, out
	err := cmd.Run()
	return out.String(), err
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (w *tailBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b = append(w.b, p...)
	if len(w.b) > 2*w.max {
		w.b = append(w.b[:0], w.b[len(w.b)-w.max:]...)
	}
	return len(p), nil
}

func (w *tailBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.b[max(0, len(w.b)-w.max):])
}
