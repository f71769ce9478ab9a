package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/notify/smtptest"
	"github.com/asrdr/asr/store"
)

// waitAlert polls the active alerts until one of kind about machine (and
// disk, if given) is there, under the safety net.
func (r *rig) waitAlert(kind, machine, disk string) api.Alert {
	r.t.Helper()
	deadline := time.Now().Add(hung)
	for time.Now().Before(deadline) {
		as, err := r.client.Alerts(context.Background(), false)
		if err != nil {
			r.t.Fatal(err)
		}
		for _, a := range as {
			if a.Kind == kind && a.Machine == machine && a.Disk == disk {
				return a
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	as, _ := r.client.Alerts(context.Background(), true)
	r.t.Fatalf("no active %s alert on %s %s; alerts: %+v", kind, machine, disk, as)
	return api.Alert{}
}

// waitResolved polls until the alert id is resolved.
func (r *rig) waitResolved(id int64) api.Alert {
	r.t.Helper()
	deadline := time.Now().Add(hung)
	for time.Now().Before(deadline) {
		as, err := r.client.Alerts(context.Background(), true)
		if err != nil {
			r.t.Fatal(err)
		}
		for _, a := range as {
			if a.ID == id && a.State == api.AlertResolved {
				return a
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.t.Fatalf("alert %d not resolved", id)
	return api.Alert{}
}

// hookRecorder is a webhook that records what it receives.
type hookRecorder struct {
	mu     sync.Mutex
	bodies []api.WebhookBody
}

func (h *hookRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	var wb api.WebhookBody
	if err := json.Unmarshal(b, &wb); err == nil {
		h.mu.Lock()
		h.bodies = append(h.bodies, wb)
		h.mu.Unlock()
	}
}

func (h *hookRecorder) bodiesCopy() []api.WebhookBody {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]api.WebhookBody(nil), h.bodies...)
}

func (h *hookRecorder) count(kind, change string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, b := range h.bodies {
		if b.Alert.Kind == kind && b.Change == change {
			n++
		}
	}
	return n
}

// After a restart, a machine whose agent never came back has no status:
// its RPO is measured from the newest durable data the vault has (its
// latest point or its last contact), and it is alerted, as is the lost
// heartbeat; both reach the webhook once.
func TestAlertRPOOfAnAgentThatNeverReconnected(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger()}
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 1<<20, 1)
	ra := startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk}))
	r.waitProtected("vm1")
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil {
		t.Fatal(err)
	}
	hook := &hookRecorder{}
	hs := httptest.NewServer(hook)
	defer hs.Close()
	if err := r.client.SetWebhook(ctx, &api.WebhookSettings{URL: hs.URL}); err != nil {
		t.Fatal(err)
	}
	ra.close()
	r.stop()
	r.tune = func(c *server.Config) {
		c.PolicyEvery, c.HeartbeatLost, c.AlertClear = 20*time.Millisecond, 500*time.Millisecond, 100*time.Millisecond
	}
	r.start()
	if err := r.client.Do(ctx, http.MethodPatch, "/api/v1/policies/default", api.PolicyJSON{RPOThreshold: "1s"}, nil); err != nil {
		t.Fatal(err)
	}
	a := r.waitAlert(api.AlertRPO, "vm1", "")
	if !strings.Contains(a.Message, "no status from the agent since the server started") || a.Action == "" {
		t.Errorf("RPO alert %+v", a)
	}
	hb := r.waitAlert(api.AlertHeartbeat, "vm1", "")
	if !strings.Contains(hb.Action, "systemctl status asr-agent") {
		t.Errorf("heartbeat alert %+v", hb)
	}
	// One row per condition and subject, one notice each.
	as, err := r.client.Alerts(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, x := range as {
		if x.Kind == api.AlertRPO {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d RPO alerts: %+v", n, as)
	}
	deadline := time.Now().Add(hung)
	for hook.count(api.AlertRPO, api.AlertChangeRaised) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	r.waitPasses(20) // no later duplicate
	if c := hook.count(api.AlertRPO, api.AlertChangeRaised); c != 1 {
		t.Fatalf("%d RPO notices at the webhook", c)
	}
	if c := hook.count(api.AlertHeartbeat, api.AlertChangeRaised); c != 1 {
		t.Fatalf("%d heartbeat notices at the webhook", c)
	}
	// The events name it at its severity.
	es, err := r.srv.Events(ctx, "", 50)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range es {
		if e.Kind == "rpo-exceeded" && e.Machine == "vm1" && (e.Severity == api.SeverityWarning || e.Severity == api.SeverityCritical) {
			found = true
		}
	}
	if !found {
		t.Fatalf("no rpo-exceeded event: %+v", es)
	}
	// Acknowledging keeps it active. The RPO grows while the agent is
	// away: once critical it cannot escalate again (an escalation takes
	// the acknowledgement back), so the acknowledgement must hold.
	waitFor(t, "the RPO alert critical", func() bool {
		return r.waitAlert(api.AlertRPO, "vm1", "").Severity == api.SeverityCritical
	})
	if err := r.client.AckAlert(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	r.waitPasses(10)
	a = r.waitAlert(api.AlertRPO, "vm1", "")
	if a.Acked.IsZero() || a.Severity != api.SeverityCritical {
		t.Fatalf("not acknowledged: %+v", a)
	}
	// The agent comes back: both clear.
	startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk}))
	r.waitResolved(hb.ID)
	if err := r.client.Do(ctx, http.MethodPatch, "/api/v1/policies/default", api.PolicyJSON{RPOThreshold: "1h"}, nil); err != nil {
		t.Fatal(err)
	}
	r.waitResolved(a.ID)
}

