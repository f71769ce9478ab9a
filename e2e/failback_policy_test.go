//go:build e2e

package e2e

// The failback policy through the real binaries: its defaults and notes,
// its editing, its refusal as a machine's policy; and its RPO threshold
// applied to a reprotected machine's reverse direction: the original
// agent held (SIGSTOP) while fio writes into the export, the reverse RPO
// grows past the threshold and the alert is raised; continued, the
// changes drain and the alert clears.

import (
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/asrdr/asr/server/api"
)

// reverseRPOMetric reads asr_machine_reverse_rpo_seconds of machine from
// /metrics (ok false: absent).
func (c *cluster) reverseRPOMetric(t *testing.T, machine string) (float64, bool) {
	t.Helper()
	tok, err := os.ReadFile(filepath.Join(c.srvDir, "metrics-token"))
	if err != nil {
		t.Fatal(err)
	}
	code, body := bearerGet(t, caClient(t, filepath.Join(c.srvDir, "ca.pem")), c.url()+"/metrics", strings.TrimSpace(string(tok)))
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	prefix := `asr_machine_reverse_rpo_seconds{machine="` + machine + `"} `
	for _, l := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s%q: %v", prefix, v, err)
			}
			return f, true
		}
	}
	return 0, false
}

// alertsOf lists the alerts (active, or all) through `asr alerts --json`.
func (c *cluster) alertsOf(all bool) []api.Alert {
	c.t.Helper()
	args := []string{"alerts", "--json"}
	if all {
		args = append(args, "--all")
	}
	var as []api.Alert
	if err := json.Unmarshal([]byte(c.mustCLI(args...)), &as); err != nil {
		c.t.Fatal(err)
	}
	return as
}

