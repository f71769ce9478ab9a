//go:build e2e

package e2e

// Failback of a recovery plan through the real binaries: a plan of two
// groups (db; app1 and app2, a replication group), a planned failover of
// the plan to the server's NBD exports, fio writing into every export,
// asr reprotect --plan, asr failback --plan (shut down last group first,
// drain and verify all, switch, power on in plan order), and asr
// reprotect --plan forward again.

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/server/api"
)

// planFio writes n bytes of random 64 KiB blocks into uri (a 16 MiB disk).
func planFio(t *testing.T, uri, name string, n int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
	defer cancel()
	out, err := runTool(ctx, t, "fio", "--name="+name, "--ioengine=nbd", "--uri="+uri, "--rw=randwrite", "--bs=64k",
		"--iodepth=4", "--size=16M", "--io_size="+strconv.FormatInt(n, 10), "--randseed="+strconv.Itoa(len(name)*13+int(n%89)))
	if err != nil {
		t.Fatalf("fio %s: %v\n%s", name, err, out)
	}
}

// TestE2EFailbackPlan: the whole cycle of a plan; every original disk
// equals its export's final content, and new points recover bit-exact. A
// failback-only script of group 1 fails past the switch: the job fails
// naming it, yet group 2 still runs its action and powers on in order.
func TestE2EFailbackPlan(t *testing.T) {
	t.Parallel()
	c := newFailoverCluster(t)
	machines := []string{"db", "app1", "app2"}
	disks := map[string]string{}
	for i, m := range machines {
		disks[m] = filepath.Join(c.dir, m+".img")
		makeDisk(t, disks[m], 16<<20, uint64(20+i))
		c.startAgent(m, nil, "d="+disks[m])
	}
	for _, m := range machines {
		c.waitState(m, "protected", hungAfter)
		planFio(t, c.agents[m].uri("d"), "fwd-"+m, 1<<20)
	}
	c.mustCLI("group", "set", "--machine", "app1", "--group", "rg")
	c.mustCLI("group", "set", "--machine", "app2", "--group", "rg")
	// A plan's script actions: one for both directions, one for failback
	// only; each logs the direction, phase and group it ran for.
	actionLog := filepath.Join(c.dir, "actions.log")
	script := filepath.Join(c.dir, "action.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \"$ASR_DIRECTION $ASR_PHASE $ASR_GROUP $ASR_FAILOVER_TYPE\" >> "+actionLog+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	failing := filepath.Join(c.dir, "failing.sh")
	if err := os.WriteFile(failing, []byte("#!/bin/sh\necho the database does not answer\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c.mustCLI("plan", "create", "app", "--group", "1=db", "--group", "2=app1,app2", "--pre", "2=script:"+script,
		"--post", "1=failback:script:"+script, "--post", "1=failback:script:"+failing)
	actions := func() string {
		b, err := os.ReadFile(actionLog)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if out := c.mustCLI("failover", "--plan", "app", "--planned", "--to", "nbd"); !strings.Contains(out, "succeeded") {
		t.Fatalf("planned failover of the plan:\n%s", out)
	}
	if out := c.mustCLI("failover", "--plan", "app", "--commit"); !strings.Contains(out, "succeeded") {
		t.Fatalf("commit of the plan:\n%s", out)
	}
	if got := actions(); got != "primary-to-recovery pre 2 planned\n" {
		t.Fatalf("the plan's actions on failover: %q", got)
	}
	exports := map[string]string{}
	for _, f := range c.liveFailovers() {
		if f.Plan != "app" || len(f.Exports) != 1 {
			t.Fatalf("failover of %s: %+v", f.Machine, f)
		}
		exports[f.Machine] = f.Exports[0].URI
	}
	if len(exports) != len(machines) {
		t.Fatalf("exports %v", exports)
	}
	for _, m := range machines {
		planFio(t, exports[m], "failed-over-"+m, 2<<20)
	}
	out := c.mustCLI("reprotect", "--plan", "app")
	if !strings.Contains(out, "plan app reprotected: 3 machines") {
		t.Fatalf("reprotect --plan:\n%s", out)
	}
	for _, m := range machines {
		if st := c.status(m); st.Direction != "reprotected" {
			t.Fatalf("%s after reprotect --plan: direction %q", m, st.Direction)
		}
	}
	// One member of the replication group alone is refused.
	if out, err := c.cli("failback", "--machine", "app1"); err == nil || !strings.Contains(err.Error()+out, "replication group rg with app2") ||
		!strings.Contains(err.Error()+out, "asr failback --plan app") {
		t.Fatalf("failback of app1 alone: %v\n%s", err, out)
	}
	want := map[string]string{}
	for _, m := range machines {
		planFio(t, exports[m], "reprotected-"+m, 1<<20)
		want[m] = nbdCopySum(t, exports[m])
	}
	out, err := c.cli("failback", "--plan", "app")
	t.Logf("failback --plan: %v\n%s", err, out)
	if err == nil || !strings.Contains(err.Error(), "group 1 post 2: script "+failing) ||
		!strings.Contains(out, "plan app failed back with failures past the switch (the plan went on in its order, with its actions): 3 machines") ||
		!strings.Contains(out, "failed: group 1 post 2") {
		t.Fatalf("failback --plan with a failing script past the switch: %v\n%s", err, out)
	}
	for _, m := range machines {
		re := regexp.MustCompile(regexp.QuoteMeta(m) + `: failed back: (\d+) bytes sent, (\d+) bytes compared`)
		g := re.FindStringSubmatch(out)
		if g == nil {
			t.Fatalf("failback --plan output lacks %s's figures:\n%s", m, out)
		}
		sent, _ := strconv.ParseInt(g[1], 10, 64)
		// 3 MiB written into each export after the failover.
		if sent <= 0 || sent > 2*(3<<20) {
			t.Fatalf("%s: %d bytes sent for 3 MiB written after the failover", m, sent)
		}
		if got := sha256File(t, disks[m]); got != want[m] {
			t.Fatalf("%s: original disk sha256 %s, the failed-over disk's final state %s", m, got, want[m])
		}
		if st := c.status(m); st.Direction != "failed-back" {
			t.Fatalf("%s after failback --plan: direction %q", m, st.Direction)
		}
	}
	if fs := c.liveFailovers(); len(fs) != 0 {
		t.Fatalf("live failovers after failback --plan: %+v", fs)
	}
	// On failback: group 1's failback-only post action after db's
	// power-on, then (past the failing one) group 2's pre action before
	// app1's and app2's.
	if got := actions(); got != "primary-to-recovery pre 2 planned\nrecovery-to-primary post 1 failback\nrecovery-to-primary pre 2 failback\n" {
		t.Fatalf("the plan's actions after its failback: %q", got)
	}
	// Forward again: the originals run and write, a checksum resync each.
	for _, m := range machines {
		planFio(t, c.agents[m].uri("d"), "back-home-"+m, 1<<20)
	}
	out = c.mustCLI("reprotect", "--plan", "app")
	t.Logf("reprotect --plan forward:\n%s", out)
	for _, m := range machines {
		g := regexp.MustCompile(regexp.QuoteMeta(m) + `: protected again: (\d+) bytes compared, (\d+) sent`).FindStringSubmatch(out)
		if g == nil {
			t.Fatalf("forward reprotect --plan output lacks %s:\n%s", m, out)
		}
		compared, _ := strconv.ParseInt(g[1], 10, 64)
		sent, _ := strconv.ParseInt(g[2], 10, 64)
		if compared != 16<<20 || sent <= 0 || sent >= compared/2 {
			t.Fatalf("%s: forward reprotect compared %d bytes and sent %d: want the whole disk compared, only the differences sent", m, compared, sent)
		}
	}
	for _, m := range machines {
		c.waitState(m, "protected", hungAfter)
		if st := c.status(m); st.Direction != "" {
			t.Fatalf("%s after the forward reprotect: direction %q", m, st.Direction)
		}
		p := c.tag(m)
		c.recoverAndCheck(m, p, map[string]string{"d": sha256File(t, disks[m])})
	}
}

// TestE2EFailbackGroup: a replication group failed over (planned, no group
// point taken first) with asr failover --group, failed back with asr
// failback --group after asr reprotect --group (one member alone refused
// with that hint); every original disk equals its export's final content,
// and asr reprotect --group protects them forward.
func TestE2EFailbackGroup(t *testing.T) {
	t.Parallel()
	c := newFailoverCluster(t)
	machines := []string{"app1", "app2"}
	disks := map[string]string{}
	for i, m := range machines {
		disks[m] = filepath.Join(c.dir, m+".img")
		makeDisk(t, disks[m], 16<<20, uint64(40+i))
		c.startAgent(m, nil, "d="+disks[m])
	}
	for _, m := range machines {
		c.waitState(m, "protected", hungAfter)
		c.mustCLI("group", "set", "--machine", m, "--group", "rg")
		planFio(t, c.agents[m].uri("d"), "fwd-"+m, 1<<20)
	}
	if out := c.mustCLI("failover", "--group", "rg", "--planned", "--to", "nbd"); !strings.Contains(out, "succeeded") {
		t.Fatalf("planned failover of the group:\n%s", out)
	}
	c.mustCLI("failover", "--group", "rg", "--commit")
	exports := map[string]string{}
	for _, f := range c.liveFailovers() {
		exports[f.Machine] = f.Exports[0].URI
	}
	for _, m := range machines {
		planFio(t, exports[m], "failed-over-"+m, 2<<20)
	}
	if out := c.mustCLI("reprotect", "--group", "rg"); !strings.Contains(out, "group rg reprotected: 2 machines") {
		t.Fatalf("reprotect --group:\n%s", out)
	}
	if out, err := c.cli("failback", "--machine", "app1"); err == nil || !strings.Contains(err.Error()+out, "asr failback --group rg") {
		t.Fatalf("failback of app1 alone: %v\n%s", err, out)
	}
	want := map[string]string{}
	for _, m := range machines {
		planFio(t, exports[m], "reprotected-"+m, 1<<20)
		want[m] = nbdCopySum(t, exports[m])
	}
	out := c.mustCLI("failback", "--group", "rg")
	if !strings.Contains(out, "group rg failed back: 2 machines") {
		t.Fatalf("failback --group:\n%s", out)
	}
	for _, m := range machines {
		if got := sha256File(t, disks[m]); got != want[m] {
			t.Fatalf("%s: original disk sha256 %s, the failed-over disk's final state %s", m, got, want[m])
		}
	}
	if out := c.mustCLI("reprotect", "--group", "rg"); !strings.Contains(out, "group rg protected again: 2 machines") {
		t.Fatalf("reprotect --group forward:\n%s", out)
	}
	for _, m := range machines {
		c.waitState(m, "protected", hungAfter)
		if st := c.status(m); st.Direction != "" {
			t.Fatalf("%s after the forward reprotect: direction %q", m, st.Direction)
		}
	}
}

// waitJob polls a job until ok (bounded by hungAfter); the job must be
// running meanwhile unless ok accepts its end.
func (c *cluster) waitJob(id, what string, ok func(api.Job) bool) api.Job {
	c.t.Helper()
	deadline := time.Now().Add(hungAfter)
	for {
		j := c.job(id)
		if ok(j) {
			return j
		}
		if j.State != api.JobRunning || time.Now().After(deadline) {
			c.t.Fatalf("job %s, waiting for %s: %+v", id, what, j)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestE2EFailbackPlanMixed: a plan of two groups: db (group 1), failed
// over by itself (planned) to the server's NBD exports, and m (group 2),
// linked to the simulator's guest01, failed over (unplanned) to vSphere.
// fio writes into db's export and into the recovered VM's flat file;
// asr reprotect --plan reprotects each by its own path; more fio; asr
// failback --plan: group 1's failback-only manual action holds the job
// after db's power-on, and the server is killed (-9) there, past the
// switch. Restarted, the same job resumes: it waits on that action again
// (m still failing back: the plan's order kept), and once confirmed
// group 2's pre script runs, then m's power-on, then its post script;
// group 1's pre script is not run again. Every original disk's SHA-256
// equals its failed-over final state.
func TestE2EFailbackPlanMixed(t *testing.T) {
	t.Parallel()
	vc := startVSphereFailbackCase(t)
	fc, c := vc.failbackCase, vc.c
	dbDisk := filepath.Join(c.dir, "db.img")
	makeDisk(t, dbDisk, 16<<20, 31)
	c.startAgent("db", nil, "d="+dbDisk)
	c.waitState("db", "protected", hungAfter)
	planFio(t, c.agents["db"].uri("d"), "fwd-db", 1<<20)
	c.mustCLI("failover", "--machine", "db", "--planned", "--to", "nbd")
	c.mustCLI("failover", "--machine", "db", "--commit")
	var export string
	for _, f := range c.liveFailovers() {
		if f.Machine == "db" && len(f.Exports) == 1 {
			export = f.Exports[0].URI
		}
	}
	if export == "" {
		t.Fatalf("no export of db: %+v", c.liveFailovers())
	}
	actionLog := filepath.Join(c.dir, "actions.log")
	script := filepath.Join(c.dir, "action.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \"$ASR_DIRECTION $ASR_PHASE $ASR_GROUP\" >> "+actionLog+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c.mustCLI("plan", "create", "mix", "--group", "1=db", "--group", "2=m",
		"--pre", "1=failback:script:"+script, "--post", "1=failback:manual:check the database",
		"--pre", "2=failback:script:"+script, "--post", "2=failback:script:"+script)
	actions := func() string {
		b, err := os.ReadFile(actionLog)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		return string(b)
	}
	planFio(t, export, "failed-over-db", 2<<20)
	fc.fioFile(vc.flat, "recovered", 2<<20)
	out := c.mustCLI("reprotect", "--plan", "mix")
	t.Logf("reprotect --plan:\n%s", out)
	if !strings.Contains(out, "plan mix reprotected: 2 machines") || !strings.Contains(out, "db: reprotected: ") || reprotectedRE.FindStringSubmatch(out) == nil {
		t.Fatalf("reprotect --plan:\n%s", out)
	}
	for _, m := range []string{"db", "m"} {
		if st := c.status(m); st.Direction != "reprotected" {
			t.Fatalf("%s after reprotect --plan: direction %q", m, st.Direction)
		}
	}
	planFio(t, export, "reprotected-db", 1<<20)
	fc.fioFile(vc.flat, "recovered-after-reprotect", 1<<20)
	wantDB := nbdCopySum(t, export)
	wantM := sha256File(t, vc.flat)

	id := strings.TrimSpace(c.mustCLI("failback", "--plan", "mix", "--no-wait"))
	waiting := func() {
		t.Helper()
		c.waitJob(id, "group 1's manual action", func(j api.Job) bool { return j.Waiting == "check the database" })
	}
	waiting()
	if st := c.status("db"); st.Direction != "failed-back" {
		t.Fatalf("db while group 1's action waits: direction %q", st.Direction)
	}
	if st := c.status("m"); st.Direction != "failing-back" {
		t.Fatalf("m while group 1's action waits: direction %q", st.Direction)
	}
	if got := actions(); got != "recovery-to-primary pre 1\n" {
		t.Fatalf("the plan's actions before the kill: %q", got)
	}
	c.server.kill()
	c.startServer()
	waiting() // the same job, resumed
	if st := c.status("m"); st.Direction != "failing-back" {
		t.Fatalf("m after the restart, before group 1's action is confirmed: direction %q", st.Direction)
	}
	if got := actions(); got != "recovery-to-primary pre 1\n" {
		t.Fatalf("the plan's actions after the restart: %q", got)
	}
	if out := c.mustCLI("job", "confirm", id); !strings.Contains(out, "confirmed") {
		t.Fatalf("job confirm: %s", out)
	}
	j := c.waitJob(id, "its end", func(j api.Job) bool { return j.State != api.JobRunning })
	t.Logf("the resumed failback: %s %s %q", j.State, j.Error, j.Output)
	if j.State != api.JobSucceeded || len(j.Output) != 4 || !strings.HasPrefix(j.Output[0], "plan mix failed back: 2 machines") ||
		!strings.Contains(j.Output[3], "guest01-recovered") {
		t.Fatalf("the resumed plan failback: %+v", j)
	}
	at := func(name string) int {
		i := slices.IndexFunc(j.Steps, func(s api.JobStep) bool { return s.Name == name })
		if i < 0 {
			t.Fatalf("the job has no step %q: %+v", name, j.Steps)
		}
		return i
	}
	order := []string{"group 2: shut down", "m: stop the recovered VM", "group 1: shut down", "db: stop the failed-over machine",
		"switch", "group 1 pre 1", "group 1: power on", "resume", "group 2 pre 1", "group 2: power on", "m: end the failover", "group 2 post 1"}
	for k := 1; k < len(order); k++ {
		if at(order[k-1]) >= at(order[k]) {
			t.Fatalf("step %q is not before %q: %+v", order[k-1], order[k], j.Steps)
		}
	}
	if got := actions(); got != "recovery-to-primary pre 1\nrecovery-to-primary pre 2\nrecovery-to-primary post 2\n" {
		t.Fatalf("the plan's actions after its failback: %q", got)
	}
	if got := sha256File(t, dbDisk); got != wantDB {
		t.Fatalf("db: original disk sha256 %s, the export's final state %s", got, wantDB)
	}
	if got := sha256File(t, fc.disk); got != wantM {
		t.Fatalf("m: original disk sha256 %s, the recovered VM's final disk %s", got, wantM)
	}
	for _, m := range []string{"db", "m"} {
		if st := c.status(m); st.Direction != "failed-back" {
			t.Fatalf("%s after the plan's failback: direction %q", m, st.Direction)
		}
	}
	if fs := c.liveFailovers(); len(fs) != 0 {
		t.Fatalf("live failovers after the plan's failback: %+v", fs)
	}
	if vm, ok := simVM(t, vc.sim, vc.ref); !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("the recovered VM after the plan's failback: found %v, %s", ok, vm.Runtime.PowerState)
	}
}
