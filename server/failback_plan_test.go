package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// planRig is a recovery plan "app" of two groups: db (group 1), app1 and
// app2 (group 2, and replication group "rg"), each machine with one disk,
// failed over (planned) to the server's NBD exports by the plan.
type planRig struct {
	*rig
	cfgs    map[string]agent.Config
	agents  map[string]*runningAgent
	disks   map[string]string // machine -> its original disk file
	exports map[string]string // machine -> its export's URI
	rnd     *rand.Rand
	plan    string // the plan that failed them over ("" for a group's failover)
}

var planMachines = []string{"db", "app1", "app2"}

// startPlanRig protects the machines and fails the plan over; commit
// commits it.
func startPlanRig(t *testing.T, commit bool) *planRig {
	t.Helper()
	return startPlanRigWith(t, commit, []api.PlanGroup{{Machines: []string{"db"}}, {Machines: []string{"app1", "app2"}}})
}

// startPlanRigWith is startPlanRig with the plan's groups (their actions)
// given: db in group 1, app1 and app2 in group 2. With groups nil there is
// no plan: db fails over by itself, app1 and app2 as replication group rg
// (asr failover --group rg).
func startPlanRigWith(t *testing.T, commit bool, groups []api.PlanGroup) *planRig {
	t.Helper()
	return startPlanRigOf(t, commit, groups, true)
}

// startPlanRigOf is startPlanRigWith, the failover planned or not (an
// unplanned one at a point of each machine taken first; the sources run
// on after it).
func startPlanRigOf(t *testing.T, commit bool, groups []api.PlanGroup, planned bool) *planRig {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	pr := &planRig{rig: r, cfgs: map[string]agent.Config{}, agents: map[string]*runningAgent{},
		disks: map[string]string{}, exports: map[string]string{}, rnd: rand.New(rand.NewPCG(5, 9))}
	for i, name := range planMachines {
		p := filepath.Join(dir, name+".img")
		mustDisk(t, p, int64(4+2*i)<<20, uint64(50+i))
		pr.disks[name] = p
		pr.cfgs[name] = r.agentConfig(name, agent.DiskSpec{Name: "d0", Path: p})
		pr.agents[name] = startAgent(t, pr.cfgs[name])
	}
	for _, name := range planMachines {
		r.waitProtected(name)
	}
	for _, name := range []string{"app1", "app2"} {
		if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/"+name+"/group", api.GroupRequest{Group: "rg"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if !planned {
		for _, name := range planMachines {
			if _, err := r.client.Tag(ctx, name, false, time.Minute); err != nil {
				t.Fatal(err)
			}
		}
	}
	if groups == nil {
		for _, a := range []api.FailoverAction{{Machine: "db"}, {Group: "rg"}} {
			r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: a.Machine, Group: a.Group, Planned: planned, To: api.ToNBD}))
			if commit {
				r.mustJob(r.client.FailoverAction(ctx, "commit", a))
			}
		}
	} else {
		pr.plan = "app"
		if _, err := r.client.CreatePlan(ctx, api.Plan{Name: "app", Groups: groups}); err != nil {
			t.Fatal(err)
		}
		r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Plan: "app", Planned: planned, To: api.ToNBD}))
		if commit {
			r.mustJob(r.client.FailoverAction(ctx, "commit", api.FailoverAction{Plan: "app"}))
		}
	}
	pr.readExports()
	return pr
}

// readExports reads the live failovers' exports.
func (pr *planRig) readExports() {
	pr.t.Helper()
	fos, err := pr.client.Failovers(context.Background(), false)
	if err != nil {
		pr.t.Fatal(err)
	}
	for _, f := range fos {
		if len(f.Exports) != 1 || f.Plan != pr.plan {
			pr.t.Fatalf("failover of %s: %+v", f.Machine, f)
		}
		pr.exports[f.Machine] = f.Exports[0].URI
	}
	if len(pr.exports) != len(planMachines) {
		pr.t.Fatalf("exports %v", pr.exports)
	}
}

// write writes n random 64 KiB blocks into a machine's export.
func (pr *planRig) write(machine string, n int) {
	pr.t.Helper()
	c := dialExport(pr.t, pr.exports[machine])
	defer c.Close()
	buf := make([]byte, 65536)
	for range n {
		for i := range buf {
			buf[i] = byte(pr.rnd.IntN(256))
		}
		if err := c.WriteAt(buf, pr.rnd.Int64N(c.Size()/65536)*65536); err != nil {
			pr.t.Fatal(err)
		}
	}
	if err := c.Flush(); err != nil {
		pr.t.Fatal(err)
	}
}

func (pr *planRig) sums() map[string][32]byte {
	pr.t.Helper()
	out := map[string][32]byte{}
	for m, uri := range pr.exports {
		c := dialExport(pr.t, uri)
		out[m] = exportSum(pr.t, c)
		c.Close()
	}
	return out
}

func (pr *planRig) directions(want string, machines ...string) {
	pr.t.Helper()
	if len(machines) == 0 {
		machines = planMachines
	}
	for _, name := range machines {
		if d := pr.machine(name).Direction; d != want {
			pr.t.Fatalf("machine %s: direction %q, want %q", name, d, want)
		}
	}
}

// stepIndex returns the index of the job's step named name.
func stepIndex(t *testing.T, j api.Job, name string) int {
	t.Helper()
	i := slices.IndexFunc(j.Steps, func(s api.JobStep) bool { return s.Name == name })
	if i < 0 {
		var names []string
		for _, s := range j.Steps {
			names = append(names, s.Name)
		}
		t.Fatalf("job %s has no step %q: %q", j.ID, name, names)
	}
	return i
}

