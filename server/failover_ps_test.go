package server_test

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/psnode"
)

// A failover of a machine served by a scale-out process server: the job
// first brings it back to the built-in one (a hand-over while ps1
// answers; taken back at once when ps1 is gone, for an unplanned
// failover), then serves the point's exports, equal to the point.
func TestFailoverFromAScaleOutProcessServer(t *testing.T) {
	// Not parallel: it runs scale-out process servers, whose heartbeats
	// and commands have deadlines (PSHeartbeatLost, psCommandWait) that
	// the package's other tests run beside it made them overrun.
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) {
		c.PSHeartbeatLost, c.NBDListen = 2*time.Second, "127.0.0.1:0"
	}}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 8<<20, 4)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0})
	startAgent(t, cfg)
	r.waitProtected("vm1")
	stop := r.runPS(ctx, "ps1")
	c0, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer c0.Close()
	rnd := rand.New(rand.NewPCG(4, 4))
	write := func() {
		b := make([]byte, 128<<10)
		for i := range b {
			b[i] = byte(rnd.IntN(256))
		}
		if err := c0.WriteAt(b, rnd.Int64N(60)<<17); err != nil {
			t.Fatal(err)
		}
	}
	// tagOnPS1 switches vm1 to ps1, writes and takes a point there.
	tagOnPS1 := func() api.PointJSON {
		t.Helper()
		if _, err := r.client.SwitchProcessServer(ctx, "vm1", "ps1"); err != nil {
			t.Fatal(err)
		}
		write()
		for {
			p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
			if err == nil {
				return p
			}
			select {
			case <-ctx.Done():
				t.Fatalf("no point on ps1: %v", err)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	// check fails vm1 over at p (test), checks the job's first step and
	// the export against the point recovered, and cleans up.
	check := func(p api.PointJSON, test bool, stepDone string) {
		t.Helper()
		j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Test: test, Point: p.ID, To: api.ToNBD}))
		i := slices.IndexFunc(j.Steps, func(s api.JobStep) bool { return s.Name == "vm1: to the built-in process server" })
		if i < 0 || !strings.Contains(j.Steps[i].Detail, stepDone) {
			t.Fatalf("the failover's steps %+v, want vm1 brought back (%s)", j.Steps, stepDone)
		}
		if ps := r.machine("vm1").ProcessServer; ps != "" && ps != api.BuiltinProcessServer {
			t.Fatalf("after the failover vm1 is on %q", ps)
		}
		out := t.TempDir()
		r.recover("vm1", p.ID, out)
		b, err := os.ReadFile(filepath.Join(out, "d0.img"))
		if err != nil {
			t.Fatal(err)
		}
		c := dialExport(t, exportsOf(t, j)["d0"])
		got := exportSum(t, c)
		c.Close()
		if got != sha256.Sum256(b) {
			t.Fatalf("the export of point %s differs from the point", p.ID)
		}
		action := "cleanup"
		if !test {
			action = "commit"
		}
		r.mustJob(r.client.FailoverAction(ctx, action, api.FailoverAction{Machine: "vm1"}))
	}

	// ps1 answers: a hand-over.
	check(tagOnPS1(), true, "handed over")

	// ps1 is gone: an unplanned failover takes vm1 back at once.
	p := tagOnPS1()
	stop()
	for {
		l, err := r.client.ProcessServers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if i := slices.IndexFunc(l, func(x api.ProcessServerInfo) bool { return x.Name == "ps1" }); i >= 0 && l[i].State == api.PSNoHeartbeat {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("ps1 never lost its heartbeat")
		case <-time.After(50 * time.Millisecond):
		}
	}
	// A planned one needs the hand-over: refused, nothing changed.
	if j := r.runJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Planned: true, To: api.ToNBD})); j.State != api.JobFailed ||
		!strings.Contains(j.Error, "planned failover needs its process server's hand-over") {
		t.Fatalf("a planned failover with ps1 gone: %s %s", j.State, j.Error)
	}
	if ps := r.machine("vm1").ProcessServer; ps != "ps1" {
		t.Fatalf("a refused planned failover moved vm1 to %q", ps)
	}
	check(p, false, "taken back")
	var evs []api.EventJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=vm1", nil, &evs); err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(evs, func(e api.EventJSON) bool {
		return e.Kind == "process-server-switch" && strings.Contains(e.Message, "taken back for a failover from process server ps1")
	}) {
		t.Fatalf("no event of the take-back: %+v", evs)
	}
}

// runPS runs a scale-out process server in process until the returned
// stop (also called at the test's end) and waits until it is healthy.
func (r *rig) runPS(ctx context.Context, name string) (stop func()) {
	r.t.Helper()
	n, err := psnode.Open(ctx, r.psConfig(name, filepath.Join(r.dir, "srv", server.PassphraseFile)))
	if err != nil {
		r.t.Fatal(err)
	}
	nctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- n.Run(nctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			<-done
			n.Close()
		})
	}
	r.t.Cleanup(stop)
	r.waitPS(ctx, name, api.PSHealthy)
	return stop
}

// Unprotecting a machine on a scale-out process server brings it back to
// the built-in one first (handed over: every acknowledged write applied),
// then ends its protection there; its replica recovers the last point.
func TestUnprotectFromAScaleOutProcessServer(t *testing.T) {
	// Not parallel: it runs scale-out process servers, whose heartbeats
	// and commands have deadlines (PSHeartbeatLost, psCommandWait) that
	// the package's other tests run beside it made them overrun.
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger()}
	r.start()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 4<<20, 6)
	startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0}))
	r.waitProtected("vm1")
	r.runPS(ctx, "ps1")
	if _, err := r.client.SwitchProcessServer(ctx, "vm1", "ps1"); err != nil {
		t.Fatal(err)
	}
	var p api.PointJSON
	for {
		var err error
		if p, err = r.client.Tag(ctx, "vm1", false, time.Minute); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no point on ps1: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := r.client.Unprotect(ctx, "vm1", false); err != nil {
		t.Fatal(err)
	}
	m := r.machine("vm1")
	if !m.Unprotected || (m.ProcessServer != "" && m.ProcessServer != api.BuiltinProcessServer) {
		t.Fatalf("after unprotect: unprotected %v, on %q", m.Unprotected, m.ProcessServer)
	}
	out := t.TempDir()
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d0.img")) != fileSum(t, d0) {
		t.Fatal("the point made on ps1 does not recover the source after the unprotect")
	}
}
