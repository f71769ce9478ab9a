package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
)

// runDemo starts a server and agents protecting sparse disk files, with a
// write load through each agent's NBD splitter: the real code paths, on one
// machine.
func runDemo(ctx context.Context, e *env, args []string) error {
	out := e.out
	fs := e.flags("asr demo")
	dir := fs.String("data", "./asr-demo", "directory for the demo's server, guests and target")
	listen := fs.String("listen", "127.0.0.1:8443", "console and API address")
	machines := fs.Int("machines", 2, "number of protected guests")
	sizeFlag := fs.String("disk-size", "256MiB", "size of each guest disk")
	rate := fs.Float64("rate", 0.5, "write load per guest, MB/s")
	crash := fs.Duration("crash-interval", 30*time.Second, "crash-consistent point interval (the demo's policy's; 5s to 5m)")
	if err := parse(fs, args); err != nil {
		return err
	}
	size, err := replication.ParseSize(*sizeFlag)
	if err != nil {
		return err
	}
	if *machines < 1 || *machines > 16 {
		return errors.New("--machines: 1 to 16")
	}
	if *crash < replication.MinCrashInterval || *crash > replication.MaxCrashInterval {
		return fmt.Errorf("--crash-interval %s: 5s to 5m", *crash)
	}
	if *rate < 0 {
		return errors.New("--rate: not negative")
	}
	asr := demoCommand()
	if abs, err := filepath.Abs(*dir); err == nil {
		*dir = abs // its paths are printed in commands that work from any directory
	}
	// Quiet the agents' and server's info logs: the demo prints its own summary.
	quiet := slog.New(slog.NewTextHandler(e.errOut, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if os.Getenv("ASR_LOG_LEVEL") != "" {
		quiet = e.log
	}
	srvDir := filepath.Join(*dir, "server")
	// The agents keep the data listener's address they registered with:
	// a rerun listens where the first run did.
	portFile := filepath.Join(*dir, "data-listen")
	dataListen := "127.0.0.1:0"
	if b, err := os.ReadFile(portFile); err == nil {
		dataListen = strings.TrimSpace(string(b))
	}
	srv, err := server.Open(ctx, server.Config{DataDir: srvDir, Listen: *listen, DataListen: dataListen, NBDListen: "127.0.0.1:0", Logger: quiet})
	if err != nil {
		return err
	}
	if err := os.WriteFile(portFile, []byte(srv.DataAddr().String()+"\n"), 0o600); err != nil {
		srv.Close()
		return err
	}
	// The agents get the server's policy when they connect, which would
	// override their --crash-interval: the demo's flag goes into it.
	if err := setDemoPolicy(ctx, srv, *crash); err != nil {
		srv.Close()
		return err
	}
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Run(ctx) }()

	// A vCenter: govmomi's simulator, in process, registered like a real
	// one, with a VM for each demo guest (matched by BIOS UUID) and a few
	// more that are not protected yet.
	vc, err := startDemoVCenter(ctx, srv, *machines, size, filepath.Join(*dir, "guests"))
	if err != nil {
		srv.Close()
		return fmt.Errorf("demo vCenter: %w", err)
	}
	defer vc.Close()
	guest, spares, err := startDemoGuest(*dir, size, quiet)
	if err != nil {
		return fmt.Errorf("demo guest: %w", err)
	}
	defer stopDemoGuest(guest, spares)

	var agents []*agent.Agent
	var wg sync.WaitGroup
	defer func() {
		wg.Wait()
		for _, a := range agents {
			a.Close()
		}
		srv.Close()
	}()
	lctx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	for i := 1; i <= *machines; i++ {
		name := fmt.Sprintf("demo-vm%d", i)
		gdir := filepath.Join(*dir, "guests", name)
		if err := os.MkdirAll(gdir, 0o700); err != nil {
			return err
		}
		disk := filepath.Join(gdir, "disk0.img")
		if err := prepareDemoDisk(disk, size, int64(i)); err != nil {
			return err
		}
		sock := filepath.Join(gdir, "nbd.sock")
		a, err := agent.New(ctx, agent.Config{
			Server: srv.URL(), PassphraseFile: filepath.Join(srvDir, server.PassphraseFile),
			StateDir: filepath.Join(gdir, "agent"), Name: name,
			Disks: []agent.DiskSpec{{Name: "disk0", Path: disk}}, NBD: "unix:" + sock,
			CrashInterval: *crash, SpoolMax: demoSpoolMax, Logger: quiet, BIOSUUID: demoUUID(name),
		})
		if err != nil {
			return fmt.Errorf("start agent %s: %w", name, err)
		}
		agents = append(agents, a)
		wg.Add(2)
		go func() { defer wg.Done(); a.Run(ctx) }()
		go func() { defer wg.Done(); demoLoad(lctx, "unix:"+sock, "disk0", *rate, int64(i), quiet) }()
	}
	fmt.Fprintf(out, `asr demo is running: %d guests, %s disks, %.1f MB/s of writes each through NBD;
a crash-consistent point every %s, kept %s. Its data (%s) stays under about %s.

  Console:  %s
  Sign in by opening, once:  %s
  or with the admin token: %s
  (also in %s). The console's certificate is the demo's own CA's, which
  the browser does not know: accept its warning once (or import
  %s into the browser).

  CLI:      %s status --data %s --server %s
            %s vms --data %s --server %s

  Recover:  %s tag --machine demo-vm1 --wait --data %s --server %s
            %s failover --machine demo-vm1 --test --to nbd --data %s --server %s
            (tag --wait waits for the initial copy, then takes a point; a test
            failover then takes seconds: the point as NBD exports, printed last;
            --cleanup instead of --test --to nbd ends it; the console's
            Failovers page does the same)

  vCenter:  %s (govmomi's simulator, registered as %q): the demo guests
            are its VMs %s; the others are not protected yet.
%s
Press Ctrl-C to stop.
`, *machines, *sizeFlag, *rate, *crash, demoRetention, *dir, humanBytes(demoBound(*machines, size, *rate)),
		srv.URL(), srv.LoginLink(), srv.AdminToken(), filepath.Join(srvDir, server.AdminTokenFile), filepath.Join(srvDir, "ca.pem"),
		asr, srvDir, srv.URL(), asr, srvDir, srv.URL(), asr, srvDir, srv.URL(), asr, srvDir, srv.URL(),
		vc.URL, demoVCenter, demoNames(*machines), demoGuestHelp(asr, guest, spares, srvDir, srv.URL()))
	select {
	case <-ctx.Done():
		fmt.Fprintln(out, "\nstopping...")
	case err := <-srvDone:
		return err
	}
	stopLoad()
	return nil
}

// The demo's policy keeps little: with the default one (24 h of points, a
// 1 h any-point window) its target grew by the write load twice over, GBs
// within minutes.
const (
	demoRetention = 10 * time.Minute
	demoPITWindow = 5 * time.Minute
)

// setDemoPolicy makes the vault's default policy the demo's: points every
// crash, kept demoRetention, no application-consistent points.
func setDemoPolicy(ctx context.Context, srv *server.Server, crash time.Duration) error {
	p, err := srv.DB().Policy(ctx, "default")
	if err != nil {
		return fmt.Errorf("the demo's policy: %w", err)
	}
	p.CrashInterval, p.Retention, p.PITWindow, p.AppFrequency = crash, demoRetention, demoPITWindow, 0
	if err := p.Validate(""); err != nil {
		return fmt.Errorf("the demo's policy: %w", err)
	}
	if err := srv.DB().UpdatePolicy(ctx, p); err != nil {
		return fmt.Errorf("the demo's policy: %w", err)
	}
	return nil
}

// demoBound is about the most the demo's data directory holds, whatever
// it runs for: each guest's disk file and its replica (size each), and
// what the retention keeps of the write load: the points' saved blocks
// (at most every byte written in demoRetention) and the kept segments (at
// most every byte written in demoPITWindow); then the spools (the agents'
// 256 MiB bound each, reached only while the server does not take the
// log) and 128 MiB of fixed costs (the database, block sums, caches).
func demoBound(machines int, size int64, rate float64) int64 {
	churn := int64(rate * 1e6 * (demoRetention + demoPITWindow).Seconds())
	return int64(machines)*(2*size+churn+demoSpoolMax) + 128<<20
}

// demoSpoolMax is each demo agent's spool bound.
const demoSpoolMax = 256 << 20

// demoCommand is how the demo's printed commands call asr: "go run ." when
// it runs that way, else the binary as it was started.
func demoCommand() string {
	arg0 := os.Args[0]
	if strings.Contains(arg0, "go-build") || strings.HasSuffix(arg0, ".test") {
		return "go run ."
	}
	return arg0
}

// prepareDemoDisk creates a sparse disk with some data (a quarter text-like,
// a little random) so the initial copy has work to do; an existing disk is
// kept as it is.
func prepareDemoDisk(path string, size, seed int64) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	f, err := os.OpenFile(path+".tmp", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	r := rand.New(rand.NewPCG(uint64(seed), 1))
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size/4; off += int64(len(buf)) {
		fillDemo(r, buf, off%(8<<20) == 0)
		if _, err := f.WriteAt(buf, off); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	return os.Rename(path+".tmp", path)
}

var demoWords = []string{"replica ", "recovery ", "point ", "vmware ", "disk ", "block ", "journal ", "failover ", "the ", "of ", "and ", "site "}

// fillDemo fills b with text-like bytes, or random bytes if random is set.
func fillDemo(r *rand.Rand, b []byte, random bool) {
	if random {
		for i := 0; i+8 <= len(b); i += 8 {
			v := r.Uint64()
			for j := 0; j < 8; j++ {
				b[i+j] = byte(v >> (8 * j))
			}
		}
		return
	}
	for i := 0; i < len(b); {
		i += copy(b[i:], demoWords[r.IntN(len(demoWords))])
	}
}

// demoLoad writes to a disk through the agent's NBD splitter at about rate
// MB/s: random 4-64 KiB writes, a flush every second.
func demoLoad(ctx context.Context, addr, export string, rate float64, seed int64, log *slog.Logger) {
	var c *nbd.Client
	for c == nil {
		var err error
		if c, err = nbd.Dial(ctx, addr, export); err != nil {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
	}
	defer c.Close()
	r := rand.New(rand.NewPCG(uint64(seed), 2))
	buf := make([]byte, 64<<10)
	perTick := rate * 1e6 / 10
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	lastFlush := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for done := 0.0; done < perTick; {
			n := (1 + r.IntN(16)) * 4096
			off := r.Int64N(c.Size()/4096-16) * 4096
			fillDemo(r, buf[:n], r.IntN(4) == 0)
			if err := c.WriteAt(buf[:n], off); err != nil {
				if ctx.Err() == nil {
					log.Warn("demo load write failed", "err", err)
				}
				return
			}
			done += float64(n)
		}
		if time.Since(lastFlush) > time.Second {
			c.Flush()
			lastFlush = time.Now()
		}
	}
}