// failBackPlan fails the plan back and checks the order of its steps,
// the original disks against want, and that the machines are failed back.
func (pr *planRig) failBackPlan(want map[string][32]byte) {
	t := pr.t
	t.Helper()
	pr.checkPlanFailback(pr.mustJob(pr.client.FailbackPlan(context.Background(), "app")), want)
}

// checkPlanFailback checks a plan failback's finished job (see
// failBackPlan).
func (pr *planRig) checkPlanFailback(j api.Job, want map[string][32]byte) {
	t := pr.t
	t.Helper()
	ctx := context.Background()
	t.Logf("plan failback output %q", j.Output)
	if len(j.Output) != 4 || !strings.HasPrefix(j.Output[0], "plan app failed back: 3 machines") {
		t.Fatalf("plan failback output %q", j.Output)
	}
	at := func(name string) int { return stepIndex(t, j, name) }
	// Shut down the last group first; drain every machine, then compare
	// every one, before the switch; power on in the plan's order.
	order := [][]string{
		{"group 2: shut down"}, {"app1: stop the failed-over machine", "app2: stop the failed-over machine"},
		{"group 1: shut down"}, {"db: stop the failed-over machine"},
		{"app1: drain", "app2: drain", "db: drain"},
		{"app1: verify", "app2: verify", "db: verify"},
		{"switch"},
		{"group 1: power on"}, {"db: power on"}, {"db: end the failover"},
		{"group 2: power on"}, {"app1: power on", "app2: power on"},
	}
	for k := 1; k < len(order); k++ {
		for _, before := range order[k-1] {
			for _, after := range order[k] {
				if at(before) >= at(after) {
					t.Fatalf("step %q is not before %q", before, after)
				}
			}
		}
	}
	for _, s := range j.Steps {
		if strings.HasSuffix(s.Name, ": verify") && (s.Total == 0 || s.Done != s.Total) {
			t.Fatalf("step %+v: want its bytes", s)
		}
	}
	for m, p := range pr.disks {
		if fileSum(t, p) != want[m] {
			t.Fatalf("machine %s: the original disk differs from the failed-over disk's final state", m)
		}
	}
	pr.directions("failed-back")
	if fos, _ := pr.client.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers after the plan's failback: %+v", fos)
	}
}

// forward protects the plan forward again; a new point of each machine
// recovers bit-exact.
func (pr *planRig) forward() {
	t := pr.t
	t.Helper()
	ctx := context.Background()
	j := pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	t.Logf("forward plan reprotect output %q", j.Output)
	if len(j.Output) != 4 || !strings.HasPrefix(j.Output[0], "plan app protected again: 3 machines") {
		t.Fatalf("forward plan reprotect output %q", j.Output)
	}
	for _, name := range planMachines {
		pr.waitProtected(name)
	}
	pr.directions("")
	for _, name := range planMachines {
		p, err := pr.client.Tag(ctx, name, false, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		out := t.TempDir()
		pr.recover(name, p.ID, out)
		if fileSum(t, filepath.Join(out, "d0.img")) != fileSum(t, pr.disks[name]) {
			t.Fatalf("machine %s: the point after the forward reprotect differs from the source", name)
		}
	}
	if _, err := pr.client.ReprotectPlan(ctx, "app"); err == nil {
		t.Fatal("a second forward reprotect of the plan was accepted")
	}
}

// The plan's cycle: reprotect --plan, the failback of one member of a
// replication group refused, failback --plan in order (shut down last
// group first, drain and verify all, switch, power on in plan order), the
// original disks equal the exports, forward protection again.
func TestFailbackPlanCycle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pr := startPlanRig(t, true)
	if _, err := pr.client.FailbackPlan(ctx, "app"); err == nil || !strings.Contains(err.Error(), "reprotect --plan app") {
		t.Fatalf("plan failback before reprotect: %v", err)
	}
	for _, m := range planMachines {
		pr.write(m, 8)
	}
	j := pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	if len(j.Output) != 4 || !strings.HasPrefix(j.Output[0], "plan app reprotected: 3 machines") {
		t.Fatalf("plan reprotect output %q", j.Output)
	}
	pr.directions("reprotected")
	if _, err := pr.client.ReprotectPlan(ctx, "app"); err == nil || !strings.Contains(err.Error(), "reprotected already") {
		t.Fatalf("a second plan reprotect: %v", err)
	}
	// app1 alone would come back on premises while app2 runs failed over.
	_, err := pr.client.Failback(ctx, "app1")
	if err == nil || !strings.Contains(err.Error(), "replication group rg with app2") || !strings.Contains(err.Error(), "asr failback --plan app") {
		t.Fatalf("failback of one member of a replication group: %v", err)
	}
	pr.directions("reprotected")
	for _, m := range planMachines {
		pr.write(m, 4)
	}
	pr.failBackPlan(pr.sums())
	pr.forward()
}

