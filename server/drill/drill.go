// Package drill runs verified recovery drills: it boots a recovered
// machine's disks, served over NBD by the server, in QEMU inside a new
// network namespace with no uplink, and checks a boot condition — a line on
// the serial console, a guest TCP port that answers, or both.
//
// The guest's writes go through NBD to whatever the server exports (its
// overlay), so a drill never changes a recovery point.
package drill

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Defaults for zero Options fields.
const (
	DefaultCPUs      = 1
	DefaultMemoryMiB = 512
	DefaultTimeout   = 5 * time.Minute
	DefaultQEMU      = "qemu-system-x86_64"
)

// Accelerators reported in Result.Accel.
const (
	AccelKVM = "kvm"
	AccelTCG = "tcg"
)

// ErrInvalidOptions is wrapped by Boot's error for Options it cannot run.
var ErrInvalidOptions = errors.New("drill: invalid options")

// Disk is one disk of the machine, exported over NBD on a unix socket.
type Disk struct {
	// Name identifies the disk in logs and reasons.
	Name string
	// Socket is the absolute path of the NBD server's unix socket.
	Socket string
	// Export is the NBD export name; empty selects the default export.
	Export string
}

// Options describe one drill boot.
type Options struct {
	// Disks in boot order: the first is the boot disk.
	Disks []Disk
	// CPUs is the guest's CPU count (DefaultCPUs if zero).
	CPUs int
	// MemoryMiB is the guest's memory (DefaultMemoryMiB if zero).
	MemoryMiB int
	// BootCheck, if set, must match a line of the serial console (or the
	// unfinished last line, such as a "login: " prompt).
	BootCheck *regexp.Regexp
	// TCPPort, if set, is a guest TCP port that must accept a connection.
	// At least one of BootCheck and TCPPort is required.
	TCPPort int
	// Timeout bounds the boot from QEMU's start (DefaultTimeout if zero).
	Timeout time.Duration
	// LogPath, if set, receives the serial console output (truncated first).
	LogPath string
	// QEMU is the emulator binary (DefaultQEMU if empty).
	QEMU string
	// Accel forces AccelKVM or AccelTCG; empty picks KVM when /dev/kvm is
	// usable and TCG otherwise.
	Accel string
	// Logger receives progress; slog.Default() if nil.
	Logger *slog.Logger
}

// Result is a drill's verdict.
type Result struct {
	// Passed is true when every requested condition was met in time.
	Passed bool
	// BootTime is from QEMU's start until the last condition was met
	// (zero if not Passed).
	BootTime time.Duration
	// Reason says why the drill failed: which conditions were not met,
	// and how the boot ended, with the last console lines.
	Reason string
	// Accel is AccelKVM or AccelTCG.
	Accel string
	// ConsoleTail holds the last lines of the serial console.
	ConsoleTail string
}

// consoleTailLines is how many console lines Result.ConsoleTail keeps.
const consoleTailLines = 25

