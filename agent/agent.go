// Package agent is asr's Mobility service: it runs on a protected guest,
// registers with the server, serves every protected disk over NBD as a
// write-splitter (each change goes to the disk and to an ordered on-disk
// spool), copies each disk once (initial replication) while it is in use,
// ships the spool to the process server over mutual TLS, and tags the stream
// with crash-consistent recovery points.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/agent/nbd"
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
	// MaxRate limits the replication bandwidth to this many bytes per
	// second on the wire (0: unlimited), as ASR and Zerto throttle.
	MaxRate int64
	// ResyncRate limits how fast a resync reads the source disk, in bytes
	// per second (0: unlimited), as DRBD's resync-rate keeps a resync from
	// starving the guest's own I/O.
	ResyncRate int64
	Logger     *slog.Logger
}

// ParseFlags parses `asr agent` arguments.
func ParseFlags(args []string) (Config, error) {
	var c Config
	fs := flag.NewFlagSet("asr agent", flag.ContinueOnError)
	fs.StringVar(&c.Server, "server", "", "control URL of the asr server, https://HOST:PORT")
	fs.StringVar(&c.PassphraseFile, "passphrase-file", "", "file holding the vault passphrase (needed to register)")
	fs.StringVar(&c.StateDir, "state", "./asr-agent", "directory for the agent's identity, state and spool")
	fs.StringVar(&c.Name, "name", "", "machine name (default: host name)")
	fs.StringVar(&c.NBD, "nbd", "", "NBD listen address for the protected disks: unix:/path.sock or HOST:PORT")
	fs.DurationVar(&c.CrashInterval, "crash-interval", 5*time.Minute, "interval between crash-consistent recovery points (1s or more); the machine's policy overrides it")
	fs.DurationVar(&c.AppFrequency, "app-frequency", 0, "interval between application-consistent points (0: none); the machine's policy overrides it")
	fs.StringVar(&c.PreFreeze, "pre-freeze", "", "script run (with argument \"freeze\") before an application-consistent point")
	fs.StringVar(&c.PostThaw, "post-thaw", "", "script run (with argument \"thaw\") after an application-consistent point")
	fs.DurationVar(&c.FreezeTimeout, "freeze-timeout", 10*time.Second, "longest time file systems stay frozen")
	fs.Func("freeze", "mount point to freeze (FIFREEZE) for application-consistent points (repeatable)", func(v string) error {
		c.FreezeMounts = append(c.FreezeMounts, v)
		return nil
	})
	spoolMax := fs.String("spool-max", "1GiB", "maximum size of the on-disk spool of changes not yet acknowledged")
	maxRate := fs.String("max-rate", "0", "replication bandwidth limit in bytes per second, e.g. 50MiB (0: unlimited)")
	resyncRate := fs.String("resync-rate", "0", "how fast a resync may read the source disks, bytes per second, e.g. 200MiB (0: unlimited)")
	fs.Func("disk", "protected disk NAME=PATH, served over NBD; NAME=PATH,mode=scan[,interval=30s] for a disk the guest uses directly, copied by periodic scans (repeat for each disk)", func(v string) error {
		name, rest, ok := strings.Cut(v, "=")
		if !ok || rest == "" {
			return fmt.Errorf("want NAME=PATH, got %q", v)
		}
		opts := strings.Split(rest, ",")
		path := opts[0]
		spec := DiskSpec{Name: name, Path: path}
		for _, o := range opts[1:] {
			k, val, _ := strings.Cut(o, "=")
			switch {
			case k == "mode" && val == "scan":
				spec.Scan = true
			case k == "mode" && val == "splitter":
			case k == "interval":
				d, err := time.ParseDuration(val)
				if err != nil || d < time.Second {
					return fmt.Errorf("disk %s: interval %q: want a duration of 1s or more", name, val)
				}
				spec.ScanInterval = d
			default:
				return fmt.Errorf("disk %s: unknown option %q (want mode=scan or mode=splitter, interval=D)", name, o)
			}
		}
		if !replication.ValidDiskName(name) {
			return fmt.Errorf("disk name %q: use letters, digits, '.', '_' and '-' (at most 64)", name)
		}
		for _, d := range c.Disks {
			if d.Name == name {
				return fmt.Errorf("disk %q given twice", name)
			}
		}
		c.Disks = append(c.Disks, spec)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	var err error
	if c.SpoolMax, err = ParseSize(*spoolMax); err != nil {
		return c, fmt.Errorf("--spool-max: %w", err)
	}
	if c.MaxRate, err = ParseSize(*maxRate); err != nil {
		return c, fmt.Errorf("--max-rate: %w", err)
	}
	if c.ResyncRate, err = ParseSize(*resyncRate); err != nil {
		return c, fmt.Errorf("--resync-rate: %w", err)
	}
	if c.Name == "" {
		c.Name, _ = os.Hostname()
	}
	return c, c.validate()
}

func (c *Config) validate() error {
	switch {
	case len(c.Disks) == 0:
		return errors.New("at least one --disk NAME=PATH is required")
	case c.NBD == "":
		return errors.New("--nbd is required (unix:/path.sock or HOST:PORT)")
	case c.CrashInterval < time.Second:
		return fmt.Errorf("--crash-interval %s: the minimum is 1s", c.CrashInterval)
	case c.SpoolMax < 16<<20:
		return fmt.Errorf("--spool-max %d: the minimum is 16MiB", c.SpoolMax)
	case !replication.ValidMachineName(c.Name):
		return fmt.Errorf("--name %q: want %s", c.Name, replication.MachineNameRule)
	}
	return nil
}

// ParseSize parses sizes like 1GiB, 512MiB, 4096.
func ParseSize(s string) (int64, error) {
	units := []struct {
		suf  string
		mult int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}}
	s = strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suf) {
			s, mult = strings.TrimSuffix(s, u.suf), u.mult
			break
		}
	}
	var n int64
	if _, err := fmt.Sscanf(s, "%d", &n); err != nil || n < 0 || fmt.Sprint(n) != s {
		return 0, fmt.Errorf("size %q: want a number with an optional KiB/MiB/GiB/TiB suffix", s)
	}
	return n * mult, nil
}

