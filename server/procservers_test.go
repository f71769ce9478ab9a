package server_test

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/psnode"
)

func (r *rig) psConfig(name, passFile string) psnode.Config {
	pass, err := api.ReadSecretFile(passFile)
	if err != nil {
		r.t.Fatal(err)
	}
	return psnode.Config{ConfigURL: r.srv.URL(), Passphrase: pass, DataDir: filepath.Join(r.dir, name), DataListen: "127.0.0.1:0", Name: name,
		OpenTarget: func(ctx context.Context, url string) (replication.Target, error) {
			return server.OpenTarget(ctx, url, "", server.SharedTarget)
		}, Logger: r.log}
}

// waitPS waits until the list shows the process server name in state,
// with the figures of its process server (not only of its first
// heartbeat, sent before its process server runs).
func (r *rig) waitPS(ctx context.Context, name, state string) api.ProcessServerInfo {
	r.t.Helper()
	for {
		l, err := r.client.ProcessServers(ctx)
		if err != nil {
			r.t.Fatal(err)
		}
		for _, p := range l {
			if p.Name == name && p.State == state && p.Figures.CacheState != "" {
				return p
			}
		}
		select {
		case <-ctx.Done():
			r.t.Fatalf("process server %s never %s: %+v", name, state, l)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// A scale-out process server registers with the passphrase, opens the
// configuration server's target beside it, sends heartbeats with its
// figures; a wrong passphrase or a reserved name is refused and registers
// nothing; removal revokes it (its next heartbeat is refused and it stops);
// a silent one raises a critical alert.
func TestProcessServerRegistersAndBeats(t *testing.T) {
	// Not parallel: it runs scale-out process servers, whose heartbeats
	// and commands have deadlines (PSHeartbeatLost, psCommandWait) that
	// the package's other tests run beside it made them overrun.
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger()}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.tune = func(c *server.Config) {
		c.PolicyEvery, c.PSHeartbeatLost, c.AlertClear, c.HeartbeatLost = 20*time.Millisecond, 2*time.Second, 50*time.Millisecond, time.Hour
	}
	r.start()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	passFile := filepath.Join(dir, "srv", server.PassphraseFile)

	bad := filepath.Join(dir, "bad-pass")
	os.WriteFile(bad, []byte("not-the-passphrase\n"), 0o600)
	_, err := psnode.Open(ctx, r.psConfig("ps1", bad))
	if !errors.Is(err, enroll.ErrWrongPassphrase) {
		t.Fatalf("wrong passphrase: %v, want ErrWrongPassphrase", err)
	}
	if _, err := psnode.Open(ctx, r.psConfig(api.BuiltinProcessServer, passFile)); err == nil || !strings.Contains(err.Error(), "builtin") {
		t.Fatalf("the built-in name: %v", err)
	}
	if l, err := r.client.ProcessServers(ctx); err != nil || len(l) != 1 || !l[0].Builtin {
		t.Fatalf("after refusals: %+v, %v (want the built-in one only)", l, err)
	}

	n, err := psnode.Open(ctx, r.psConfig("ps1", passFile))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	runErr := make(chan error, 1)
	go func() { runErr <- n.Run(ctx) }()
	p := r.waitPS(ctx, "ps1", api.PSHealthy)
	if p.DataAddr != n.DataAddr() || p.Figures.MemoryTotal == 0 || !strings.HasPrefix(p.Figures.Target, "localfs:") || p.Figures.CacheState == "" {
		t.Fatalf("ps1 as listed: %+v (data %s)", p, n.DataAddr())
	}

	// Removed: the next heartbeat is refused and the process server stops.
	if err := r.client.RemoveProcessServer(ctx, "ps1"); err != nil {
		t.Fatal(err)
	}
	if err := r.client.RemoveProcessServer(ctx, "ps1"); err == nil || !strings.Contains(err.Error(), "no process server") {
		t.Fatalf("removed twice: %v", err)
	}
	if err := r.client.RemoveProcessServer(ctx, api.BuiltinProcessServer); err == nil {
		t.Fatal("the built-in process server was removed")
	}
	select {
	case err := <-runErr:
		if err == nil || !strings.Contains(err.Error(), "not registered") {
			t.Fatalf("removed process server's Run: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the removed process server kept running")
	}
	n.Close()

	// Registered again, then silent: a critical alert, cleared by its
	// heartbeats once it runs again.
	n2, err := psnode.Open(ctx, r.psConfig("ps2", passFile))
	if err != nil {
		t.Fatal(err)
	}
	n2.Close()
	waitAlert := func(active bool) {
		for {
			var as []api.Alert
			if err := r.client.Do(ctx, "GET", "/api/v1/alerts", nil, &as); err != nil {
				t.Fatal(err)
			}
			found := false
			for _, a := range as {
				if a.Kind == api.AlertPSHeartbeat && a.Subject == "process server ps2" && a.Severity == api.SeverityCritical {
					found = true
				}
			}
			if found == active {
				return
			}
			select {
			case <-ctx.Done():
				t.Fatalf("ps-heartbeat alert active=%v never: %+v", active, as)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	waitAlert(true)
	n3, err := psnode.Open(ctx, r.psConfig("ps2", passFile))
	if err != nil {
		t.Fatal(err)
	}
	defer n3.Close()
	ctx3, stop3 := context.WithCancel(ctx)
	defer stop3()
	go n3.Run(ctx3)
	waitAlert(false)
}

// A machine switched mid-stream between the built-in process server and
// two scale-out ones (ps1, ps2, then back), with writes going on all the
// while: each process server serves it in turn (bytes arrive there), and
// a point made at the end recovers bit-exact: every write acknowledged to
// the guest is in the replica, whichever process server received it.
func TestSwitchProcessServerMidStream(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger()}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	passFile := filepath.Join(dir, "srv", server.PassphraseFile)
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 8<<20, 1)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0})
	startAgent(t, cfg)
	c0, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer c0.Close()
	r.waitProtected("vm1")

	for _, name := range []string{"ps1", "ps2"} {
		n, err := psnode.Open(ctx, r.psConfig(name, passFile))
		if err != nil {
			t.Fatal(err)
		}
		nctx, stop := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- n.Run(nctx) }()
		t.Cleanup(func() {
			stop()
			<-done
			n.Close()
		})
		r.waitPS(ctx, name, api.PSHealthy)
	}
	if _, err := r.client.SwitchProcessServer(ctx, "vm1", "nowhere"); err == nil || !strings.Contains(err.Error(), "no process server") {
		t.Fatalf("switch to an unknown process server: %v", err)
	}

	// The writer: random blocks, each acknowledged by the agent's NBD
	// server, until stopped.
	stopW, wdone := make(chan struct{}), make(chan error, 1)
	var written atomic.Int64
	go func() {
		rnd := rand.New(rand.NewPCG(5, 5))
		for {
			select {
			case <-stopW:
				wdone <- nil
				return
			default:
			}
			b := make([]byte, 4096*(1+rnd.IntN(16)))
			for j := range b {
				b[j] = byte(rnd.IntN(256))
			}
			off := rnd.Int64N((c0.Size()-int64(len(b)))/4096) * 4096
			if err := c0.WriteAt(b, off); err != nil {
				wdone <- err
				return
			}
			written.Add(int64(len(b)))
		}
	}()
	// received is what a process server's heartbeat says it took in.
	received := func(name string) int64 {
		l, err := r.client.ProcessServers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range l {
			if p.Name == name {
				return p.Figures.RawBytes
			}
		}
		t.Fatalf("no process server %s", name)
		return 0
	}
	for _, to := range []string{"ps1", "ps2", "ps1"} {
		before := received(to)
		if now, err := r.client.SwitchProcessServer(ctx, "vm1", to); err != nil || now != to {
			t.Fatalf("switch to %s: on %q, %v", to, now, err)
		}
		for received(to) <= before {
			select {
			case <-ctx.Done():
				t.Fatalf("no data reached %s after the switch", to)
			case <-time.After(50 * time.Millisecond):
			}
		}
		t.Logf("vm1 on %s; %d bytes written so far", to, written.Load())
	}
	if err := r.client.RemoveProcessServer(ctx, "ps1"); err == nil || !strings.Contains(err.Error(), "serves 1 machines") {
		t.Fatalf("removing the process server vm1 is on: %v", err)
	}
	// auto: the least loaded healthy one; ps2 has no machine and uploads
	// nothing now, the built-in one and ps1 neither: one of the three.
	if now, err := r.client.SwitchProcessServer(ctx, "vm1", api.AutoProcessServer); err != nil || now == api.AutoProcessServer || now == "" {
		t.Fatalf("switch to auto: on %q, %v", now, err)
	}
	if _, err := r.client.SwitchProcessServer(ctx, "vm1", api.BuiltinProcessServer); err != nil {
		t.Fatal(err)
	}
	close(stopW)
	if err := <-wdone; err != nil {
		t.Fatal(err)
	}
	// Back on the built-in one: a point (retried until the agent is
	// connected there again) holds every write.
	var p api.PointJSON
	for {
		p, err = r.client.Tag(ctx, "vm1", false, time.Minute)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no point after switching back: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d0.img")) != fileSum(t, d0) {
		t.Fatalf("point %s after the switches differs from the source (%d bytes written)", p.ID, written.Load())
	}
	if err := r.client.RemoveProcessServer(ctx, "ps1"); err != nil {
		t.Fatalf("removing ps1 once vm1 left it: %v", err)
	}
}

// A machine on a scale-out process server is shown, given points and
// alerted on as on the built-in one: its process server's heartbeats
// report the agent's connection and status, the bytes received and each
// new point (in GET /api/v1/machines/{m}: connected, RPO known, last point,
// point count); `asr tag` makes a point there (a command in a heartbeat's
// reply); the policy's schedule reaches the agent (crash points every 5 s
// appear); a resync asked for runs there and repairs a block the replica
// lacks; when the agent stops, its heartbeat and RPO alerts raise. A
// recovery through the server while the machine is there is read by ps1,
// and the point made there recovers bit-exact once it is back too.
func TestProcessServerReportsAndCommands(t *testing.T) {
	// Not parallel: it runs scale-out process servers, whose heartbeats
	// and commands have deadlines (PSHeartbeatLost, psCommandWait) that
	// the package's other tests run beside it made them overrun.
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger()}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.tune = func(c *server.Config) {
		c.PolicyEvery, c.PSHeartbeatLost, c.AlertClear, c.HeartbeatLost = 20*time.Millisecond, 3*time.Second, 50*time.Millisecond, 500*time.Millisecond
	}
	r.start()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 8<<20, 3)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")

	r.runPS(ctx, "ps1")
	if _, err := r.client.SwitchProcessServer(ctx, "vm1", "ps1"); err != nil {
		t.Fatal(err)
	}
	before := r.machine("vm1").BytesReceived

	// Writes, then a point asked for through the configuration server
	// (again until the agent is connected to ps1).
	c0, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer c0.Close()
	rnd := rand.New(rand.NewPCG(9, 9))
	for _, off := range []int64{0, 3 << 20, 7 << 20} {
		b := make([]byte, 256<<10)
		for i := range b {
			b[i] = byte(rnd.IntN(256))
		}
		if err := c0.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	var p api.PointJSON
	for {
		p, err = r.client.Tag(ctx, "vm1", false, time.Minute)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no point of vm1 on ps1: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	waitFor(t, "vm1's view to show ps1's point, connection, RPO and bytes", func() bool {
		m := r.machine("vm1")
		return m.LastPoint != nil && m.LastPoint.ID == p.ID && m.Connected && m.RPOKnown && m.BytesReceived >= before+768<<10
	})
	// The point is in the catalog too (the points list), and was made by
	// ps1: the built-in process server does not have the machine open.
	var pts []api.PointJSON
	if err := r.client.Do(ctx, "GET", "/api/v1/machines/vm1/points", nil, &pts); err != nil || len(pts) == 0 || pts[len(pts)-1].ID != p.ID {
		t.Fatalf("points of vm1: %+v, %v (want %s last)", pts, err, p.ID)
	}
	if l, _ := r.client.ProcessServers(ctx); l[0].Machines != 0 {
		t.Fatalf("the built-in process server has %d machines open", l[0].Machines)
	}
	// Recovery through the server: ps1 reads the point
	// (procservers_points_test.go tests it further).
	sumAtP := fileSum(t, d0)
	r.recover("vm1", p.ID, filepath.Join(dir, "early"))
	if fileSum(t, filepath.Join(dir, "early", "d0.img")) != sumAtP {
		t.Fatalf("point %s recovered through ps1 differs from the source", p.ID)
	}
	// A scrub runs there (a command to ps1) and its report comes back.
	var vj api.VerifyJSON
	if err := r.client.Do(ctx, "POST", "/api/v1/machines/vm1/verify", api.VerifyRequest{NoSource: true}, &vj); err != nil {
		t.Fatalf("scrub of a machine on ps1: %v", err)
	}
	if vj.Scrub == nil || len(vj.Scrub.Disks) != 1 || vj.Scrub.Disks[0].Checked <= 0 || vj.Damaged {
		t.Fatalf("the scrub of vm1 on ps1: %+v", vj)
	}

	// A resync asked for runs through ps1: a block written past the
	// splitter (the replica lacks it) is found and sent.
	f, err := os.OpenFile(d0, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte(strings.Repeat("written past the splitter ", 300)), 5<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := r.client.Do(ctx, "POST", "/api/v1/machines/vm1/resync", nil, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the resync through ps1 done", func() bool {
		var rows []api.ResyncJSON
		if err := r.client.Do(ctx, "GET", "/api/v1/machines/vm1/resync", nil, &rows); err != nil {
			t.Fatal(err)
		}
		for _, x := range rows {
			if x.State == "failed" {
				t.Fatalf("resync through ps1: %+v", x)
			}
		}
		return len(rows) == 0 && r.machine("vm1").State == replication.StateProtected
	})

	// The policy reaches the agent through ps1: crash points every 5 s.
	count := r.machine("vm1").PointCount
	if err := r.client.Do(ctx, "PATCH", "/api/v1/policies/default", api.PolicyJSON{CrashInterval: "5s"}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "crash points of the pushed schedule", func() bool { return r.machine("vm1").PointCount >= count+2 })

	// Connected: no heartbeat alert. Stopped: heartbeat and RPO alerts.
	r.waitPasses(5)
	if as, err := r.client.Alerts(ctx, false); err != nil {
		t.Fatal(err)
	} else {
		for _, a := range as {
			if a.Kind == api.AlertHeartbeat && a.Machine == "vm1" {
				t.Fatalf("heartbeat alert while vm1's agent is connected to ps1: %+v", a)
			}
		}
	}
	if err := r.client.Do(ctx, "PATCH", "/api/v1/policies/default", api.PolicyJSON{RPOThreshold: "1s", CrashInterval: "5m"}, nil); err != nil {
		t.Fatal(err)
	}
	last := r.machine("vm1").LastPoint.ID
	ra.close()
	waitFor(t, "vm1 shown disconnected", func() bool { return !r.machine("vm1").Connected })
	r.waitAlert(api.AlertHeartbeat, "vm1", "")
	if a := r.waitAlert(api.AlertRPO, "vm1", ""); !strings.Contains(a.Message, "exceeds the threshold") {
		t.Fatalf("RPO alert: %+v", a)
	}

	// Back on the built-in process server: the point asked for on ps1,
	// and the last one (after the resync, with no write since), recover
	// bit-exact.
	if _, err := r.client.SwitchProcessServer(ctx, "vm1", api.BuiltinProcessServer); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string][32]byte{p.ID: sumAtP, last: fileSum(t, d0)} {
		out := filepath.Join(dir, "out-"+id)
		r.recover("vm1", id, out)
		if fileSum(t, filepath.Join(out, "d0.img")) != want {
			t.Fatalf("point %s made on ps1 differs from the source", id)
		}
	}
}

