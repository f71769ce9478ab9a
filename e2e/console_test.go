//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image/color"
	"image/png"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestE2EConsoleInChromium drives the console in headless Chromium: login
// with the admin token, the machines page, and its live refresh (htmx
// polling) showing the initial copy finish and a new recovery point appear
// without a reload; then a forced shutdown whose resync waits for the resync
// window, started at once from the console after its confirmation. The
// agent's data link is held part-way through the initial copy until the
// page has shown it, so the copy cannot finish before the browser has
// loaded the page.
func TestE2EConsoleInChromium(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	c, gate := gatedCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	const size = 96 << 20
	makeRandomDisk(t, disk, size, 3)
	// 40% of the (incompressible) disk gets through, then the gate holds:
	// the copy stays at a third (progress is recorded every 16 MiB).
	gate.allow(size * 2 / 5)
	a := c.startAgent("vm1", nil, "data="+disk)

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		// The vault's own CA is not in Chromium's store; the TLS set-up is
		// tested elsewhere, here the page is.
		chromedp.Flag("ignore-certificate-errors", true),
		chromedp.UserDataDir(t.TempDir()),
	)
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelA()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	// A safety net for a hung browser or server, not a pace to keep.
	ctx, cancelT := context.WithTimeout(ctx, 10*time.Minute)
	defer cancelT()

	token, err := os.ReadFile(filepath.Join(c.srvDir, "admin-token"))
	if err != nil {
		t.Fatal(err)
	}
	// A step that finds the page changing under it is done again
	// (runFresh, staleNode).
	do := func(steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		for _, step := range steps {
			_, err := runFresh(ctx, step)
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	text := func(sel chromedp.CSS) string {
		t.Helper()
		s, err := runFresh(ctx, chromedp.Text(sel))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	do(chromedp.Navigate(c.url()+"/login"),
		chromedp.WaitVisible(chromedp.CSS("#secret")),
		chromedp.SendKeys(chromedp.CSS("#secret"), "wrong-token"),
		chromedp.Submit(chromedp.CSS("#secret")),
		chromedp.WaitVisible(chromedp.CSS("#login-error")))
	if text("#login-error") == "" {
		t.Fatal("a wrong token shows no error")
	}
	do(chromedp.SetValue(chromedp.CSS("#secret"), strings.TrimSpace(string(token))),
		chromedp.Submit(chromedp.CSS("#secret")),
		chromedp.WaitVisible(chromedp.CSS("#dashboard")),
		chromedp.Click(chromedp.CSS(`nav a[href="/machines"]`)),
		chromedp.WaitVisible(chromedp.CSS("#machines")))

	// waitText polls the live section until it contains want (no reloads).
	// Every state it waits for holds until the page shows it; the timeout
	// only ends a hung run.
	waitText := func(want string) string {
		t.Helper()
		deadline := time.Now().Add(hungAfter)
		var got string
		for time.Now().Before(deadline) {
			if got = text("#machines"); strings.Contains(got, want) {
				return got
			}
			time.Sleep(250 * time.Millisecond)
		}
		t.Fatalf("the machines page never showed %q; it shows:\n%s", want, got)
		return ""
	}
	url, err := chromedp.Run(ctx, chromedp.Location())
	if err != nil {
		t.Fatal(err)
	}
	waitText("vm1")
	st := c.waitStatus("vm1", "a third of the initial copy applied", func(st machineStatus) bool { return st.copying(0.3) })
	first := waitText(fmt.Sprintf("Initial replication %d%%", int(math.Floor(st.Progress*100))))
	t.Logf("during the initial copy:\n%s", first)
	gate.release()
	waitText("Protected")
	// The process server's figures are under the machines.
	if ps := text(chromedp.CSS("#process-server")); !strings.Contains(ps, "Backlog") || !strings.Contains(ps, "Compression") ||
		!strings.Contains(ps, "Cache disk free") || !strings.Contains(ps, "file://") && !strings.Contains(ps, "localfs:") {
		t.Fatalf("process server panel:\n%s", ps)
	}

	// A new point appears by itself.
	id := c.tag("vm1")
	var points []struct{ ID, Time string }
	if err := json.Unmarshal([]byte(c.mustCLI("points", "--machine", "vm1", "--json")), &points); err != nil {
		t.Fatal(err)
	}
	var when time.Time
	for _, p := range points {
		if p.ID == id {
			when, _ = time.Parse(time.RFC3339Nano, p.Time)
		}
	}
	if when.IsZero() {
		t.Fatalf("point %s not listed", id)
	}
	waitText(when.UTC().Format("2006-01-02 15:04:05"))
	if after, _ := chromedp.Run(ctx, chromedp.Location()); after != url {
		t.Fatalf("the page navigated (%s -> %s): the refresh should be in place", url, after)
	}

	// The machine crashes; its resync waits for a window two hours away.
	// The console shows why and when.
	now := time.Now().Local()
	c.mustCLI("resync", "--window", now.Add(2*time.Hour).Format("15:04")+"-"+now.Add(3*time.Hour).Format("15:04"))
	guestWritesThenCrash(t, a.uri("data"), "write -P 0x61 8M 64k", "write -P 0x62 40M 64k")
	// The block changed behind the splitter lies in a logged write's
	// extent but outside every logged write: the restarted agent re-logs
	// the ranges of its last changes anyway (agent/open.go, repairLog).
	a = c.forcedShutdown(t, a, "vm1", disk, 8<<20+128<<10)
	shown := waitText("Scheduled for")
	if !strings.Contains(shown, "forced shutdown") || !strings.Contains(shown, "(in 1 h") && !strings.Contains(shown, "(in 2 h") {
		t.Fatalf("the scheduled resync shows no reason or start time:\n%s", shown)
	}
	if !strings.Contains(c.mustCLI("resync", "--machine", "vm1", "--status"), "scheduled") {
		t.Fatal("the resync is not scheduled")
	}

	// Start it now: the link asks for confirmation first, and Cancel
	// starts nothing.
	link := chromedp.CSS(`a[aria-label="Resync data of vm1 now"]`)
	do(chromedp.Click(link), chromedp.WaitVisible(chromedp.CSS("#confirm-resync")))
	if s := text("main"); !strings.Contains(s, "Resync disk data?") || !strings.Contains(s, "forced shutdown") {
		t.Fatalf("the confirmation page does not say what it resyncs and why:\n%s", s)
	}
	do(chromedp.Click(chromedp.CSS(`a.button[href="/machines/vm1"]`)), chromedp.WaitVisible(chromedp.CSS("#machine-title")),
		chromedp.Click(chromedp.CSS(`nav a[href="/machines"]`)), chromedp.WaitVisible(chromedp.CSS("#machines")))
	if !strings.Contains(c.mustCLI("resync", "--machine", "vm1", "--status"), "scheduled") {
		t.Fatal("Cancel started the resync")
	}
	do(chromedp.Click(link), chromedp.WaitVisible(chromedp.CSS("#confirm-resync")),
		chromedp.Click(chromedp.CSS("#confirm-resync")), chromedp.WaitVisible(chromedp.CSS("#machine-title")),
		chromedp.Click(chromedp.CSS(`nav a[href="/machines"]`)), chromedp.WaitVisible(chromedp.CSS("#machines")))
	waitText("Protected")
	if s := text("#machines"); strings.Contains(s, "Scheduled for") || strings.Contains(s, "Needs resync") {
		t.Fatalf("the resync finished but the page still shows it:\n%s", s)
	}
	compared, sent := c.resyncDone(t, "vm1")
	if sent < 4096 || compared > 8<<20 {
		t.Fatalf("resync compared %d bytes and sent %d: want the activity log's extents only", compared, sent)
	}
	id = c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"data": sha256File(t, disk)})
}

