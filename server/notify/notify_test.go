package notify

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/smtp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/notify/smtptest"
)

func mustSMTP(t *testing.T, o smtptest.Options) *smtptest.Server {
	t.Helper()
	s, err := smtptest.Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func TestSendMail(t *testing.T) {
	ctx := context.Background()
	users := map[string]string{"asr": "s3cret"}
	for _, tc := range []struct {
		name    string
		opts    smtptest.Options
		email   func(e *Email, s *smtptest.Server)
		wantErr string
		tls     bool
		auth    string
	}{
		{name: "plain, several recipients", email: func(e *Email, _ *smtptest.Server) { e.StartTLS = false }},
		{name: "STARTTLS wanted, not offered", email: func(e *Email, _ *smtptest.Server) {}, wantErr: "does not offer STARTTLS"},
		{name: "STARTTLS", opts: smtptest.Options{StartTLS: true}, tls: true,
			email: func(e *Email, s *smtptest.Server) { e.TLSConfig = &tls.Config{RootCAs: s.CAPool} }},
		{name: "STARTTLS, certificate not trusted", opts: smtptest.Options{StartTLS: true}, wantErr: "STARTTLS",
			email: func(e *Email, s *smtptest.Server) {}},
		{name: "AUTH PLAIN over TLS", opts: smtptest.Options{StartTLS: true, Users: users}, tls: true, auth: "asr",
			email: func(e *Email, s *smtptest.Server) {
				e.TLSConfig, e.User, e.Password = &tls.Config{RootCAs: s.CAPool}, "asr", "s3cret"
			}},
		{name: "AUTH LOGIN over TLS", opts: smtptest.Options{StartTLS: true, Users: users, Mechs: "LOGIN"}, tls: true, auth: "asr",
			email: func(e *Email, s *smtptest.Server) {
				e.TLSConfig, e.User, e.Password = &tls.Config{RootCAs: s.CAPool}, "asr", "s3cret"
			}},
		{name: "wrong password", opts: smtptest.Options{StartTLS: true, Users: users}, wantErr: "535",
			email: func(e *Email, s *smtptest.Server) {
				e.TLSConfig, e.User, e.Password = &tls.Config{RootCAs: s.CAPool}, "asr", "guess"
			}},
		{name: "user but no AUTH offered", wantErr: "offers no AUTH",
			email: func(e *Email, s *smtptest.Server) { e.StartTLS, e.User, e.Password = false, "asr", "x" }},
		{name: "recipient refused", opts: smtptest.Options{Refuse: map[string]string{"ops@example.com": "550 5.1.1 no such user"}},
			wantErr: "no such user", email: func(e *Email, _ *smtptest.Server) { e.StartTLS = false }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := mustSMTP(t, tc.opts)
			e := Email{Addr: s.Addr, From: "asr@example.com", To: []string{"ops@example.com", "oncall@example.com"}, StartTLS: true}
			tc.email(&e, s)
			err := SendMail(ctx, e, "[asr] WARNING rpo vm1: RPO 2m", "line one\n.line with a dot\n")
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				if len(s.Mails()) != 0 {
					t.Fatal("a mail went through anyway")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			ms := s.Mails()
			if len(ms) != 1 {
				t.Fatalf("%d mails", len(ms))
			}
			m := ms[0]
			if m.From != "asr@example.com" || len(m.To) != 2 || m.TLS != tc.tls || m.Auth != tc.auth {
				t.Fatalf("mail %+v", m)
			}
			for _, want := range []string{"Subject: [asr] WARNING rpo vm1: RPO 2m\r\n", "\r\n\r\nline one\r\n.line with a dot\r\n", "To: ops@example.com, oncall@example.com\r\n"} {
				if !strings.Contains(m.Data, want) {
					t.Errorf("mail lacks %q:\n%s", want, m.Data)
				}
			}
		})
	}
}

// The password never goes in clear to another host than this one.
func TestLoginAuthRefusesClearText(t *testing.T) {
	a := &loginAuth{user: "u", pass: "p", host: "mail.example.com"}
	if _, _, err := a.Start(&smtpServerInfo{Name: "mail.example.com"}); err == nil {
		t.Fatal("LOGIN started over a clear connection to another host")
	}
}

func TestValidate(t *testing.T) {
	ok := func() Email {
		return Email{Addr: "mail.example.com:587", From: "asr@example.com", To: []string{"a@example.com"}}
	}
	for _, tc := range []struct {
		mod  func(*Email)
		want string
	}{
		{func(e *Email) { e.Addr = "mail.example.com" }, "want HOST:PORT"},
		{func(e *Email) { e.Addr = "mail.example.com:99999" }, "port"},
		{func(e *Email) { e.Addr = "mail.example.com:smtp" }, "port"},
		{func(e *Email) { e.From = "not an address" }, "from address"},
		{func(e *Email) { e.To = nil }, "no recipient"},
		{func(e *Email) { e.To = []string{"a@example.com", "nobody"} }, `recipient "nobody"`},
		{func(e *Email) { e.To = make([]string, MaxRecipients+1) }, "at most"},
		{func(e *Email) { e.Digest = -time.Second }, "digest"},
		{func(e *Email) { e.MinSeverity = "info" }, "minimum severity"},
		{func(e *Email) { e.User = "a\r\nRCPT TO:<x>" }, "line break"},
	} {
		e := ok()
		tc.mod(&e)
		if err := ValidateEmail(&e); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: err = %v, want %q", e, err, tc.want)
		}
	}
	e := ok()
	e.To = []string{"Ops <ops@example.com>"}
	if err := ValidateEmail(&e); err != nil || e.To[0] != "ops@example.com" || e.MinSeverity != api.SeverityWarning {
		t.Errorf("valid settings: %v, %+v", err, e)
	}
	for _, u := range []string{"", "ftp://example.com/x", "http://", "example.com/hook", "https://" + strings.Repeat("a", maxURLLen)} {
		if err := ValidateWebhook(&Webhook{URL: u}); err == nil {
			t.Errorf("webhook URL %q accepted", u)
		}
	}
	if err := ValidateWebhook(&Webhook{URL: "https://hooks.example.com/asr?token=x"}); err != nil {
		t.Error(err)
	}
}