// Retention reaches a machine on a scale-out process server: its points
// past the policy's retention are pruned there (a command in a heartbeat's
// reply), the newest kept, and the vault database follows the catalog.
func TestProcessServerPrunes(t *testing.T) {
	// Not parallel: it runs scale-out process servers, whose heartbeats
	// and commands have deadlines (PSHeartbeatLost, psCommandWait) that
	// the package's other tests run beside it made them overrun.
	dir := t.TempDir()
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) {
		c.Now = func() time.Time { return time.Unix(0, clock.Load()) }
		c.PolicyEvery, c.PruneEvery, c.PSHeartbeatLost = 50*time.Millisecond, 50*time.Millisecond, 3*time.Second
	}}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	d := filepath.Join(dir, "d.img")
	mustDisk(t, d, 4<<20, 1)
	startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: d}))
	r.waitProtected("vm1")
	if err := r.client.Do(ctx, "POST", "/api/v1/policies", api.PolicyJSON{Name: "short", Retention: "1h", AppFrequency: "0", PITWindow: "30m"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.client.Do(ctx, "POST", "/api/v1/machines/vm1/policy", api.AssignRequest{Policy: "short"}, nil); err != nil {
		t.Fatal(err)
	}
	r.runPS(ctx, "ps1")
	if _, err := r.client.SwitchProcessServer(ctx, "vm1", "ps1"); err != nil {
		t.Fatal(err)
	}
	var last api.PointJSON
	var err error
	for range 3 {
		for {
			if last, err = r.client.Tag(ctx, "vm1", false, time.Minute); err == nil {
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("no point of vm1 on ps1: %v", err)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	waitFor(t, "three points or more in the view", func() bool { return r.machine("vm1").PointCount >= 3 })
	clock.Add(int64(2 * time.Hour)) // every point is past the retention
	waitFor(t, "the old points pruned by ps1, the newest kept", func() bool {
		clock.Add(int64(time.Second)) // the next prune pass is due
		var pts []api.PointJSON
		if err := r.client.Do(ctx, "GET", "/api/v1/machines/vm1/points", nil, &pts); err != nil {
			t.Fatal(err)
		}
		m := r.machine("vm1")
		return len(pts) == 1 && pts[0].ID == last.ID && m.PointCount == 1 && m.LastPoint != nil && m.LastPoint.ID == last.ID
	})
}