// TestE2EConsoleDR walks the console an administrator runs DR from, in
// headless Chromium against the real server and two agents: the dashboard
// (health counts, the RPO of every machine, its 24 h charts drawn as SVG
// from the server's history), a machine's page (disks, the points
// timeline), a tag from its button (a new point on the timeline), a
// resync from its button (in its resync history once done), a test
// failover from its page with the job's progress, the policies (a create
// refused and shown, then created, edited and assigned), the groups (two
// machines put in one, a group point), the infrastructure page, the jobs
// list, an agent gone (Disconnected, its RPO growing) and the machines
// table on a 400 px wide screen. Each step checks what the page shows and
// takes a screenshot (kept in $ASR_SCREENSHOTS, else the test's temporary
// directory), checked not to be blank.
func TestE2EConsoleDR(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	c := newClusterArgs(t, "--history-every", "200ms")
	agents := map[string]*agentProc{}
	for i, m := range []string{"m1", "m2"} {
		disk := filepath.Join(c.dir, m+".img")
		makeDisk(t, disk, 4<<20, uint64(40+i))
		agents[m] = c.startAgent(m, nil, "disk0="+disk)
	}
	for _, m := range []string{"m1", "m2"} {
		c.waitState(m, "protected", time.Minute)
	}
	c.tag("m1")

	p := openConsole(t, c, browser)

	// The dashboard: counts, the RPO table, and charts with lines once
	// the server has sampled a few times (every 200 ms here; the page
	// polls every 5 s).
	p.waitJS("counted two protected machines", `document.querySelector("#tile-protected .tile-count").textContent.trim() === "2"`)
	if s := p.text("#rpo-table"); !strings.Contains(s, "m1") || !strings.Contains(s, "m2") || !strings.Contains(s, "15 min") {
		t.Fatalf("the RPO table shows:\n%s", s)
	}
	p.waitJS("drew m1's RPO and churn lines", `(() => {
		const l = document.querySelector("#rpo-chart-m1 path.chart-line"), c = document.querySelector("#churn-chart-m1 path.chart-line");
		return !!l && !!c && /^M[0-9.]+,[0-9.]+ L/.test(l.getAttribute("d")) && /^M[0-9.]+,[0-9.]+ L/.test(c.getAttribute("d"));
	})()`)
	if n := p.evalInt(`document.querySelectorAll("#charts svg.chart").length`); n != 4 {
		t.Fatalf("%d charts on the dashboard, want 4 (RPO and churn of m1 and m2)", n)
	}
	if s := p.text("#alerts"); !strings.Contains(s, "Active alerts") {
		t.Fatalf("the alerts panel shows:\n%s", s)
	}
	p.screenshot("01-dashboard")

	// A machine's page, from the RPO table.
	p.do(chromedp.Click(chromedp.CSS(`#rpo-table a[href="/machines/m1"]`)), chromedp.WaitVisible(chromedp.CSS("#machine-title")))
	if s := p.text("#machine-title"); s != "m1" {
		t.Fatalf("the machine page's title is %q", s)
	}
	if s := p.text("#machine-disks"); !strings.Contains(s, "disk0") || !strings.Contains(s, "Protected") || !strings.Contains(s, "4 MiB") {
		t.Fatalf("the disks show:\n%s", s)
	}
	if s := p.text("#any-point"); !strings.Contains(s, "Any point in time") {
		t.Fatalf("the any-point window shows %q", s)
	}
	before := p.evalInt(`document.querySelectorAll("#points-timeline circle").length`)
	if before < 1 {
		t.Fatal("the points timeline has no point")
	}
	p.screenshot("02-machine")

	// Tag: a new point, named on the page, on the timeline and in the CLI.
	p.do(chromedp.Click(chromedp.CSS("#tag-crash")), chromedp.WaitVisible(chromedp.CSS("#tagged")))
	point := strings.Fields(strings.TrimPrefix(p.text("#tagged"), "Recovery point "))[0]
	if n := p.evalInt(`document.querySelectorAll("#points-timeline circle").length`); n != before+1 {
		t.Fatalf("%d points on the timeline after the tag, want %d", n, before+1)
	}
	if !p.exists(`#points-table tr[data-point="` + point + `"]`) {
		t.Fatalf("point %s is not in the points table", point)
	}
	if out := c.mustCLI("points", "--machine", "m1", "--json"); !strings.Contains(out, point) {
		t.Fatalf("asr points does not list %s:\n%s", point, out)
	}
	p.screenshot("03-tagged")

	// Resync, confirmed, then in the machine's resync history.
	p.do(chromedp.Click(chromedp.CSS("#machine-resync")), chromedp.WaitVisible(chromedp.CSS("#confirm-resync")),
		chromedp.Click(chromedp.CSS("#confirm-resync")), chromedp.WaitVisible(chromedp.CSS("#machine-title")))
	waitEvent(t, c, "m1", "resync-done")
	p.do(chromedp.Reload(), chromedp.WaitVisible(chromedp.CSS("#machine-resyncs")))
	if s := p.text("#machine-resyncs"); !strings.Contains(s, "resync-done") {
		t.Fatalf("the resync history shows:\n%s", s)
	}
	if s := p.text("#machine-events"); !strings.Contains(s, "resync-done") {
		t.Fatalf("the events show:\n%s", s)
	}
	p.screenshot("04-resynced")

	// A test failover from the machine's page: its job shows its steps'
	// progress while it runs and when it ends; then its cleanup.
	p.do(chromedp.Click(chromedp.CSS("#machine-test-failover")), chromedp.WaitVisible(chromedp.CSS("#failover-submit")),
		chromedp.Click(chromedp.CSS("#failover-submit")))
	p.waitVisible("showed the failover's job end", `#job[data-state="succeeded"], #job[data-state="failed"]`)
	if s := p.text("#job"); !strings.Contains(s, "succeeded") {
		t.Fatalf("the test failover's job:\n%s", s)
	}
	if s := p.text("#job-progress"); !regexp.MustCompile(`(\d+) of (\d+) steps? done`).MatchString(s) {
		t.Fatalf("the job shows no progress: %q", s)
	}
	p.screenshot("05-job")
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/jobs"]`)), chromedp.WaitVisible(chromedp.CSS("#jobs")))
	if s := p.text("#jobs tbody tr"); !strings.Contains(s, "m1") || !strings.Contains(s, " done") {
		t.Fatalf("the jobs list's newest job:\n%s", s)
	}
	p.screenshot("06-jobs")
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/failovers"]`)), chromedp.WaitVisible(chromedp.CSS("button.failover-cleanup")),
		chromedp.Click(chromedp.CSS("button.failover-cleanup")))
	p.waitVisible("showed the cleanup's job end", `#job[data-state="succeeded"]`)

	// Policies: a refused input shows in the form and creates nothing;
	// then created, edited, assigned.
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/policies"]`)), chromedp.WaitVisible(chromedp.CSS("#policy-create")),
		chromedp.SetValue(chromedp.CSS("#policy-name"), "silver"),
		chromedp.SetValue(chromedp.CSS("#new-crash"), "1s"),
		chromedp.Click(chromedp.CSS("#policy-create-submit")),
		chromedp.WaitVisible(chromedp.CSS("#policy-error")))
	if s := p.text("#policy-error"); !strings.Contains(s, "crash-consistent interval") || !strings.Contains(s, "nothing was created") {
		t.Fatalf("the refused policy shows %q", s)
	}
	if v := p.evalString(`document.querySelector("#new-crash").value`); v != "1s" {
		t.Fatalf("the form lost what was typed: %q", v)
	}
	if out := c.mustCLI("policy", "list"); strings.Contains(out, "silver") {
		t.Fatalf("a refused policy was created:\n%s", out)
	}
	p.screenshot("07-policy-refused")
	p.do(chromedp.SetValue(chromedp.CSS("#new-crash"), "30s"),
		chromedp.Click(chromedp.CSS("#policy-create-submit")),
		chromedp.WaitVisible(chromedp.CSS("#policies-done")))
	if s := p.text(`#policies tr[data-policy="silver"]`); !strings.Contains(s, "30s") {
		t.Fatalf("the new policy's row: %q", s)
	}
	p.do(chromedp.Click(chromedp.CSS(`a[href="/policies/silver/edit"]`)), chromedp.WaitVisible(chromedp.CSS("#policy-edit")),
		chromedp.SetValue(chromedp.CSS("#edit-rpo"), "10m"),
		chromedp.Click(chromedp.CSS("#policy-edit-submit")),
		chromedp.WaitVisible(chromedp.CSS("#policies-done")))
	if s := p.text(`#policies tr[data-policy="silver"]`); !strings.Contains(s, "10m0s") {
		t.Fatalf("the edited policy's row: %q", s)
	}
	// The page already says what the edit did: wait for what the
	// assignment says.
	p.do(chromedp.SetValue(chromedp.CSS("#assign-machine"), "m1"),
		chromedp.SetValue(chromedp.CSS("#assign-policy"), "silver"),
		chromedp.Click(chromedp.CSS("#policy-assign-submit")))
	p.waitJS("said m1 has policy silver", `document.querySelector("#policies-done")?.textContent.includes("Machine m1 now has policy silver")`)
	if st := c.status("m1"); st.Policy != "silver" {
		t.Fatalf("m1's policy is %q after the assignment", st.Policy)
	}
	if s := p.text(`#policies tr[data-policy="silver"]`); !strings.Contains(s, "m1") {
		t.Fatalf("the policy's row does not list m1: %q", s)
	}
	p.screenshot("08-policies")

	// Groups: both machines in one, then a group point across them.
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/groups"]`)), chromedp.WaitVisible(chromedp.CSS("#group-set")))
	for _, m := range []string{"m1", "m2"} {
		p.do(chromedp.SetValue(chromedp.CSS("#group-machine"), m),
			chromedp.SetValue(chromedp.CSS("#group-name"), "erp"),
			chromedp.Click(chromedp.CSS("#group-set-submit")))
		p.waitJS("said "+m+" is in group erp", `document.querySelector("#groups-done")?.textContent.includes("Machine `+m+` is now in group erp")`)
	}
	if s := p.text(`[data-group="erp"] .group-members`); !strings.Contains(s, "m1") || !strings.Contains(s, "m2") {
		t.Fatalf("group erp's members: %q", s)
	}
	p.do(chromedp.Click(chromedp.CSS(`[data-group="erp"] form button`)))
	p.waitJS("said a group point was made", `document.querySelector("#groups-done")?.textContent.includes("Group point")`)
	if s := p.text(`[data-group="erp"] .group-points tbody`); !strings.Contains(s, "m1: ") || !strings.Contains(s, "m2: ") {
		t.Fatalf("group erp's points: %q", s)
	}
	p.screenshot("09-groups")

	// Infrastructure.
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/infrastructure"]`)), chromedp.WaitVisible(chromedp.CSS("#infra-ps")))
	if s := p.text("#infra-ps"); !strings.Contains(s, "CPU") || !strings.Contains(s, "Memory") || !strings.Contains(s, "Cache upload time") {
		t.Fatalf("the process server shows:\n%s", s)
	}
	if s := p.text("#target-url"); !strings.HasPrefix(s, "localfs:"+c.srvDir) {
		t.Fatalf("the target shows %q", s)
	}
	if s := p.text("#infra-vcenters"); !strings.Contains(s, "No vCenter registered") {
		t.Fatalf("the vCenters show:\n%s", s)
	}
	p.screenshot("10-infrastructure")

	// An agent gone: Disconnected, not Protected, its RPO growing.
	agents["m2"].stop()
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/"]`)), chromedp.WaitVisible(chromedp.CSS("#dashboard")))
	row := `#rpo-table tr[data-machine="m2"]`
	p.waitJS("showed m2 disconnected", `document.querySelector('`+row+` .status-disconnected') !== null`)
	if s := p.text(row); strings.Contains(s, "Protected") {
		t.Fatalf("m2 is gone but shows %q", s)
	}
	first := p.text(row + " .rpo")
	p.waitJS("showed m2's RPO grow past "+first, `(() => {
		const secs = s => { let t = 0; for (const [, n, u] of s.matchAll(/([0-9.]+) (d|h|min|s)/g)) t += n * {d: 86400, h: 3600, min: 60, s: 1}[u]; return t; };
		const e = document.querySelector('`+row+` .rpo');
		return !!e && secs(e.textContent) > secs(`+"`"+first+"`"+`) + 2;
	})()`)
	if n := p.text("#tile-disconnected .tile-count"); n != "1" {
		t.Fatalf("%s disconnected machines counted, want 1", n)
	}
	p.screenshot("11-disconnected")
	// Its page says so too, and its RPO grows in place (the page polls).
	p.do(chromedp.Click(chromedp.CSS(`#rpo-table a[href="/machines/m2"]`)), chromedp.WaitVisible(chromedp.CSS("#machine-live .status-disconnected")))
	if s := p.text(".machine-head"); strings.Contains(s, "Protected") {
		t.Fatalf("m2's page shows %q", s)
	}
	loc, _ := chromedp.Run(p.ctx, chromedp.Location())
	first = p.text("#machine-rpo")
	p.waitJS("showed m2's RPO grow on its page past "+first, `(() => {
		const secs = s => { let t = 0; for (const [, n, u] of s.matchAll(/([0-9.]+) (d|h|min|s)/g)) t += n * {d: 86400, h: 3600, min: 60, s: 1}[u]; return t; };
		const e = document.querySelector("#machine-rpo");
		return !!e && secs(e.textContent) > secs(`+"`"+first+"`"+`) + 2;
	})()`)
	if after, _ := chromedp.Run(p.ctx, chromedp.Location()); after != loc {
		t.Fatalf("the machine page navigated (%s -> %s): the refresh should be in place", loc, after)
	}
	p.screenshot("12-disconnected-machine")

	// A narrow screen: the machines table scrolls in its box, the page
	// does not overflow.
	p.do(chromedp.EmulateViewport(400, 800), chromedp.Navigate(c.url()+"/machines"), chromedp.WaitVisible(chromedp.CSS("#machines")))
	for _, path := range []string{"/machines", "/", "/machines/m1", "/policies"} {
		p.do(chromedp.Navigate(c.url()+path), chromedp.WaitVisible(chromedp.CSS("main")))
		sw, iw := p.evalInt(`document.documentElement.scrollWidth`), p.evalInt(`window.innerWidth`)
		if sw > iw {
			wide := p.evalString(`[...document.querySelectorAll("body *")].filter(e => e.getBoundingClientRect().right > window.innerWidth && !e.closest(".table-wrap") && !e.closest(".nav"))
				.slice(0, 8).map(e => e.tagName + (e.id ? "#" + e.id : "") + "." + e.className + " " + Math.round(e.getBoundingClientRect().right)).join(", ")`)
			t.Errorf("%s at 400 px: the page is %d px wide, wider than the window (%d px): %s", path, sw, iw, wide)
		}
	}
	p.do(chromedp.Navigate(c.url()+"/machines"), chromedp.WaitVisible(chromedp.CSS("#machines")))
	if w := p.evalInt(`document.querySelector("#machines-scroll").getBoundingClientRect().right`); w > 400 {
		t.Errorf("the machines table's box ends at %d px, past the 400 px window", w)
	}
	p.screenshot("13-narrow-machines")
	t.Logf("screenshots in %s", p.shots)
}

