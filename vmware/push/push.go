// Package push installs the asr agent on a Linux guest over SSH, as Azure
// Site Recovery's push installation does for its Mobility service: it
// connects with a key, checks the host key, checks that the guest can take
// the agent (root or passwordless sudo, architecture, free space, disks, the
// BIOS UUID of the VM it should be), copies the binary over SFTP and checks
// its SHA-256, checks that the guest reaches the server, writes the agent's
// configuration and starts it as a systemd service (or, without systemd, as
// a detached process with a pid file). A failure before the service step
// leaves nothing behind; a second Install upgrades in place.
//
// What is installed, in InstallDir (default /opt/asr):
//
//	asr          the binary (asr.new while it is being copied)
//	passphrase   the vault passphrase the agent registers with, mode 0600
//	agent.sh     the agent's command line (exec asr agent ...)
//	state/       the agent's state directory, mode 0700
//	agent.pid, agent.log  without systemd: the process and its output
//
// and, with systemd, /etc/systemd/system/asr-agent.service.
//
// Waiting for the agent to register is the caller's business.
package push

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/pkg/sftp"

	"github.com/asrdr/asr/replication"
)

// Defaults of Options.
const (
	DefaultInstallDir = "/opt/asr"
	DefaultUUIDPath   = "/sys/class/dmi/id/product_uuid"
)

// SpaceMargin is the free space Install wants in the install directory's
// file system beyond the binary's size: room for the configuration, the
// agent's log and state while it starts.
const SpaceMargin = 16 << 20

// ServiceName is the systemd unit Install writes, and UnitPath where.
const (
	ServiceName = "asr-agent"
	UnitPath    = "/etc/systemd/system/asr-agent.service"
)

// cleanupTimeout bounds the removal of a failed install's leftovers, which
// runs even when the caller's context has ended.
const cleanupTimeout = 30 * time.Second

// Target is a guest's SSH server and how to trust and log into it.
type Target struct {
	Addr string // host:port of the guest's sshd
	User string // login user: root, or one with passwordless sudo
	// Key is the PEM private key to log in with (unencrypted). It is never
	// logged nor put into an error.
	Key []byte
	// KnownHosts is known_hosts content the guest's host key must match
	// (nil: none).
	KnownHosts []byte
	// AcceptHostKey is the "SHA256:..." fingerprint the operator confirmed for
	// a guest not yet known. A guest presenting exactly that key is trusted
	// and its key recorded in RecordFile.
	AcceptHostKey string
	// RecordFile is a known_hosts file (the server's, e.g. DATA/known_hosts)
	// that host keys are looked up in and accepted keys recorded into.
	RecordFile string
}

// Disk is a disk the agent protects.
type Disk struct {
	Name   string // the disk's name in the vault
	Device string // block device or image file on the guest
	Scan   bool   // copied by periodic scans (mode=scan) rather than served over NBD
}

// Options is what Install needs.
type Options struct {
	Target
	InstallDir string   // default DefaultInstallDir; an absolute path of letters, digits, '.', '_', '-'
	Binary     string   // local path of the asr binary to copy (the server passes os.Executable())
	Name       string   // machine name the agent registers as
	ServerURL  string   // control URL the agent registers with, https://HOST:PORT
	Reach      []string // host:port the guest must reach: the server's control and data listeners
	// Passphrase is the vault passphrase, written to INSTALLDIR/passphrase
	// (mode 0600). Never logged nor put into an error.
	Passphrase []byte
	Disks      []Disk
	NBD        string // the agent's --nbd listen address (default unix:INSTALLDIR/nbd.sock)
	// ExpectUUID is the VM's BIOS UUID; the guest's UUIDPath must hold it
	// (letter case aside), so that an address leading to the wrong machine
	// is found out before anything is installed.
	ExpectUUID string
	// SkipUUIDCheck is the operator's word that the guest is the VM although
	// its UUID cannot be read or differs; the agent then gets
	// --bios-uuid ExpectUUID.
	SkipUUIDCheck bool
	UUIDPath      string   // default DefaultUUIDPath
	ExtraArgs     []string // more arguments for asr agent
}