type sentMail struct{ subject, body string }

// testNotifier is a Notifier whose mails go to a channel, on a clock and
// ticks the test drives.
func testNotifier(t *testing.T, digest time.Duration) (*Notifier, chan sentMail, *atomic.Int64, chan time.Time) {
	t.Helper()
	mails := make(chan sentMail, 100)
	var clock atomic.Int64
	clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	ticks := make(chan time.Time)
	n := New(Options{Now: func() time.Time { return time.Unix(0, clock.Load()) }, Ticks: ticks,
		SendMail: func(_ context.Context, _ Email, subject, body string) error {
			mails <- sentMail{subject, body}
			return nil
		}})
	t.Cleanup(n.Close)
	n.Configure(&Email{Addr: "x:25", From: "a@b", To: []string{"c@d"}, MinSeverity: api.SeverityWarning, Digest: digest}, nil)
	return n, mails, &clock, ticks
}

func notice(change, sev, machine string) Notice {
	return Notice{Change: change, Alert: api.Alert{ID: 7, Kind: api.AlertRPO, Severity: sev, Machine: machine,
		Message: "RPO 5m exceeds the threshold of 1m", Action: "check the agent"}}
}

func noMail(t *testing.T, mails chan sentMail) {
	t.Helper()
	select {
	case m := <-mails:
		t.Fatalf("unexpected mail %q", m.subject)
	default:
	}
}

