//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/asrdr/asr/server/api"
)

// TestE2EConsoleAlerts walks the console's alerting in headless Chromium
// against the real server and agent, a real SMTP server (mailpit) and a
// webhook: on the settings page an e-mail form with a bad recipient is
// refused, shown, and stores nothing; the corrected form (STARTTLS
// unticked, mailpit speaks none) and a webhook are saved; the test button
// sends one test mail and one test notice to the webhook. Then an agent
// stopped (SIGSTOP) past its policy's RPO threshold: the alerts page shows
// an active RPO alert naming the machine and what to do; the dashboard's
// tiles count it and link to the alerts page; Acknowledge marks it on the
// page and in the API; exactly one RPO mail. Continued (SIGCONT), the
// alert is listed as resolved and exactly one "resolved" mail arrives.
// The alerts page polls: both changes appear without a reload.
// Every state is checked in the page's DOM text and screenshotted.
func TestE2EConsoleAlerts(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	c := newClusterArgs(t, "--alert-clear", "2s")
	mp := startMailpit(t, c.dir, smtpTLS{}) // plain: the console's form is what is tested here
	hook := newHookRecorder(t)
	client, err := api.NewClient(c.url(), filepath.Join(c.srvDir, "admin-token"), filepath.Join(c.srvDir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute) // a hung run, not a pace
	defer cancel()
	notifications := func() api.NotificationSettings {
		t.Helper()
		n, err := client.Notifications(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}

	disk := filepath.Join(c.dir, "vm1.img")
	makeDisk(t, disk, 8<<20, 1)
	ag := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", hungAfter)

	p := openConsole(t, c, browser)
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/settings"]`)), chromedp.WaitVisible(chromedp.CSS("#notify-email")))
	if p.exists("#notify-test") {
		t.Fatal("a test button with no channel set")
	}

	// A bad recipient: refused, said why, nothing stored, and the form
	// keeps what was typed (STARTTLS unticked included).
	p.do(chromedp.SetValue(chromedp.CSS("#smtp"), mp.smtp),
		chromedp.SetValue(chromedp.CSS("#from"), "asr@example.com"),
		chromedp.SetValue(chromedp.CSS("#to"), "ops-at-example.com"),
		chromedp.SetValue(chromedp.CSS("#digest"), "0s"))
	if !p.evalBool(`document.querySelector("#starttls").checked`) {
		t.Fatal("STARTTLS is not ticked by default")
	}
	p.do(chromedp.Click(chromedp.CSS("#starttls")))
	if p.evalBool(`document.querySelector("#starttls").checked`) {
		t.Fatal("clicking STARTTLS did not untick it")
	}
	p.do(chromedp.Click(chromedp.CSS("#email-save")), chromedp.WaitVisible(chromedp.CSS("#notify-error")))
	if s := p.text("#notify-error"); !strings.Contains(s, "not saved") || !strings.Contains(s, "ops-at-example.com") || !strings.Contains(s, "nothing was changed") {
		t.Fatalf("the refused e-mail form says %q", s)
	}
	if n := notifications(); n.Email != nil {
		t.Fatalf("a refused e-mail form stored %+v", n.Email)
	}
	if v := p.evalString(`document.querySelector("#smtp").value + " " + document.querySelector("#to").value`); v != mp.smtp+" ops-at-example.com" {
		t.Fatalf("the refused form lost what was typed: %q", v)
	}
	if p.evalBool(`document.querySelector("#starttls").checked`) {
		t.Fatal("the refused form ticked STARTTLS again")
	}
	p.screenshot("alerts-01-email-refused")

	// Corrected: saved, with STARTTLS off.
	// Each answer is a new page with its own notice: wait for its words,
	// not for a notice the page before may have had.
	saved := func(what, want string) {
		t.Helper()
		p.waitJS(what, `document.querySelector("#notify-saved")?.textContent.trim() === `+"`"+want+"`")
	}
	p.do(chromedp.SetValue(chromedp.CSS("#to"), "ops@example.com"), chromedp.Click(chromedp.CSS("#email-save")))
	saved("said the e-mail settings are saved", "The e-mail settings are saved.")
	if e := notifications().Email; e == nil || e.SMTP != mp.smtp || e.StartTLS || len(e.To) != 1 || e.To[0] != "ops@example.com" || e.From != "asr@example.com" {
		t.Fatalf("stored e-mail settings: %+v", e)
	}
	if p.exists("#notify-error") || p.evalBool(`document.querySelector("#starttls").checked`) {
		t.Fatal("the saved form shows an error or STARTTLS ticked")
	}

	// The webhook, then the test button: through both channels.
	p.do(chromedp.SetValue(chromedp.CSS("#webhook-url"), hook.url+"/asr"), chromedp.Click(chromedp.CSS("#webhook-save")))
	saved("said the webhook is saved", "The webhook is saved.")
	if w := notifications().Webhook; w == nil || w.URL != hook.url+"/asr" {
		t.Fatalf("stored webhook: %+v", w)
	}
	if s := p.text("#notify-test-help"); !strings.Contains(s, "by e-mail and to the webhook") {
		t.Fatalf("the test button's help says %q", s)
	}
	p.do(chromedp.Click(chromedp.CSS("#notify-test")))
	saved("said the test was sent through both channels", "A test notification was sent by e-mail and to the webhook.")
	test := mp.waitMail(t, "[asr] TEST")
	if len(test.To) != 1 || test.To[0].Address != "ops@example.com" || test.From.Address != "asr@example.com" {
		t.Fatalf("the test mail: %+v", test)
	}
	hook.wait(t, "a test notice", func(b api.WebhookBody) bool { return b.Change == "test" })
	p.screenshot("alerts-02-notifications-set")

	// The agent stops: nothing reaches the server, the RPO grows past the
	// threshold. (Critical comes at twice it: a minute gives the steps
	// below time to ack before, even on a loaded machine.)
	// The alerts page is open and polls: the alert appears without a
	// reload.
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/alerts"]`)), chromedp.WaitVisible(chromedp.CSS("#alerts-live")))
	if s := p.text("#alerts-active"); !strings.Contains(s, "No active alert") {
		t.Fatalf("active alerts before the agent stops:\n%s", s)
	}
	loc := p.location()
	c.mustCLI("policy", "set", "default", "--rpo-threshold", "1m")
	ag.proc.pause()
	active := `#alerts-active tr[data-kind="rpo"][data-machine="vm1"]`
	p.waitJS("showed vm1's RPO alert as active", `document.querySelector('`+active+`') !== null`)
	if after := p.location(); after != loc {
		t.Fatalf("the alerts page navigated (%s -> %s): the refresh should be in place", loc, after)
	}
	row := p.text(active)
	for _, want := range []string{"warning", "vm1", "rpo", "exceeds the threshold of 1m0s", "asr status --machine vm1"} {
		if !strings.Contains(row, want) {
			t.Fatalf("the active RPO alert's row lacks %q:\n%s", want, row)
		}
	}
	id := p.evalString(`document.querySelector('` + active + `').dataset.alert`)
	if !p.exists(active + " button.alert-ack") {
		t.Fatalf("the active alert has no Acknowledge button:\n%s", row)
	}
	if s := p.text("#alerts-resolved"); strings.Contains(s, "vm1") {
		t.Fatalf("vm1 is under resolved while active:\n%s", s)
	}
	p.screenshot("alerts-03-active")

	// The dashboard counts it, lists it with what to do, and its tile
	// leads to the alerts page.
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/"]`)), chromedp.WaitVisible(chromedp.CSS("#dashboard")))
	if w, cr := p.text("#tile-warning .tile-count"), p.text("#tile-critical .tile-count"); w != "1" || cr != "0" {
		t.Fatalf("the dashboard counts %s warnings and %s critical alerts, want 1 and 0", w, cr)
	}
	if h := p.evalString(`document.querySelector("#tile-warning").getAttribute("href")`); h != "/alerts" {
		t.Fatalf("the warnings tile links to %q", h)
	}
	if s := p.text(`#alerts li[data-alert="` + id + `"]`); !strings.Contains(s, "vm1") || !strings.Contains(s, "asr status --machine vm1") {
		t.Fatalf("the dashboard's alert %s shows %q", id, s)
	}
	p.screenshot("alerts-04-dashboard")
	p.do(chromedp.Click(chromedp.CSS("#tile-warning")), chromedp.WaitVisible(chromedp.CSS("#alerts-active")))

	// Acknowledge: said on the page, the button gone, marked in the API;
	// it stays active.
	p.do(chromedp.Click(chromedp.CSS(active+" button.alert-ack")), chromedp.WaitVisible(chromedp.CSS("#alerts-done")))
	if s := p.text("#alerts-done"); !strings.Contains(s, "Acknowledged: the rpo alert of vm1") {
		t.Fatalf("after Acknowledge the page says %q", s)
	}
	if s := p.text(active); !strings.Contains(s, "Acknowledged") || p.exists(active+" button.alert-ack") {
		t.Fatalf("the acknowledged alert's row:\n%s", s)
	}
	as, err := client.Alerts(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	var acked api.Alert
	for _, a := range as {
		if fmt.Sprint(a.ID) == id {
			acked = a
		}
	}
	if acked.Kind != api.AlertRPO || acked.Machine != "vm1" || acked.State != api.AlertActive || acked.Acked.IsZero() {
		t.Fatalf("alert %s in the API after Acknowledge: %+v (active: %+v)", id, acked, as)
	}
	mp.waitMail(t, "[asr] WARNING rpo vm1", "[asr] CRITICAL rpo vm1")
	p.screenshot("alerts-05-acknowledged")

	// Continued, the agent reports again; the alert clears after 2 s
	// clearly under the threshold.
	ag.proc.resume()
	resolved := `#alerts-resolved tr[data-alert="` + id + `"]`
	p.waitJS("listed vm1's RPO alert as resolved", `document.querySelector('`+resolved+`') !== null`)
	if s := p.text(resolved); !strings.Contains(s, "vm1") || !strings.Contains(s, "rpo") {
		t.Fatalf("the resolved alert's row:\n%s", s)
	}
	if p.exists(active) {
		t.Fatalf("vm1's RPO alert is still under active:\n%s", p.text("#alerts-active"))
	}
	if s := p.text("#events"); !strings.Contains(s, "rpo-exceeded") || !strings.Contains(s, "rpo-recovered") {
		t.Fatalf("the recent events:\n%s", s)
	}
	p.screenshot("alerts-06-resolved")
	p.do(chromedp.Click(chromedp.CSS(`nav a[href="/"]`)), chromedp.WaitVisible(chromedp.CSS("#dashboard")))
	if w := p.text("#tile-warning .tile-count"); w != "0" || !p.exists("#no-alerts") {
		t.Fatalf("after the resolve the dashboard counts %s warnings and lists:\n%s", w, p.text("#alerts"))
	}

	mp.waitMail(t, "[asr] RESOLVED rpo vm1")
	hook.wait(t, "a resolved notice", func(b api.WebhookBody) bool {
		return b.Change == api.AlertChangeResolved && b.Alert.Kind == api.AlertRPO && b.Alert.Machine == "vm1"
	})
	if n := mp.count(t, "[asr] WARNING rpo vm1") + mp.count(t, "[asr] CRITICAL rpo vm1") + mp.count(t, "[asr] ESCALATED"); n != 1 {
		t.Errorf("%d RPO mails, want exactly 1", n)
	}
	if n := mp.count(t, "[asr] RESOLVED rpo vm1"); n != 1 {
		t.Errorf("%d resolved mails, want exactly 1", n)
	}
	if n := mp.count(t, "[asr] TEST"); n != 1 {
		t.Errorf("%d test mails, want exactly 1", n)
	}
	if n := mp.count(t, "[asr] digest"); n != 0 {
		t.Errorf("%d digests, want none", n)
	}
	rpoHooks := func(change string) int {
		return hook.count(func(b api.WebhookBody) bool {
			return b.Change == change && b.Alert.Kind == api.AlertRPO && b.Alert.Machine == "vm1"
		})
	}
	if r, s, tst := rpoHooks(api.AlertChangeRaised), rpoHooks(api.AlertChangeResolved), hook.count(func(b api.WebhookBody) bool { return b.Change == "test" }); r != 1 || s != 1 || tst != 1 {
		t.Errorf("webhook: %d raised, %d resolved, %d test notices, want 1 each", r, s, tst)
	}
	t.Logf("screenshots in %s", p.shots)
}

// hookRecorder is a webhook receiver that keeps every notice.
type hookRecorder struct {
	url    string
	mu     sync.Mutex
	bodies []api.WebhookBody
}

func newHookRecorder(t *testing.T) *hookRecorder {
	t.Helper()
	h := &hookRecorder{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var b api.WebhookBody
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&b); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		h.mu.Lock()
		h.bodies = append(h.bodies, b)
		h.mu.Unlock()
	}))
	t.Cleanup(srv.Close)
	h.url = srv.URL
	return h
}

func (h *hookRecorder) count(match func(api.WebhookBody) bool) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, b := range h.bodies {
		if match(b) {
			n++
		}
	}
	return n
}

// wait waits until a notice that matches has arrived.
func (h *hookRecorder) wait(t *testing.T, what string, match func(api.WebhookBody) bool) {
	t.Helper()
	deadline := time.Now().Add(hungAfter)
	for h.count(match) == 0 {
		if time.Now().After(deadline) {
			h.mu.Lock()
			defer h.mu.Unlock()
			t.Fatalf("the webhook never got %s; it got %+v", what, h.bodies)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (p *consolePage) evalBool(expr string) bool {
	p.t.Helper()
	b, err := runFresh(p.ctx, chromedp.Evaluate[bool](expr))
	if err != nil {
		p.t.Fatalf("%s: %v", expr, err)
	}
	return b
}

func (p *consolePage) location() string {
	p.t.Helper()
	loc, err := chromedp.Run(p.ctx, chromedp.Location())
	if err != nil {
		p.t.Fatal(err)
	}
	return loc
}
