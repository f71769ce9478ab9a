package web

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// fakeAlerts is the alerts part of the fake backend.
type fakeAlerts struct {
	amu      sync.Mutex
	alerts   []api.Alert
	events   []api.EventJSON
	notify   api.NotificationSettings
	setErr   error // what SetEmail and SetWebhook refuse with
	testErr  error
	tests    int
	emailSet []*api.EmailSettings
}

func (f *fakeAlerts) Alerts(_ context.Context, all bool) ([]api.Alert, error) {
	f.amu.Lock()
	defer f.amu.Unlock()
	var out []api.Alert
	for _, a := range f.alerts {
		if all || a.State == api.AlertActive {
			out = append(out, a)
		}
	}
	return out, nil
}

func (f *fakeAlerts) AckAlert(_ context.Context, id int64) error {
	f.amu.Lock()
	defer f.amu.Unlock()
	for i := range f.alerts {
		if f.alerts[i].ID == id {
			f.alerts[i].Acked = testNow
			return nil
		}
	}
	return ErrNotFound
}

func (f *fakeAlerts) Events(_ context.Context, limit int) ([]api.EventJSON, error) {
	f.amu.Lock()
	defer f.amu.Unlock()
	return f.events[:min(limit, len(f.events))], nil
}

func (f *fakeAlerts) Notifications(context.Context) (api.NotificationSettings, error) {
	f.amu.Lock()
	defer f.amu.Unlock()
	return f.notify, nil
}

func (f *fakeAlerts) SetEmail(_ context.Context, e *api.EmailSettings) error {
	f.amu.Lock()
	defer f.amu.Unlock()
	if f.setErr != nil {
		return f.setErr
	}
	f.emailSet = append(f.emailSet, e)
	f.notify.Email = e
	return nil
}

func (f *fakeAlerts) SetWebhook(_ context.Context, w *api.WebhookSettings) error {
	f.amu.Lock()
	defer f.amu.Unlock()
	if f.setErr != nil {
		return f.setErr
	}
	f.notify.Webhook = w
	return nil
}

func (f *fakeAlerts) TestNotification(context.Context) (api.TestNotificationResult, error) {
	f.amu.Lock()
	defer f.amu.Unlock()
	f.tests++
	return api.TestNotificationResult{}, f.testErr
}

func testAlerts() []api.Alert {
	raised := testNow.Add(-10 * time.Minute)
	return []api.Alert{
		{ID: 3, Kind: api.AlertRPO, Severity: api.SeverityCritical, State: api.AlertActive, Machine: "web-01",
			Message: "RPO 31m exceeds the threshold of 15m (policy default)", Action: "check the agent on web-01", Raised: raised, Updated: raised},
		{ID: 2, Kind: api.AlertResyncFailed, Severity: api.SeverityWarning, State: api.AlertActive, Machine: "db-01", Disk: "sdb",
			Message: "the resync of disk sdb failed", Action: "asr resync --machine db-01 --disk sdb", Raised: raised, Updated: raised, Acked: testNow.Add(-time.Minute)},
		{ID: 1, Kind: api.AlertPSCPU, Severity: api.SeverityWarning, State: api.AlertResolved, Subject: "process-server",
			Message: "the process server's CPU is 85% busy", Action: "see top", Raised: raised.Add(-time.Hour), Resolved: raised},
	}
}