// A storm: the first notice is mailed at once, the others of the digest
// interval in one mail when it ends; the severity filter applies.
func TestDigest(t *testing.T) {
	n, mails, clock, ticks := testNotifier(t, 5*time.Minute)
	n.Notify(notice(api.AlertChangeRaised, api.SeverityCritical, "vm1"))
	n.sync()
	m := <-mails
	if !strings.HasPrefix(m.subject, "[asr] CRITICAL rpo vm1: RPO 5m") || !strings.Contains(m.body, "action:   check the agent") ||
		!strings.Contains(m.body, "asr alerts ack 7") {
		t.Fatalf("first mail %q:\n%s", m.subject, m.body)
	}
	for i := 2; i <= 5; i++ {
		n.Notify(notice(api.AlertChangeRaised, api.SeverityWarning, "vm"+string(rune('0'+i))))
	}
	n.Notify(notice(api.AlertChangeResolved, api.SeverityWarning, "vm2"))
	n.Notify(Notice{Change: api.AlertChangeRaised, Alert: api.Alert{Kind: "x", Severity: api.SeverityInfo}}) // below the minimum
	n.sync()
	noMail(t, mails)
	clock.Add(int64(4 * time.Minute))
	ticks <- time.Time{}
	n.sync()
	noMail(t, mails) // the interval has not ended
	clock.Add(int64(time.Minute))
	ticks <- time.Time{}
	n.sync()
	m = <-mails
	if m.subject != "[asr] digest of 5 alert notices: 4 raised, 1 resolved" {
		t.Fatalf("digest subject %q", m.subject)
	}
	for _, want := range []string{"vm2", "vm3", "vm4", "vm5", "RESOLVED rpo vm2"} {
		if !strings.Contains(m.body, want) {
			t.Errorf("digest lacks %q:\n%s", want, m.body)
		}
	}
	noMail(t, mails)
	// The digest started another interval: a notice within it waits...
	n.Notify(notice(api.AlertChangeResolved, api.SeverityCritical, "vm1"))
	n.sync()
	noMail(t, mails)
	clock.Add(int64(5 * time.Minute))
	ticks <- time.Time{}
	n.sync()
	if m = <-mails; !strings.HasPrefix(m.subject, "[asr] RESOLVED rpo vm1") {
		t.Fatalf("single-notice digest %q", m.subject)
	}
	// ... and once an interval passed with nothing, the next goes at once.
	clock.Add(int64(6 * time.Minute))
	ticks <- time.Time{}
	n.Notify(notice(api.AlertChangeRaised, api.SeverityWarning, "vm9"))
	n.sync()
	if m = <-mails; !strings.HasPrefix(m.subject, "[asr] WARNING rpo vm9") {
		t.Fatalf("after a quiet interval %q", m.subject)
	}
}

// A critical minimum leaves warnings out; no digest sends each at once.
func TestMinSeverityNoDigest(t *testing.T) {
	n, mails, _, _ := testNotifier(t, 0)
	n.Configure(&Email{Addr: "x:25", From: "a@b", To: []string{"c@d"}, MinSeverity: api.SeverityCritical}, nil)
	n.Notify(notice(api.AlertChangeRaised, api.SeverityWarning, "vm1"))
	n.Notify(notice(api.AlertChangeRaised, api.SeverityCritical, "vm2"))
	n.Notify(notice(api.AlertChangeEscalate, api.SeverityCritical, "vm3"))
	n.sync()
	if m := <-mails; !strings.Contains(m.subject, "vm2") {
		t.Fatalf("first %q", m.subject)
	}
	if m := <-mails; !strings.HasPrefix(m.subject, "[asr] ESCALATED to CRITICAL rpo vm3") {
		t.Fatalf("second %q", m.subject)
	}
	noMail(t, mails)
}

// The webhook gets the documented body; 5xx answers are retried, a 4xx
// is final; a slow webhook does not hold the mail back.
func TestWebhook(t *testing.T) {
	var mu sync.Mutex
	var bodies []api.WebhookBody
	var calls atomic.Int32
	got := make(chan struct{}, 10)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		if r.Header.Get("Content-Type") != "application/json" || r.Method != http.MethodPost {
			t.Errorf("%s with %q", r.Method, r.Header.Get("Content-Type"))
		}
		if n <= 2 {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		if strings.Contains(r.URL.Path, "gone") {
			http.Error(w, "no such hook", http.StatusNotFound)
			got <- struct{}{}
			return
		}
		b, _ := io.ReadAll(r.Body)
		var wb api.WebhookBody
		if err := json.Unmarshal(b, &wb); err != nil {
			t.Errorf("body %q: %v", b, err)
		}
		mu.Lock()
		bodies = append(bodies, wb)
		mu.Unlock()
		got <- struct{}{}
	}))
	defer hook.Close()
	n := New(Options{WebhookBackoff: time.Millisecond, SendMail: func(context.Context, Email, string, string) error { return nil }})
	defer n.Close()
	n.Configure(nil, &Webhook{URL: hook.URL + "/asr", MinSeverity: api.SeverityWarning})
	n.Notify(notice(api.AlertChangeRaised, api.SeverityWarning, "vm1"))
	<-got
	mu.Lock()
	if len(bodies) != 1 || bodies[0].Version != 1 || bodies[0].Change != api.AlertChangeRaised || bodies[0].Alert.Machine != "vm1" {
		t.Fatalf("bodies %+v", bodies)
	}
	mu.Unlock()
	if c := calls.Load(); c != 3 {
		t.Fatalf("%d calls, want 3 (two 503s, then 200)", c)
	}
	n.Configure(nil, &Webhook{URL: hook.URL + "/gone", MinSeverity: api.SeverityWarning})
	n.Notify(notice(api.AlertChangeRaised, api.SeverityWarning, "vm1"))
	<-got
	n.sync()
	if c := calls.Load(); c != 4 {
		t.Fatalf("%d calls, want 4: a 404 is not retried", c)
	}
	// Test reports the refusal.
	_, errs := n.Test(context.Background(), api.Alert{Kind: api.AlertTest, Severity: api.SeverityWarning})
	<-got
	if errs["webhook"] == nil || !strings.Contains(errs["webhook"].Error(), "404") {
		t.Fatalf("test errors %v", errs)
	}
}

