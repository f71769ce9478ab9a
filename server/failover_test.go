package server_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// dialExport connects to an export by its NBD URI (nbd://HOST:PORT/NAME).
func dialExport(t *testing.T, uri string) *nbd.Client {
	t.Helper()
	u, err := url.Parse(uri)
	if err != nil || u.Scheme != "nbd" {
		t.Fatalf("export URI %q: %v", uri, err)
	}
	c, err := nbd.Dial(context.Background(), u.Host, strings.TrimPrefix(u.Path, "/"))
	if err != nil {
		t.Fatalf("dial %s: %v", uri, err)
	}
	return c
}

func exportSum(t *testing.T, c *nbd.Client) [32]byte {
	t.Helper()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < c.Size(); off += int64(len(buf)) {
		b := buf[:min(int64(len(buf)), c.Size()-off)]
		if err := c.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		h.Write(b)
	}
	return [32]byte(h.Sum(nil))
}

// runJob starts a job and waits for its end.
func (r *rig) runJob(j api.Job, err error) api.Job {
	r.t.Helper()
	if err != nil {
		r.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	j, err = r.client.WaitJob(ctx, j.ID, nil)
	if err != nil {
		r.t.Fatal(err)
	}
	return j
}

func (r *rig) mustJob(j api.Job, err error) api.Job {
	r.t.Helper()
	j = r.runJob(j, err)
	if j.State != api.JobSucceeded {
		r.t.Fatalf("job %s %s %s: %s (steps %+v)", j.ID, j.Kind, j.State, j.Error, j.Steps)
	}
	return j
}

// exportsOf parses a failover job's "DISK URI" lines.
func exportsOf(t *testing.T, j api.Job) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, l := range j.Output {
		disk, uri, ok := strings.Cut(l, " ")
		if !ok || !strings.HasPrefix(uri, "nbd://") {
			t.Fatalf("output line %q: want DISK URI", l)
		}
		out[disk] = uri
	}
	return out
}

// A test failover serves a point as read-write NBD exports at once, without
// touching the point; replication and new points go on; retention keeps
// the point; cleanup removes the exports and releases the point.
func TestTestFailoverToNBD(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) {
		c.NBDListen = "127.0.0.1:0"
		c.Now = func() time.Time { return time.Unix(0, clock.Load()) }
		c.PolicyEvery, c.PruneEvery = 50*time.Millisecond, 50*time.Millisecond
	}}
	r.start()
	d0, d1 := filepath.Join(dir, "d0.img"), filepath.Join(dir, "d1.img")
	mustDisk(t, d0, 8<<20, 1)
	mustDisk(t, d1, 3<<20+4096, 2)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0}, agent.DiskSpec{Name: "d1", Path: d1})
	startAgent(t, cfg)
	r.waitProtected("vm1")
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/policies", api.PolicyJSON{Name: "short", Retention: "1h", AppFrequency: "0", PITWindow: "30m"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/vm1/policy", api.AssignRequest{Policy: "short"}, nil); err != nil {
		t.Fatal(err)
	}
	src, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.WriteAt(bytes.Repeat([]byte{1}, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	p1, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	want0, want1 := fileSum(t, d0), fileSum(t, d1)

	j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Test: true, Point: p1.ID, To: api.ToNBD}))
	ex := exportsOf(t, j)
	if len(ex) != 2 || ex["d0"] == "" || ex["d1"] == "" {
		t.Fatalf("exports %v, want d0 and d1", ex)
	}
	c0, c1 := dialExport(t, ex["d0"]), dialExport(t, ex["d1"])
	defer c1.Close()
	if exportSum(t, c0) != want0 || exportSum(t, c1) != want1 {
		t.Fatal("the exports differ from the point")
	}
	// A second failover of the same machine is refused while this one lives.
	if _, err := r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Test: true, To: api.ToNBD}); err == nil || !strings.Contains(err.Error(), "has a test failover") {
		t.Fatalf("a second test failover: %v", err)
	}
	// Writes to the export change the export, not the point.
	if err := c0.WriteAt(bytes.Repeat([]byte{0xee}, 4096), 12345); err != nil {
		t.Fatal(err)
	}
	if err := c0.Flush(); err != nil {
		t.Fatal(err)
	}
	if exportSum(t, c0) == want0 {
		t.Fatal("a write to the export did not show")
	}
	// Replication goes on: the source changes, a new point is taken.
	if err := src.WriteAt(bytes.Repeat([]byte{2}, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	p2, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatalf("a point during the test failover: %v", err)
	}
	// Retention: every point is past it, but the one under test stays.
	clock.Add(int64(2 * time.Hour))
	waitFor(t, "retention to prune", func() bool {
		var ps []api.PointJSON
		r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/points", nil, &ps)
		return len(ps) == 2 && ps[0].ID == p1.ID && ps[1].ID == p2.ID
	})
	out := filepath.Join(dir, "out")
	r.recover("vm1", p1.ID, out)
	if fileSum(t, filepath.Join(out, "d0.img")) != want0 {
		t.Fatal("the point changed under the test failover")
	}
	fos, err := r.client.Failovers(ctx, false)
	if err != nil || len(fos) != 1 || fos[0].Kind != api.FailoverTest || fos[0].State != "active" || fos[0].Exports[0].Written == 0 {
		t.Fatalf("failovers: %+v %v", fos, err)
	}
	c0.Close()

	r.mustJob(r.client.FailoverAction(ctx, "cleanup", api.FailoverAction{Machine: "vm1"}))
	u, _ := url.Parse(ex["d0"])
	if c, err := nbd.Dial(ctx, u.Host, "vm1/d0"); err == nil {
		c.Close()
		t.Fatal("the export is still served after cleanup")
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "srv", "failovers", "*", "*")); len(m) != 0 {
		t.Fatalf("overlay files left after cleanup: %v", m)
	}
	clock.Add(int64(time.Minute)) // the next pruning pass
	waitFor(t, "the released point to be pruned", func() bool {
		var ps []api.PointJSON
		r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/points", nil, &ps)
		return len(ps) == 1 && ps[0].ID == p2.ID
	})
	if _, err := r.client.FailoverAction(ctx, "cleanup", api.FailoverAction{Machine: "vm1"}); err == nil {
		t.Fatal("a second cleanup found something")
	}
}