// maxScanSize bounds a scan-mode disk: its block hashes (17 bytes a MiB)
// live in memory, 70 MiB at this size.
const maxScanSize = 4 << 40

// Agent is a running agent.
type Agent struct {
	cfg Config
	log *slog.Logger

	st      *state
	stMu    sync.Mutex // guards st and its file
	spool   *spool.Spool
	disks   []*Disk
	lat     *latency
	nbdSrv  *nbd.Server
	nbdL    net.Listener
	stats   *stats
	unclean bool

	// progress records not yet acknowledged, in seq order
	progMu  sync.Mutex
	prog    []progressMark
	cursors map[uint32]*atomic.Int64 // read cursor of the initial copy, per disk
	done    map[uint32]*atomic.Bool
	// copyGen counts the new logs started (newlog.go): each restarts the
	// initial copy, which copyWake wakes.
	copyGen  atomic.Uint64
	copyWake chan struct{}

	tagMu         sync.Mutex
	tagSeqs       []uint64 // tag and resync-done records not yet sent (for FlagTag)
	pointMu       sync.Mutex
	crashInterval atomic.Int64
	appFrequency  atomic.Int64
	freezer       freezer
	eventMu       sync.Mutex
	events        []replication.AgentEvent
	inGroup       atomic.Bool // the server makes this machine's points
	cutMu         sync.Mutex
	cuts          map[uint64]chan replication.FrameType // group cuts being held
	holds         *latency                              // how long group cuts held the writes
	resync        *resyncer
	al            *activityLog
	over          *overflow
	recovering    bool                        // started after the machine went down: may adopt the server's sequence
	current       atomic.Pointer[shipSession] // the current connection, if any

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// reqs tracks the goroutines of the server's requests (points, group
	// cuts), which the receiver starts; Run and Close wait for them after
	// wg, once no receiver can start more.
	reqs sync.WaitGroup
}

