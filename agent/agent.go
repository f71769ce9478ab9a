// Package agent is asr's Mobility service: it runs on a protected guest,
// registers with the server, serves every protected disk over NBD as a
// write-splitter (each change goes to the disk and to an ordered on-disk
// spool), copies each disk once (initial replication) while it is in use,
// ships the spool to the process server over mutual TLS, and tags the stream
// with crash-consistent recovery points.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

// Version is the agent's version, set by main.
var Version = "dev"

// DiskSpec is a --disk NAME=PATH[,mode=scan][,interval=D] flag.
type DiskSpec struct {
	Name, Path string
	// Scan selects scan mode: the disk is not served over NBD (the guest
	// uses it directly) and its changes are found by periodic scans.
	Scan         bool
	ScanInterval time.Duration // default 30s
}

// Config configures an agent.
type Config struct {
	Server         string // https://HOST:PORT of the server's control API
	PassphraseFile string
	StateDir       string
	Name           string
	Disks          []DiskSpec
	NBD            string // unix:/path.sock or HOST:PORT
	CrashInterval  time.Duration
	AppFrequency   time.Duration // 0: no scheduled application-consistent points
	PreFreeze      string        // script run with "freeze" before file systems are frozen
	PostThaw       string        // script run with "thaw" after they are thawed
	FreezeMounts   []string      // mount points frozen for application-consistent points
	FreezeTimeout  time.Duration // the freeze is time-boxed (default 10s)
	SpoolMax       int64
	// MemoryLog, when set, keeps the changes not yet acknowledged in a
	// memory log of this many bytes in front of the spool, which is then
	// written only while the server falls behind (spool.Options.MemBytes).
	// The cost: after an unclean stop (kill -9) the activity log's extents
	// are resynced (docs/ARCHITECTURE.md, "The memory log"). 0: every
	// change is written to the spool.
	MemoryLog int64
	// MaxRate limits the replication bandwidth to this many bytes per
	// second on the wire (0: unlimited), as ASR and Zerto throttle.
	MaxRate int64
	// ResyncRate limits how fast a resync reads the source disk, in bytes
	// per second (0: unlimited), as DRBD's resync-rate keeps a resync from
	// starving the guest's own I/O.
	ResyncRate int64
	// Compress makes the agent compress its DATA frames before sending
	// them, on the guest's CPU (`asr agent` does by default), as
	// Compression says. Without it the frames go plain and the process
	// server compresses them before its cache: less CPU on the guest, but
	// at 100 MB/s of churn on the 2-core bench machine the RPO then missed
	// its bound (BENCHMARKS.md, "Agent memory and compression off the
	// guest").
	Compress bool
	// Compression picks the codec when Compress is set: CompressAuto (the
	// default, ""), CompressZstd or CompressS2. S2 goes only to a process
	// server that decodes it (its Welcome says so); zstd otherwise.
	Compression string
	// MemoryLimit is the soft limit of the agent's Go memory that
	// `asr agent` sets once the agent is open (debug.SetMemoryLimit; 0:
	// none). New does not set it: it is process-wide.
	MemoryLimit int64
	// BIOSUUID is the guest's BIOS UUID the agent reports, which links the
	// machine to its VM in the vCenter inventory. "" reads it from
	// replication.BIOSUUIDFile (`--bios-uuid` overrides it, for tests and for
	// guests whose DMI is unreadable); if that fails too the agent reports
	// none and the console shows the machine as not linked.
	BIOSUUID string
	Logger   *slog.Logger
}