// A failover to NBD survives a server restart with what was written to it;
// its point can be changed before commit; commit keeps the source
// registered (failback's master target), keeps
// the exports and releases the other points.
func TestFailoverChangePointCommit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	r.start()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 4<<20, 3)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	src, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	p1, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	sum1 := fileSum(t, d0)
	if err := src.WriteAt(bytes.Repeat([]byte{7}, 65536), 65536); err != nil {
		t.Fatal(err)
	}
	p2, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	sum2 := fileSum(t, d0)
	src.Close()
	ra.close() // the source site is gone

	j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", To: api.ToNBD}))
	if j.RTO <= 0 {
		t.Fatalf("no RTO measured: %+v", j)
	}
	c := dialExport(t, exportsOf(t, j)["d0"])
	if exportSum(t, c) != sum2 {
		t.Fatal("failover at latest: the export differs from the newest point")
	}
	c.Close()
	if _, err := r.client.FailoverAction(ctx, "cleanup", api.FailoverAction{Machine: "vm1"}); err == nil {
		t.Fatal("cleanup accepted a real failover")
	}
	j = r.mustJob(r.client.FailoverAction(ctx, "change-point", api.FailoverAction{Machine: "vm1", Point: p1.ID}))
	c = dialExport(t, exportsOf(t, j)["d0"])
	if exportSum(t, c) != sum1 {
		t.Fatal("after change-point: the export differs from the point chosen")
	}
	// The recovered machine runs: it writes, flushes, and the server stops.
	mark := bytes.Repeat([]byte{0x5a}, 70000)
	if err := c.WriteAt(mark, 100000); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	r.stop()
	r.start()
	fos, err := r.client.Failovers(ctx, false)
	if err != nil || len(fos) != 1 || len(fos[0].Exports) != 1 {
		t.Fatalf("after a restart: %+v %v", fos, err)
	}
	c = dialExport(t, fos[0].Exports[0].URI)
	got := make([]byte, len(mark))
	if err := c.ReadAt(got, 100000); err != nil || !bytes.Equal(got, mark) {
		t.Fatalf("a flushed write to the failed-over disk was lost in a restart: %v", err)
	}
	r.mustJob(r.client.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "vm1"}))
	// Still served, still readable, after protection stopped.
	if err := c.ReadAt(got, 100000); err != nil || !bytes.Equal(got, mark) {
		t.Fatalf("the export broke at commit: %v", err)
	}
	c.Close()
	// A failover to NBD keeps its source registered: it is failback's
	// master target (failback_compare.go).
	if m := r.machine("vm1"); m.Unprotected || m.Direction != "failed-over" {
		t.Fatalf("after commit the machine is %q (unprotected %v, direction %q), want registered, failed over", m.State, m.Unprotected, m.Direction)
	}
	var ps []api.PointJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/points", nil, &ps); err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if p.ID == p2.ID {
			t.Fatalf("points after commit %+v: point %s was not released", ps, p2.ID)
		}
	}
	if _, err := r.client.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "vm1"}); err == nil {
		t.Fatal("a second commit was accepted")
	}
}