type progressMark struct {
	seq    uint64
	disk   uint32
	cursor int64
	done   bool
}

// New opens the agent: it registers if it has no identity yet, opens the
// disks and the spool, and repairs the log after an unclean stop. Run starts
// the work.
func New(ctx context.Context, cfg Config) (*Agent, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	a := &Agent{cfg: cfg, log: cfg.Logger.With("component", "agent"), lat: &latency{}, holds: &latency{},
		cuts:    map[uint64]chan replication.FrameType{},
		cursors: map[uint32]*atomic.Int64{}, done: map[uint32]*atomic.Bool{}, copyWake: make(chan struct{}, 1)}
	a.resync = newResyncer(a)
	a.crashInterval.Store(int64(cfg.CrashInterval))
	a.appFrequency.Store(int64(cfg.AppFrequency))
	a.freezer = osFreezer{}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, err
	}
	st, err := loadState(cfg.StateDir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if cfg.Server == "" || cfg.PassphraseFile == "" {
			return nil, errors.New("this agent is not registered yet: --server and --passphrase-file are required")
		}
		pass, err := os.ReadFile(cfg.PassphraseFile)
		if err != nil {
			return nil, fmt.Errorf("read passphrase: %w", err)
		}
		st, err = registerRetry(ctx, a.log, defaultRegisterBackoff, cfg.Server, pass, cfg.Name, cfg.StateDir)
		if err != nil {
			return nil, err
		}
		a.log.Info("registered", "machine", st.MachineID, "name", st.Name, "data", st.DataAddr)
	case err != nil:
		return nil, err
	default:
		if cfg.Name != st.Name && cfg.Name != "" {
			a.log.Warn("--name differs from the registered name; keeping the registered one", "registered", st.Name, "given", cfg.Name)
		}
	}
	if st.LogID == "" {
		// A new state, or one from before log ids (an agent continuing
		// its own log): open saves it.
		st.LogID = newLogID()
	}
	a.st = st
	if err := a.open(); err != nil {
		a.closeResources()
		return nil, err
	}
	return a, nil
}