func TestAlertsPageAndAck(t *testing.T) {
	b := newFakeBackend(protectedMachine)
	b.alerts = testAlerts()
	b.events = []api.EventJSON{{Time: "2025-06-01T11:50:00Z", Machine: "web-01", Severity: "warning", Kind: "rpo-exceeded", Message: "RPO 16m exceeds the threshold of 15m"}}
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/alerts", http.StatusOK)
	checkGolden(t, "page_alerts", body)
	for _, want := range []string{"web-01", "db-01 / sdb", "check the agent on web-01", "Acknowledge", "rpo-exceeded", "process-server"} {
		if !strings.Contains(body, want) {
			t.Errorf("alerts page lacks %q", want)
		}
	}
	if strings.Index(body, "RPO 31m") > strings.Index(body, "85% busy") {
		t.Error("a resolved alert is listed before an active one")
	}
	// Without the CSRF token nothing is acknowledged.
	post(t, h, id, "/alerts/3/ack", url.Values{}, http.StatusForbidden)
	if !b.alerts[0].Acked.IsZero() {
		t.Fatal("acknowledged without the CSRF token")
	}
	w := post(t, h, id, "/alerts/3/ack", url.Values{"csrf": {csrf}}, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/alerts" {
		t.Fatalf("ack redirects to %q", loc)
	}
	if b.alerts[0].Acked.IsZero() {
		t.Fatal("not acknowledged")
	}
	post(t, h, id, "/alerts/99/ack", url.Values{"csrf": {csrf}}, http.StatusNotFound)
	post(t, h, id, "/alerts/x/ack", url.Values{"csrf": {csrf}}, http.StatusNotFound)
}

func TestSettingsNotifications(t *testing.T) {
	b := newFakeBackend(protectedMachine)
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/settings", http.StatusOK)
	if strings.Contains(body, "Send test e-mail") {
		t.Error("a test button with no channel set")
	}
	post(t, h, id, "/settings/notifications/email", url.Values{"csrf": {csrf}, "smtp": {"mail.example.com:587"},
		"from": {"asr@example.com"}, "to": {"a@example.com, b@example.com"}, "starttls": {"1"}, "digest": {"5m"}}, http.StatusSeeOther)
	e := b.notify.Email
	if e == nil || e.SMTP != "mail.example.com:587" || len(e.To) != 2 || e.To[1] != "b@example.com" || !e.StartTLS {
		t.Fatalf("e-mail settings: %+v", e)
	}
	body = get(t, h, id, "/settings?notify=email", http.StatusOK)
	checkGolden(t, "page_settings_notifications", body)
	if !strings.Contains(body, "Send test e-mail") || !strings.Contains(body, "The e-mail settings are saved.") {
		t.Error("settings page lacks the test button or the saved notice")
	}
	// A refusal is shown, and nothing changes.
	b.setErr = errors.New(`recipient "nobody": mail: missing '@' or angle-addr; nothing was changed`)
	w := post(t, h, id, "/settings/notifications/email", url.Values{"csrf": {csrf}, "smtp": {"mail.example.com:587"},
		"from": {"asr@example.com"}, "to": {"nobody"}}, http.StatusUnprocessableEntity)
	if !strings.Contains(w.Body.String(), "missing &#39;@&#39;") {
		t.Errorf("refusal not shown:\n%s", w.Body)
	}
	b.setErr = nil
	b.testErr = errors.New("e-mail: 550 relaying denied")
	w = post(t, h, id, "/settings/notifications/test", url.Values{"csrf": {csrf}}, http.StatusUnprocessableEntity)
	if !strings.Contains(w.Body.String(), "550 relaying denied") || b.tests != 1 {
		t.Errorf("test refusal not shown (tests %d):\n%s", b.tests, w.Body)
	}
	post(t, h, id, "/settings/notifications/email", url.Values{"csrf": {csrf}, "off": {"1"}}, http.StatusSeeOther)
	if b.notify.Email != nil {
		t.Fatal("e-mail not turned off")
	}
	post(t, h, id, "/settings/notifications/webhook", url.Values{"csrf": {csrf}, "url": {"https://hooks.example.com/asr"}}, http.StatusSeeOther)
	if b.notify.Webhook == nil || b.notify.Webhook.URL != "https://hooks.example.com/asr" {
		t.Fatalf("webhook: %+v", b.notify.Webhook)
	}
	post(t, h, id, "/settings/notifications/other", url.Values{"csrf": {csrf}}, http.StatusNotFound)
}