// A plan's failback is cancellable until its switch: cancelled while the
// drain of one machine waits for its agent, every failed-over machine runs
// on (its export writable) and stays reprotected; run again, it completes.
func TestFailbackPlanCancel(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pr := startPlanRig(t, true)
	for _, m := range planMachines {
		pr.write(m, 4)
	}
	pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	pr.agents["app2"].close() // app2's drain cannot end
	pr.write("app2", 4)
	j, err := pr.client.FailbackPlan(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the plan failback's drain of app2", func() bool {
		jj, err := pr.client.Job(ctx, j.ID)
		if err != nil {
			return false
		}
		for _, s := range jj.Steps {
			if s.Name == "app2: drain" && s.State == "running" && jj.Cancellable {
				return true
			}
		}
		return false
	})
	// Stopped: the exports refuse writes.
	c := dialExport(t, pr.exports["db"])
	if err := c.WriteAt(make([]byte, 4096), 0); err == nil {
		t.Fatal("a write to a stopped failed-over machine was accepted")
	}
	c.Close()
	if _, err := pr.client.FailbackPlan(ctx, "app"); err == nil || !strings.Contains(err.Error(), "job "+j.ID) {
		t.Fatalf("a second plan failback while one runs: %v", err)
	}
	if _, err := pr.client.Reprotect(ctx, "db"); err == nil || !strings.Contains(err.Error(), "running") {
		t.Fatalf("a machine's reprotect while its plan fails back: %v", err)
	}
	if _, err := pr.client.CancelJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	if j = pr.runJob(j, nil); j.State == api.JobSucceeded {
		t.Fatalf("a cancelled plan failback succeeded: %+v", j)
	}
	for _, s := range j.Steps {
		if s.Name == "switch" || strings.HasSuffix(s.Name, "power on") {
			t.Fatalf("a cancelled plan failback ran step %+v", s)
		}
	}
	pr.directions("reprotected")
	for _, m := range planMachines {
		pr.write(m, 2) // every failed-over machine runs on
	}
	pr.agents["app2"] = startAgent(t, pr.cfgs["app2"])
	pr.failBackPlan(pr.sums())
	pr.forward()
}

// Refusals list every machine that cannot take part and start nothing.
func TestFailbackPlanRefusals(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pr := startPlanRig(t, false)
	var ae *api.Error
	if _, err := pr.client.ReprotectPlan(ctx, "nosuch"); !errors.As(err, &ae) || ae.Status != http.StatusNotFound {
		t.Fatalf("reprotect of an unknown plan: %v", err)
	}
	// db committed, app1 and app2 not.
	pr.mustJob(pr.client.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "db"}))
	_, err := pr.client.ReprotectPlan(ctx, "app")
	if !errors.As(err, &ae) || ae.Status != http.StatusConflict ||
		!strings.Contains(err.Error(), "nothing was started") || !strings.Contains(err.Error(), "app1's failover is") ||
		!strings.Contains(err.Error(), "app2's failover is") || strings.Contains(err.Error(), "db") {
		t.Fatalf("reprotect of a plan half committed: %v", err)
	}
	if d := pr.machine("db").Direction; d != "failed-over" {
		t.Fatalf("db after a refused plan reprotect: direction %q", d)
	}
	_, err = pr.client.FailbackPlan(ctx, "app")
	if err == nil || !strings.Contains(err.Error(), "db is not reprotected") || !strings.Contains(err.Error(), "app2 is not reprotected") {
		t.Fatalf("failback of a plan not reprotected: %v", err)
	}
	pr.directions("failed-over")
}

// A server that stops after a plan failback's switch (every machine's
// record says failing-back, in one transaction) finishes every machine at
// its next start: nothing lost, none left half-way.
func TestFailbackPlanFinishedAfterARestartPastTheSwitch(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pr := startPlanRig(t, true)
	for _, m := range planMachines {
		pr.write(m, 4)
	}
	pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	for _, m := range planMachines {
		pr.write(m, 2)
	}
	want := pr.sums()
	switched := make(chan struct{})
	server.SetFailbackSwitchHook(pr.srv, func(ctx context.Context) {
		close(switched)
		<-ctx.Done()
	})
	if _, err := pr.client.FailbackPlan(ctx, "app"); err != nil {
		t.Fatal(err)
	}
	<-switched
	pr.directions("failing-back")
	pr.stop()
	pr.start()
	waitFor(t, "every machine failed back after the restart", func() bool {
		for _, m := range planMachines {
			if pr.machine(m).Direction != "failed-back" {
				return false
			}
		}
		return true
	})
	for m, p := range pr.disks {
		if fileSum(t, p) != want[m] {
			t.Fatalf("machine %s: the original disk differs from the failed-over disk's final state", m)
		}
	}
	if fos, _ := pr.client.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers: %+v", fos)
	}
	pr.forward()
}