// openConsole starts headless Chromium (1280x900), signs into the
// cluster's console with the admin token and returns the tab on the
// dashboard. Screenshots go to $ASR_SCREENSHOTS, else the test's
// temporary directory.
func openConsole(t *testing.T, c *cluster, browser string) *consolePage {
	t.Helper()
	shots := os.Getenv("ASR_SCREENSHOTS")
	if shots == "" {
		shots = t.TempDir()
	}
	if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("ignore-certificate-errors", true),
		chromedp.WindowSize(1280, 900),
		chromedp.UserDataDir(t.TempDir()),
	)
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelA)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(cancel)
	ctx, cancelT := context.WithTimeout(ctx, 10*time.Minute) // a hung browser, not a pace
	t.Cleanup(cancelT)
	p := &consolePage{t: t, ctx: ctx, shots: shots}

	token, err := os.ReadFile(filepath.Join(c.srvDir, "admin-token"))
	if err != nil {
		t.Fatal(err)
	}
	p.do(chromedp.Navigate(c.url()+"/login"),
		chromedp.WaitVisible(chromedp.CSS("#secret")),
		chromedp.SetValue(chromedp.CSS("#secret"), strings.TrimSpace(string(token))),
		chromedp.Submit(chromedp.CSS("#secret")),
		chromedp.WaitVisible(chromedp.CSS("#dashboard")))
	return p
}