// Validate checks a configuration (the names are the flags' of asr
// agent); New checks it too.
func (c *Config) Validate() error {
	switch {
	case len(c.Disks) == 0:
		return errors.New("at least one --disk NAME=PATH is required")
	case c.NBD == "":
		return errors.New("--nbd is required (unix:/path.sock or HOST:PORT)")
	case c.CrashInterval < time.Second:
		return fmt.Errorf("--crash-interval %s: the minimum is 1s", c.CrashInterval)
	case c.SpoolMax < 16<<20:
		return fmt.Errorf("--spool-max %d: the minimum is 16MiB", c.SpoolMax)
	case c.MemoryLog != 0 && (c.MemoryLog < 1<<20 || c.MemoryLog > c.SpoolMax/2):
		return fmt.Errorf("--memory-log %d: want 0 (none) or 1MiB to half of --spool-max", c.MemoryLog)
	case c.MemoryLimit != 0 && c.MemoryLimit < 16<<20:
		return fmt.Errorf("--memory-limit %d: the minimum is 16MiB (0: none)", c.MemoryLimit)
	case !replication.ValidMachineName(c.Name):
		return fmt.Errorf("--name %q: want %s", c.Name, replication.MachineNameRule)
	case c.Compression != "" && c.Compression != CompressAuto && c.Compression != CompressZstd && c.Compression != CompressS2:
		return fmt.Errorf("--compression %q: want %s, %s or %s", c.Compression, CompressAuto, CompressZstd, CompressS2)
	}
	if c.BIOSUUID != "" {
		if _, err := replication.ParseBIOSUUID(c.BIOSUUID); err != nil {
			return fmt.Errorf("--bios-uuid: %w", err)
		}
	}
	return nil
}

// biosUUID is the UUID the agent reports: the configured one, or the one
// the guest's firmware gives (read once; "" with a log line if unreadable).
func biosUUID(cfg Config, log *slog.Logger) string {
	if cfg.BIOSUUID != "" {
		u, _ := replication.ParseBIOSUUID(cfg.BIOSUUID)
		return u
	}
	b, err := os.ReadFile(replication.BIOSUUIDFile)
	if err == nil {
		var u string
		if u, err = replication.ParseBIOSUUID(string(b)); err == nil {
			return u
		}
	}
	log.Info("the guest's BIOS UUID is unknown: the machine cannot be linked to its VM (give --bios-uuid)", "err", err)
	return ""
}

// Agent is a running agent. It wires its components together and runs
// them; each component owns its locks and goroutines (its Close waits for
// them) and is used through its methods (docs/ARCHITECTURE.md, "How the
// agent is built"):
//
//   - state (state.go): the state file and its lock
//   - disks (splitter.go, disks.go) and spool: the write-splitter and the log
//   - copies (initial.go): initial replication, cursors, progress marks
//   - points (points.go, freeze.go): the point lock, the schedule, tags
//   - groups (group.go): group cuts being held
//   - fo (failover.go): the freeze of a planned failover, its final points
//   - scans (scan.go): scan-mode disks
//   - resyncer (resync.go): the checksum resync job
//   - over (overflow.go): spool overflow and its catch-up
//   - al (activity.go): the activity log and its checkpoints
//   - ship (ship.go): the connection to the process server
//   - nbd (export.go): the NBD server
//   - stats (stats.go): the stats file; events (events.go), latency
//     (latency.go) and tag marks (points.go) are shared records
//
// What the server's messages mean for these is in link.go; the start
// (registration, repair after an unclean stop) in open.go; the switch to a
// new log, which touches most of them, in newlog.go.
type Agent struct {
	cfg Config
	log *slog.Logger
	// ctx is the parent of every component's context: the end of Run's
	// context, or Close, cancels it.
	ctx    context.Context
	cancel context.CancelFunc

	uuid       string // the guest's BIOS UUID, reported in Hello ("": unknown)
	unclean    bool   // no clean marker at start: the log was repaired
	recovering bool   // started after the machine went down: may adopt the server's sequence
	// After a forced shutdown, until a Welcome: each Hello marks the
	// spooled changes' ranges for a resync and holds the spool until its
	// Welcome (divergeSpooled); used by the ship loop's goroutine only.
	divergeFirst, helloHold bool
	// runFirst is the first sequence number this run logs (the spool's
	// next at open, before the repair re-logs anything).
	runFirst uint64

	// Open from New to Close.
	state *stateStore
	spool *spool.Spool
	disks diskSet

	// Shared records (locks of their own, no goroutines).
	lat    *latency    // acknowledgement latency of guest changes
	events *eventQueue // for the next status report
	tags   *tagMarks   // records that ship like a tag

	// Components with goroutines (parts lists them).
	al       *activityLog
	over     *overflow
	copies   *copier
	points   *points
	groups   *groupCuts
	scans    *scanner
	resyncer *resyncer
	fo       *failover
	ship     *shipper
	nbd      *exporter
	stats    *statsFile
}