// The other conditions, set up in the vault database: a failed resync, a
// scrub that found damage, a failed job, an unreachable vCenter; each
// raised naming its machine and disk with an action, and cleared when
// the state is normal again.
func TestAlertConditions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := &rig{t: t, dir: t.TempDir(), log: quietLogger(), tune: func(c *server.Config) {
		c.PolicyEvery, c.HealthHold, c.AlertClear, c.HeartbeatLost = 20*time.Millisecond, 50*time.Millisecond, 50*time.Millisecond, time.Hour
	}}
	r.start()
	db := r.srv.DB()
	if _, _, err := db.CreateMachine(ctx, "0123456789abcdef0123456789abcdef", "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	id := "0123456789abcdef0123456789abcdef"
	for _, d := range []store.Disk{{Index: 0, Name: "sda", Size: 1 << 20, State: store.DiskProtected}, {Index: 1, Name: "sdb", Size: 1 << 20, State: store.DiskResync}} {
		if err := db.PutDisk(ctx, id, d); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.PutResync(ctx, store.Resync{MachineID: id, Disk: 1, Reason: "sequence gap", State: store.ResyncFailed, Attempts: 5, LastError: "agent not connected"}); err != nil {
		t.Fatal(err)
	}
	if err := db.SetScrub(ctx, id, time.Now(), store.ScrubDamaged, "3 damaged blocks on sda"); err != nil {
		t.Fatal(err)
	}
	if err := db.AddJob(ctx, store.Job{ID: "00000000000000aa", Kind: "protect", Subject: "vc1/web", State: store.JobRunning, Steps: "[]"}); err != nil {
		t.Fatal(err)
	}
	if err := db.UpdateJob(ctx, "00000000000000aa", store.JobFailed, "[]", "ssh: handshake failed"); err != nil {
		t.Fatal(err)
	}
	if err := db.AddVCenter(ctx, store.VCenter{Name: "vc1", URL: "https://vc1.example.com/sdk", User: "admin", Secret: []byte("x"), Thumbprint: "AA"}); err != nil {
		t.Fatal(err)
	}
	rs := r.waitAlert(api.AlertResyncFailed, "vm1", "sdb")
	if !strings.Contains(rs.Action, "asr resync --machine vm1 --disk sdb") || !strings.Contains(rs.Message, "agent not connected") {
		t.Errorf("resync alert %+v", rs)
	}
	sc := r.waitAlert(api.AlertScrubDamage, "vm1", "")
	if sc.Severity != api.SeverityCritical || !strings.Contains(sc.Action, "asr verify --machine vm1") {
		t.Errorf("scrub alert %+v", sc)
	}
	jb := r.waitAlert(api.AlertJobFailed, "", "")
	if !strings.Contains(jb.Subject, "00000000000000aa") || !strings.Contains(jb.Message, "ssh: handshake failed") || jb.Action == "" {
		t.Errorf("job alert %+v", jb)
	}
	vc := r.waitAlert(api.AlertVCenter, "", "")
	if vc.Subject != "vCenter vc1" || !strings.Contains(vc.Action, "https://vc1.example.com/sdk") {
		t.Errorf("vCenter alert %+v", vc)
	}
	// Back to normal: they clear.
	if err := db.DeleteResync(ctx, id, 1); err != nil {
		t.Fatal(err)
	}
	if err := db.SetScrub(ctx, id, time.Now(), store.ScrubOK, "ok: 2 disks checked"); err != nil {
		t.Fatal(err)
	}
	if err := db.SetVCenterStatus(ctx, "vc1", true, time.Now(), "", ""); err != nil {
		t.Fatal(err)
	}
	r.waitResolved(rs.ID)
	r.waitResolved(sc.ID)
	r.waitResolved(vc.ID)
	as, _ := r.client.Alerts(ctx, false)
	// The host's own figures (CPU, memory, the cache disk's free space)
	// are this machine's, not the test's: a busy or nearly full host may
	// raise them.
	as = slices.DeleteFunc(as, func(a api.Alert) bool {
		return a.Kind == api.AlertPSCPU || a.Kind == api.AlertPSMemory || a.Kind == api.AlertPSCacheFree
	})
	if len(as) != 1 || as[0].ID != jb.ID {
		t.Fatalf("active alerts %+v, want only the job's", as)
	}
}

// The notification settings: bad input is refused and changes nothing;
// the SMTP password is stored sealed and never shown; a test
// notification comes back with the SMTP server's refusal.
func TestNotificationSettingsAPI(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := startServer(t, t.TempDir())
	c := r.client
	if _, err := c.TestNotification(ctx); !isStatus(err, http.StatusConflict) {
		t.Fatalf("test with nothing set: %v", err)
	}
	mail, err := smtptest.Start(smtptest.Options{Refuse: map[string]string{"nobody@example.com": "550 5.1.1 nobody here"}})
	if err != nil {
		t.Fatal(err)
	}
	defer mail.Close()
	good := api.EmailSettings{SMTP: mail.Addr, From: "asr@example.com", To: []string{"ops@example.com"}, User: "asr", Password: "p4ssw0rd-secret"}
	if err := c.SetEmail(ctx, &good); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []func(e *api.EmailSettings){
		func(e *api.EmailSettings) { e.SMTP = "mail.example.com" },
		func(e *api.EmailSettings) { e.SMTP = "mail.example.com:0" },
		func(e *api.EmailSettings) { e.From = "asr" },
		func(e *api.EmailSettings) { e.To = []string{"ops@example.com", "@"} },
		func(e *api.EmailSettings) { e.Digest = "soon" },
		func(e *api.EmailSettings) { e.MinSeverity = "loud" },
	} {
		e := good
		e.To = append([]string(nil), good.To...)
		bad(&e)
		if err := c.SetEmail(ctx, &e); !isStatus(err, http.StatusBadRequest) || !strings.Contains(err.Error(), "nothing was changed") {
			t.Errorf("%+v: %v", e, err)
		}
	}
	for _, u := range []string{"ftp://x/y", "hooks.example.com", ""} {
		if err := c.SetWebhook(ctx, &api.WebhookSettings{URL: u}); !isStatus(err, http.StatusBadRequest) {
			t.Errorf("webhook %q: %v", u, err)
		}
	}
	n, err := c.Notifications(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n.Email == nil || n.Email.SMTP != mail.Addr || !n.Email.PasswordSet || n.Email.Password != "" || n.Email.Digest != "5m0s" || n.Webhook != nil {
		t.Fatalf("settings after refusals: %+v %+v", n.Email, n.Webhook)
	}
	if v, err := r.srv.DB().Setting(ctx, "notify_email"); err != nil || strings.Contains(v, "p4ssw0rd") {
		t.Fatalf("stored e-mail setting %q (%v): the password is not sealed", v, err)
	}
	// The test mail: the fake offers no AUTH, so the user is refused.
	if _, err := c.TestNotification(ctx); !isStatus(err, http.StatusBadGateway) || !strings.Contains(err.Error(), "offers no AUTH") {
		t.Fatalf("test: %v", err)
	}
	good.User, good.Password, good.To = "", "", []string{"nobody@example.com"}
	if err := c.SetEmail(ctx, &good); err != nil {
		t.Fatal(err)
	}
	if _, err := c.TestNotification(ctx); !isStatus(err, http.StatusBadGateway) || !strings.Contains(err.Error(), "550") || !strings.Contains(err.Error(), "nobody here") {
		t.Fatalf("test: %v", err)
	}
	good.To = []string{"ops@example.com"}
	if err := c.SetEmail(ctx, &good); err != nil {
		t.Fatal(err)
	}
	res, err := c.TestNotification(ctx)
	if err != nil || len(res.Sent) != 1 || len(mail.Mails()) != 1 || !strings.Contains(mail.Mails()[0].Data, "Subject: [asr] TEST") {
		t.Fatalf("test: %+v %v, mails %+v", res, err, mail.Mails())
	}
	if err := c.SetEmail(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if n, _ := c.Notifications(ctx); n.Email != nil {
		t.Fatalf("e-mail still on: %+v", n.Email)
	}
	// Alerts: bad requests.
	if err := c.AckAlert(ctx, 12345); !isStatus(err, http.StatusNotFound) {
		t.Fatalf("ack of no alert: %v", err)
	}
	if err := c.Do(ctx, http.MethodPost, "/api/v1/alerts/x/ack", nil, nil); !isStatus(err, http.StatusBadRequest) {
		t.Fatalf("ack x: %v", err)
	}
	if err := c.Do(ctx, http.MethodGet, "/api/v1/alerts?state=maybe", nil, nil); !isStatus(err, http.StatusBadRequest) {
		t.Fatalf("state=maybe: %v", err)
	}
}

func isStatus(err error, status int) bool {
	var ae *api.Error
	return errors.As(err, &ae) && ae.Status == status
}

// The server's certificate: a warning 30 days before it expires, critical
// 7 days before, on the server's clock.
func TestAlertCertificateExpiry(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	set := func(t time.Time) { mu.Lock(); now = t; mu.Unlock() }
	r := &rig{t: t, dir: t.TempDir(), log: quietLogger(), tune: func(c *server.Config) {
		c.Now, c.PolicyEvery = clock, 20*time.Millisecond
	}}
	r.start()
	issued := time.Now()
	set(issued.AddDate(5, 0, 0).Add(-10 * 24 * time.Hour)) // the server's certificate lives 5 years
	a := r.waitAlert(api.AlertCertificate, "", "")
	if a.Subject != "the server's TLS certificate" || a.Severity != api.SeverityWarning || !strings.Contains(a.Action, "restart the server") {
		t.Fatalf("certificate alert %+v", a)
	}
	set(issued.AddDate(5, 0, 0).Add(-3 * 24 * time.Hour))
	deadline := time.Now().Add(hung)
	for a.Severity != api.SeverityCritical && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		a = r.waitAlert(api.AlertCertificate, "", "")
	}
	if a.Severity != api.SeverityCritical {
		t.Fatalf("not escalated: %+v", a)
	}
}
