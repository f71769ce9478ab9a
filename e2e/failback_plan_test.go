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
	"strconv"
	"strings"
	"testing"
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
// equals its export's final content, and new points recover bit-exact.
func TestE2EFailbackPlan(t *testing.T) {
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
	c.mustCLI("plan", "create", "app", "--group", "1=db", "--group", "2=app1,app2", "--pre", "2=script:"+script, "--post", "1=failback:script:"+script)
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
	out = c.mustCLI("failback", "--plan", "app")
	t.Logf("failback --plan:\n%s", out)
	if !strings.Contains(out, "plan app failed back: 3 machines") {
		t.Fatalf("failback --plan:\n%s", out)
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
	// power-on, then group 2's pre action before app1's and app2's.
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
