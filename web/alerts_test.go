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
	testSent []string // the channels TestNotification says it sent through
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
	return api.TestNotificationResult{Sent: f.testSent}, f.testErr
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
	if loc := w.Header().Get("Location"); loc != "/alerts?acked=3" {
		t.Fatalf("ack redirects to %q", loc)
	}
	if b.alerts[0].Acked.IsZero() {
		t.Fatal("not acknowledged")
	}
	// The page says what was acknowledged, and the alert's row shows it
	// instead of the button.
	body = get(t, h, id, "/alerts?acked=3", http.StatusOK)
	if !strings.Contains(body, `id="alerts-done"`) || !strings.Contains(body, "Acknowledged: the rpo alert of web-01.") {
		t.Errorf("the acknowledgement is not said:\n%s", body)
	}
	row := body[strings.Index(body, `data-alert="3"`):]
	row = row[:strings.Index(row, "</tr>")]
	if !strings.Contains(row, "Acknowledged") || strings.Contains(row, "<button") {
		t.Errorf("the acknowledged alert's row: %s", row)
	}
	if n := strings.Count(body, `class="button alert-ack"`); n != 0 {
		t.Errorf("%d Acknowledge buttons left, want none (both active alerts are acknowledged)", n)
	}
	// An id that is not an acknowledged alert says nothing.
	if body := get(t, h, id, "/alerts?acked=1", http.StatusOK); strings.Contains(body, "alerts-done") {
		t.Error("a resolved, unacknowledged alert is said to be acknowledged")
	}
	// The polled part: the live sections alone, with an alert raised
	// since and one resolved since.
	b.amu.Lock()
	b.alerts[0].State, b.alerts[0].Resolved = api.AlertResolved, testNow
	b.alerts = append(b.alerts, api.Alert{ID: 4, Kind: api.AlertHeartbeat, Severity: api.SeverityWarning, State: api.AlertActive,
		Machine: "app-01", Message: "the agent is not connected", Action: "start the agent on app-01", Raised: testNow, Updated: testNow})
	b.amu.Unlock()
	frag := get(t, h, id, "/fragments/alerts", http.StatusOK)
	if !strings.HasPrefix(strings.TrimSpace(frag), `<div id="alerts-live" hx-get="/fragments/alerts" hx-trigger="every 5s" hx-swap="outerHTML">`) ||
		strings.Contains(frag, "<html") || strings.Contains(frag, "alerts-done") {
		t.Fatalf("the alerts fragment is not the live part alone:\n%s", frag)
	}
	active, resolved := frag[:strings.Index(frag, `id="alerts-resolved"`)], frag[strings.Index(frag, `id="alerts-resolved"`):]
	if !strings.Contains(active, `data-alert="4"`) || !strings.Contains(active, `id="ack-4"`) || strings.Contains(active, `data-alert="3"`) || !strings.Contains(resolved, `data-alert="3"`) {
		t.Errorf("the fragment does not show the new alert active and alert 3 resolved:\n%s", frag)
	}
	post(t, h, id, "/alerts/99/ack", url.Values{"csrf": {csrf}}, http.StatusNotFound)
	post(t, h, id, "/alerts/x/ack", url.Values{"csrf": {csrf}}, http.StatusNotFound)
}