// A test failover at a time replays the kept changes up to it.
func TestTestFailoverAtTime(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	r.start()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 4<<20, 4)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0})
	startAgent(t, cfg)
	r.waitProtected("vm1")
	src, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := src.WriteAt(bytes.Repeat([]byte{9}, 8192), 8192); err != nil {
		t.Fatal(err)
	}
	if err := src.Flush(); err != nil {
		t.Fatal(err)
	}
	want := fileSum(t, d0)
	// The instant after the write, before the next.
	time.Sleep(20 * time.Millisecond)
	at := time.Now()
	time.Sleep(20 * time.Millisecond)
	if err := src.WriteAt(bytes.Repeat([]byte{10}, 8192), 3<<20); err != nil {
		t.Fatal(err)
	}
	// The changes reach the target's kept segments with the next point.
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil {
		t.Fatal(err)
	}
	j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Test: true, Time: &at, To: api.ToNBD}))
	c := dialExport(t, exportsOf(t, j)["d0"])
	defer c.Close()
	if exportSum(t, c) != want {
		t.Fatal("the export at a time differs from the disk as it was then")
	}
	r.mustJob(r.client.FailoverAction(ctx, "cleanup", api.FailoverAction{Machine: "vm1"}))
}

// Bad requests are refused with a clear error and change nothing.
func TestFailoverRefusesBadRequests(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	r.start()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 1<<20, 5)
	startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0}))
	r.waitProtected("vm1")
	for _, c := range []struct {
		req  api.FailoverRequest
		want string
	}{
		{api.FailoverRequest{Machine: "vm1", Test: true}, "say where"},
		{api.FailoverRequest{Machine: "vm1", Test: true, To: "cloud"}, "want nbd"},
		{api.FailoverRequest{Machine: "vm1", Plan: "p", Test: true, To: api.ToNBD}, "one machine, group or plan"},
		{api.FailoverRequest{Machine: "nope", Test: true, To: api.ToNBD}, "no machine named"},
		{api.FailoverRequest{Machine: "vm1", Test: true, To: api.ToNBD, Point: "999999"}, "no such recovery point"},
		{api.FailoverRequest{Machine: "vm1", To: api.ToQEMU, BootCheck: "x"}, "add --test"},
		{api.FailoverRequest{Machine: "vm1", Test: true, To: api.ToQEMU}, "needs a boot check"},
		{api.FailoverRequest{Machine: "vm1", Test: true, To: api.ToQEMU, BootCheck: "("}, "boot check"},
		{api.FailoverRequest{Machine: "vm1", Test: true, Planned: true, To: api.ToNBD}, "not a test"},
		{api.FailoverRequest{Machine: "vm1", To: api.ToVSphere}, "--vcenter"},
		{api.FailoverRequest{Machine: "vm1", To: api.ToAzure, Azure: &api.AzureTarget{Subscription: "s"}}, "--resource-group"},
		{api.FailoverRequest{Machine: "vm1", Test: true, To: api.ToNBD, Point: "1", Time: new(time.Time)}, "not both"},
	} {
		_, err := r.client.StartFailover(ctx, c.req)
		var ae *api.Error
		if err == nil || !strings.Contains(err.Error(), c.want) || !errors.As(err, &ae) || ae.Status >= 500 {
			t.Errorf("%+v: %v, want a 4xx naming %q", c.req, err, c.want)
		}
	}
	if fos, _ := r.client.Failovers(ctx, true); len(fos) != 0 {
		t.Fatalf("refused requests left failovers: %+v", fos)
	}
	if js, _ := r.client.Jobs(ctx); len(js) != 0 {
		t.Fatalf("refused requests started jobs: %+v", js)
	}
}