// New opens the agent: it registers if it has no identity yet, opens the
// disks and the spool, and repairs the log after an unclean stop. Run starts
// the work.
func New(ctx context.Context, cfg Config) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	a := &Agent{cfg: cfg, log: cfg.Logger.With("component", "agent"), lat: &latency{}, events: &eventQueue{}, tags: &tagMarks{}}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	a.uuid = biosUUID(cfg, a.log)
	st, err := a.identity(ctx)
	if err != nil {
		a.cancel()
		return nil, err
	}
	if err := a.open(st); err != nil {
		a.cancel()
		a.closeResources()
		return nil, err
	}
	return a, nil
}

// wire makes the components once the state, the spool and the disks are
// open: the one place they meet. from is where each disk's initial copy
// resumes.
func (a *Agent) wire(from map[uint32]copyPos) error {
	cfg, ctx, log := a.cfg, a.ctx, a.log
	a.al = openActivityLog(ctx, cfg.StateDir, log, func() error { return a.disks.syncAll(a.spool) })
	if cfg.MemoryLog > 0 {
		a.al.seqs = func() (uint64, uint64) { return a.spool.Acked(), a.spool.Next() }
	}
	a.over = newOverflow(ctx, log, a.spool, a.disks, a.state, a.events)
	for _, d := range a.disks {
		d.al, d.over, d.changes = a.al, a.over, newChangeMap(d.Size())
	}
	a.copies = newCopier(ctx, log, a.spool, a.disks, a.tags, from)
	a.points = newPoints(ctx, log, a.spool, a.disks, a.tags, a.events, cfg.CrashInterval, cfg.AppFrequency, freezeConfig{
		preFreeze: cfg.PreFreeze, postThaw: cfg.PostThaw, mounts: cfg.FreezeMounts, timeout: cfg.FreezeTimeout})
	a.points.ready = a.copies.allDone
	a.scans = newScanner(ctx, log, a.spool, a.disks, a.copies.isDone, a.points)
	a.points.whileFrozen = a.scans.passCopied
	a.groups = newGroupCuts(ctx, log, a.disks, a.points, a.events)
	// Before the NBD server: a machine frozen before a restart refuses
	// the first write.
	a.fo = newFailover(ctx, log, a.spool, a.disks, a.state, a.points, a.events)
	a.fo.ready = func() bool { return a.copies.allDone() && !a.over.pending() }
	a.fo.scanPass = a.scans.passCopied
	control := cfg.Server
	if control == "" {
		control = a.state.server()
	}
	dd := &dataDialer{dir: cfg.StateDir, control: control, st: a.state, log: log}
	a.ship = newShipper(ctx, log, a.spool, a.tags, cfg.MaxRate, shipCodec(cfg), dd.dial, a, loadSendCounters(cfg.StateDir))
	a.resyncer = newResyncer(ctx, log, a.spool, a.disks, a.state, a.tags, a.ship.current, cfg.ResyncRate)
	a.stats = newStatsFile(ctx, cfg.StateDir, a.Stats)
	var err error
	a.nbd, err = listenNBD(ctx, cfg.NBD, a.disks, log.With("component", "nbd"))
	return err
}

// part is a component that runs goroutines.
type part interface {
	start()
	Close()
}