func (a *Agent) open() error {
	cfg := a.cfg
	// Disks: keep indexes stable; new names get new indexes.
	for _, spec := range cfg.Disks {
		ds := a.st.disk(spec.Name)
		if ds == nil {
			idx := uint32(0)
			for _, d := range a.st.Disks {
				if d.Index >= idx {
					idx = d.Index + 1
				}
			}
			a.st.Disks = append(a.st.Disks, diskState{Index: idx, Name: spec.Name, Path: spec.Path})
			ds = &a.st.Disks[len(a.st.Disks)-1]
		}
		ds.Path = spec.Path
	}
	for _, ds := range a.st.Disks {
		found := false
		for _, spec := range cfg.Disks {
			found = found || spec.Name == ds.Name
		}
		if !found {
			return fmt.Errorf("disk %q is protected but not given with --disk; give it, or disable its protection", ds.Name)
		}
	}
	a.unclean = !exists(filepath.Join(cfg.StateDir, cleanFile))
	sp, rec, err := spool.Open(filepath.Join(cfg.StateDir, spoolDir), spool.Options{MaxBytes: cfg.SpoolMax}, a.st.Acked)
	if err != nil {
		return fmt.Errorf("open spool: %w", err)
	}
	a.spool = sp
	if rec.Truncated > 0 {
		a.log.Warn("spool had a torn record at its end (the agent stopped mid-write); cut it off", "bytes", rec.Truncated)
	}
	for i := range a.st.Disks {
		ds := &a.st.Disks[i]
		d, err := openDisk(a.ctx, ds.Index, ds.Name, ds.Path, sp, a.lat, a.log)
		if err != nil {
			return err
		}
		a.disks = append(a.disks, d)
		for _, spec := range cfg.Disks {
			if spec.Name == ds.Name && spec.Scan {
				interval := spec.ScanInterval
				if interval <= 0 {
					interval = 30 * time.Second
				}
				if d.Size() > maxScanSize {
					return fmt.Errorf("disk %s: %d bytes is more than scan mode handles (%d: it keeps a hash of every MiB in memory); serve it over NBD (without mode=scan)", d.Name, d.Size(), int64(maxScanSize))
				}
				d.scan = newScanState(d.Size(), interval)
				if !a.unclean {
					if err := loadScan(cfg.StateDir, d); err != nil {
						a.log.Warn("scan hashes", "disk", d.Name, "err", err)
					}
				}
			}
		}
		if ds.Size != 0 && d.Size() < ds.Size {
			return fmt.Errorf("disk %s shrank from %d to %d bytes: a protected disk cannot shrink (as in ASR); restore its size, or disable its protection", ds.Name, ds.Size, d.Size())
		}
		if ds.Size != 0 && d.Size() > ds.Size {
			// The server grows the replica and resyncs the new area when
			// it sees the new size in Hello.
			a.log.Info("disk grew; its new area will be resynced", "disk", ds.Name, "from", ds.Size, "to", d.Size())
		}
		ds.Size = d.Size()
		idx := ds.Index
		d.diverged = func(reason string) { a.markDiverged(idx, reason) }
		// The initial copy resumes from the furthest progress known: the
		// acknowledged one in the state file, or a later one still in the
		// spool (whose records will be sent). Only the acknowledged one is
		// saved: the spool's tail is not durable until flushed.
		cursor, done := ds.Cursor, ds.Done
		if p, ok := rec.Progress[ds.Index]; ok && int64(p.Offset) > cursor {
			cursor, done = int64(p.Offset), done || p.Flags&replication.FlagDone != 0
		}
		a.cursors[ds.Index] = &atomic.Int64{}
		a.cursors[ds.Index].Store(cursor)
		a.done[ds.Index] = &atomic.Bool{}
		a.done[ds.Index].Store(done)
	}
	if err := a.st.save(cfg.StateDir); err != nil {
		return err
	}
	if err := a.repair(rec); err != nil {
		return err
	}
	if err := a.afterForcedShutdown(); err != nil {
		return err
	}
	a.al = openActivityLog(cfg.StateDir)
	a.over = &overflow{a: a}
	for _, d := range a.disks {
		d.al, d.over, d.changes = a.al, a.over, newChangeMap(d.Size())
	}
	os.Remove(filepath.Join(cfg.StateDir, cleanFile))
	a.stats = loadStats(cfg.StateDir)

	a.nbdSrv = &nbd.Server{
		// Scan-mode disks are used by the guest directly, not served.
		Lookup: func(name string) (nbd.Backend, bool) {
			for _, d := range a.disks {
				if d.Name == name && d.scan == nil {
					return d, true
				}
			}
			return nil, false
		},
		List: func() []string {
			var names []string
			for _, d := range a.disks {
				if d.scan == nil {
					names = append(names, d.Name)
				}
			}
			return names
		},
		Logger: a.log.With("component", "nbd"),
	}
	a.nbdL, err = nbd.Listen(cfg.NBD)
	if err != nil {
		return fmt.Errorf("NBD listen on %s: %w", cfg.NBD, err)
	}
	return nil
}

// repairFile lists the ranges being re-logged after an unclean stop, so a
// second stop in the middle of the repair repeats all of it.
const repairFile = "repair.json"