// Step is the progress of one step of Install or Uninstall.
type Step struct {
	Name   string // one of the Step* names
	State  string // StateRunning, StateDone, StateFailed or StateSkipped
	Detail string // what was found or done, or why it failed
	// Done and Total count the bytes of the copy step.
	Done, Total int64
}

// Step names, in the order Install runs them (Uninstall: StepConnect,
// StepStop, StepRemove).
const (
	StepConnect       = "connect"
	StepPrerequisites = "prerequisites"
	StepCopy          = "copy"
	StepReachability  = "reachability"
	StepConfigure     = "configure"
	StepService       = "service"
	StepStop          = "stop"
	StepRemove        = "remove"
)

// Step states.
const (
	StateRunning = "running"
	StateDone    = "done"
	StateFailed  = "failed"
	StateSkipped = "skipped"
)

var installDirRE = regexp.MustCompile(`^(/[A-Za-z0-9._-]+)+$`)

// validInstallDir checks dir: it is removed whole by Uninstall and by a
// failed first Install, and appears in a systemd unit, so it is restricted
// to a plain absolute path.
func validInstallDir(dir string) error {
	if !installDirRE.MatchString(dir) || strings.Contains(dir+"/", "/../") || strings.Contains(dir+"/", "/./") {
		return fmt.Errorf("install directory %q: want an absolute path of letters, digits, '.', '_' and '-', other than /", dir)
	}
	return nil
}

func (t Target) validate() error {
	if _, _, err := net.SplitHostPort(t.Addr); err != nil {
		return fmt.Errorf("ssh address %q: want HOST:PORT", t.Addr)
	}
	if t.User == "" {
		return fmt.Errorf("push %s: no ssh user", t.Addr)
	}
	if len(t.Key) == 0 {
		return fmt.Errorf("push %s: no ssh private key", t.Addr)
	}
	if t.AcceptHostKey != "" && !strings.HasPrefix(t.AcceptHostKey, "SHA256:") {
		return fmt.Errorf("push %s: accepted host key %q: want a SHA256:... fingerprint as ssh-keygen -l shows", t.Addr, t.AcceptHostKey)
	}
	return nil
}

// withDefaults fills in the defaults and checks o.
func (o Options) withDefaults() (Options, error) {
	if err := o.Target.validate(); err != nil {
		return o, err
	}
	if o.InstallDir == "" {
		o.InstallDir = DefaultInstallDir
	}
	if err := validInstallDir(o.InstallDir); err != nil {
		return o, err
	}
	if o.NBD == "" {
		o.NBD = "unix:" + o.InstallDir + "/nbd.sock"
	}
	if o.UUIDPath == "" {
		o.UUIDPath = DefaultUUIDPath
	}
	if o.Binary == "" {
		return o, errors.New("push: no binary to copy")
	}
	if o.Name == "" || strings.ContainsFunc(o.Name, func(r rune) bool { return r < ' ' || r == 0x7f }) {
		return o, fmt.Errorf("push: machine name %q: want a non-empty name without control characters", o.Name)
	}
	u, err := url.Parse(o.ServerURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return o, fmt.Errorf("push: server URL %q: want https://HOST:PORT", o.ServerURL)
	}
	for _, a := range o.Reach {
		h, p, err := net.SplitHostPort(a)
		if n, perr := strconv.Atoi(p); err != nil || h == "" || perr != nil || n < 1 || n > 65535 {
			return o, fmt.Errorf("push: address to reach %q: want HOST:PORT", a)
		}
	}
	if len(o.Passphrase) == 0 {
		return o, errors.New("push: no vault passphrase")
	}
	if len(o.Disks) == 0 {
		return o, errors.New("push: no disk to protect")
	}
	seen := map[string]bool{}
	for _, d := range o.Disks {
		if !replication.ValidDiskName(d.Name) {
			return o, fmt.Errorf("push: disk name %q: use letters, digits, '.', '_' and '-' (at most 64)", d.Name)
		}
		if seen[d.Name] {
			return o, fmt.Errorf("push: disk %s given twice", d.Name)
		}
		seen[d.Name] = true
		if !strings.HasPrefix(d.Device, "/") || strings.ContainsAny(d.Device, ",\n") {
			return o, fmt.Errorf("push: disk %s: device %q: want an absolute path without ',' or newlines", d.Name, d.Device)
		}
	}
	id, err := uuid.Parse(o.ExpectUUID)
	if err != nil || len(o.ExpectUUID) != 36 {
		return o, fmt.Errorf("push: the VM's BIOS UUID %q: want a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)", o.ExpectUUID)
	}
	o.ExpectUUID = id.String() // lower case, as compared and as --bios-uuid gets it
	if !strings.HasPrefix(o.UUIDPath, "/") {
		return o, fmt.Errorf("push: UUID path %q: want an absolute path", o.UUIDPath)
	}
	return o, nil
}