// consolePage drives one browser tab of the console.
type consolePage struct {
	t     *testing.T
	ctx   context.Context
	shots string
}

// machinePage opens machine's page in the console of c.
func (p *consolePage) machinePage(c *cluster, machine string) {
	p.t.Helper()
	p.do(chromedp.Navigate(c.url()+"/machines/"+machine), chromedp.WaitVisible(chromedp.CSS("#machine-title")))
}

// jobDone waits until the job's page shows its end, fails the test if
// the job did not succeed, and returns its output and its steps.
func (p *consolePage) jobDone(what string) (output, steps string) {
	p.t.Helper()
	p.waitVisible("showed the end of the "+what+" job", `#job[data-state="succeeded"], #job[data-state="failed"]`)
	if s := p.text("#job-state"); s != "succeeded" {
		p.t.Fatalf("the %s job %s:\n%s", what, s, p.text("#job"))
	}
	if p.exists("#job-output") { // a job without result lines has none
		output = p.text("#job-output")
	}
	return output, p.text("#job-steps")
}

// staleNode tells an error from a step that found the page changing
// under it, and so did nothing: a node that htmx's polling replaced
// between its query and its use ("No node with given id", "Could not
// find node"), or a page being navigated away while the step ran, whose
// JavaScript context is gone ("Cannot find context with specified id",
// "Execution context was destroyed"). The step is done again on the new
// page or node.
func staleNode(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	for _, m := range []string{"node with given id", "Could not find node", "Cannot find context with specified id", "Execution context was destroyed"} {
		if strings.Contains(s, m) {
			return true
		}
	}
	return false
}