// repair re-logs, after an unclean stop, the range of each disk's last
// logged change: it may have been logged and not reached the disk (or the
// reverse). The ranges are saved first, so an interrupted repair is redone
// whole at the next start.
func (a *Agent) repair(rec spool.Recovered) error {
	path := filepath.Join(a.cfg.StateDir, repairFile)
	var ranges []spool.Tail
	if b, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(b, &ranges); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
	}
	if a.unclean {
		for _, t := range rec.Tails {
			ranges = append(ranges, t)
		}
	}
	if len(ranges) == 0 {
		return nil
	}
	b, err := json.Marshal(ranges)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(path, b, 0o600); err != nil {
		return err
	}
	for _, t := range ranges {
		for _, d := range a.disks {
			if d.Index == t.Disk {
				if err := d.Relog(int64(t.Offset), int64(t.Length)); err != nil {
					return fmt.Errorf("repair log of disk %s: %w", d.Name, err)
				}
				a.log.Info("unclean stop: re-logged the disk's last change", "disk", d.Name, "offset", t.Offset, "length", t.Length)
			}
		}
	}
	if err := a.spool.Sync(); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil {
		return err
	}
	return atomicfile.SyncDir(a.cfg.StateDir)
}

// afterForcedShutdown checks whether the machine went down since the last
// run (an unclean stop and another boot id): then the changes in the
// activity log's extents may be lost from the spool while on the disk (or
// the reverse), and each disk is marked for a resync of those ranges.
func (a *Agent) afterForcedShutdown() error {
	boot := bootID()
	prev := a.st.BootID
	a.st.BootID = boot
	if a.st.Overflow {
		// Stopped while overflowing: the changed-block maps are gone.
		for i := range a.st.Disks {
			a.st.Disks[i].Diverged, a.st.Disks[i].DivergedRanges = "the agent stopped during a spool overflow: its changed-block map was lost", nil
		}
		a.st.Overflow = false
	}
	if a.unclean && prev != "" && boot != "" && prev != boot {
		a.recovering = true
		risk, ok := atRisk(a.cfg.StateDir)
		for i := range a.st.Disks {
			ds := &a.st.Disks[i]
			if ds.Diverged != "" {
				continue // already marked (whole disk)
			}
			if !ok {
				ds.Diverged, ds.DivergedRanges = "forced shutdown of the machine (activity log unreadable: the whole disk is at risk)", nil
				continue
			}
			if rs := risk[ds.Index]; len(rs) > 0 {
				ds.Diverged = fmt.Sprintf("forced shutdown of the machine: %d extents of 4 MiB had changes in flight", len(rs))
				ds.DivergedRanges = rs
			}
		}
		a.log.Warn("the machine went down while the agent ran: the extents in its activity log will be resynced")
	}
	if err := a.st.save(a.cfg.StateDir); err != nil {
		return err
	}
	err := os.Remove(filepath.Join(a.cfg.StateDir, "activity.log"))
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// markDiverged records, durably, that a disk's log and its contents may
// disagree; the server is told at the next connection and marks the disk
// for resync.
func (a *Agent) markDiverged(index uint32, reason string) {
	a.stMu.Lock()
	defer a.stMu.Unlock()
	for i := range a.st.Disks {
		if a.st.Disks[i].Index == index && a.st.Disks[i].Diverged == "" {
			a.st.Disks[i].Diverged = reason
			if err := a.st.save(a.cfg.StateDir); err != nil {
				a.log.Error("save agent state", "err", err)
			}
		}
	}
	a.reconnect()
}

// clearDiverged forgets the divergences the server has now been told of (in
// the Hello it just accepted): it marked those disks for resync.
func (a *Agent) clearDiverged(told []replication.DiskInfo) {
	a.stMu.Lock()
	defer a.stMu.Unlock()
	changed := false
	for _, di := range told {
		for i := range a.st.Disks {
			ds := &a.st.Disks[i]
			if ds.Index == di.Index && di.Diverged != "" && ds.Diverged == di.Diverged {
				ds.Diverged, ds.DivergedRanges = "", nil
				changed = true
			}
		}
	}
	if changed {
		if err := a.st.save(a.cfg.StateDir); err != nil {
			a.log.Error("save agent state", "err", err)
		}
	}
}

// MachineID returns the agent's registered machine id.
func (a *Agent) MachineID() string { return a.st.MachineID }

// NBDAddr returns the address the NBD server listens on.
func (a *Agent) NBDAddr() net.Addr { return a.nbdL.Addr() }

// Run serves NBD, copies the disks, ships the log and tags points until ctx
// is done. The disks stay served whatever happens to replication: a server
// that refuses the agent is retried, and its reason logged, while the guest
// keeps working.
func (a *Agent) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, a.cancel)
	defer stop()
	a.wg.Add(9)
	go func() { defer a.wg.Done(); a.over.loop() }()
	go func() { defer a.wg.Done(); a.activityLoop() }()
	go func() { defer a.wg.Done(); a.resync.loop() }()
	go func() { defer a.wg.Done(); a.scanLoop() }()
	go func() { defer a.wg.Done(); a.nbdSrv.Serve(a.ctx, a.nbdL) }()
	go func() { defer a.wg.Done(); a.initialCopy() }()
	go func() { defer a.wg.Done(); a.shipLoop() }()
	go func() { defer a.wg.Done(); a.tagLoop() }()
	go func() { defer a.wg.Done(); a.statsLoop() }()
	a.log.Info("agent running", "machine", a.st.MachineID, "name", a.st.Name, "nbd", a.nbdL.Addr().String(),
		"disks", len(a.disks), "next_seq", a.spool.Next())
	<-a.ctx.Done()
	a.wg.Wait()
	a.reqs.Wait()
	return nil
}