// A plan's actions run on failback too, in the reverse direction, around
// each group's power-on: a script for both directions runs on failover and
// on failback (with the direction and type in its context), one for
// failover only does not run on failback, a manual action for failback
// only holds the failback after group 2's power-on (and never the
// failover) until it is confirmed.
func TestFailbackPlanActions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	logf := filepath.Join(dir, "actions.log")
	script := func(name string) string {
		p := filepath.Join(dir, name)
		body := "#!/bin/sh\n{ printf '%s ' " + name + "; cat; echo; } >> " + logf + "\n"
		if err := os.WriteFile(p, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	both, foOnly, fbOnly := script("both.sh"), script("failover-only.sh"), script("failback-only.sh")
	pr := startPlanRigWith(t, true, []api.PlanGroup{
		{Machines: []string{"db"}, Pre: []api.PlanAction{{Kind: "script", Path: both}}, Post: []api.PlanAction{{Kind: "script", Path: foOnly, On: api.ActionOnFailover}}},
		{Machines: []string{"app1", "app2"}, Pre: []api.PlanAction{{Kind: "script", Path: fbOnly, On: api.ActionOnFailback}},
			Post: []api.PlanAction{{Kind: "manual", Text: "check the application", On: api.ActionOnFailback}}},
	})
	type line struct {
		script string
		actx   api.ActionContext
	}
	lines := func() []line {
		b, err := os.ReadFile(logf)
		if err != nil {
			t.Fatal(err)
		}
		var out []line
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			name, js, _ := strings.Cut(l, " ")
			var a api.ActionContext
			if err := json.Unmarshal([]byte(js), &a); err != nil {
				t.Fatalf("action log line %q: %v", l, err)
			}
			out = append(out, line{name, a})
		}
		return out
	}
	got := lines()
	if len(got) != 2 || got[0].script != "both.sh" || got[1].script != "failover-only.sh" ||
		got[0].actx.Direction != "primary-to-recovery" || got[0].actx.Type != "planned" || got[1].actx.Phase != "post" {
		t.Fatalf("the failover's actions: %+v", got)
	}
	for _, m := range planMachines {
		pr.write(m, 4)
	}
	pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	for _, m := range planMachines {
		pr.write(m, 2)
	}
	want := pr.sums()
	j := pr.failbackWaiting("group 2's manual action")
	if j.Waiting != "check the application" {
		t.Fatalf("waiting on %q", j.Waiting)
	}
	got = lines()[2:]
	if len(got) != 2 || got[0].script != "both.sh" || got[1].script != "failback-only.sh" {
		t.Fatalf("the failback's actions: %+v", got)
	}
	for i, g := range []int{1, 2} {
		a := got[i].actx
		if a.Direction != "recovery-to-primary" || a.Type != "failback" || a.Phase != "pre" || a.Group != g || a.Plan != "app" {
			t.Fatalf("failback action %d's context: %+v", i, a)
		}
	}
	// Group 1 was powered on before group 2's pre action: it is in the
	// context, at its original place.
	if m, ok := got[1].actx.Machines["db"]; !ok || m.To != "original" || len(got[1].actx.Machines) != 1 {
		t.Fatalf("group 2's pre action's machines: %+v", got[1].actx.Machines)
	}
	if at := stepIndex(t, j, "group 2 pre 1"); at < stepIndex(t, j, "group 1: power on") || at > stepIndex(t, j, "group 2: power on") {
		t.Fatalf("group 2's pre action ran out of order: %+v", j.Steps)
	}
	if _, err := pr.client.ConfirmJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	pr.checkPlanFailback(pr.mustJob(j, nil), want)
	if n := len(lines()); n != 4 {
		t.Fatalf("%d actions ran in all, want 4", n)
	}
}