// A recovery plan fails its groups over in order, runs a script with the
// JSON context and waits on a manual action until it is confirmed.
func TestPlanTestFailover(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	r.start()
	for i, name := range []string{"web", "db"} {
		d := filepath.Join(dir, name+".img")
		mustDisk(t, d, 1<<20, uint64(10+i))
		startAgent(t, r.agentConfig(name, agent.DiskSpec{Name: "d0", Path: d}))
		r.waitProtected(name)
		if _, err := r.client.Tag(ctx, name, false, time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	script := filepath.Join(dir, "pre.sh")
	ctxFile := filepath.Join(dir, "context.json")
	if err := os.WriteFile(script, []byte("#!/bin/sh\ncat > "+ctxFile+"\necho started group $ASR_GROUP\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	bad := []api.Plan{
		{Name: "p", Groups: []api.PlanGroup{{Machines: []string{"nope"}}}},
		{Name: "p", Groups: []api.PlanGroup{{Machines: []string{"db"}}, {Machines: []string{"db"}}}},
		{Name: "p", Groups: []api.PlanGroup{{Machines: []string{"db"}, Pre: []api.PlanAction{{Kind: "script", Path: "relative.sh"}}}}},
		{Name: "p", Groups: []api.PlanGroup{{Machines: []string{"db"}, Pre: []api.PlanAction{{Kind: "script", Path: script, On: "sideways"}}}}},
		{Name: "bad name!", Groups: []api.PlanGroup{{Machines: []string{"db"}}}},
		{Name: "p", Groups: make([]api.PlanGroup, 8)},
	}
	for _, p := range bad {
		if _, err := r.client.CreatePlan(ctx, p); err == nil {
			t.Errorf("plan %+v was accepted", p)
		}
	}
	plan := api.Plan{Name: "app", Groups: []api.PlanGroup{
		{Machines: []string{"db"}, Post: []api.PlanAction{{Kind: "manual", Text: "check the database"}}},
		{Machines: []string{"web"}, Pre: []api.PlanAction{{Kind: "script", Path: script}}},
	}}
	if _, err := r.client.CreatePlan(ctx, plan); err != nil {
		t.Fatal(err)
	}
	if _, err := r.client.CreatePlan(ctx, plan); err == nil {
		t.Fatal("a second plan of the same name was accepted")
	}
	j, err := r.client.StartFailover(ctx, api.FailoverRequest{Plan: "app", Test: true, To: api.ToNBD})
	if err != nil {
		t.Fatal(err)
	}
	// The plan waits on the manual action, with db failed over and web not.
	waitFor(t, "the plan to wait on its manual action", func() bool {
		j, err = r.client.Job(ctx, j.ID)
		if err != nil || j.State != api.JobRunning {
			t.Fatalf("the plan ended without waiting: %+v %v", j, err)
		}
		return j.Waiting != ""
	})
	if j.Waiting != "check the database" {
		t.Fatalf("waiting on %q", j.Waiting)
	}
	fos, _ := r.client.Failovers(ctx, false)
	if len(fos) != 1 || fos[0].Machine != "db" || fos[0].Plan != "app" {
		t.Fatalf("while group 1's post action waits: %+v", fos)
	}
	if _, err := os.Stat(ctxFile); err == nil {
		t.Fatal("group 2's script ran before group 1's manual action was confirmed")
	}
	if _, err := r.client.ConfirmJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := r.client.ConfirmJob(ctx, j.ID); err == nil {
		t.Fatal("a second confirmation was accepted")
	}
	j = r.mustJob(j, nil)
	if len(j.Output) != 2 || !strings.HasPrefix(j.Output[0], "db/d0 nbd://") || !strings.HasPrefix(j.Output[1], "web/d0 nbd://") {
		t.Fatalf("plan output %q", j.Output)
	}
	var actx api.ActionContext
	b, err := os.ReadFile(ctxFile)
	if err != nil || json.Unmarshal(b, &actx) != nil {
		t.Fatalf("the script's context: %s %v", b, err)
	}
	if actx.Plan != "app" || actx.Group != 2 || actx.Phase != "pre" || actx.Type != "test" || len(actx.Machines["db"].Exports) != 1 {
		t.Fatalf("the script's context: %+v", actx)
	}
	if _, err := r.client.FailoverAction(ctx, "cleanup", api.FailoverAction{Plan: "app"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the plan's cleanup", func() bool {
		fos, _ := r.client.Failovers(ctx, false)
		return len(fos) == 0
	})
	if err := r.client.DeletePlan(ctx, "app"); err != nil {
		t.Fatal(err)
	}
}

// A planned failover through the API, under a constant write load: the
// source refuses writes from the freeze on, and the failed-over exports
// equal the source disk byte for byte (every acknowledged write is there).
func TestPlannedFailoverToNBD(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	r.start()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 8<<20, 21)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0})
	startAgent(t, cfg)
	r.waitProtected("vm1")
	var writers []*stripeWriter
	progress := make(chan struct{}, 1)
	refused := make(chan error, 4)
	for i := range 4 {
		c, err := nbd.Dial(ctx, cfg.NBD, "d0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		w := &stripeWriter{c: c, disk: "d0", id: i, stripes: 4, last: map[int64][]byte{}}
		writers = append(writers, w)
		go func() { refused <- w.run(progress) }()
	}
	for range 200 {
		<-progress
	}
	j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Planned: true, To: api.ToNBD}))
	for range writers {
		if err := <-refused; !errors.Is(err, nbd.EPERM) {
			t.Fatalf("a writer stopped with %v, want EPERM (the source is frozen)", err)
		}
	}
	c := dialExport(t, exportsOf(t, j)["d0"])
	defer c.Close()
	if exportSum(t, c) != fileSum(t, d0) {
		t.Fatal("the failed-over disk differs from the frozen source: acknowledged writes were lost")
	}
	if j.Kind != "planned-failover" || j.RTO <= 0 {
		t.Fatalf("job %+v", j)
	}
	// A planned failover of a machine whose agent is gone is refused by
	// its job with the reason, and leaves no failover behind.
	r.mustJob(r.client.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "vm1"}))
	if fos, _ := r.client.Failovers(ctx, false); len(fos) != 1 || fos[0].State != "committed" {
		t.Fatalf("after commit: %+v", fos)
	}
}