// reconnect ends the current session (if any); the ship loop starts a new
// one, whose Hello carries the current disk state.
func (a *Agent) reconnect() {
	if s := a.current.Load(); s != nil {
		s.nc.Close()
	}
}

// Close stops the agent (if running) and closes its files; a clean stop is
// recorded so the next start need not repair the log.
func (a *Agent) Close() error {
	a.cancel()
	a.wg.Wait()
	a.reqs.Wait()
	for _, d := range a.disks {
		if d.scan != nil {
			if err := saveScan(a.cfg.StateDir, d); err != nil {
				a.log.Error("save scan hashes", "disk", d.Name, "err", err)
			}
		}
	}
	err := a.closeResources()
	if err == nil && a.spool != nil {
		// Everything was fsynced: nothing is at risk any more.
		os.Remove(filepath.Join(a.cfg.StateDir, "activity.log"))
		a.stMu.Lock()
		err = a.st.save(a.cfg.StateDir)
		a.stMu.Unlock()
		if err != nil {
			// No clean marker: the state file may be older than the
			// spool, and the next start must repair the log.
			return fmt.Errorf("save agent state at stop (the next start repairs the log): %w", err)
		}
		err = atomicfile.Write(filepath.Join(a.cfg.StateDir, cleanFile), []byte("clean stop\n"), 0o600)
	}
	return err
}

