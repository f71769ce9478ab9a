package server_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/notify"
	"github.com/asrdr/asr/server/notify/smtptest"
	"github.com/asrdr/asr/store"
)

// mustFailedJob records a failed job: an alert (job-failed, a warning)
// raised on the next pass, for a day.
func mustFailedJob(t *testing.T, db *store.DB, id string) {
	t.Helper()
	ctx := context.Background()
	if err := db.AddJob(ctx, store.Job{ID: id, Kind: "protect", Subject: "vc1/web", State: store.JobRunning}); err != nil {
		t.Fatal(err)
	}
	if err := db.UpdateJob(ctx, id, store.JobFailed, "[]", "ssh: handshake failed"); err != nil {
		t.Fatal(err)
	}
}

// waitPasses waits until the alert loop has made n more passes.
func (r *rig) waitPasses(n int64) {
	r.t.Helper()
	until := server.AlertPasses(r.srv) + n
	deadline := time.Now().Add(hung)
	for server.AlertPasses(r.srv) < until {
		if time.Now().After(deadline) {
			r.t.Fatalf("the alert loop made %d passes, want %d", server.AlertPasses(r.srv), until)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A notice is sent once: a server restarted with an active alert whose
// notice was sent sends it neither by mail nor to the webhook again,
// however many passes it makes.
func TestOutboxRestartSendsNothingTwice(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	mail, err := smtptest.Start(smtptest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer mail.Close()
	hook := &hookRecorder{}
	hs := httptest.NewServer(hook)
	defer hs.Close()
	r := &rig{t: t, dir: t.TempDir(), log: quietLogger(), tune: func(c *server.Config) {
		c.PolicyEvery, c.HeartbeatLost = 10*time.Millisecond, time.Hour
	}}
	r.start()
	if err := r.client.SetEmail(ctx, &api.EmailSettings{SMTP: mail.Addr, From: "asr@example.com", To: []string{"ops@example.com"}, Digest: "0"}); err != nil {
		t.Fatal(err)
	}
	if err := r.client.SetWebhook(ctx, &api.WebhookSettings{URL: hs.URL}); err != nil {
		t.Fatal(err)
	}
	mustFailedJob(t, r.srv.DB(), "00000000000000aa")
	a := r.waitAlert(api.AlertJobFailed, "", "")
	waitFor(t, "the raise marked as sent", func() bool {
		row, err := r.srv.DB().Alert(ctx, a.ID)
		return err == nil && !row.Notified.IsZero()
	})
	if n, h := len(mail.Mails()), hook.count(api.AlertJobFailed, api.AlertChangeRaised); n != 1 || h != 1 {
		t.Fatalf("%d mails, %d webhook posts; want 1 each", n, h)
	}
	for i := 0; i < 2; i++ {
		r.stop()
		r.start()
		r.waitPasses(20)
		if as, _ := r.client.Alerts(ctx, false); len(as) != 1 || as[0].ID != a.ID {
			t.Fatalf("active alerts after a restart: %+v", as)
		}
		if n, h := len(mail.Mails()), len(hook.bodiesCopy()); n != 1 || h != 1 {
			t.Fatalf("restart %d: %d mails, %d webhook posts; want still 1 each", i+1, n, h)
		}
	}
}

// A notice the server left unsent (a crash between the raise and the
// send) is sent at the next start.
func TestOutboxSendsWhatAStoppedServerLeft(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	hook := &hookRecorder{}
	hs := httptest.NewServer(hook)
	defer hs.Close()
	r := &rig{t: t, dir: t.TempDir(), log: quietLogger(), tune: func(c *server.Config) {
		c.PolicyEvery, c.HeartbeatLost = 10*time.Millisecond, time.Hour
	}}
	r.tune = func(c *server.Config) {
		c.PolicyEvery, c.HeartbeatLost, c.AlertClear = 10*time.Millisecond, time.Hour, 20*time.Millisecond
	}
	r.start()
	if err := r.client.SetWebhook(ctx, &api.WebhookSettings{URL: hs.URL}); err != nil {
		t.Fatal(err)
	}
	r.stop()
	// As the engine leaves it: raised, not told.
	r.opened = func(s *server.Server) {
		if _, err := s.DB().RaiseAlert(ctx, store.Alert{Kind: api.AlertVCenter, Key: "vc9", Severity: api.SeverityCritical,
			Subject: "vCenter vc9", Message: "unreachable", Action: "check"}); err != nil {
			t.Fatal(err)
		}
		r.opened = nil
	}
	r.start()
	waitFor(t, "the left notice at the webhook", func() bool { return hook.count(api.AlertVCenter, api.AlertChangeRaised) == 1 })
	// vc9 is not in the vault: the alert resolves, and that is told too.
	waitFor(t, "the resolve at the webhook", func() bool { return hook.count(api.AlertVCenter, api.AlertChangeResolved) == 1 })
	r.waitPasses(20)
	if c := len(hook.bodiesCopy()); c != 2 {
		t.Fatalf("%d webhook posts, want 2", c)
	}
}

// A mail the SMTP server refuses is sent again, with a backoff, until it
// is accepted; then once only.
func TestOutboxRetriesAFailedMail(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	mail, err := smtptest.Start(smtptest.Options{Refuse: map[string]string{"ops@example.com": "451 4.3.0 try again later"}})
	if err != nil {
		t.Fatal(err)
	}
	defer mail.Close()
	r := &rig{t: t, dir: t.TempDir(), log: quietLogger(), tune: func(c *server.Config) {
		c.PolicyEvery, c.HeartbeatLost = 10*time.Millisecond, time.Hour
	}, opened: func(s *server.Server) { server.SetOutboxBackoff(s, 20*time.Millisecond, 100*time.Millisecond) }}
	r.start()
	if err := r.client.SetEmail(ctx, &api.EmailSettings{SMTP: mail.Addr, From: "asr@example.com", To: []string{"ops@example.com"}, Digest: "1h"}); err != nil {
		t.Fatal(err)
	}
	mustFailedJob(t, r.srv.DB(), "00000000000000bb")
	a := r.waitAlert(api.AlertJobFailed, "", "")
	r.waitPasses(20) // tried and refused, more than once
	row, err := r.srv.DB().Alert(ctx, a.ID)
	if err != nil || !row.Notified.IsZero() || len(mail.Mails()) != 0 {
		t.Fatalf("refused mail: row %+v (%v), %d mails", row, err, len(mail.Mails()))
	}
	mail.SetRefuse(nil)
	waitFor(t, "the mail", func() bool { return len(mail.Mails()) > 0 })
	r.waitPasses(20)
	if n := len(mail.Mails()); n != 1 {
		t.Fatalf("%d mails, want 1", n)
	}
	if row, _ := r.srv.DB().Alert(ctx, a.ID); row.Notified.IsZero() {
		t.Fatal("sent, not marked")
	}
}

// The stored SMTP password is kept only for the same server and user; a
// CA given for STARTTLS is checked, stored and used; a bad one is refused.
func TestEmailSettingsPasswordAndCA(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	mail, err := smtptest.Start(smtptest.Options{StartTLS: true, Users: map[string]string{"asr": "p4ss"}})
	if err != nil {
		t.Fatal(err)
	}
	defer mail.Close()
	other, err := smtptest.Start(smtptest.Options{StartTLS: true, Users: map[string]string{"asr": "p4ss"}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	r := startServer(t, t.TempDir())
	c := r.client
	set := func(e api.EmailSettings) error { return c.SetEmail(ctx, &e) }
	base := api.EmailSettings{SMTP: mail.Addr, From: "asr@example.com", To: []string{"ops@example.com"}, StartTLS: true, User: "asr"}
	// Without the CA, the self-signed certificate is refused.
	e := base
	e.Password = "p4ss"
	if err := set(e); err != nil {
		t.Fatal(err)
	}
	if _, err := c.TestNotification(ctx); !isStatus(err, http.StatusBadGateway) || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("test without the CA: %v", err)
	}
	for _, bad := range []string{"not PEM", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", strings.Repeat("x", notify.MaxCABytes+1)} {
		e := base
		e.CAPEM = bad
		if err := set(e); !isStatus(err, http.StatusBadRequest) || !strings.Contains(err.Error(), "CA file") {
			t.Errorf("CA %.20q: %v", bad, err)
		}
	}
	// The CA; the password is kept (same server, same user).
	e = base
	e.CAPEM = string(mail.CAPEM)
	if err := set(e); err != nil {
		t.Fatal(err)
	}
	if _, err := c.TestNotification(ctx); err != nil {
		t.Fatalf("test with the CA and the kept password: %v", err)
	}
	if m := mail.Mails(); len(m) != 1 || !m[0].TLS || m[0].Auth != "asr" {
		t.Fatalf("mails %+v", m)
	}
	// The CA is kept too when not given again for the same server.
	if n, _ := c.Notifications(ctx); n.Email == nil || n.Email.CAPEM != string(mail.CAPEM) || !n.Email.PasswordSet {
		t.Fatalf("settings %+v", n.Email)
	}
	// Another server or another user: the password must be given again.
	e = base
	e.SMTP = other.Addr
	e.CAPEM = string(other.CAPEM)
	if err := set(e); !isStatus(err, http.StatusBadRequest) || !strings.Contains(err.Error(), "give the password again") {
		t.Fatalf("another server, no password: %v", err)
	}
	e = base
	e.User = "ops"
	if err := set(e); !isStatus(err, http.StatusBadRequest) || !strings.Contains(err.Error(), "give the password again") {
		t.Fatalf("another user, no password: %v", err)
	}
	if n, _ := c.Notifications(ctx); n.Email == nil || n.Email.SMTP != mail.Addr || n.Email.User != "asr" {
		t.Fatalf("a refused change changed the settings: %+v", n.Email)
	}
	e = base
	e.SMTP, e.CAPEM, e.Password = other.Addr, string(other.CAPEM), "p4ss"
	if err := set(e); err != nil {
		t.Fatal(err)
	}
	if _, err := c.TestNotification(ctx); err != nil || len(other.Mails()) != 1 {
		t.Fatalf("test on the other server: %v, %d mails", err, len(other.Mails()))
	}
	// NoCA drops it.
	e = base
	e.SMTP, e.NoCA = other.Addr, true
	if err := set(e); err != nil {
		t.Fatal(err)
	}
	if n, _ := c.Notifications(ctx); n.Email.CAPEM != "" || !n.Email.PasswordSet {
		t.Fatalf("after --no-ca: %+v", n.Email)
	}
}