// A planned failover needs the source's agent: without it the job fails
// with the reason and nothing is left.
func TestPlannedFailoverNeedsTheAgent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	r.start()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 1<<20, 22)
	ra := startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0}))
	r.waitProtected("vm1")
	ra.close()
	j := r.runJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Planned: true, To: api.ToNBD}))
	if j.State != api.JobFailed || !strings.Contains(j.Error, "unplanned") {
		t.Fatalf("planned failover without the agent: %s %s", j.State, j.Error)
	}
	if fos, _ := r.client.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("a refused planned failover left %+v", fos)
	}
}

// The replica a live failover runs from cannot be deleted.
func TestUnprotectKeepsAFailedOverReplica(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	r.start()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 1<<20, 23)
	startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0}))
	r.waitProtected("vm1")
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil {
		t.Fatal(err)
	}
	r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Test: true, To: api.ToNBD}))
	err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/vm1/unprotect", api.UnprotectRequest{DeleteReplica: true}, nil)
	if err == nil || !strings.Contains(err.Error(), "clean it up") {
		t.Fatalf("unprotect --delete-replica under a test failover: %v", err)
	}
	if m := r.machine("vm1"); m.State == "unprotected" {
		t.Fatal("the refused unprotect changed the machine")
	}
}

// A replication group fails over at one of its cuts: each member from its
// own point of that cut.
func TestGroupTestFailover(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	r.start()
	sums := map[string][32]byte{}
	var srcs []*nbd.Client
	for i, name := range []string{"vm1", "vm2"} {
		d := filepath.Join(dir, name+".img")
		mustDisk(t, d, 2<<20, uint64(30+i))
		cfg := r.agentConfig(name, agent.DiskSpec{Name: "d", Path: d})
		startAgent(t, cfg)
		r.waitProtected(name)
		if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/"+name+"/group", api.GroupRequest{Group: "g"}, nil); err != nil {
			t.Fatal(err)
		}
		c, err := nbd.Dial(ctx, cfg.NBD, "d")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		srcs = append(srcs, c)
	}
	var gp api.GroupPointJSON
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/groups/g/points", api.TagRequest{}, &gp); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"vm1", "vm2"} {
		sums[name] = fileSum(t, filepath.Join(dir, name+".img"))
	}
	// Later writes are not in the cut.
	for _, c := range srcs {
		if err := c.WriteAt(bytes.Repeat([]byte{0xcc}, 65536), 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil {
		t.Fatal(err)
	}
	j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Group: "g", Test: true, Point: gp.ID, To: api.ToNBD}))
	if len(j.Output) != 2 {
		t.Fatalf("group output %q", j.Output)
	}
	for _, l := range j.Output {
		name, uri, _ := strings.Cut(l, " ")
		machine, _, _ := strings.Cut(name, "/")
		c := dialExport(t, uri)
		if exportSum(t, c) != sums[machine] {
			t.Fatalf("%s: the export differs from the group's cut", name)
		}
		c.Close()
	}
	r.mustJob(r.client.FailoverAction(ctx, "cleanup", api.FailoverAction{Group: "g"}))
	if fos, _ := r.client.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("after the group's cleanup: %+v", fos)
	}
}

