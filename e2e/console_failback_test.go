//go:build e2e

package e2e

// The failback cycle from the console, in Chromium, against the real
// server and agent: a planned failover to the server's NBD exports and
// its commit from the console's buttons, fio writing into the export,
// then Reprotect, Failback and Reprotect forward from the machine's page,
// each confirmed, each followed on its job's page.

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/asrdr/asr/server/api"
)

// bytesShownRE is a byte figure as the console writes it.
var bytesShownRE = regexp.MustCompile(`\d+(\.\d)? (B|KiB|MiB|GiB)`)

// TestE2EConsoleFailback: protect a machine with the real agent, fail it
// over (planned, to NBD) and commit from the console; write into the
// failed-over export; Reprotect, Failback (its drain held by a stopped
// agent, so the job's live progress and the machine page's "running"
// are seen, then let go) and Reprotect forward from the machine's page
// (its form posted twice: the second post refused by the server, 409,
// shown, nothing more started).
// The original disk ends equal to the export's final content and a new
// point recovers bit-exact.
func TestE2EConsoleFailback(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	c := newFailoverCluster(t)
	fc := &failbackCase{c: c, disk: filepath.Join(c.dir, "d.img")}
	makeDisk(t, fc.disk, 32<<20, 7)
	a := c.startAgent("m", nil, "d="+fc.disk)
	c.waitState("m", "protected", hungAfter)
	fc.fio(a.uri("d"), "fwd", 1<<20)

	p := openConsole(t, c, browser)

	// No failback yet: no direction, no button.
	p.machinePage(c, "m")
	if p.exists("#machine-failback") || p.exists("a.failback-action") {
		t.Fatal("a protected machine's page shows failback")
	}

	// The planned failover to NBD, from the machine's page.
	p.do(chromedp.Click(chromedp.CSS("#machine-failover")), chromedp.WaitVisible(chromedp.CSS("#failover-submit")))
	if p.evalString(`document.querySelector('input[name="kind"]:checked').value + "/" + document.querySelector('input[name="to"]:checked').value`) != "planned/nbd" {
		t.Fatal("the failover form is not prefilled with a planned failover to NBD")
	}
	p.do(chromedp.Click(chromedp.CSS("#failover-submit")))
	out, _ := p.jobDone("failover")
	fs := c.liveFailovers()
	if len(fs) != 1 || len(fs[0].Exports) != 1 || !fs[0].Planned || !strings.Contains(out, fs[0].Exports[0].URI) {
		t.Fatalf("after the planned failover: %+v; the job's output:\n%s", fs, out)
	}
	fc.export = fs[0].Exports[0].URI
	fc.written = 0 // counted from the failover on

	// Not committed yet: the machine's page says to commit, no button.
	p.machinePage(c, "m")
	if s := p.text("#machine-failback"); !strings.Contains(s, "Failed over") || !strings.Contains(s, "Commit the failover") || p.exists("a.failback-action") {
		t.Fatalf("an uncommitted failover's machine page shows:\n%s", s)
	}
	p.screenshot("fb-01-failed-over")

	// Commit, from the failovers page.
	p.do(chromedp.Navigate(c.url()+"/failovers"), chromedp.WaitVisible(chromedp.CSS("button.failover-commit")),
		chromedp.Click(chromedp.CSS("button.failover-commit")))
	p.jobDone("commit")
	if st := c.status("m"); st.Direction != "failed-over" || st.Unprotected {
		t.Fatalf("after commit: direction %q, unprotected %v", st.Direction, st.Unprotected)
	}

	// The failed-over machine writes (fio through NBD into the export).
	fc.fio(fc.export, "failed-over", 4<<20)

	// Reprotect: the button, its confirmation, its job.
	p.machinePage(c, "m")
	if s := p.text("#machine-failback"); !strings.Contains(s, "Failed over") || !strings.Contains(s, "Reprotect") {
		t.Fatalf("the committed failover's machine page shows:\n%s", s)
	}
	if n := p.evalInt(`document.querySelectorAll("a.failback-action").length`); n != 1 || !p.exists(`a.failback-action[data-failback="reprotect"]`) {
		t.Fatalf("%d failback buttons, want the one Reprotect", n)
	}
	p.do(chromedp.Click(chromedp.CSS(`a.failback-action[data-failback="reprotect"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-reprotect")))
	if s := p.text("#failback-steps"); !strings.Contains(s, "marked for a resync") || !strings.Contains(s, "stays frozen") || !bytesShownRE.MatchString(s) {
		t.Fatalf("the reprotect confirmation says:\n%s", s)
	}
	p.screenshot("fb-02-reprotect-confirm")
	p.do(chromedp.Click(chromedp.CSS("#confirm-reprotect")))
	out, steps := p.jobDone("reprotect")
	if !strings.Contains(out, "reprotected:") || !strings.Contains(out, "bytes sent") || !strings.Contains(steps, "first pass") {
		t.Fatalf("the reprotect job shows:\n%s\n%s", out, steps)
	}
	p.screenshot("fb-03-reprotected-job")
	if st := c.status("m"); st.Direction != "reprotected" {
		t.Fatalf("after reprotect: direction %q", st.Direction)
	}
	p.machinePage(c, "m")
	if s := p.text("#machine-failback"); !strings.Contains(s, "Reprotected") || !strings.Contains(s, "sent back to the original disks") ||
		!p.exists(`a.failback-action[data-failback="failback"]`) || p.exists(`a.failback-action[data-failback="reprotect"]`) {
		t.Fatalf("the reprotected machine's page shows:\n%s", s)
	}
	p.do(chromedp.Navigate(c.url()+"/machines"), chromedp.WaitVisible(chromedp.CSS("#machines")))
	if s := p.text("#machines"); !strings.Contains(s, "Reprotected") || !p.exists(`#machines a.failback-action[data-failback="failback"]`) {
		t.Fatalf("the machines list shows:\n%s", s)
	}
	p.screenshot("fb-04-machines-reprotected")

	// Failback, its drain held: the agent is stopped (SIGSTOP) and the
	// failed-over machine writes more, so the job's page shows the drain
	// running with its bytes, and the machine's page the running job.
	a.proc.pause()
	fc.fio(fc.export, "held", 2<<20)
	want := nbdCopySum(t, fc.export)
	p.machinePage(c, "m")
	p.do(chromedp.Click(chromedp.CSS(`a.failback-action[data-failback="failback"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-failback")))
	if s := p.text("#failback-steps"); !strings.Contains(s, "failed-over machine is stopped") || !strings.Contains(s, "last changes are drained") ||
		!strings.Contains(s, "compared whole") || !strings.Contains(s, "on-premises machine is resumed") {
		t.Fatalf("the failback confirmation says:\n%s", s)
	}
	p.screenshot("fb-05-failback-confirm")
	p.do(chromedp.Click(chromedp.CSS("#confirm-failback")))
	p.waitJS("showed the failback's drain running with its bytes", `(() => {
		const j = document.querySelector('#job[data-state="running"]');
		if (!j) return false;
		return [...j.querySelectorAll("#job-steps tr.step-running")].some(r => /: drain/.test(r.textContent) && / of \d/.test(r.textContent));
	})()`)
	if !p.exists("#job-cancel") {
		t.Fatal("the failback in its drain offers no cancel")
	}
	p.screenshot("fb-06-failback-draining")
	jobURL, err := chromedp.Run(p.ctx, chromedp.Location())
	if err != nil {
		t.Fatal(err)
	}
	p.machinePage(c, "m")
	if s := p.text("#machine-failback"); !strings.Contains(s, "failback running") || p.exists("a.failback-action") {
		t.Fatalf("the machine's page while its failback runs:\n%s", s)
	}
	p.do(chromedp.Navigate(jobURL), chromedp.WaitVisible(chromedp.CSS("#job")))
	a.proc.resume()
	out, steps = p.jobDone("failback")
	t.Logf("failback job:\n%s\n%s", out, steps)
	if !strings.Contains(steps, ": verify") || !strings.Contains(steps, "compared: equal") || !strings.Contains(steps, ": power on") {
		t.Fatalf("the failback's steps:\n%s", steps)
	}
	fc.checkFailedBack(out, want) // the original disk's sha256, bytes sent, direction
	p.screenshot("fb-07-failed-back-job")

	// Failed back: the machine's page offers Reprotect forward; a failback
	// asked for again is refused with the reason (409), nothing changed.
	p.machinePage(c, "m")
	if s := p.text("#machine-failback"); !strings.Contains(s, "Failed back") || !strings.Contains(s, "Reprotect forward") ||
		!p.exists(`a.failback-action[data-failback="reprotect"]`) {
		t.Fatalf("the failed-back machine's page shows:\n%s", s)
	}
	p.screenshot("fb-08-failed-back")
	p.do(chromedp.Navigate(c.url()+"/machines/m/failback"), chromedp.WaitVisible(chromedp.CSS("#failback-title")))
	if s := p.text("#failback-error"); !strings.Contains(s, "does not apply") || p.exists("#confirm-failback") {
		t.Fatalf("failback of a failed-back machine: %q", s)
	}

	// Reprotect forward: the original runs again (writes through its
	// agent), the checksum resync sends only what differs.
	fc.fio(a.uri("d"), "back-home", 1<<20)
	p.machinePage(c, "m")
	p.do(chromedp.Click(chromedp.CSS(`a.failback-action[data-failback="reprotect"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-reprotect")))
	if s := p.text("#failback-steps"); !strings.Contains(s, "compares checksums") || !strings.Contains(s, "not a new initial replication") {
		t.Fatalf("the forward reprotect's confirmation says:\n%s", s)
	}
	p.screenshot("fb-09-forward-confirm")
	// A double click: the form is posted twice. The first post starts the
	// job; the second is refused by the server (409), its reason shown on
	// the confirmation page, and starts nothing.
	jobPage, err := chromedp.Run(p.ctx, chromedp.Evaluate[string](`(() => {
		const f = document.querySelector("#confirm-reprotect").form;
		return fetch(f.action, {method: "POST", body: new URLSearchParams(new FormData(f))}).then(r => r.url);
	})()`, chromedp.EvalAwaitPromise))
	if err != nil || !regexp.MustCompile(`/jobs/[0-9a-f]+$`).MatchString(jobPage) {
		t.Fatalf("the first post of the forward reprotect went to %q: %v", jobPage, err)
	}
	p.do(chromedp.Click(chromedp.CSS("#confirm-reprotect")), chromedp.WaitVisible(chromedp.CSS("#failback-error")))
	if s := p.text("#failback-error"); !strings.Contains(s, "Nothing was started: machine m") {
		t.Fatalf("the second post of the forward reprotect: %q", s)
	}
	p.screenshot("fb-10-forward-refused")
	var jobs []api.Job
	if err := json.Unmarshal([]byte(c.mustCLI("jobs", "--json")), &jobs); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, j := range jobs {
		if j.Kind == "reprotect" && j.Subject == "m" {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d reprotect jobs, want 2 (the reverse one and one forward): %+v", n, jobs)
	}
	// The refusal links the running job: the one the first post started.
	if href := p.evalString(`document.querySelector("#failback-running-job") ? document.querySelector("#failback-running-job").href : ""`); href != jobPage {
		// The job may have ended already: then there is no link.
		if href != "" {
			t.Fatalf("the refusal links %q, the job started is %q", href, jobPage)
		}
		p.do(chromedp.Navigate(jobPage), chromedp.WaitVisible(chromedp.CSS("#job")))
	} else {
		p.do(chromedp.Click(chromedp.CSS("#failback-running-job")), chromedp.WaitVisible(chromedp.CSS("#job")))
	}
	out, steps = p.jobDone("forward reprotect")
	m := forwardRE.FindStringSubmatch(out)
	if m == nil || !strings.Contains(steps, "resync d") {
		t.Fatalf("the forward reprotect job shows:\n%s\n%s", out, steps)
	}
	compared, _ := strconv.ParseInt(m[1], 10, 64)
	sent, _ := strconv.ParseInt(m[2], 10, 64)
	if compared != 32<<20 || sent <= 0 || sent >= compared/2 {
		t.Fatalf("forward reprotect compared %d bytes and sent %d: want the whole disk compared, only the differences sent", compared, sent)
	}
	p.screenshot("fb-11-forward-job")
	c.waitState("m", "protected", hungAfter)
	if st := c.status("m"); st.Direction != "" {
		t.Fatalf("after the forward reprotect: direction %q", st.Direction)
	}
	p.machinePage(c, "m")
	if p.exists("#machine-failback") || p.exists("a.failback-action") {
		t.Fatal("the machine's page still shows failback once protected forward")
	}
	p.screenshot("fb-12-protected")
	point := c.tag("m")
	c.recoverAndCheck("m", point, map[string]string{"d": sha256File(t, fc.disk)})
}