func (a *Agent) closeResources() error {
	var first error
	if a.stats != nil {
		a.stats.save(a.cfg.StateDir, a)
	}
	if a.nbdL != nil {
		a.nbdL.Close()
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

// allDone reports whether every disk has finished its initial copy.
func (a *Agent) allDone() bool {
	for _, d := range a.done {
		if !d.Load() {
			return false
		}
	}
	return true
}

// point makes a recovery point now: application-consistent (freeze
// sequence, see freeze.go) or crash-consistent. One point at a time.
func (a *Agent) point(reqID uint64, app bool) error {
	a.pointMu.Lock()
	defer a.pointMu.Unlock()
	if app {
		return a.appPoint(reqID)
	}
	return a.tag(reqID, false)
}

// tag appends a recovery-point tag record; app marks it application-
// consistent (the caller has quiesced the guest).
func (a *Agent) tag(reqID uint64, app bool) error {
	rec := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindTag, Offset: reqID}
	switch {
	case app:
		rec.Flags |= replication.FlagApp
	case a.hasScanDisks():
		rec.Flags |= replication.FlagScan
	}
	seq, err := a.spool.Append(a.ctx, &rec)
	if err != nil {
		return err
	}
	a.markTag(seq)
	a.spool.Complete(seq)
	return nil
}

// markTag records that the record seq ships like a tag (FlagTag). It is
// called before the record is completed: the sender never reads past the
// completed prefix, so it cannot ship the record without knowing. Append
// is not done under tagMu: it may wait for spool space, which only the
// sender, which takes tagMu, frees.
func (a *Agent) markTag(seq uint64) {
	a.tagMu.Lock()
	defer a.tagMu.Unlock()
	i, _ := slices.BinarySearch(a.tagSeqs, seq)
	a.tagSeqs = slices.Insert(a.tagSeqs, i, seq)
}

// hasTag reports whether a tag record lies in [first, last], forgetting the
// tags up to last (they are being sent).
func (a *Agent) hasTag(first, last uint64) bool {
	a.tagMu.Lock()
	defer a.tagMu.Unlock()
	found := false
	i := 0
	for ; i < len(a.tagSeqs) && a.tagSeqs[i] <= last; i++ {
		found = found || a.tagSeqs[i] >= first
	}
	a.tagSeqs = a.tagSeqs[i:]
	return found
}

// tagLoop makes the scheduled points: crash-consistent every crash
// interval, application-consistent every app frequency (when set), as the
// machine's policy says. An application-consistent point also counts as the
// crash-consistent one due at the same time.
func (a *Agent) tagLoop() {
	lastCrash, lastApp := time.Now(), time.Now()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-a.ctx.Done():
			return
		case now := <-t.C:
			crashDue := now.Sub(lastCrash) >= time.Duration(a.crashInterval.Load())
			appEvery := time.Duration(a.appFrequency.Load())
			appDue := appEvery > 0 && now.Sub(lastApp) >= appEvery
			if a.inGroup.Load() {
				lastCrash, lastApp = now, now // the server makes the group's points
				continue
			}
			if !crashDue && !appDue {
				continue
			}
			if !a.allDone() {
				lastCrash, lastApp = now, now // no points before the copy is complete
				continue
			}
			if err := a.point(0, appDue); err != nil && a.ctx.Err() == nil {
				a.log.Error("scheduled point failed", "app", appDue, "err", err)
			}
			lastCrash = now
			if appDue {
				lastApp = now
			}
		}
	}
}

// setPolicy applies the point schedule of the machine's policy.
func (a *Agent) setPolicy(p replication.AgentPolicy) {
	if p.CrashInterval > 0 {
		a.crashInterval.Store(p.CrashInterval)
	}
	a.appFrequency.Store(p.AppFrequency)
	a.inGroup.Store(p.Group != "")
	a.log.Info("policy applied", "crash_interval", time.Duration(p.CrashInterval), "app_frequency", time.Duration(p.AppFrequency), "group", p.Group)
}

// event queues an event for the server (sent with the next status report).
func (a *Agent) event(kind, msg string) {
	a.eventMu.Lock()
	defer a.eventMu.Unlock()
	if len(a.events) < maxQueuedEvents {
		a.events = append(a.events, replication.AgentEvent{Time: time.Now().UnixNano(), Kind: kind, Message: msg})
	}
}

// takeEvents returns and clears the queued events.
func (a *Agent) takeEvents() []replication.AgentEvent {
	a.eventMu.Lock()
	defer a.eventMu.Unlock()
	ev := a.events
	a.events = nil
	return ev
}

// maxQueuedEvents bounds the events waiting for a status report.
const maxQueuedEvents = 100