// parts lists the components that run goroutines, in the order Run starts
// them and stop waits for them: the shipper first, as its receiver starts
// the points and cuts the server asks for.
func (a *Agent) parts() []part {
	return []part{a.ship, a.groups, a.fo, a.points, a.resyncer, a.copies, a.scans, a.over, a.al, a.nbd, a.stats}
}

// MachineID returns the agent's registered machine id.
func (a *Agent) MachineID() string { return a.state.machineID() }

// NBDAddr returns the address the NBD server listens on.
func (a *Agent) NBDAddr() net.Addr { return a.nbd.addr() }

// Run serves NBD, copies the disks, ships the log and tags points until ctx
// is done. The disks stay served whatever happens to replication: a server
// that refuses the agent is retried, and its reason logged, while the guest
// keeps working.
func (a *Agent) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, a.cancel)
	defer stop()
	for _, p := range a.parts() {
		p.start()
	}
	a.log.Info("agent running", "machine", a.state.machineID(), "name", a.state.name(), "nbd", a.nbd.addr().String(),
		"disks", len(a.disks), "next_seq", a.spool.Next())
	<-a.ctx.Done()
	a.stop()
	return nil
}

// stop ends every component's goroutines: all are cancelled at once, then
// waited for in order.
func (a *Agent) stop() {
	a.cancel()
	for _, p := range a.parts() {
		p.Close()
	}
}

// Close stops the agent (if running) and closes its files; a clean stop is
// recorded so the next start need not repair the log.
func (a *Agent) Close() error {
	a.stop()
	for _, d := range a.disks {
		if d.scan != nil {
			if err := saveScan(a.cfg.StateDir, d); err != nil {
				a.log.Error("save scan hashes", "disk", d.Name, "err", err)
			}
		}
	}
	err := a.closeResources()
	if err != nil {
		return err
	}
	// Everything was fsynced: nothing is at risk any more.
	os.Remove(filepath.Join(a.cfg.StateDir, activityFile))
	if err := a.state.save(); err != nil {
		// No clean marker: the state file may be older than the
		// spool, and the next start must repair the log.
		return fmt.Errorf("save agent state at stop (the next start repairs the log): %w", err)
	}
	return atomicfile.Write(filepath.Join(a.cfg.StateDir, cleanFile), []byte("clean stop\n"), 0o600)
}

// closeResources writes the last figures and closes the NBD listener, the
// disks (flushed) and the spool, whatever New got to.
func (a *Agent) closeResources() error {
	var first error
	if a.stats != nil {
		a.stats.save()
	}
	if a.nbd != nil {
		a.nbd.Close()
	}
	for _, d := range a.disks {
		if err := d.Flush(); err != nil && first == nil && !errors.Is(err, spool.ErrClosed) {
			first = err
		}
		d.Close()
	}
	if a.spool != nil {
		if err := a.spool.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// markDiverged records, durably, that a disk's log and its contents may
// disagree; the server is told at the next connection (the session ends
// now) and marks the disk for resync.
func (a *Agent) markDiverged(index uint32, reason string) {
	if err := a.state.markDiverged(index, reason); err != nil {
		a.log.Error("save agent state", "err", err)
	}
	a.ship.reconnect()
}

// Progress returns each disk's initial-copy state.
func (a *Agent) Progress() []replication.DiskProgress { return a.copies.progress() }

// Stats returns the current figures.
func (a *Agent) Stats() Stats {
	c := a.ship.counters
	return Stats{
		BytesSent: c.bytesSent.Load(), RawSent: c.rawSent.Load(), Frames: c.frames.Load(), Records: c.records.Load(),
		FramesZstd: c.framesZstd.Load(), FramesS2: c.framesS2.Load(),
		Acked: a.spool.Acked(), NextSeq: a.spool.Next(), SpoolBytes: a.spool.Pending(),
		SpoolWritten: a.spool.Written(),
		Writes:       a.disks.writes(), Latency: a.lat.stats(), Holds: a.groups.holds.stats(), Connected: c.connected.Load(),
		Disks: a.Progress(),
	}
}