// A replication group failed over by asr failover --group fails back with
// asr failback --group (no plan needed): its reprotect, the failback of one
// member alone refused with that hint, the group's failback (every
// member's original disk equals its export), forward again. db, failed
// over by itself, is not the group's and stays as it is.
func TestFailbackGroup(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pr := startPlanRigWith(t, true, nil)
	rg := []string{"app1", "app2"}
	if _, err := pr.client.FailbackGroup(ctx, "nope"); err == nil || !strings.Contains(err.Error(), "no replication group named") {
		t.Fatalf("failback of an unknown group: %v", err)
	}
	if _, err := pr.client.FailbackGroup(ctx, "rg"); err == nil || !strings.Contains(err.Error(), "reprotect") {
		t.Fatalf("group failback before reprotect: %v", err)
	}
	for _, m := range planMachines {
		pr.write(m, 6)
	}
	j := pr.mustJob(pr.client.ReprotectGroup(ctx, "rg"))
	if len(j.Output) != 3 || !strings.HasPrefix(j.Output[0], "group rg reprotected: 2 machines") || j.Subject != "group rg" {
		t.Fatalf("group reprotect %q: %q", j.Subject, j.Output)
	}
	pr.directions("reprotected", rg...)
	pr.directions("failed-over", "db")
	_, err := pr.client.Failback(ctx, "app1")
	if err == nil || !strings.Contains(err.Error(), "replication group rg with app2") || !strings.Contains(err.Error(), "asr failback --group rg") {
		t.Fatalf("failback of one member of a replication group: %v", err)
	}
	for _, m := range rg {
		pr.write(m, 3)
	}
	want := pr.sums()
	j = pr.mustJob(pr.client.FailbackGroup(ctx, "rg"))
	if len(j.Output) != 3 || !strings.HasPrefix(j.Output[0], "group rg failed back: 2 machines") || !strings.Contains(j.Output[0], "asr reprotect --group rg") {
		t.Fatalf("group failback output %q", j.Output)
	}
	if stepIndex(t, j, "switch") > stepIndex(t, j, "app1: power on") || stepIndex(t, j, "app2: verify") > stepIndex(t, j, "switch") {
		t.Fatalf("the group's failback steps out of order: %+v", j.Steps)
	}
	for _, m := range rg {
		if fileSum(t, pr.disks[m]) != want[m] {
			t.Fatalf("machine %s: the original disk differs from the failed-over disk's final state", m)
		}
	}
	pr.directions("failed-back", rg...)
	pr.directions("failed-over", "db")
	j = pr.mustJob(pr.client.ReprotectGroup(ctx, "rg"))
	if len(j.Output) != 3 || !strings.HasPrefix(j.Output[0], "group rg protected again: 2 machines") {
		t.Fatalf("forward group reprotect output %q", j.Output)
	}
	for _, m := range rg {
		pr.waitProtected(m)
		p, err := pr.client.Tag(ctx, m, false, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		out := t.TempDir()
		pr.recover(m, p.ID, out)
		if fileSum(t, filepath.Join(out, "d0.img")) != fileSum(t, pr.disks[m]) {
			t.Fatalf("machine %s: the point after the forward reprotect differs from the source", m)
		}
	}
	pr.directions("", rg...)
}

// writeSource writes n random 64 KiB blocks into a machine's original
// disk through its agent (after an unplanned failover: on the original
// only, never in the failed-over state).
// actionLogScript writes a plan action's script that appends the line
// what (shell words: the action's variables) to a log; it returns the
// script and the log.
func actionLogScript(t *testing.T, what string) (script, logf string) {
	t.Helper()
	dir := t.TempDir()
	script, logf = filepath.Join(dir, "log.sh"), filepath.Join(dir, "actions.log")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \""+what+"\" >> "+logf+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return script, logf
}

// failbackWaiting starts plan app's failback and waits until its job
// waits on a manual action (what names it).
func (pr *planRig) failbackWaiting(what string) api.Job {
	pr.t.Helper()
	ctx := context.Background()
	j, err := pr.client.FailbackPlan(ctx, "app")
	if err != nil {
		pr.t.Fatal(err)
	}
	waitFor(pr.t, "the plan failback to wait on "+what, func() bool {
		j, err = pr.client.Job(ctx, j.ID)
		if err != nil || j.State != api.JobRunning {
			pr.t.Fatalf("the plan failback ended without waiting: %+v %v", j, err)
		}
		return j.Waiting != ""
	})
	return j
}

func (pr *planRig) writeSource(machine string, n int) {
	pr.t.Helper()
	c, err := nbd.Dial(context.Background(), pr.cfgs[machine].NBD, "d0")
	if err != nil {
		pr.t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 65536)
	for range n {
		for i := range buf {
			buf[i] = byte(pr.rnd.IntN(256))
		}
		if err := c.WriteAt(buf, pr.rnd.Int64N(c.Size()/65536)*65536); err != nil {
			pr.t.Fatalf("a write to the original of %s: %v", machine, err)
		}
	}
	if err := c.Flush(); err != nil {
		pr.t.Fatal(err)
	}
}

var planReprotectedRE = regexp.MustCompile(`^(\S+): reprotected: (\d+) bytes compared, (\d+) differ, (\d+) bytes sent to the original disks`)

// A plan failed over unplanned (the sources written after its points, on
// the originals only) is reprotected by asr reprotect --plan: each
// original agent frozen and its disks compared by checksum, only what
// differs sent; the plan's failback then leaves every original disk equal
// to its export's final state, and forward protection resumes.
func TestFailbackPlanUnplanned(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pr := startPlanRigOf(t, true, []api.PlanGroup{{Machines: []string{"db"}}, {Machines: []string{"app1", "app2"}}}, false)
	for _, m := range planMachines {
		pr.writeSource(m, 3) // after the point: the compare finds it
		pr.write(m, 4)
	}
	j := pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	t.Logf("plan reprotect output %q", j.Output)
	if len(j.Output) != 4 || !strings.HasPrefix(j.Output[0], "plan app reprotected: 3 machines") || !strings.Contains(j.Output[0], "compared by checksum") {
		t.Fatalf("plan reprotect output %q", j.Output)
	}
	for _, l := range j.Output[1:] {
		g := planReprotectedRE.FindStringSubmatch(l)
		if g == nil {
			t.Fatalf("plan reprotect line %q", l)
		}
		compared, _ := strconv.ParseInt(g[2], 10, 64)
		differ, _ := strconv.ParseInt(g[3], 10, 64)
		size := int64(4+2*slices.Index(planMachines, g[1])) << 20
		// At least the source's writes differ; far less than the disk.
		if compared != size || differ < 65536 || differ > 7*65536 {
			t.Fatalf("%s: %d bytes compared of %d, %d differ", g[1], compared, size, differ)
		}
	}
	for _, s := range []string{"db: freeze the original", "db: compare", "app2: compare"} {
		if j.Steps[stepIndex(t, j, s)].State != "done" {
			t.Fatalf("step %s: %+v", s, j.Steps)
		}
	}
	pr.directions("reprotected")
	for _, m := range planMachines {
		pr.write(m, 2)
	}
	pr.failBackPlan(pr.sums())
	pr.forward()
}

// A plan mixing a failover to the server's NBD exports (db, planned, by
// itself) and one to vSphere (app01, unplanned, to a VM in the simulator):
// asr reprotect --plan reprotects each by its own path (the overlay's
// blocks; the recovered VM's disks read through vCenter and compared),
// asr failback --plan stops both (the recovered VM powered off, last
// group first), sends and verifies, switches them at once and powers on
// in the plan's order; every original disk equals its failed-over state.
func TestFailbackPlanMixed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	vr := startVSphereRig(t)
	p := filepath.Join(vr.dir, "db.img")
	mustDisk(t, p, 4<<20, 91)
	startAgent(t, vr.agentConfig("db", agent.DiskSpec{Name: "d0", Path: p}))
	vr.waitProtected("db")
	vr.mustJob(vr.client.StartFailover(ctx, api.FailoverRequest{Machine: "db", Planned: true, To: api.ToNBD}))
	vr.mustJob(vr.client.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "db"}))
	if _, err := vr.client.CreatePlan(ctx, api.Plan{Name: "mix", Groups: []api.PlanGroup{{Machines: []string{"db"}}, {Machines: []string{"app01"}}}}); err != nil {
		t.Fatal(err)
	}
	var export string
	fos, err := vr.client.Failovers(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fos {
		if f.Machine == "db" && len(f.Exports) == 1 {
			export = f.Exports[0].URI
		}
	}
	pr := &planRig{rig: vr.rig, exports: map[string]string{"db": export}, rnd: vr.rnd}
	pr.write("db", 5)
	vr.writeRecovered("d0", 4)
	if _, err := vr.client.FailbackPlan(ctx, "mix"); err == nil || !strings.Contains(err.Error(), "app01 is not reprotected") || !strings.Contains(err.Error(), "db is not reprotected") {
		t.Fatalf("plan failback before reprotect: %v", err)
	}
	j := vr.mustJob(vr.client.ReprotectPlan(ctx, "mix"))
	t.Logf("plan reprotect output %q", j.Output)
	if len(j.Output) != 3 || !strings.HasPrefix(j.Output[0], "plan mix reprotected: 2 machines") ||
		!strings.HasPrefix(j.Output[1], "db: reprotected: ") || planReprotectedRE.FindStringSubmatch(j.Output[2]) == nil {
		t.Fatalf("plan reprotect output %q", j.Output)
	}
	if stepIndex(t, j, "db: first pass") > stepIndex(t, j, "app01: freeze the original") || j.Steps[stepIndex(t, j, "app01: compare and send")].State != "done" {
		t.Fatalf("plan reprotect steps %v", stepNames(j))
	}
	for _, m := range []string{"db", "app01"} {
		if d := vr.machine(m).Direction; d != "reprotected" {
			t.Fatalf("%s after the plan's reprotect: direction %q", m, d)
		}
	}
	if _, err := vr.client.ReprotectPlan(ctx, "mix"); err == nil || !strings.Contains(err.Error(), "reprotected already") {
		t.Fatalf("a second plan reprotect: %v", err)
	}
	pr.write("db", 3)
	vr.writeRecovered("d1", 6)
	want := pr.sums()["db"]
	j = vr.mustJob(vr.client.FailbackPlan(ctx, "mix"))
	t.Logf("plan failback output %q", j.Output)
	if len(j.Output) != 4 || !strings.HasPrefix(j.Output[0], "plan mix failed back: 2 machines") ||
		!strings.Contains(j.Output[3], "app01-recovered") || !strings.Contains(j.Output[3], "stays powered off") {
		t.Fatalf("plan failback output %q", j.Output)
	}
	at := func(name string) int { return stepIndex(t, j, name) }
	order := []string{"group 2: shut down", "app01: stop the recovered VM", "group 1: shut down", "db: stop the failed-over machine",
		"app01: send the last changes", "db: drain", "app01: verify", "db: verify", "switch",
		"group 1: power on", "db: power on", "group 2: power on", "app01: power on", "app01: end the failover"}
	for k := 1; k < len(order); k++ {
		if at(order[k-1]) >= at(order[k]) {
			t.Fatalf("step %q is not before %q: %v", order[k-1], order[k], stepNames(j))
		}
	}
	if fileSum(t, p) != want {
		t.Fatal("db: the original disk differs from the export's final state")
	}
	for d, path := range vr.disks {
		if fileSHA(t, path) != fileSHA(t, vr.flats[d]) {
			t.Fatalf("app01 disk %s: the original differs from the recovered VM's final state", d)
		}
	}
	if powerState(t, vr.rec) != types.VirtualMachinePowerStatePoweredOff {
		t.Fatal("the recovered VM runs after the plan's failback")
	}
	for _, m := range []string{"db", "app01"} {
		if d := vr.machine(m).Direction; d != "failed-back" {
			t.Fatalf("%s after the plan's failback: direction %q", m, d)
		}
	}
	j = vr.mustJob(vr.client.ReprotectPlan(ctx, "mix"))
	if len(j.Output) != 3 || !strings.HasPrefix(j.Output[0], "plan mix protected again: 2 machines") {
		t.Fatalf("forward plan reprotect output %q", j.Output)
	}
	vr.waitProtected("app01")
	vr.waitProtected("db")
}

