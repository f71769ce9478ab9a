//go:build e2e

package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/chromedp/chromedp"
)

// TestE2EConsolePlanFailback runs a recovery plan's failback cycle from
// the plans page in headless Chromium against the real server and two
// agents: the plan's planned failover to NBD and its commit (its
// buttons), fio into the exports, Reprotect… (the confirmation page, its
// job), more fio, Failback… (the confirmation page; its job shuts group 2
// down first and powers group 1 on first; while group 1's failback-only
// manual action holds it, m2's page shows that job as its own, without
// its button), Reprotect… forward. Every
// original disk ends equal to its export's final content and new points
// recover bit-exact.
func TestE2EConsolePlanFailback(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	c := newFailoverCluster(t)
	machines := []string{"m1", "m2"}
	disks := map[string]string{}
	for i, m := range machines {
		disks[m] = filepath.Join(c.dir, m+".img")
		makeDisk(t, disks[m], 16<<20, uint64(40+i))
		c.startAgent(m, nil, "d="+disks[m])
	}
	for _, m := range machines {
		c.waitState(m, "protected", hungAfter)
		planFio(t, c.agents[m].uri("d"), "fwd-"+m, 1<<20)
	}
	c.mustCLI("plan", "create", "dr", "--group", "1=m1", "--group", "2=m2", "--post", "1=failback:manual:check m1")

	p := openConsole(t, c, browser)
	plansPage := func() {
		t.Helper()
		p.do(chromedp.Navigate(c.url()+"/plans"), chromedp.WaitVisible(chromedp.CSS("#plan-dr")))
	}
	directions := func(want string) {
		t.Helper()
		for _, m := range machines {
			if st := c.status(m); st.Direction != want {
				t.Fatalf("%s: direction %q, want %q", m, st.Direction, want)
			}
		}
	}

	// The plan's planned failover to NBD and its commit, from its card.
	plansPage()
	p.do(chromedp.Click(chromedp.CSS(`#plan-dr form.plan-failover button[type="submit"]`)))
	p.jobDone("plan failover")
	plansPage()
	p.do(chromedp.Click(chromedp.CSS(`#plan-dr button.plan-commit`)))
	p.jobDone("plan commit")
	directions("failed-over")
	exports := map[string]string{}
	for _, f := range c.liveFailovers() {
		if f.Plan != "dr" || !f.Planned || len(f.Exports) != 1 {
			t.Fatalf("failover of %s: %+v", f.Machine, f)
		}
		exports[f.Machine] = f.Exports[0].URI
	}
	for _, m := range machines {
		planFio(t, exports[m], "failed-over-"+m, 2<<20)
	}

	// Reprotect…: its confirmation page, its job.
	plansPage()
	p.do(chromedp.Click(chromedp.CSS(`#plan-dr a.plan-reprotect`)), chromedp.WaitVisible(chromedp.CSS("#confirm-plan-reprotect")))
	if s := p.text("#plan-failback-machines"); !strings.Contains(s, "m1") || !strings.Contains(s, "m2") || !strings.Contains(s, "committed") {
		t.Fatalf("the plan reprotect confirmation lists:\n%s", s)
	}
	p.screenshot("planfb-01-reprotect-confirm")
	p.do(chromedp.Click(chromedp.CSS("#confirm-plan-reprotect")))
	out, _ := p.jobDone("plan reprotect")
	if !strings.Contains(out, "plan dr reprotected: 2 machines") {
		t.Fatalf("the plan reprotect job's output:\n%s", out)
	}
	directions("reprotected")

	want := map[string]string{}
	for _, m := range machines {
		planFio(t, exports[m], "reprotected-"+m, 1<<20)
		want[m] = nbdCopySum(t, exports[m])
	}

	// Failback…: its confirmation page, its job in order.
	plansPage()
	p.do(chromedp.Click(chromedp.CSS(`#plan-dr a.plan-failback`)), chromedp.WaitVisible(chromedp.CSS("#confirm-plan-failback")))
	if s := p.text("#plan-failback-steps"); !strings.Contains(s, "last group first") || !strings.Contains(s, "switch back at once") || !strings.Contains(s, "plan's order") {
		t.Fatalf("the plan failback confirmation says:\n%s", s)
	}
	if s := p.text("#plan-failback-machines"); strings.Count(s, "Reprotected") != 2 {
		t.Fatalf("the plan failback confirmation lists:\n%s", s)
	}
	p.screenshot("planfb-02-failback-confirm")
	p.do(chromedp.Click(chromedp.CSS("#confirm-plan-failback")))
	// Past the switch, group 1's manual action holds the job: m2's page
	// shows the plan's job as its own (the link, what it waits on), with
	// no button of its own.
	p.waitVisible("showed group 1's manual action", "#job-confirm")
	planJob, err := chromedp.Run(p.ctx, chromedp.Location())
	if err != nil || !strings.Contains(planJob, "/jobs/") {
		t.Fatalf("the plan failback's page: %q %v", planJob, err)
	}
	p.do(chromedp.Navigate(c.url()+"/machines/m2"), chromedp.WaitVisible(chromedp.CSS(".failback-job")))
	if s := p.text(".failback-job"); !strings.Contains(s, "failback running") || !strings.Contains(s, "of plan dr") ||
		!strings.Contains(s, "group 1 post 1: waits for a manual action: check m1") {
		t.Fatalf("m2's page shows its plan's job as:\n%s", s)
	}
	if p.exists("[data-failback]") || !p.exists(`.failback-job a[href="`+strings.TrimPrefix(planJob, c.url())+`"]`) {
		t.Fatalf("m2's page offers a button, or does not link its plan's job, while that job runs:\n%s", p.text(".direction"))
	}
	p.screenshot("planfb-02b-machine-in-plan-job")
	p.do(chromedp.Navigate(planJob), chromedp.WaitVisible(chromedp.CSS("#job-confirm")), chromedp.Click(chromedp.CSS("#job-confirm")))
	out, steps := p.jobDone("plan failback")
	t.Logf("plan failback job:\n%s\n%s", out, steps)
	order := []string{"group 2: shut down", "group 1: shut down", "m2: drain", "m1: drain", "m1: verify", "switch", "group 1: power on", "group 2: power on"}
	last := -1
	for _, s := range order {
		i := strings.Index(steps, s)
		if i <= last {
			t.Fatalf("step %q not in order %q:\n%s", s, order, steps)
		}
		last = i
	}
	if !strings.Contains(out, "plan dr failed back: 2 machines") {
		t.Fatalf("the plan failback job's output:\n%s", out)
	}
	for _, m := range machines {
		if got := sha256File(t, disks[m]); got != want[m] {
			t.Fatalf("%s: original disk sha256 %s, the failed-over disk's final state %s", m, got, want[m])
		}
	}
	directions("failed-back")
	p.screenshot("planfb-03-failed-back")

	// Reprotect… forward.
	for _, m := range machines {
		planFio(t, c.agents[m].uri("d"), "back-home-"+m, 1<<20)
	}
	plansPage()
	p.do(chromedp.Click(chromedp.CSS(`#plan-dr a.plan-reprotect`)), chromedp.WaitVisible(chromedp.CSS("#confirm-plan-reprotect")))
	p.do(chromedp.Click(chromedp.CSS("#confirm-plan-reprotect")))
	out, _ = p.jobDone("plan forward reprotect")
	if !strings.Contains(out, "plan dr protected again: 2 machines") {
		t.Fatalf("the forward plan reprotect job's output:\n%s", out)
	}
	for _, m := range machines {
		c.waitState(m, "protected", hungAfter)
		if st := c.status(m); st.Direction != "" {
			t.Fatalf("%s after the forward reprotect: direction %q", m, st.Direction)
		}
		c.recoverAndCheck(m, c.tag(m), map[string]string{"d": sha256File(t, disks[m])})
	}
}