// agentArgs is the agent's command line after the binary's path.
func (o Options) agentArgs() []string {
	d := o.InstallDir
	args := []string{"agent",
		"--server", o.ServerURL,
		"--passphrase-file", d + "/passphrase",
		"--state", d + "/state",
		"--name", o.Name,
		"--nbd", o.NBD,
	}
	for _, k := range o.Disks {
		spec := k.Name + "=" + k.Device
		if k.Scan {
			spec += ",mode=scan"
		}
		args = append(args, "--disk", spec)
	}
	if o.SkipUUIDCheck {
		args = append(args, "--bios-uuid", o.ExpectUUID)
	}
	return append(args, o.ExtraArgs...)
}

// agentScript is INSTALLDIR/agent.sh: the agent's command line, run by the
// systemd unit or by the detached start.
func (o Options) agentScript() string {
	return "#!/bin/sh\n# Written by asr's push install; rewritten by the next one.\nexec " +
		shellJoin(append([]string{o.InstallDir + "/asr"}, o.agentArgs()...)...) + "\n"
}

// unit is the systemd unit of the agent installed in dir.
func unit(dir string) string {
	return `[Unit]
Description=asr replication agent
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=` + dir + `/agent.sh
Restart=always
RestartSec=5
TimeoutStopSec=60

[Install]
WantedBy=multi-user.target
`
}

// guestArch is what uname -m prints on a guest that runs this build's
// architecture.
func guestArch(goarch string) []string {
	switch goarch {
	case "amd64":
		return []string{"x86_64"}
	case "arm64":
		return []string{"aarch64", "arm64"}
	case "386":
		return []string{"i386", "i486", "i586", "i686"}
	case "arm":
		return []string{"armv6l", "armv7l", "armv8l"}
	}
	return []string{goarch}
}

// steps reports the steps of one run.
type steps struct{ progress func(Step) }

// errSkip makes a step end as skipped, its message the detail.
type errSkip string

func (e errSkip) Error() string { return string(e) }

// run runs one step: fn returns the step's detail, or an error (errSkip:
// skipped).
func (s steps) run(name string, fn func(report func(done, total int64)) (string, error)) error {
	s.progress(Step{Name: name, State: StateRunning})
	last := Step{Name: name, State: StateRunning}
	detail, err := fn(func(done, total int64) {
		last.Done, last.Total = done, total
		s.progress(last)
	})
	end := Step{Name: name, State: StateDone, Detail: detail, Done: last.Done, Total: last.Total}
	var skip errSkip
	switch {
	case errors.As(err, &skip):
		end.State, end.Detail, err = StateSkipped, string(skip), nil
	case err != nil:
		end.State, end.Detail = StateFailed, err.Error()
	}
	s.progress(end)
	return err
}