func TestE2EFailbackPolicyReverseRPO(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	fc := startFailbackCase(t, "--alert-clear", "2s")
	c := fc.c

	// The failback policy: ASR's defaults, notes on what applies.
	var fb api.PolicyJSON
	if err := json.Unmarshal([]byte(c.mustCLI("policy", "show", "default-failback")), &fb); err != nil {
		t.Fatal(err)
	}
	if fb.FailbackOf != "default" || fb.RPOThreshold != "15m0s" || fb.Retention != "24h0m0s" || fb.AppFrequency != "1h0m0s" ||
		!strings.Contains(fb.Notes, "app_frequency: not applied") || !strings.Contains(fb.Notes, "rpo_threshold: applied") {
		t.Fatalf("default-failback: %+v", fb)
	}
	if out, err := c.cli("policy", "set", "default-failback", "--rpo-threshold", "nonsense"); err == nil || !strings.Contains(out+err.Error(), "not a duration") {
		t.Fatalf("a malformed threshold: %v\n%s", err, out)
	}
	if err := json.Unmarshal([]byte(c.mustCLI("policy", "set", "default-failback", "--rpo-threshold", "10s")), &fb); err != nil || fb.RPOThreshold != "10s" {
		t.Fatalf("set the failback threshold: %+v %v", fb, err)
	}
	if out, err := c.cli("policy", "assign", "--machine", "m", "--policy", "default-failback"); err == nil ||
		!strings.Contains(out+err.Error(), "is a failback policy") {
		t.Fatalf("a failback policy assigned to a machine: %v\n%s", err, out)
	}
	// The console edits it too, and says what applies.
	p := openConsole(t, c, browser)
	p.do(chromedp.Navigate(c.url()+"/policies"), chromedp.WaitVisible(chromedp.CSS("#policy-create")),
		chromedp.Click(chromedp.CSS(`a[href="/policies/default-failback/edit"]`)), chromedp.WaitVisible(chromedp.CSS("#failback-notes")))
	if s := p.text("#failback-notes"); !strings.Contains(s, "app_frequency: not applied") || !strings.Contains(s, "cannot be assigned") {
		t.Fatalf("the failback policy's page says %q", s)
	}
	p.do(chromedp.SetValue(chromedp.CSS("#edit-retention"), "12h"),
		chromedp.Click(chromedp.CSS("#policy-edit-submit")),
		chromedp.WaitVisible(chromedp.CSS("#policies-done")))
	if s := p.text(`#policies tr[data-policy="default-failback"]`); !strings.Contains(s, "12h0m0s") || !strings.Contains(s, "10s") {
		t.Fatalf("the failback policy's row after the console's edit: %q", s)
	}
	p.screenshot("failback-policy")

	fc.fio(fc.export, "failed-over", 2<<20)
	c.mustCLI("reprotect", "--machine", "m")
	st := c.waitStatus("m", "the reverse RPO 0 after the first pass", func(st machineStatus) bool {
		r := st.Reverse
		return r != nil && r.RPOKnown && r.RPO == 0 && r.FirstPassDone && r.Pending == 0
	})
	if st.Reverse.Threshold != 10*time.Second || st.Reverse.Policy != "default-failback" {
		t.Fatalf("reverse status %+v", st.Reverse)
	}

	// The original agent held: the writes into the export stay pending.
	a := c.agents["m"]
	a.proc.pause()
	fc.fio(fc.export, "held", 1<<20)
	deadline := time.Now().Add(hungAfter)
	var alert api.Alert
	for alert.ID == 0 {
		for _, x := range c.alertsOf(false) {
			if x.Kind == api.AlertReverseRPO && x.Machine == "m" {
				alert = x
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reverse RPO alert with the agent held; status %+v", c.status("m").Reverse)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if !strings.Contains(alert.Message, "reverse direction") || !strings.Contains(alert.Message, "default-failback") ||
		!strings.Contains(alert.Action, "asr status --machine m") {
		t.Fatalf("reverse RPO alert %+v", alert)
	}
	if r := c.status("m").Reverse; r == nil || r.RPO <= 10*time.Second || r.Pending == 0 {
		t.Fatalf("reverse status with the agent held: %+v", r)
	}
	if v, ok := c.reverseRPOMetric(t, "m"); !ok || v <= 10 {
		t.Fatalf("asr_machine_reverse_rpo_seconds %v (present %v) with the alert raised", v, ok)
	}
	if out := c.mustCLI("status", "--machine", "m"); !strings.Contains(out, "reverse ") || !strings.Contains(out, "(over 10s)") {
		t.Fatalf("asr status with the reverse RPO over its threshold:\n%s", out)
	}
	p.do(chromedp.Navigate(c.url() + "/machines"))
	p.waitVisible("the reverse RPO flagged over its threshold", "#machine-m .reverse-rpo.rpo-over")
	p.screenshot("reverse-rpo-over")

	// Continued: drained, the alert clears.
	a.proc.resume()
	c.waitStatus("m", "the reverse RPO 0 once drained", func(st machineStatus) bool {
		r := st.Reverse
		return r != nil && r.RPO == 0 && r.Pending == 0
	})
	deadline = time.Now().Add(hungAfter)
	for {
		resolved := false
		for _, x := range c.alertsOf(true) {
			if x.ID == alert.ID && x.State == api.AlertResolved {
				resolved = true
			}
		}
		if resolved {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the reverse RPO alert %d not resolved once drained", alert.ID)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if v, ok := c.reverseRPOMetric(t, "m"); !ok || v != 0 {
		t.Fatalf("asr_machine_reverse_rpo_seconds %v (present %v) once drained", v, ok)
	}
	points := 0
	for _, e := range c.events("m") {
		if e.Kind == "reverse-point" {
			points++
		}
	}
	if points == 0 {
		t.Fatal("no reverse point recorded while the original disks were drained")
	}

	// Failback goes on as usual.
	want := nbdCopySum(t, fc.export)
	out := c.mustCLI("failback", "--machine", "m")
	fc.checkFailedBack(out, want)
	if _, ok := c.reverseRPOMetric(t, "m"); ok {
		t.Fatal("asr_machine_reverse_rpo_seconds still present after failback")
	}
}