func (o Options) withDefaults() (Options, error) {
	bad := func(format string, args ...any) (Options, error) {
		return o, fmt.Errorf("%w: %s", ErrInvalidOptions, fmt.Sprintf(format, args...))
	}
	if len(o.Disks) == 0 {
		return bad("no disks")
	}
	for i, d := range o.Disks {
		if d.Name == "" {
			o.Disks[i].Name = fmt.Sprintf("disk%d", i)
		}
		if !filepath.IsAbs(d.Socket) {
			return bad("disk %d (%s): socket %q is not an absolute path", i, d.Name, d.Socket)
		}
	}
	if o.BootCheck == nil && o.TCPPort == 0 {
		return bad("neither a boot check nor a TCP port to check")
	}
	if o.TCPPort < 0 || o.TCPPort > 65535 {
		return bad("TCP port %d", o.TCPPort)
	}
	if o.CPUs < 0 || o.MemoryMiB < 0 || o.Timeout < 0 {
		return bad("negative CPUs, memory or timeout")
	}
	if o.CPUs == 0 {
		o.CPUs = DefaultCPUs
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = DefaultMemoryMiB
	}
	if o.Timeout == 0 {
		o.Timeout = DefaultTimeout
	}
	if o.QEMU == "" {
		o.QEMU = DefaultQEMU
	}
	switch o.Accel {
	case "", AccelKVM, AccelTCG:
	default:
		return bad("accel %q: want %q or %q", o.Accel, AccelKVM, AccelTCG)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, nil
}

// conditions tracks which checks are still pending and when the last one
// was met.
type conditions struct {
	bootCheck *regexp.Regexp
	tcpPort   int
	bootAt    time.Time // zero until met
	tcpAt     time.Time
}

func (c *conditions) done() bool {
	return (c.bootCheck == nil || !c.bootAt.IsZero()) && (c.tcpPort == 0 || !c.tcpAt.IsZero())
}

// metAt is when the last required condition was met.
func (c *conditions) metAt() time.Time {
	if c.bootAt.After(c.tcpAt) {
		return c.bootAt
	}
	return c.tcpAt
}

// pending says which conditions were not met, for Reason.
func (c *conditions) pending() string {
	var p []string
	if c.bootCheck != nil && c.bootAt.IsZero() {
		p = append(p, fmt.Sprintf("console never matched %q", c.bootCheck.String()))
	}
	if c.tcpPort != 0 && c.tcpAt.IsZero() {
		p = append(p, fmt.Sprintf("guest TCP port %d never answered", c.tcpPort))
	}
	return strings.Join(p, "; ")
}

// failReason builds Result.Reason for a boot that ended before every
// condition was met.
func failReason(how string, c *conditions, tail, qemuErr string) string {
	var b strings.Builder
	b.WriteString(how)
	if p := c.pending(); p != "" {
		b.WriteString(": ")
		b.WriteString(p)
	}
	if qemuErr = strings.TrimSpace(qemuErr); qemuErr != "" {
		b.WriteString("\nqemu: ")
		b.WriteString(qemuErr)
	}
	if tail = strings.TrimSpace(tail); tail != "" {
		b.WriteString("\nlast console lines:\n")
		b.WriteString(tail)
	} else {
		b.WriteString("\nno console output")
	}
	return b.String()
}

// startHook, if set (by tests), is called with QEMU's pid once it started.
var startHook func(pid int)

// Boot boots the disks in QEMU in a new network namespace and waits until
// every requested condition is met, the timeout passes, QEMU exits or ctx
// is done. QEMU is always killed and reaped before Boot returns.
//
// The error is non-nil only when the drill could not run (invalid options,
// QEMU missing, no permission for a network namespace) or ctx was done; a
// guest that does not boot is a Result with Passed false and a Reason.
func Boot(ctx context.Context, o Options) (Result, error) {
	o, err := o.withDefaults()
	if err != nil {
		return Result{}, err
	}
	accel := o.Accel
	if accel == "" {
		accel = detectAccel()
	}
	res := Result{Accel: accel}
	log := o.Logger.With("component", "drill")

	qemuPath, err := exec.LookPath(o.QEMU)
	if err != nil {
		return res, fmt.Errorf("drill: qemu: %w", err)
	}
	for _, d := range o.Disks {
		if _, err := os.Stat(d.Socket); err != nil {
			return res, fmt.Errorf("drill: disk %s: %w", d.Name, err)
		}
	}
	dir, err := os.MkdirTemp("", "asr-drill-")
	if err != nil {
		return res, fmt.Errorf("drill: %w", err)
	}
	defer os.RemoveAll(dir)
	qmpPath := filepath.Join(dir, "qmp.sock")

	var logFile *os.File
	if o.LogPath != "" {
		if logFile, err = os.Create(o.LogPath); err != nil {
			return res, fmt.Errorf("drill: console log: %w", err)
		}
		defer logFile.Close()
	}

	args, err := qemuArgs(o, accel, qmpPath)
	if err != nil {
		return res, err
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return res, fmt.Errorf("drill: %w", err)
	}
	defer pr.Close()
	stderr := &tailBuffer{max: 4096}
	cmd := exec.Command(qemuPath, args...)
	cmd.Stdout = pw
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET, // the isolated test network: no uplink
		Setpgid:    true,
		Pdeathsig:  syscall.SIGKILL,
	}
	// Pdeathsig fires when the thread that forked QEMU exits, and the TCP
	// check discards threads (see dialInNetns): hold this one until QEMU
	// is reaped so that it cannot be one of them.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	start := time.Now()
	err = cmd.Start()
	pw.Close()
	if err != nil {
		if errors.Is(err, syscall.EPERM) {
			return res, fmt.Errorf("drill: start qemu in a new network namespace (needs root or CAP_SYS_ADMIN): %w", err)
		}
		return res, fmt.Errorf("drill: start qemu: %w", err)
	}
	pid := cmd.Process.Pid
	log.Info("drill started", "pid", pid, "accel", accel, "disks", len(o.Disks))
	if startHook != nil {
		startHook(pid)
	}

	checkCtx, cancelChecks := context.WithCancel(ctx)
	var wg sync.WaitGroup
	exited := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		exited <- cmd.Wait()
	}()
	reaped := false
	defer func() {
		cancelChecks()
		if !reaped {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
		}
		wg.Wait()
	}()

	con := newConsole(o.BootCheck, consoleTailLines)
	bootSeen := make(chan time.Time, 1)
	consoleDone := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(consoleDone)
		con.scan(pr, logFile, func() { bootSeen <- time.Now() })
	}()

	tcpSeen := make(chan time.Time, 1)
	if o.TCPPort != 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if at, ok := waitTCP(checkCtx, pid, qmpPath, o.TCPPort, log); ok {
				tcpSeen <- at
			}
		}()
	}

	timer := time.NewTimer(o.Timeout - time.Since(start))
	defer timer.Stop()
	cond := &conditions{bootCheck: o.BootCheck, tcpPort: o.TCPPort}
	var how string
	var runErr error
	for !cond.done() && how == "" {
		select {
		case at := <-bootSeen:
			cond.bootAt = at
		case at := <-tcpSeen:
			cond.tcpAt = at
		case err := <-exited:
			reaped = true
			// The console may still hold the lines that explain the exit.
			<-consoleDone
			how = fmt.Sprintf("qemu exited (%v) after %s", exitStatus(err), time.Since(start).Round(time.Millisecond))
			// A condition may have been met just before the exit.
			select {
			case at := <-bootSeen:
				cond.bootAt = at
			default:
			}
		case <-timer.C:
			how = fmt.Sprintf("timed out after %s", o.Timeout)
		case <-ctx.Done():
			how = "canceled"
			runErr = ctx.Err()
		}
	}
	if cond.done() && how == "" {
		res.Passed = true
		res.BootTime = cond.metAt().Sub(start)
	}
	if !reaped {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		<-exited
		reaped = true
		<-consoleDone
	}
	res.ConsoleTail = con.tail()
	if !res.Passed {
		res.Reason = failReason(how, cond, res.ConsoleTail, stderr.String())
		log.Info("drill failed", "pid", pid, "reason", how, "pending", cond.pending())
	} else {
		log.Info("drill passed", "pid", pid, "boot_time", res.BootTime)
	}
	return res, runErr
}

func exitStatus(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
