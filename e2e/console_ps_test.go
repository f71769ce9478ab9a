//go:build e2e

package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/asrdr/asr/server/api"
)

// TestE2EConsoleProcessServers: the process servers' page in Chromium,
// with a real scale-out process server: it is listed healthy beside the
// built-in one; vm1 is switched to it with the switch form (its agent
// connects there and its records reach it); a switch to a process server
// that is not healthy (ps2, killed -9) is refused on the page with the
// server's reason; "Move all" brings vm1 back to the built-in one; a
// point taken then recovers bit-exact.
func TestE2EConsoleProcessServers(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	c := newClusterArgs(t, "--ps-heartbeat-lost", "3s")
	disk := filepath.Join(c.dir, "vm1.img")
	makeDisk(t, disk, 16<<20, 5)
	a := c.startAgent("vm1", nil, "d0="+disk)
	c.waitState("vm1", "protected", 3*time.Minute)
	c.startPS("ps1")
	ps2 := c.startPS("ps2")
	c.waitPS("ps1 and ps2 healthy", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps1"].State == api.PSHealthy && l["ps2"].State == api.PSHealthy
	})
	ps2.kill()
	c.waitPS("ps2 without heartbeat", func(l map[string]api.ProcessServerInfo) bool { return l["ps2"].State == api.PSNoHeartbeat })

	p := openConsole(t, c, browser)
	psPage := func() {
		t.Helper()
		p.do(chromedp.Navigate(c.url()+"/infrastructure"), chromedp.WaitVisible(chromedp.CSS("#infra-all-ps")),
			chromedp.Click(chromedp.CSS("#infra-all-ps")), chromedp.WaitVisible(chromedp.CSS("#process-servers")))
	}
	psPage()
	if s := p.text(`tr[data-ps="ps1"]`); !strings.Contains(s, "healthy") {
		t.Fatalf("ps1's row: %q", s)
	}
	if s := p.text(`tr[data-ps="ps2"]`); !strings.Contains(s, "no-heartbeat") {
		t.Fatalf("ps2's row: %q", s)
	}
	p.screenshot("ps-01-list")

	// A refused switch: ps2 sends no heartbeat.
	p.do(chromedp.SetValue(chromedp.CSS("#ps-machine"), "vm1"), chromedp.SetValue(chromedp.CSS("#ps-to"), "ps2"),
		chromedp.Click(chromedp.CSS("#ps-switch-submit")))
	p.waitVisible("showed the refusal", "#ps-error")
	if s := p.text("#ps-error"); !strings.Contains(s, "Nothing was moved") || !strings.Contains(s, "ps2") {
		t.Fatalf("the refusal: %q", s)
	}
	if l := c.psList(); l["ps2"].Machines != 0 || l[api.BuiltinProcessServer].Machines != 1 {
		t.Fatalf("a refused switch moved something: %+v", l)
	}

	// vm1 to ps1.
	n := connections(t, c.psLog("ps1"), "vm1")
	psPage()
	p.do(chromedp.SetValue(chromedp.CSS("#ps-machine"), "vm1"), chromedp.SetValue(chromedp.CSS("#ps-to"), "ps1"),
		chromedp.Click(chromedp.CSS("#ps-switch-submit")))
	p.waitVisible("said what the switch did", "#ps-done")
	if s := p.text("#ps-done"); !strings.Contains(s, "Machine vm1 is served by process server ps1 now.") {
		t.Fatalf("after the switch: %q", s)
	}
	waitConnected(t, c.psLog("ps1"), "vm1", n)
	planFio(t, a.uri("d0"), "on-ps1", 1<<20)
	c.waitPS("vm1's records on ps1", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps1"].Machines == 1 && l["ps1"].Figures.RawBytes > 0
	})
	p.screenshot("ps-02-switched")

	// Move all of ps1's machines back to the built-in one.
	n = connections(t, c.psLog(api.BuiltinProcessServer), "vm1")
	psPage()
	p.do(chromedp.SetValue(chromedp.CSS("#move-ps1"), api.BuiltinProcessServer), chromedp.Click(chromedp.CSS(`tr[data-ps="ps1"] form.ps-move button`)))
	p.waitVisible("said what the move did", "#ps-done")
	if s := p.text("#ps-done"); !strings.Contains(s, "1 machine moved from process server ps1: vm1.") {
		t.Fatalf("after the move: %q", s)
	}
	waitConnected(t, c.psLog(api.BuiltinProcessServer), "vm1", n)
	planFio(t, a.uri("d0"), "back-home", 1<<20)
	c.recoverAndCheck("vm1", c.tag("vm1"), map[string]string{"d0": sha256File(t, disk)})
}