func TestSettingsNotifications(t *testing.T) {
	b := newFakeBackend(protectedMachine)
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/settings", http.StatusOK)
	if strings.Contains(body, "Send a test notification") {
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
	if !strings.Contains(body, "Send a test notification") || !strings.Contains(body, "The e-mail settings are saved.") ||
		!strings.Contains(body, "Sends one test notice by e-mail.") {
		t.Error("settings page lacks the test button, what it sends, or the saved notice")
	}
	// A refusal is shown, nothing changes, and the form keeps what was
	// typed (STARTTLS unticked included), never the password.
	b.setErr = errors.New(`recipient "nobody": mail: missing '@' or angle-addr; nothing was changed`)
	w := post(t, h, id, "/settings/notifications/email", url.Values{"csrf": {csrf}, "smtp": {"relay.example.com:25"},
		"from": {"asr@example.com"}, "to": {"nobody"}, "user": {"asr"}, "password": {"s3cret-pw"}, "digest": {"1m"}}, http.StatusUnprocessableEntity)
	refused := w.Body.String()
	if !strings.Contains(refused, "The e-mail settings were not saved: recipient") || !strings.Contains(refused, "missing &#39;@&#39;") {
		t.Errorf("refusal not shown:\n%s", refused)
	}
	for _, want := range []string{`value="relay.example.com:25"`, `name="to" type="text" value="nobody"`, `name="user" type="text" autocomplete="off" value="asr"`, `value="1m"`} {
		if !strings.Contains(refused, want) {
			t.Errorf("the refused form lost what was typed: no %s", want)
		}
	}
	if strings.Contains(refused, "s3cret-pw") {
		t.Error("the refused form echoes the password")
	}
	if strings.Contains(refused, `name="starttls" type="checkbox" value="1" checked`) {
		t.Error("the refused form ticks STARTTLS again although it was unticked")
	}
	if e := b.notify.Email; e == nil || e.SMTP != "mail.example.com:587" || len(b.emailSet) != 1 {
		t.Errorf("a refused change changed the settings: %+v", e)
	}
	// A webhook refused keeps its URL in the form.
	w = post(t, h, id, "/settings/notifications/webhook", url.Values{"csrf": {csrf}, "url": {"ftp://hooks.example.com/asr"}}, http.StatusUnprocessableEntity)
	if s := w.Body.String(); !strings.Contains(s, "The webhook was not saved") || !strings.Contains(s, `value="ftp://hooks.example.com/asr"`) {
		t.Errorf("the refused webhook form:\n%s", s)
	}
	b.setErr = nil
	// STARTTLS unticked is saved as off, and shown unticked.
	post(t, h, id, "/settings/notifications/email", url.Values{"csrf": {csrf}, "smtp": {"127.0.0.1:1025"},
		"from": {"asr@example.com"}, "to": {"ops@example.com"}}, http.StatusSeeOther)
	if e := b.notify.Email; e == nil || e.StartTLS {
		t.Fatalf("STARTTLS unticked, saved %+v", e)
	}
	if body := get(t, h, id, "/settings", http.StatusOK); strings.Contains(body, `name="starttls" type="checkbox" value="1" checked`) {
		t.Error("STARTTLS is off but shown ticked")
	}
	// The SMTP server's CA goes to the backend as typed (trimmed), and
	// "remove it" as NoCA.
	post(t, h, id, "/settings/notifications/email", url.Values{"csrf": {csrf}, "smtp": {"relay.example.com:587"},
		"from": {"asr@example.com"}, "to": {"ops@example.com"}, "starttls": {"1"},
		"ca_pem": {"\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n\n"}}, http.StatusSeeOther)
	if e := b.emailSet[len(b.emailSet)-1]; e.CAPEM != "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----" || e.NoCA {
		t.Errorf("the CA sent to the backend: %q (no_ca %v)", e.CAPEM, e.NoCA)
	}
	if body := get(t, h, id, "/settings", http.StatusOK); !strings.Contains(body, `id="smtp-no-ca"`) {
		t.Error("a stored CA is not said, nor can it be removed")
	}
	post(t, h, id, "/settings/notifications/email", url.Values{"csrf": {csrf}, "smtp": {"relay.example.com:587"},
		"from": {"asr@example.com"}, "to": {"ops@example.com"}, "no_ca": {"1"}}, http.StatusSeeOther)
	if e := b.emailSet[len(b.emailSet)-1]; !e.NoCA {
		t.Error("removing the CA did not reach the backend")
	}
	// The test says where it went.
	b.testSent = []string{"email", "webhook"}
	w = post(t, h, id, "/settings/notifications/test", url.Values{"csrf": {csrf}}, http.StatusSeeOther)
	loc := w.Header().Get("Location")
	if body := get(t, h, id, loc, http.StatusOK); !strings.Contains(body, "A test notification was sent by e-mail and to the webhook.") {
		t.Errorf("after the test (%s) the page says:\n%s", loc, body)
	}
	if body := get(t, h, id, "/settings?notify=test&sent=<b>pwned</b>", http.StatusOK); strings.Contains(body, "pwned") {
		t.Error("the test notice repeats the query's words")
	}
	// A test refused by one channel says so, and says where it did go.
	b.testSent = []string{"webhook"}
	b.testErr = errors.New("test notification refused: e-mail: 550 relaying denied")
	w = post(t, h, id, "/settings/notifications/test", url.Values{"csrf": {csrf}}, http.StatusUnprocessableEntity)
	if s := w.Body.String(); !strings.Contains(s, "550 relaying denied") || !strings.Contains(s, "(it was sent to the webhook)") || b.tests != 2 {
		t.Errorf("test refusal not shown (tests %d):\n%s", b.tests, s)
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