// Install installs (or upgrades) the agent on the guest at o.Addr and starts
// it. progress (nil: none) is called as each step starts, ends and, for the
// copy, advances. A failure before the service step removes what this run
// created; on a re-run over an existing install, the running agent stays
// as it was until the service step stops, replaces and restarts it.
func Install(ctx context.Context, o Options, progress func(Step)) (err error) {
	o, err = o.withDefaults()
	if err != nil {
		return err
	}
	if progress == nil {
		progress = func(Step) {}
	}
	bin, err := os.Open(o.Binary)
	if err != nil {
		return fmt.Errorf("push: the binary to copy: %w", err)
	}
	defer bin.Close()
	fi, err := bin.Stat()
	if err != nil {
		return fmt.Errorf("push: the binary to copy: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("push: the binary to copy %s is not a regular file", o.Binary)
	}
	size := fi.Size()
	st := steps{progress}
	host, dir := o.Addr, o.InstallDir

	var r *remote
	if err := st.run(StepConnect, func(func(int64, int64)) (string, error) {
		var err error
		r, err = dial(ctx, o.Target)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("logged in as %s at %s", o.User, host), nil
	}); err != nil {
		return err
	}
	defer r.close()

	if err := st.run(StepPrerequisites, func(func(int64, int64)) (string, error) {
		return r.prerequisites(ctx, o, size)
	}); err != nil {
		return err
	}

	// From here on, a failure removes what this run made.
	created := false
	serviceReached := false
	defer func() {
		if err == nil || serviceReached {
			return
		}
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
		defer cancel()
		script := "rm -f " + shellJoin(dir+"/asr.new", dir+"/passphrase.new", dir+"/agent.sh.new")
		if created {
			script = "rm -rf " + shellQuote(dir)
		}
		if res, cerr := r.sh(cctx, script, nil); cerr != nil || res.code != 0 {
			err = fmt.Errorf("%w (and removing what this run made in %s failed: %v %s)", err, dir, cerr, res.msg())
		}
	}()

	if err := st.run(StepCopy, func(report func(int64, int64)) (string, error) {
		var detail string
		var err error
		created, detail, err = r.copyBinary(ctx, dir, bin, size, report)
		return detail, err
	}); err != nil {
		return err
	}

	if err := st.run(StepReachability, func(func(int64, int64)) (string, error) {
		return r.reachability(ctx, dir, o.Reach)
	}); err != nil {
		return err
	}

	if err := st.run(StepConfigure, func(func(int64, int64)) (string, error) {
		return r.configure(ctx, o)
	}); err != nil {
		return err
	}

	serviceReached = true
	return st.run(StepService, func(func(int64, int64)) (string, error) {
		return r.service(ctx, dir)
	})
}

// prerequisites checks that the agent can be installed: the user can act
// as root, the architecture, free space, the disks and the BIOS UUID.
func (r *remote) prerequisites(ctx context.Context, o Options, size int64) (string, error) {
	host := r.host
	if err := r.becomeRoot(ctx, o.User); err != nil {
		return "", err
	}
	notes := []string{"root"}
	if r.sudo {
		notes = []string{"root through sudo"}
	}

	res, err := r.exec(ctx, "uname -m", nil)
	if err != nil {
		return "", err
	}
	arch := lastLine(res.out())
	want := guestArch(runtime.GOARCH)
	ok := false
	for _, w := range want {
		ok = ok || arch == w
	}
	if res.code != 0 || !ok {
		return "", fmt.Errorf("push %s: %w: the guest is %q, the binary is for %s (%s): install a build for the guest's architecture",
			host, ErrArch, arch, runtime.GOARCH, strings.Join(want, " or "))
	}
	notes = append(notes, arch)

	// df on the nearest existing ancestor of the install directory: the
	// file system the binary will land on.
	res, err = r.sh(ctx, `d=`+shellQuote(o.InstallDir)+`
while [ ! -e "$d" ]; do d=$(dirname "$d"); done
df -Pk "$d"`, nil)
	if err != nil {
		return "", err
	}
	avail, perr := parseDF(res.stdout)
	if res.code != 0 || perr != nil {
		return "", fmt.Errorf("push %s: free space in %s: df -Pk failed: %s", host, o.InstallDir, firstNonEmpty(res.msg(), fmt.Sprint(perr)))
	}
	if need := size + SpaceMargin; avail < need {
		return "", fmt.Errorf("push %s: %w in %s: %d KiB free, %d KiB needed (the binary and %d MiB): free some space or choose another install directory",
			host, ErrNoSpace, o.InstallDir, avail>>10, need>>10, SpaceMargin>>20)
	}
	notes = append(notes, fmt.Sprintf("%d MiB free", avail>>20))

	var sb strings.Builder
	for _, d := range o.Disks {
		q := shellQuote(d.Device)
		fmt.Fprintf(&sb, "if [ ! -e %s ]; then echo missing %s; elif [ ! -b %s ] && [ ! -f %s ]; then echo badtype %s; fi\n", q, q, q, q, q)
	}
	res, err = r.sh(ctx, sb.String(), nil)
	if err != nil {
		return "", err
	}
	if res.code != 0 {
		return "", fmt.Errorf("push %s: checking the disks failed: %s", host, res.msg())
	}
	if out := res.out(); strings.Contains(out, "missing ") || strings.Contains(out, "badtype ") {
		var missing, bad []string
		for _, line := range strings.Split(out, "\n") {
			switch kind, dev, _ := strings.Cut(line, " "); kind {
			case "missing":
				missing = append(missing, dev)
			case "badtype":
				bad = append(bad, dev)
			}
		}
		var parts []string
		if len(missing) > 0 {
			parts = append(parts, "absent: "+strings.Join(missing, ", "))
		}
		if len(bad) > 0 {
			parts = append(parts, "neither a block device nor a regular file: "+strings.Join(bad, ", "))
		}
		return "", fmt.Errorf("push %s: %w: %s: check the device paths of the disks to protect", host, ErrDiskMissing, strings.Join(parts, "; "))
	}
	notes = append(notes, fmt.Sprintf("%d disks present", len(o.Disks)))

	res, err = r.sh(ctx, "cat "+shellQuote(o.UUIDPath), nil)
	if err != nil {
		return "", err
	}
	got := strings.ToLower(lastLine(res.out()))
	want1 := strings.ToLower(o.ExpectUUID)
	switch {
	case got == want1 && res.code == 0:
		notes = append(notes, "BIOS UUID "+want1)
	case o.SkipUUIDCheck:
		notes = append(notes, "BIOS UUID not checked (the operator's word), the agent gets --bios-uuid")
	case res.code != 0 || got == "":
		return "", fmt.Errorf("push %s: %w: cannot read %s (%s): if this guest is certainly the VM %s, use --skip-uuid-check",
			host, ErrUUIDUnreadable, o.UUIDPath, firstNonEmpty(res.msg(), "empty"), o.ExpectUUID)
	default:
		if len(got) > 64 {
			got = got[:64] + "..."
		}
		return "", fmt.Errorf("push %s: %w: the guest's BIOS UUID is %q, the VM's is %s: the address leads to another machine; check the VM's IP address",
			host, ErrUUIDMismatch, got, want1)
	}
	return strings.Join(notes, ", "), nil
}

// becomeRoot finds out whether the login user is root and, if not, whether
// it may use sudo without a password; commands then run through sudo -n.
func (r *remote) becomeRoot(ctx context.Context, user string) error {
	res, err := r.exec(ctx, "id -u", nil)
	if err != nil {
		return err
	}
	if res.code != 0 {
		return fmt.Errorf("push %s: id -u failed: %s", r.host, res.msg())
	}
	// The last line: a chatty shell start-up file may print before it.
	uid := lastLine(res.out())
	if uid == "0" {
		return nil
	}
	r.uid = uid
	res, err = r.exec(ctx, "sudo -n true", nil)
	if err != nil {
		return err
	}
	if res.code != 0 {
		return fmt.Errorf("push %s: %w: user %s is not root and sudo -n true failed (%s): log in as root or allow %s passwordless sudo",
			r.host, ErrNotRoot, user, firstNonEmpty(res.msg(), fmt.Sprintf("exit status %d", res.code)), user)
	}
	r.sudo = true
	return nil
}

// parseDF reads the available KiB from df -Pk output, in bytes.
func parseDF(out string) (int64, error) {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) < 2 {
		return 0, errors.New("unexpected df output")
	}
	f := strings.Fields(lines[len(lines)-1])
	if len(f) < 4 {
		return 0, errors.New("unexpected df output")
	}
	kb, err := strconv.ParseInt(f[3], 10, 64)
	if err != nil || kb < 0 {
		return 0, errors.New("unexpected df output")
	}
	return kb << 10, nil
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// copyBinary copies bin to dir/asr.new over SFTP and checks its SHA-256 on
// the guest. created reports whether this run made dir.
func (r *remote) copyBinary(ctx context.Context, dir string, bin io.Reader, size int64, report func(int64, int64)) (created bool, detail string, err error) {
	staging := dir + "/asr.new"
	chown := ""
	if r.sudo {
		// The login user writes the staging file over SFTP; root owns it after.
		chown = "chown " + shellQuote(r.uid) + " " + shellQuote(staging) + "\n"
	}
	res, err := r.sh(ctx, `set -e
d=`+shellQuote(dir)+`
if [ -d "$d" ]; then echo existed; else mkdir -p "$d"; echo created; chmod 0755 "$d"; fi
rm -f "$d/asr.new"
(umask 077; : > "$d/asr.new")
`+chown, nil)
	created = strings.Contains(res.stdout, "created")
	if err != nil {
		return created, "", err
	}
	if res.code != 0 {
		return created, "", fmt.Errorf("push %s: making %s failed: %s", r.host, dir, res.msg())
	}

	sc, err := sftp.NewClient(r.client, sftp.UseConcurrentWrites(true))
	if err != nil {
		return created, "", fmt.Errorf("push %s: %w: starting SFTP: %v (the guest's sshd needs the sftp subsystem)", r.host, ErrConnect, err)
	}
	stop := context.AfterFunc(ctx, func() { sc.Close() })
	defer func() {
		stop()
		sc.Close()
	}()
	f, err := sc.OpenFile(staging, os.O_WRONLY|os.O_TRUNC)
	if err != nil {
		return created, "", fmt.Errorf("push %s: open %s over SFTP: %v", r.host, staging, err)
	}
	h := sha256.New()
	pr := &progressReader{r: io.TeeReader(bin, h), size: size, report: report}
	report(0, size)
	n, err := f.ReadFromWithConcurrency(pr, 0)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && n != size {
		err = fmt.Errorf("copied %d bytes of %d", n, size)
	}
	if err != nil {
		if cerr := ctx.Err(); cerr != nil {
			return created, "", cerr
		}
		return created, "", fmt.Errorf("push %s: copying the binary to %s: %v", r.host, staging, err)
	}
	report(n, size)
	sum := hex.EncodeToString(h.Sum(nil))

	res, err = r.sh(ctx, "sha256sum "+shellQuote(staging)+" && chown 0:0 "+shellQuote(staging)+" && chmod 0755 "+shellQuote(staging), nil)
	if err != nil {
		return created, "", err
	}
	got, _, _ := strings.Cut(lastLine(res.out()), " ")
	if res.code != 0 || got != sum {
		return created, "", fmt.Errorf("push %s: the copied binary's SHA-256 is %q, want %s (%s): the copy was damaged; try again",
			r.host, got, sum, res.msg())
	}
	return created, fmt.Sprintf("%d bytes to %s, sha256 %s", n, staging, sum), nil
}

// progressReader reports the bytes read through it, at most every MiB. Its
// Size lets SFTP write concurrently.
type progressReader struct {
	r          io.Reader
	size, done int64
	last       int64
	report     func(int64, int64)
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.done += int64(n)
	if p.done-p.last >= 1<<20 {
		p.last = p.done
		p.report(p.done, p.size)
	}
	return n, err
}

func (p *progressReader) Size() int64 { return p.size }

// reachability runs the copied binary's probe-tcp on the guest (see
// ProbeMain) for every address in reach.
func (r *remote) reachability(ctx context.Context, dir string, reach []string) (string, error) {
	if len(reach) == 0 {
		return "", errSkip("no address to check")
	}
	res, err := r.sh(ctx, shellJoin(append([]string{dir + "/asr.new", ProbeCommand}, reach...)...), nil)
	if err != nil {
		return "", err
	}
	var failed []string
	okCount := 0
	for _, line := range strings.Split(res.out(), "\n") {
		switch {
		case strings.HasPrefix(line, "ok "):
			okCount++
		case strings.HasPrefix(line, "fail "):
			failed = append(failed, strings.TrimPrefix(line, "fail "))
		}
	}
	if len(failed) > 0 {
		return "", fmt.Errorf("push %s: %w: %s: open the guest's firewall and routes to the server's control and data ports",
			r.host, ErrUnreachable, strings.Join(failed, "; "))
	}
	if res.code != 0 || okCount != len(reach) {
		return "", fmt.Errorf("push %s: the reachability probe (%s %s) failed (exit status %d): %s: is the binary an asr with the %s command?",
			r.host, dir+"/asr.new", ProbeCommand, res.code, res.msg(), ProbeCommand)
	}
	return "reached " + strings.Join(reach, ", "), nil
}

// configure writes the passphrase, the agent's command line and the state
// directory. The files are written as .new and put in place by the service
// step, so that a failure before it leaves a previous install as it was.
func (r *remote) configure(ctx context.Context, o Options) (string, error) {
	d := shellQuote(o.InstallDir)
	res, err := r.sh(ctx, `set -e
umask 077
rm -f `+d+`/passphrase.new
cat > `+d+`/passphrase.new
chmod 0600 `+d+`/passphrase.new`, o.Passphrase)
	if err != nil {
		return "", err
	}
	if res.code != 0 {
		return "", fmt.Errorf("push %s: writing the passphrase file failed: %s", r.host, res.msg())
	}
	res, err = r.sh(ctx, `set -e
umask 077
cat > `+d+`/agent.sh.new
chmod 0700 `+d+`/agent.sh.new
mkdir -p `+d+`/state
chmod 0700 `+d+`/state`, []byte(o.agentScript()))
	if err != nil {
		return "", err
	}
	if res.code != 0 {
		return "", fmt.Errorf("push %s: writing the agent's configuration failed: %s", r.host, res.msg())
	}
	return "passphrase, agent.sh and state/ in " + o.InstallDir, nil
}

// shellLib holds the shell functions the service scripts share: whether a
// pid is a live agent of this install, and stopping the one in agent.pid.
// $d is the install directory.
const shellLib = `
alive() {
	[ -r "/proc/$1/stat" ] || return 1
	s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
	[ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]
}
ours() {
	[ "$(tr '\0' '\n' < "/proc/$1/cmdline" 2>/dev/null | head -n 1)" = "$d/asr" ]
}
stop_pid() {
	[ -s "$d/agent.pid" ] || { rm -f "$d/agent.pid"; return 0; }
	pid=$(cat "$d/agent.pid")
	case "$pid" in ''|*[!0-9]*) rm -f "$d/agent.pid"; return 0;; esac
	if alive "$pid" && ours "$pid"; then
		kill -TERM "$pid" 2>/dev/null || true
		i=0
		while alive "$pid"; do
			i=$((i+1))
			if [ "$i" -eq 600 ]; then kill -KILL "$pid" 2>/dev/null || true; fi
			if [ "$i" -ge 900 ]; then echo "agent $pid does not stop" >&2; return 1; fi
			sleep 0.1
		done
		echo "stopped $pid"
	fi
	rm -f "$d/agent.pid"
}
systemd=
[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && systemd=1
`

// service stops a running agent, puts the new binary and configuration in
// place and starts the agent: as a systemd service when systemd is the
// guest's init, otherwise detached (setsid) with a pid file.
func (r *remote) service(ctx context.Context, dir string) (string, error) {
	res, err := r.sh(ctx, `set -e
d=`+shellQuote(dir)+shellLib+`
if [ -n "$systemd" ] && [ -f `+UnitPath+` ]; then systemctl stop `+ServiceName+` 2>/dev/null || true; fi
stop_pid
mv -f "$d/asr.new" "$d/asr"
mv -f "$d/passphrase.new" "$d/passphrase"
mv -f "$d/agent.sh.new" "$d/agent.sh"
if [ -n "$systemd" ]; then
	cat > `+UnitPath+`.new
	mv -f `+UnitPath+`.new `+UnitPath+`
	systemctl daemon-reload
	systemctl enable `+ServiceName+` 2>&1
	systemctl restart `+ServiceName+`
	echo "started systemd unit `+ServiceName+`"
else
	cat > /dev/null
	setsid "$d/agent.sh" < /dev/null >> "$d/agent.log" 2>&1 &
	echo $! > "$d/agent.pid"
	echo "started pid $!"
fi`, []byte(unit(dir)))
	if err != nil {
		return "", err
	}
	if res.code != 0 {
		return "", fmt.Errorf("push %s: starting the agent failed: %s", r.host, res.msg())
	}
	return lastLine(res.out()), nil
}

func lastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// Uninstall stops the agent installed in installDir (default
// DefaultInstallDir) on the guest and removes the directory, and the
// systemd unit if it is this install's. A guest without the directory is
// not an error; a directory holding no agent is (ErrNotInstalled), so that
// a mistyped path is not removed.
func Uninstall(ctx context.Context, t Target, installDir string, progress func(Step)) error {
	if err := t.validate(); err != nil {
		return err
	}
	if installDir == "" {
		installDir = DefaultInstallDir
	}
	if err := validInstallDir(installDir); err != nil {
		return err
	}
	if progress == nil {
		progress = func(Step) {}
	}
	st := steps{progress}
	var r *remote
	if err := st.run(StepConnect, func(func(int64, int64)) (string, error) {
		var err error
		r, err = dial(ctx, t)
		if err != nil {
			return "", err
		}
		if err := r.becomeRoot(ctx, t.User); err != nil {
			return "", err
		}
		return fmt.Sprintf("logged in as %s at %s", t.User, t.Addr), nil
	}); err != nil {
		if r != nil {
			r.close()
		}
		return err
	}
	defer r.close()
	absent := false
	if err := st.run(StepStop, func(func(int64, int64)) (string, error) {
		res, err := r.sh(ctx, `set -e
d=`+shellQuote(installDir)+shellLib+`
[ -e "$d" ] || { echo absent; exit 0; }
[ -e "$d/asr" ] || [ -e "$d/asr.new" ] || [ -e "$d/agent.sh" ] || { echo notours; exit 0; }
if [ -f `+UnitPath+` ] && grep -qxF "ExecStart=$d/agent.sh" `+UnitPath+`; then
	if [ -n "$systemd" ]; then systemctl disable --now `+ServiceName+` 2>&1 || true; fi
	rm -f `+UnitPath+`
	if [ -n "$systemd" ]; then systemctl daemon-reload; fi
	echo "removed systemd unit `+ServiceName+`"
fi
stop_pid`, nil)
		if err != nil {
			return "", err
		}
		switch out := res.out(); {
		case res.code != 0:
			return "", fmt.Errorf("push %s: stopping the agent failed: %s", r.host, res.msg())
		case out == "absent":
			absent = true
			return "", errSkip(installDir + " does not exist")
		case out == "notours":
			return "", fmt.Errorf("push %s: %w: %s holds no asr, asr.new or agent.sh; not removing it", r.host, ErrNotInstalled, installDir)
		case out == "":
			return "no agent running", nil
		default:
			return strings.ReplaceAll(out, "\n", "; "), nil
		}
	}); err != nil {
		return err
	}
	return st.run(StepRemove, func(func(int64, int64)) (string, error) {
		if absent {
			return "", errSkip(installDir + " does not exist")
		}
		res, err := r.sh(ctx, "rm -rf "+shellQuote(installDir), nil)
		if err != nil {
			return "", err
		}
		if res.code != 0 {
			return "", fmt.Errorf("push %s: removing %s failed: %s", r.host, installDir, res.msg())
		}
		return "removed " + installDir, nil
	})
}