// A planned failover of a machine linked to a VM shuts the VM down through
// its vCenter after the last point, then recovers it in the vCenter with
// the VM's CPUs and memory.
func TestPlannedFailoverShutsTheVMDown(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	sim := startSim(t)
	r := startServer(t, dir)
	if _, err := r.client.AddVCenter(ctx, api.AddVCenterRequest{Name: "vc1", URL: sim.URL, User: sim.User, Password: simPassword, Thumbprint: sim.Thumbprint}); err != nil {
		t.Fatal(err)
	}
	gc, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Logout(ctx)
	const uuid = "4211aaaa-bbbb-4ccc-8ddd-eeeeffff0001"
	vm, err := sim.CreateVM(ctx, gc, vcsim.VMSpec{Name: "app01", BIOSUUID: uuid, CPUs: 2, MemoryMiB: 2048, Disks: []int64{4 << 20}, PowerOn: true})
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "d0.img")
	mustDisk(t, disk, 4<<20, 40)
	cfg := r.agentConfig("app01", agent.DiskSpec{Name: "d0", Path: disk})
	cfg.BIOSUUID = uuid
	startAgent(t, cfg)
	r.waitProtected("app01")
	waitFor(t, "the machine linked to its VM", func() bool { return r.machine("app01").VM != nil })
	var ds []mo.Datastore
	v, err := view.NewManager(gc.Client).CreateContainerView(ctx, gc.ServiceContent.RootFolder, []string{"Datastore"}, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Retrieve(ctx, []string{"Datastore"}, []string{"name"}, &ds); err != nil || len(ds) == 0 {
		t.Fatalf("datastores: %v", err)
	}
	j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "app01", Planned: true, To: api.ToVSphere,
		VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: ds[0].Name}}))
	if st, err := vm.PowerState(ctx); err != nil || st != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("the source VM after a planned failover: %s %v", st, err)
	}
	var names []string
	for _, s := range j.Steps {
		names = append(names, s.Name)
	}
	if !slices.Contains(names, "app01: freeze") || !slices.Contains(names, "app01: shut down") {
		t.Fatalf("steps %v", names)
	}
	rec, err := vcsim.FindVM(ctx, gc, "app01-recovered")
	if err != nil {
		t.Fatal(err)
	}
	var mvm mo.VirtualMachine
	if err := rec.Properties(ctx, rec.Reference(), []string{"config.hardware", "runtime.powerState"}, &mvm); err != nil {
		t.Fatal(err)
	}
	if mvm.Config.Hardware.NumCPU != 2 || mvm.Config.Hardware.MemoryMB != 2048 || mvm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("the recovered VM: %d CPUs, %d MiB, %s", mvm.Config.Hardware.NumCPU, mvm.Config.Hardware.MemoryMB, mvm.Runtime.PowerState)
	}
}
