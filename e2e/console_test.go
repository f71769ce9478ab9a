//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
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
// without a reload.
func TestE2EConsoleInChromium(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeRandomDisk(t, disk, 96<<20, 3)
	c.startAgent("vm1", []string{"--max-rate", "16MiB"}, "data="+disk)

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
	ctx, cancelT := context.WithTimeout(ctx, 3*time.Minute)
	defer cancelT()

	token, err := os.ReadFile(filepath.Join(c.srvDir, "admin-token"))
	if err != nil {
		t.Fatal(err)
	}
	do := func(steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		for _, step := range steps {
			if _, err := chromedp.Run(ctx, step); err != nil {
				t.Fatal(err)
			}
		}
	}
	text := func(sel chromedp.CSS) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(sel))
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
		chromedp.WaitVisible(chromedp.CSS("#machines")))

	// waitText polls the live section until it contains want (no reloads).
	waitText := func(want string, timeout time.Duration) string {
		t.Helper()
		deadline := time.Now().Add(timeout)
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
	waitText("vm1", 30*time.Second)
	first := waitText("Initial replication", 30*time.Second)
	t.Logf("during the initial copy:\n%s", first)
	waitText("Protected", 2*time.Minute)

	// A new point appears by itself.
	out := c.mustCLI("tag", "--machine", "vm1", "--wait")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	id := lines[len(lines)-1]
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
	waitText(when.UTC().Format("2006-01-02 15:04:05"), 30*time.Second)
	if after, _ := chromedp.Run(ctx, chromedp.Location()); after != url {
		t.Fatalf("the page navigated (%s -> %s): the refresh should be in place", url, after)
	}
}