// A server restarted after a plan failback's switch resumes the same job
// from where it was: group 1 powered on, its failback-only manual action
// waiting (not confirmed) at the stop; after the restart the job waits on
// it again, group 2 still failing back (the plan's order kept); once
// confirmed, group 2's pre script runs, then its power-on; group 1's pre
// script, run before the stop, does not run again.
func TestFailbackPlanResumedAfterARestart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	script, logf := actionLogScript(t, "$ASR_DIRECTION $ASR_PHASE $ASR_GROUP")
	pr := startPlanRigWith(t, true, []api.PlanGroup{
		{Machines: []string{"db"}, Pre: []api.PlanAction{{Kind: "script", Path: script, On: api.ActionOnFailback}},
			Post: []api.PlanAction{{Kind: "manual", Text: "check the database", On: api.ActionOnFailback}}},
		{Machines: []string{"app1", "app2"}, Pre: []api.PlanAction{{Kind: "script", Path: script, On: api.ActionOnFailback}},
			Post: []api.PlanAction{{Kind: "script", Path: script, On: api.ActionOnFailback}}},
	})
	actions := func() string {
		b, err := os.ReadFile(logf)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		return string(b)
	}
	for _, m := range planMachines {
		pr.write(m, 4)
	}
	pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	for _, m := range planMachines {
		pr.write(m, 2)
	}
	want := pr.sums()
	j, err := pr.client.FailbackPlan(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	waiting := func() {
		t.Helper()
		waitFor(t, "the plan failback to wait on group 1's manual action", func() bool {
			jj, err := pr.client.Job(ctx, j.ID)
			if err != nil || jj.State != api.JobRunning {
				t.Fatalf("the plan failback job: %+v %v", jj, err)
			}
			return jj.Waiting == "check the database"
		})
		// The job names its machines, in the list too: each machine's
		// page shows it as its own.
		js, err := pr.client.Jobs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(js, func(x api.Job) bool { return x.ID == j.ID })
		if i < 0 || !slices.Equal(slices.Sorted(slices.Values(js[i].Machines)), []string{"app1", "app2", "db"}) {
			t.Fatalf("the running plan failback's machines in the jobs list: %+v", js)
		}
	}
	waiting()
	pr.directions("failed-back", "db")
	pr.directions("failing-back", "app1", "app2")
	if got := actions(); got != "recovery-to-primary pre 1\n" {
		t.Fatalf("actions before the restart: %q", got)
	}
	pr.stop()
	pr.start()
	waiting()
	pr.directions("failing-back", "app1", "app2") // behind group 1's action
	if got := actions(); got != "recovery-to-primary pre 1\n" {
		t.Fatalf("actions after the restart: %q", got)
	}
	if _, err := pr.client.Failback(ctx, "app1"); err == nil || !strings.Contains(err.Error(), j.ID) {
		t.Fatalf("a machine's failback while its plan's resumed failback runs: %v", err)
	}
	if _, err := pr.client.ConfirmJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	j = pr.runJob(j, nil)
	if j.State != api.JobSucceeded {
		t.Fatalf("the resumed plan failback: %s %s, steps %v", j.State, j.Error, stepNames(j))
	}
	if stepIndex(t, j, "resume") > stepIndex(t, j, "group 2 pre 1") || stepIndex(t, j, "group 2 pre 1") > stepIndex(t, j, "group 2: power on") ||
		stepIndex(t, j, "group 1: power on") > stepIndex(t, j, "resume") {
		t.Fatalf("the resumed job's steps out of order: %v", stepNames(j))
	}
	if got := actions(); got != "recovery-to-primary pre 1\nrecovery-to-primary pre 2\nrecovery-to-primary post 2\n" {
		t.Fatalf("actions after the resumed failback: %q", got)
	}
	pr.checkPlanFailback(j, want)
}