// A full queue drops notices rather than block the engine.
func TestNotifyNeverBlocks(t *testing.T) {
	block := make(chan struct{})
	n := New(Options{QueueSize: 2, SendMail: func(context.Context, Email, string, string) error { <-block; return nil }})
	n.Configure(&Email{Addr: "x:25", From: "a@b", To: []string{"c@d"}, MinSeverity: api.SeverityWarning}, nil)
	for i := 0; i < 100; i++ {
		n.Notify(notice(api.AlertChangeRaised, api.SeverityWarning, "vm1"))
	}
	close(block)
	n.Close()
}

type smtpServerInfo = smtp.ServerInfo

// A mail the SMTP server refuses reports its error to the notice's Done and
// starts no digest interval: the notice sent again goes at once.
func TestFailedMailStartsNoDigest(t *testing.T) {
	var fail atomic.Bool
	fail.Store(true)
	mails := make(chan sentMail, 10)
	ticks := make(chan time.Time)
	n := New(Options{Ticks: ticks, SendMail: func(_ context.Context, _ Email, subject, body string) error {
		if fail.Load() {
			return errors.New("421 try later")
		}
		mails <- sentMail{subject, body}
		return nil
	}})
	defer n.Close()
	n.Configure(&Email{Addr: "x:25", From: "a@b", To: []string{"c@d"}, MinSeverity: api.SeverityWarning, Digest: time.Hour}, nil)
	results := make(chan error, 10)
	no := notice(api.AlertChangeRaised, api.SeverityWarning, "vm1")
	no.Done = func(ch string, err error) {
		if ch != ChannelEmail {
			t.Errorf("done on %s", ch)
		}
		results <- err
	}
	n.Send(ChannelEmail, no)
	if err := <-results; err == nil || !strings.Contains(err.Error(), "421") {
		t.Fatalf("failed send reported %v", err)
	}
	fail.Store(false)
	n.Send(ChannelEmail, no)
	if err := <-results; err != nil {
		t.Fatalf("second send: %v", err)
	}
	if m := <-mails; !strings.Contains(m.subject, "vm1") {
		t.Fatalf("mail %q", m.subject)
	}
}

// Close sends what is still queued, and reports each notice's fate.
func TestCloseDrainsQueues(t *testing.T) {
	block := make(chan struct{})
	var mailed, hooked atomic.Int32
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hooked.Add(1) }))
	defer hook.Close()
	n := New(Options{SendMail: func(_ context.Context, _ Email, _, body string) error {
		<-block
		mailed.Add(int32(strings.Count(body, "rpo vm")))
		return nil
	}})
	n.Configure(&Email{Addr: "x:25", From: "a@b", To: []string{"c@d"}, MinSeverity: api.SeverityWarning}, &Webhook{URL: hook.URL, MinSeverity: api.SeverityWarning})
	var mu sync.Mutex
	done := map[string]int{}
	for i := 0; i < 5; i++ {
		no := notice(api.AlertChangeRaised, api.SeverityWarning, fmt.Sprintf("vm%d", i))
		no.Done = func(ch string, err error) {
			mu.Lock()
			defer mu.Unlock()
			done[ch+" called"]++
			if err == nil {
				done[ch]++
			}
		}
		n.Notify(no)
	}
	close(block) // the first mail goes, the four others wait in the queue
	n.Close()
	mu.Lock()
	defer mu.Unlock()
	// A post under way when Close came may be cut short: it says so, and
	// the caller sends it again later.
	if done[ChannelEmail] != 5 || mailed.Load() != 5 || done[ChannelWebhook+" called"] != 5 ||
		done[ChannelWebhook] < 4 || int(hooked.Load()) < done[ChannelWebhook] {
		t.Fatalf("done %v, %d notices mailed, %d posted; want all 5 mailed, every notice's Done called, at most one post cut", done, mailed.Load(), hooked.Load())
	}
}
