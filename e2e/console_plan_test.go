//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/asrdr/asr/server/api"
)

// TestE2EConsolePlan runs a recovery plan from the console in headless
// Chromium against the real server and two agents: a two-group plan is
// created through the form (group 1 = m1 with a post manual action, group
// 2 = m2 with a pre script that saves its standard input), its test
// failover to NBD started from the plans page pauses on the manual action,
// shown on the job's page with a Confirm button, before m2 fails over and
// before the script runs; confirmed, the job ends with an NBD export of
// each machine, the script having read the plan's context with m1's
// exports. Cleanup from the plans page ends both test failovers.
func TestE2EConsolePlan(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	c := newClusterArgs(t, "--nbd-listen", "127.0.0.1:"+freePort(t))
	const size = 4 << 20
	for i, m := range []string{"m1", "m2"} {
		disk := filepath.Join(c.dir, m+".img")
		makeDisk(t, disk, size, uint64(20+i))
		c.startAgent(m, nil, "disk0="+disk)
	}
	for _, m := range []string{"m1", "m2"} {
		c.waitState(m, "protected", time.Minute)
		c.tag(m)
	}

	// The pre script of group 2 saves the context it reads.
	work := t.TempDir()
	ctxFile := filepath.Join(work, "context.json")
	script := filepath.Join(work, "pre.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\ncat > "+ctxFile+"\n"), 0o755); err != nil {
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
		chromedp.UserDataDir(t.TempDir()),
	)
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelA()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, 10*time.Minute) // a hung browser, not a pace
	defer cancelT()

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
	text := func(sel string) string {
		t.Helper()
		s, err := runFresh(ctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// waitVisible waits on the page's DOM until sel shows; the deadline
	// only ends a hung run.
	waitVisible := func(what, sel string) {
		t.Helper()
		wctx, cancel := context.WithTimeout(ctx, hungAfter)
		defer cancel()
		_, err := runFresh(wctx, chromedp.WaitVisible(chromedp.CSS(sel)))
		if err != nil {
			page, _ := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("main")))
			t.Fatalf("never %s (%s): %v; the page shows:\n%s", what, sel, err, page)
		}
	}
	failovers := func() []api.Failover {
		t.Helper()
		var fs []api.Failover
		if err := json.Unmarshal([]byte(c.mustCLI("failover", "--list", "--json")), &fs); err != nil {
			t.Fatal(err)
		}
		return fs
	}
	machines := func(fs []api.Failover) []string {
		var out []string
		for _, f := range fs {
			out = append(out, f.Machine)
		}
		slices.Sort(out)
		return out
	}
	// jobEnded waits until the job's page shows it ended and returns its
	// state.
	jobEnded := func() string {
		t.Helper()
		waitVisible("saw the job end", `#job[data-state="succeeded"], #job[data-state="failed"]`)
		s, err := runFresh(ctx, chromedp.AttributeValue(chromedp.CSS("#job"), "data-state"))
		if err != nil {
			t.Fatal(err)
		}
		return s.Value
	}

	token, err := os.ReadFile(filepath.Join(c.srvDir, "admin-token"))
	if err != nil {
		t.Fatal(err)
	}
	do(chromedp.Navigate(c.url()+"/login"),
		chromedp.WaitVisible(chromedp.CSS("#secret")),
		chromedp.SetValue(chromedp.CSS("#secret"), strings.TrimSpace(string(token))),
		chromedp.Submit(chromedp.CSS("#secret")),
		chromedp.WaitVisible(chromedp.CSS("#dashboard")))

	// The plan, through the form.
	do(chromedp.Click(chromedp.CSS(`nav a[href="/plans"]`)),
		chromedp.WaitVisible(chromedp.CSS("#plan-create")),
		chromedp.SetValue(chromedp.CSS("#plan-name"), "dr"),
		chromedp.SetValue(chromedp.CSS("#g1-machines"), "m1"),
		chromedp.SetValue(chromedp.CSS("#g1-post"), "check the database"),
		chromedp.SetValue(chromedp.CSS("#g2-machines"), "m2"),
		chromedp.SetValue(chromedp.CSS("#g2-pre"), script),
		chromedp.Click(chromedp.CSS("#plan-create")),
		chromedp.WaitVisible(chromedp.CSS("#plan-dr")))
	if s := text("#plan-dr"); !strings.Contains(s, "Group 1: m1") || !strings.Contains(s, "post: manual: check the database") ||
		!strings.Contains(s, "Group 2: m2") || !strings.Contains(s, "pre: script "+script) {
		t.Fatalf("the plan shows:\n%s", s)
	}

	// Its test failover to NBD, from the plans page, to the job's page,
	// which waits on the manual action after group 1.
	do(chromedp.Click(chromedp.CSS(`#plan-dr form.plan-test button[type="submit"]`)))
	waitVisible("showed the manual action", "#job-confirm")
	if loc, err := chromedp.Run(ctx, chromedp.Location()); err != nil || !strings.Contains(loc, "/jobs/") {
		t.Fatalf("after Test failover, the browser is at %s (%v), not a job's page", loc, err)
	}
	if s := text("#job-waiting"); !strings.Contains(s, "Manual action:") || !strings.Contains(s, "check the database") {
		t.Fatalf("the manual action box shows %q", s)
	}
	if got := machines(failovers()); !slices.Equal(got, []string{"m1"}) {
		t.Fatalf("while the plan waits on group 1's post action, the failovers are of %v, want m1 only", got)
	}
	if _, err := os.Stat(ctxFile); !os.IsNotExist(err) {
		t.Fatalf("group 2's pre script ran before the manual action was confirmed: %v", err)
	}

	do(chromedp.Click(chromedp.CSS("#job-confirm")))
	if s := jobEnded(); s != "succeeded" {
		t.Fatalf("the plan's job ended %q:\n%s", s, text("#job"))
	}
	out := strings.Split(strings.TrimSpace(text("#job-output")), "\n")
	if len(out) != 2 || !strings.HasPrefix(out[0], "m1/disk0 nbd://") || !strings.HasPrefix(out[1], "m2/disk0 nbd://") {
		t.Fatalf("the job's output lines: %q", out)
	}
	if s := text("#job"); strings.Contains(s, "Manual action:") {
		t.Fatalf("the ended job still shows the manual action:\n%s", s)
	}

	// What the script read.
	b, err := os.ReadFile(ctxFile)
	if err != nil {
		t.Fatalf("group 2's pre script did not run: %v", err)
	}
	var got api.ActionContext
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("the script's context %s: %v", b, err)
	}
	m1 := got.Machines["m1"]
	if got.Plan != "dr" || got.Group != 2 || got.Phase != "pre" || got.Type != "test" || len(m1.Exports) != 1 ||
		!strings.HasPrefix(m1.Exports[0].URI, "nbd://") || !strings.HasSuffix(out[0], m1.Exports[0].URI) {
		t.Fatalf("the script's context: %s", b)
	}
	if _, ok := got.Machines["m2"]; ok {
		t.Fatalf("group 2's pre script saw m2 failed over already: %s", b)
	}

	// The failovers page lists both, with their exports.
	do(chromedp.Click(chromedp.CSS(`nav a[href="/failovers"]`)), chromedp.WaitVisible(chromedp.CSS("#failovers")))
	if s := text("#failovers"); !strings.Contains(s, "m1") || !strings.Contains(s, "m2") || !strings.Contains(s, strings.TrimPrefix(out[1], "m2/disk0 ")) {
		t.Fatalf("the failovers page shows:\n%s", s)
	}

	// Cleanup from the plans page.
	do(chromedp.Click(chromedp.CSS(`nav a[href="/plans"]`)),
		chromedp.WaitVisible(chromedp.CSS("#plan-dr")),
		chromedp.Click(chromedp.CSS("#plan-dr button.plan-cleanup")))
	if s := jobEnded(); s != "succeeded" {
		t.Fatalf("the cleanup job ended %q:\n%s", s, text("#job"))
	}
	if fs := failovers(); len(fs) != 0 {
		t.Fatalf("after cleanup, live failovers: %v", machines(fs))
	}
}