// runFresh runs a step, again while staleNode says the page changed
// under it (such a step did nothing).
func runFresh[T any](ctx context.Context, a chromedp.Action[T]) (T, error) {
	v, err := chromedp.Run(ctx, a)
	for staleNode(err) {
		v, err = chromedp.Run(ctx, a)
	}
	return v, err
}

func (p *consolePage) do(steps ...chromedp.Action[chromedp.Void]) {
	p.t.Helper()
	for _, step := range steps {
		_, err := chromedp.Run(p.ctx, step)
		for staleNode(err) {
			_, err = chromedp.Run(p.ctx, step)
		}
		if err != nil {
			p.t.Fatal(err)
		}
	}
}

func (p *consolePage) text(sel string) string {
	p.t.Helper()
	s, err := chromedp.Run(p.ctx, chromedp.Text(chromedp.CSS(sel)))
	for staleNode(err) {
		s, err = chromedp.Run(p.ctx, chromedp.Text(chromedp.CSS(sel)))
	}
	if err != nil {
		p.t.Fatalf("text of %s: %v", sel, err)
	}
	return strings.TrimSpace(s)
}

func (p *consolePage) evalInt(expr string) int {
	p.t.Helper()
	n, err := runFresh(p.ctx, chromedp.Evaluate[int](expr))
	if err != nil {
		p.t.Fatalf("%s: %v", expr, err)
	}
	return n
}

