package cli

import (
	"context"
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/replication"
)

// runAgent runs the agent on a protected guest until ctx ends.
func runAgent(ctx context.Context, e *env, args []string) error {
	cfg, err := agentFlags(e, args)
	if err != nil {
		return err
	}
	cfg.Logger = e.log
	a, err := agent.New(ctx, cfg)
	if err != nil {
		return err
	}
	// Starting made garbage (a first registration's Argon2id ran in memory
	// of its own, unmapped already: replication/argon2id): give it back
	// before the agent's soft memory limit applies (GOMEMLIMIT, if set,
	// is the operator's and wins). Without this the agent's peak RSS in
	// asrbench guest-write was 73-74 MiB instead of 63-64.
	debug.FreeOSMemory()
	if cfg.MemoryLimit > 0 && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(cfg.MemoryLimit)
	}
	err = a.Run(ctx)
	if cerr := a.Close(); err == nil {
		err = cerr
	}
	return err
}

// agentFlags parses `asr agent` arguments.
func agentFlags(e *env, args []string) (agent.Config, error) {
	var c agent.Config
	fs := e.flags("asr agent")
	fs.StringVar(&c.Server, "server", "", "control URL of the asr server, https://HOST:PORT")
	fs.StringVar(&c.PassphraseFile, "passphrase-file", "", "file holding the vault passphrase (needed to register)")
	fs.StringVar(&c.StateDir, "state", "./asr-agent", "directory for the agent's identity, state and spool")
	fs.StringVar(&c.Name, "name", "", "machine name (default: host name)")
	fs.StringVar(&c.BIOSUUID, "bios-uuid", "", "the guest's BIOS UUID, reported to link the machine to its VM (default: read from "+replication.BIOSUUIDFile+")")
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
	memLog := fs.String("memory-log", "0", "keep the changes not yet acknowledged in a memory log of this size (e.g. 8MiB), written to the spool only while the server falls behind; the cost: a kill -9 of the agent makes the extents of its activity log be resynced, with no new recovery point until then (0: every change is written to the spool)")
	maxRate := fs.String("max-rate", "0", "replication bandwidth limit in bytes per second, e.g. 50MiB (0: unlimited)")
	resyncRate := fs.String("resync-rate", "0", "how fast a resync may read the source disks, bytes per second, e.g. 200MiB (0: unlimited)")
	memLimit := fs.String("memory-limit", "40MiB", "soft limit of the agent's Go memory (heap, stacks; the Go runtime's GOMEMLIMIT, which overrides it when set); 0: none")
	fs.BoolVar(&c.Compress, "compress", true, "compress the changes on the agent, on the guest's CPU, before sending (--compression); --compress=false sends them plain and the process server compresses them (less CPU on the guest)")
	fs.StringVar(&c.Compression, "compression", agent.CompressAuto, "the codec with --compress: auto (the initial copy in S2, fast, the guest's changes in zstd, skipped for a while after data that does not compress), zstd, or s2 (every frame; S2 only to a process server that decodes it)")
	fs.Func("disk", "protected disk NAME=PATH, served over NBD; NAME=PATH,mode=scan[,interval=30s] for a disk the guest uses directly, copied by periodic scans (repeat for each disk)", func(v string) error {
		name, rest, ok := strings.Cut(v, "=")
		if !ok || rest == "" {
			return fmt.Errorf("want NAME=PATH, got %q", v)
		}
		opts := strings.Split(rest, ",")
		path := opts[0]
		spec := agent.DiskSpec{Name: name, Path: path}
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
	if err := parse(fs, args); err != nil {
		return c, err
	}
	var err error
	if c.SpoolMax, err = replication.ParseSize(*spoolMax); err != nil {
		return c, fmt.Errorf("--spool-max: %w", err)
	}
	if c.MemoryLog, err = replication.ParseSize(*memLog); err != nil {
		return c, fmt.Errorf("--memory-log: %w", err)
	}
	if c.MaxRate, err = replication.ParseSize(*maxRate); err != nil {
		return c, fmt.Errorf("--max-rate: %w", err)
	}
	if c.ResyncRate, err = replication.ParseSize(*resyncRate); err != nil {
		return c, fmt.Errorf("--resync-rate: %w", err)
	}
	if c.MemoryLimit, err = replication.ParseSize(*memLimit); err != nil {
		return c, fmt.Errorf("--memory-limit: %w", err)
	}
	if c.Name == "" {
		c.Name, _ = os.Hostname()
	}
	return c, c.Validate()
}