// A plan's reprotect waits for the original agent of an unplanned
// failover that is away, and may be cancelled there: that machine's
// reprotect is taken back (failed over again), those done before stay
// reprotected; run again once the agent is back, it reprotects only that
// one, and the plan fails back equal.
func TestFailbackPlanUnplannedCancelledWhileFreezing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pr := startPlanRigOf(t, true, []api.PlanGroup{{Machines: []string{"db"}}, {Machines: []string{"app1", "app2"}}}, false)
	for _, m := range planMachines {
		pr.write(m, 3)
	}
	pr.agents["app2"].close()
	j, err := pr.client.ReprotectPlan(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the plan's reprotect waiting for app2's agent", func() bool {
		jj, err := pr.client.Job(ctx, j.ID)
		if err != nil || jj.State != api.JobRunning {
			t.Fatalf("the plan's reprotect: %+v %v", jj, err)
		}
		for _, s := range jj.Steps {
			if s.Name == "app2: freeze the original" && s.State == "running" && strings.Contains(s.Detail, "waiting for the original agent") && jj.Cancellable {
				return true
			}
		}
		return false
	})
	if _, err := pr.client.CancelJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	if j = pr.runJob(j, nil); j.State != api.JobCancelled {
		t.Fatalf("the cancelled plan reprotect: %s %s", j.State, j.Error)
	}
	pr.directions("reprotected", "db", "app1")
	pr.directions("failed-over", "app2")
	pr.agents["app2"] = startAgent(t, pr.cfgs["app2"])
	j = pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	if len(j.Output) != 2 || !strings.HasPrefix(j.Output[0], "plan app reprotected: 1 machine,") || !strings.HasPrefix(j.Output[1], "app2: reprotected: ") {
		t.Fatalf("the plan's reprotect again: %q", j.Output)
	}
	pr.directions("reprotected")
	for _, m := range planMachines {
		pr.write(m, 2)
	}
	pr.failBackPlan(pr.sums())
}