func (p *consolePage) evalString(expr string) string {
	p.t.Helper()
	s, err := runFresh(p.ctx, chromedp.Evaluate[string](expr))
	if err != nil {
		p.t.Fatalf("%s: %v", expr, err)
	}
	return s
}

func (p *consolePage) exists(sel string) bool {
	p.t.Helper()
	return p.evalInt(`document.querySelectorAll('`+sel+`').length`) > 0
}

// waitJS waits until the page's DOM makes expr true (htmx swaps it in
// place); the deadline only ends a hung run.
func (p *consolePage) waitJS(what, expr string) {
	p.t.Helper()
	deadline := time.Now().Add(hungAfter)
	for time.Now().Before(deadline) {
		ok, err := chromedp.Run(p.ctx, chromedp.Evaluate[bool](expr))
		if err == nil && ok {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	page, _ := chromedp.Run(p.ctx, chromedp.Text(chromedp.CSS("main")))
	p.t.Fatalf("the page never %s; it shows:\n%s", what, page)
}

func (p *consolePage) waitVisible(what, sel string) {
	p.t.Helper()
	wctx, cancel := context.WithTimeout(p.ctx, hungAfter)
	defer cancel()
	_, err := runFresh(wctx, chromedp.WaitVisible(chromedp.CSS(sel)))
	if err != nil {
		page, _ := chromedp.Run(p.ctx, chromedp.Text(chromedp.CSS("main")))
		p.t.Fatalf("never %s (%s): %v; the page shows:\n%s", what, sel, err, page)
	}
}

// screenshot saves the whole page as NAME.png and checks it is a picture
// of something: a PNG of the page's size with more than a few colours.
func (p *consolePage) screenshot(name string) {
	p.t.Helper()
	b, err := chromedp.Run(p.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		p.t.Fatal(err)
	}
	path := filepath.Join(p.shots, name+".png")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		p.t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		p.t.Fatalf("screenshot %s: %v", name, err)
	}
	colours := map[color.RGBA]bool{}
	bounds := img.Bounds()
	for y := bounds.Min.Y; y < bounds.Max.Y && len(colours) <= 16; y += 7 {
		for x := bounds.Min.X; x < bounds.Max.X; x += 7 {
			r, g, bl, a := img.At(x, y).RGBA()
			colours[color.RGBA{uint8(r >> 8), uint8(g >> 8), uint8(bl >> 8), uint8(a >> 8)}] = true
		}
	}
	if bounds.Dx() < 300 || bounds.Dy() < 300 || len(colours) <= 16 {
		p.t.Fatalf("screenshot %s (%v, %d colours) looks blank", path, bounds, len(colours))
	}
}

// waitEvent waits until a machine has an event of a kind.
func waitEvent(t *testing.T, c *cluster, machine, kind string) {
	t.Helper()
	deadline := time.Now().Add(hungAfter)
	for time.Now().Before(deadline) {
		var es []struct{ Kind string }
		if err := json.Unmarshal([]byte(c.mustCLI("events", "--machine", machine, "--json")), &es); err == nil {
			for _, e := range es {
				if e.Kind == kind {
					return
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("no %s event of %s:\n%s", kind, machine, c.mustCLI("events", "--machine", machine))
}
