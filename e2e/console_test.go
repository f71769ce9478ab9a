//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
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
	// The live sections are swapped in whole by htmx's polling: a node the
	// browser found can be gone by the time it is read or clicked
	// ("No node with given id found"). That step did nothing and is done
	// again on the new node.
	stale := func(err error) bool { return err != nil && strings.Contains(err.Error(), "node with given id") }
	do := func(steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		for _, step := range steps {
			_, err := chromedp.Run(ctx, step)
			for stale(err) {
				_, err = chromedp.Run(ctx, step)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	text := func(sel chromedp.CSS) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(sel))
		for stale(err) {
			s, err = chromedp.Run(ctx, chromedp.Text(sel))
		}
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
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("data"), "-c", "write -P 0x61 8M 64k", "-c", "write -P 0x62 40M 64k")
	a = c.forcedShutdown(t, a, "vm1", disk, 8<<20+4096)
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