// Past the switch a failure does not end the plan: group 1's post script
// fails and app1's agent is away at its power-on (stopped at the
// switch), yet group 2's actions run in the plan's order around its
// power-on (their context without app1), the job fails naming both, and
// app1 is powered on in the background once its agent is back. Before,
// the first failure ended the job and the rest were powered on without
// their actions.
func TestFailbackPlanGoesOnPastAFailure(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	logf := filepath.Join(dir, "actions.log")
	logScript := filepath.Join(dir, "log.sh")
	if err := os.WriteFile(logScript, []byte("#!/bin/sh\n{ printf '%s ' \"$ASR_PHASE-$ASR_GROUP\"; cat; echo; } >> "+logf+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	failScript := filepath.Join(dir, "fail.sh")
	if err := os.WriteFile(failScript, []byte("#!/bin/sh\necho the database is not answering\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	pr := startPlanRigWith(t, true, []api.PlanGroup{
		{Machines: []string{"db"}, Post: []api.PlanAction{{Kind: "script", Path: failScript, On: api.ActionOnFailback}}},
		{Machines: []string{"app1", "app2"}, Pre: []api.PlanAction{{Kind: "script", Path: logScript, On: api.ActionOnFailback}},
			Post: []api.PlanAction{{Kind: "script", Path: logScript, On: api.ActionOnFailback}}},
	})
	for _, m := range planMachines {
		pr.write(m, 4)
	}
	pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	for _, m := range planMachines {
		pr.write(m, 2)
	}
	want := pr.sums()
	// app1's agent goes away once the switch is recorded: its power-on
	// (the thaw) fails.
	server.SetFailbackSwitchHook(pr.srv, func(context.Context) { pr.agents["app1"].close() })
	j := pr.runJob(pr.client.FailbackPlan(ctx, "app"))
	t.Logf("plan failback: %s %q, output %q, steps %v", j.State, j.Error, j.Output, stepNames(j))
	if j.State != api.JobFailed || !strings.Contains(j.Error, "group 1 post 1") || !strings.Contains(j.Error, "machine app1: power on") {
		t.Fatalf("the plan failback: %s %q", j.State, j.Error)
	}
	state := map[string]string{"group 1: power on": "done", "group 1 post 1": "failed", "group 2 pre 1": "done",
		"group 2: power on": "failed", "app2: power on": "done", "group 2 post 1": "done"}
	order := []string{"group 1: power on", "group 1 post 1", "group 2 pre 1", "group 2: power on", "app2: power on", "group 2 post 1"}
	for k, name := range order {
		if st := j.Steps[stepIndex(t, j, name)]; st.State != state[name] {
			t.Fatalf("step %+v: want %s", st, state[name])
		}
		if k > 0 && stepIndex(t, j, order[k-1]) > stepIndex(t, j, name) {
			t.Fatalf("step %q after %q: %v", order[k-1], name, stepNames(j))
		}
	}
	b, err := os.ReadFile(logf)
	if err != nil {
		t.Fatalf("group 2's actions did not run: %v", err)
	}
	got := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(got) != 2 || !strings.HasPrefix(got[0], "pre-2 ") || !strings.HasPrefix(got[1], "post-2 ") {
		t.Fatalf("group 2's actions: %q", got)
	}
	var post api.ActionContext
	if err := json.Unmarshal([]byte(strings.TrimPrefix(got[1], "post-2 ")), &post); err != nil {
		t.Fatal(err)
	}
	if _, ok := post.Machines["app1"]; ok || len(post.Machines) != 2 {
		t.Fatalf("group 2's post action's machines: %+v (want db and app2, not app1)", post.Machines)
	}
	pr.directions("failed-back", "db", "app2")
	pr.directions("failing-back", "app1")
	pr.agents["app1"] = startAgent(t, pr.cfgs["app1"])
	waitFor(t, "app1 powered on in the background", func() bool { return pr.machine("app1").Direction == "failed-back" })
	for m, p := range pr.disks {
		if fileSum(t, p) != want[m] {
			t.Fatalf("machine %s: the original disk differs from the failed-over disk's final state", m)
		}
	}
	if fos, _ := pr.client.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers: %+v", fos)
	}
}

// A manual action cancelled past the switch cannot undo it: the action
// is recorded as not confirmed, and the plan goes on in its order with its
// actions (group 2's script, its power-on); the job ends cancelled,
// naming the action, every machine failed back.
func TestFailbackPlanManualCancelledPastTheSwitch(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	logScript, logf := actionLogScript(t, "$ASR_PHASE $ASR_GROUP")
	pr := startPlanRigWith(t, true, []api.PlanGroup{
		{Machines: []string{"db"}, Post: []api.PlanAction{{Kind: "manual", Text: "check the database", On: api.ActionOnFailback}}},
		{Machines: []string{"app1", "app2"}, Pre: []api.PlanAction{{Kind: "script", Path: logScript, On: api.ActionOnFailback}}},
	})
	pr.mustJob(pr.client.ReprotectPlan(ctx, "app"))
	want := pr.sums()
	j := pr.failbackWaiting("group 1's manual action")
	if _, err := pr.client.CancelJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	j = pr.runJob(j, nil)
	t.Logf("plan failback: %s %q, steps %v", j.State, j.Error, stepNames(j))
	if j.State != api.JobCancelled || !strings.Contains(j.Error, `group 1 post 1: manual action "check the database" not confirmed`) {
		t.Fatalf("the plan failback: %s %q", j.State, j.Error)
	}
	if stepIndex(t, j, "group 1 post 1") > stepIndex(t, j, "group 2 pre 1") || stepIndex(t, j, "group 2 pre 1") > stepIndex(t, j, "group 2: power on") {
		t.Fatalf("steps out of the plan's order: %v", stepNames(j))
	}
	if b, err := os.ReadFile(logf); err != nil || string(b) != "pre 2\n" {
		t.Fatalf("group 2's action after the cancel: %q %v", b, err)
	}
	pr.directions("failed-back")
	for m, p := range pr.disks {
		if fileSum(t, p) != want[m] {
			t.Fatalf("machine %s: the original disk differs from the failed-over disk's final state", m)
		}
	}
}