// onAck handles an acknowledgement: trims the spool and records the
// acknowledged initial-copy progress in the state file.
func (a *Agent) onAck(seq uint64) error {
	if err := a.spool.Ack(seq); err != nil {
		return err
	}
	a.lat.acked(seq)
	a.progMu.Lock()
	var marks []progressMark
	for len(a.prog) > 0 && a.prog[0].seq <= seq {
		marks = append(marks, a.prog[0])
		a.prog = a.prog[1:]
	}
	a.progMu.Unlock()
	a.stMu.Lock()
	defer a.stMu.Unlock()
	a.st.Acked = seq
	if len(marks) == 0 {
		return nil
	}
	for _, m := range marks {
		for i := range a.st.Disks {
			if a.st.Disks[i].Index == m.disk && m.cursor > a.st.Disks[i].Cursor {
				a.st.Disks[i].Cursor = m.cursor
				a.st.Disks[i].Done = a.st.Disks[i].Done || m.done
			}
		}
	}
	return a.st.save(a.cfg.StateDir)
}

// Progress returns each disk's initial-copy state.
func (a *Agent) Progress() []replication.DiskProgress {
	out := make([]replication.DiskProgress, 0, len(a.disks))
	for _, d := range a.disks {
		out = append(out, replication.DiskProgress{Index: d.Index, Cursor: a.cursors[d.Index].Load(), Done: a.done[d.Index].Load()})
	}
	return out
}

// Stats are the agent's cumulative figures, also written to
// STATE/stats.json every second.
type Stats struct {
	BytesSent  int64        `json:"bytes_sent"` // frame bytes sent to the process server, all connections, all runs
	RawSent    int64        `json:"raw_sent"`   // record bytes before compression
	Frames     int64        `json:"frames"`
	Records    int64        `json:"records"`
	Acked      uint64       `json:"acked"`
	NextSeq    uint64       `json:"next_seq"`
	SpoolBytes int64        `json:"spool_bytes"`
	Writes     int64        `json:"writes"` // guest changes this run
	Latency    LatencyStats `json:"ack_latency"`
	Holds      LatencyStats `json:"group_holds"` // how long group cuts held the guest's writes
	Connected  bool         `json:"connected"`
	Disks      []replication.DiskProgress
}

type stats struct {
	bytesSent, rawSent, frames, records atomic.Int64
	connected                           atomic.Bool
}

func loadStats(dir string) *stats {
	s := &stats{}
	var prev Stats
	if b, err := os.ReadFile(filepath.Join(dir, "stats.json")); err == nil && json.Unmarshal(b, &prev) == nil {
		s.bytesSent.Store(prev.BytesSent)
		s.rawSent.Store(prev.RawSent)
		s.frames.Store(prev.Frames)
		s.records.Store(prev.Records)
	}
	return s
}

// Stats returns the current figures.
func (a *Agent) Stats() Stats {
	var w int64
	for _, d := range a.disks {
		w += d.writes.Load()
	}
	return Stats{
		BytesSent: a.stats.bytesSent.Load(), RawSent: a.stats.rawSent.Load(),
		Frames: a.stats.frames.Load(), Records: a.stats.records.Load(),
		Acked: a.spool.Acked(), NextSeq: a.spool.Next(), SpoolBytes: a.spool.Pending(),
		Writes: w, Latency: a.lat.stats(), Holds: a.holds.stats(), Connected: a.stats.connected.Load(), Disks: a.Progress(),
	}
}

func (s *stats) save(dir string, a *Agent) {
	b, err := json.MarshalIndent(a.Stats(), "", "  ")
	if err == nil {
		atomicfile.Write(filepath.Join(dir, "stats.json"), b, 0o644)
	}
}

func (a *Agent) statsLoop() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-t.C:
			a.stats.save(a.cfg.StateDir, a)
		}
	}
}
