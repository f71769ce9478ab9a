// Package notify sends the server's alert notices to operators: by e-mail
// over SMTP (STARTTLS by default, AUTH PLAIN or LOGIN, several recipients,
// a minimum severity, and a digest that sends the first notice of a storm
// at once and batches the rest of the interval into one mail) and to a
// JSON webhook (POST, a timeout, retries on retry.Backoff).
//
// A Notifier never blocks its caller: notices go into bounded queues, one
// per channel, each emptied by its own goroutine, so a slow SMTP server
// delays neither the alert engine nor the webhook. It does not keep
// notices either: each notice's Done says, per channel, whether it was
// sent (or needed no sending) or failed (a refused or unreachable server,
// a full queue, a Close before it could be sent), and the caller (the
// server's outbox) sends a failed one again later. A failed mail does not
// start a digest interval.
package notify

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/mail"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/asrdr/asr/replication/retry"
	"github.com/asrdr/asr/server/api"
)

// Notice is one change of an alert to tell operators about.
type Notice struct {
	Change string // api.AlertChangeRaised, AlertChangeEscalate, AlertChangeResolved, or "test"
	Alert  api.Alert
	// Done, if set, is called once per channel the notice was given to,
	// from that channel's goroutine (or from Send, for a full queue): a nil
	// error when the notice was sent, or needs no sending (the channel is
	// off, the severity under its minimum); otherwise why it was not sent.
	// It must not block for long.
	Done func(channel string, err error)
}

// The channels, as Send and Done name them.
const (
	ChannelEmail   = "email"
	ChannelWebhook = "webhook"
)

// Channels lists the channels.
var Channels = []string{ChannelEmail, ChannelWebhook}

// Errors a notice's Done gets besides a channel's own.
var (
	ErrQueueFull  = errors.New("notification queue full")
	ErrDigestFull = errors.New("e-mail digest full")
	ErrClosed     = errors.New("notifier closed before the notice could be sent")
)

func (no Notice) done(channel string, err error) {
	if no.Done != nil {
		no.Done(channel, err)
	}
}

// Email is the e-mail channel's configuration.
type Email struct {
	Addr        string // HOST:PORT of the SMTP server
	From        string
	To          []string
	StartTLS    bool // refuse to send in clear
	User        string
	Password    string
	MinSeverity string        // warning (default) or critical
	Digest      time.Duration // 0: every notice at once
	// TLSConfig, when set, is used for STARTTLS instead of the system's
	// roots (tests with their own CA).
	TLSConfig *tls.Config
}

// Webhook is the webhook channel's configuration.
type Webhook struct {
	URL         string
	MinSeverity string
}

// Limits of the settings.
const (
	MaxRecipients = 50
	MaxDigest     = 24 * time.Hour
	maxURLLen     = 2048
	// DefaultDigest is the digest interval when none is given.
	DefaultDigest = 5 * time.Minute
)

// MaxCABytes bounds the PEM of an SMTP server's CA.
const MaxCABytes = 64 << 10

// ParseCA checks the PEM of an SMTP server's CA: certificates only, at
// least one, at most MaxCABytes; it returns them as a pool.
func ParseCA(pemBytes []byte) (*x509.CertPool, error) {
	if len(pemBytes) > MaxCABytes {
		return nil, fmt.Errorf("CA file: %d bytes, at most %d", len(pemBytes), MaxCABytes)
	}
	pool := x509.NewCertPool()
	n := 0
	for rest := pemBytes; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			if len(bytes.TrimSpace(rest)) > 0 {
				return nil, errors.New("CA file: text that is not PEM")
			}
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("CA file: a %q block; want certificates only", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("CA file: certificate %d: %v", n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, errors.New("CA file: no PEM certificate in it")
	}
	return pool, nil
}

// ValidateEmail checks an e-mail configuration and normalizes it (bare
// addresses, the default minimum severity); the error says what is wrong.
func ValidateEmail(e *Email) error {
	host, port, err := net.SplitHostPort(e.Addr)
	if err != nil || host == "" {
		return fmt.Errorf("SMTP server %q: want HOST:PORT, e.g. smtp.example.com:587", e.Addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("SMTP server %q: port %q is not a number from 1 to 65535", e.Addr, port)
	}
	a, err := mail.ParseAddress(e.From)
	if err != nil {
		return fmt.Errorf("from address %q: %v", e.From, err)
	}
	e.From = a.Address
	if len(e.To) == 0 {
		return errors.New("no recipient: give at least one --to address")
	}
	if len(e.To) > MaxRecipients {
		return fmt.Errorf("%d recipients: at most %d (use a mailing list)", len(e.To), MaxRecipients)
	}
	for i, t := range e.To {
		a, err := mail.ParseAddress(strings.TrimSpace(t))
		if err != nil {
			return fmt.Errorf("recipient %q: %v", t, err)
		}
		e.To[i] = a.Address
	}
	if strings.ContainsAny(e.User, "\r\n") {
		return errors.New("the SMTP user holds a line break")
	}
	if e.Digest < 0 || e.Digest > MaxDigest {
		return fmt.Errorf("digest %s: want 0 (no digest) to %s", e.Digest, MaxDigest)
	}
	return validSeverity(&e.MinSeverity)
}

// ValidateWebhook checks a webhook configuration and normalizes it.
func ValidateWebhook(w *Webhook) error {
	if len(w.URL) > maxURLLen {
		return fmt.Errorf("webhook URL: longer than %d characters", maxURLLen)
	}
	u, err := url.Parse(w.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("webhook URL %q: want http(s)://HOST[:PORT]/PATH", w.URL)
	}
	return validSeverity(&w.MinSeverity)
}

func validSeverity(s *string) error {
	switch *s {
	case "":
		*s = api.SeverityWarning
	case api.SeverityWarning, api.SeverityCritical:
	default:
		return fmt.Errorf("minimum severity %q: want warning or critical", *s)
	}
	return nil
}

// Options configures a Notifier; the zero value is usable.
type Options struct {
	Logger *slog.Logger
	// Now is the clock of the digest (default time.Now); Ticks, when set,
	// replaces the digest's one-second ticker (tests drive both).
	Now   func() time.Time
	Ticks <-chan time.Time
	// QueueSize bounds each channel's queue (default 1024).
	QueueSize int
	// SendMail sends one mail (default: SMTP, SendMail).
	SendMail func(ctx context.Context, e Email, subject, body string) error
	// HTTPClient posts to the webhook (default: a client with a 10 s
	// timeout); WebhookTries is how many times a notice is tried (default
	// 4), waiting on retry.Backoff from WebhookBackoff (default 1 s, doubling
	// to 30 s).
	HTTPClient     *http.Client
	WebhookTries   int
	WebhookBackoff time.Duration
}

// item is what a queue carries: a notice, or a marker (done) that tests
// wait for to know everything before it was handled.
type item struct {
	n    Notice
	done chan struct{}
}

// Notifier sends notices through the configured channels.
type Notifier struct {
	opts   Options
	log    *slog.Logger
	mu     sync.Mutex
	email  *Email
	hook   *Webhook
	mailQ  chan item
	hookQ  chan item
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New starts a Notifier with no channel configured.
func New(opts Options) *Notifier {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 1024
	}
	if opts.SendMail == nil {
		opts.SendMail = SendMail
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{Timeout: 10 * time.Second}
	}
	if opts.WebhookTries <= 0 {
		opts.WebhookTries = 4
	}
	if opts.WebhookBackoff <= 0 {
		opts.WebhookBackoff = time.Second
	}
	n := &Notifier{opts: opts, log: opts.Logger.With("component", "notify"),
		mailQ: make(chan item, opts.QueueSize), hookQ: make(chan item, opts.QueueSize)}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.wg.Go(n.mailLoop)
	n.wg.Go(n.hookLoop)
	return n
}

// Close stops the Notifier; the notices still queued and a digest still
// waiting are sent first (for at most 10 s per channel); those that could
// not be get their Done with an error.
func (n *Notifier) Close() {
	n.cancel()
	n.wg.Wait()
}

// Configure replaces the channels' settings (nil: the channel is off).
func (n *Notifier) Configure(e *Email, w *Webhook) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.email, n.hook = e, w
}

func (n *Notifier) config() (*Email, *Webhook) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.email, n.hook
}

// Notify queues a notice for every channel; it never blocks.
func (n *Notifier) Notify(no Notice) {
	for _, ch := range Channels {
		n.Send(ch, no)
	}
}

// Send queues a notice for one channel (ChannelEmail, ChannelWebhook); it
// never blocks: a full queue calls the notice's Done with ErrQueueFull.
func (n *Notifier) Send(channel string, no Notice) {
	q := n.mailQ
	if channel == ChannelWebhook {
		q = n.hookQ
	}
	select {
	case q <- item{n: no}:
	default:
		n.log.Warn("notification queue full; notice not sent", "channel", channel, "kind", no.Alert.Kind, "machine", no.Alert.Machine, "change", no.Change)
		no.done(channel, ErrQueueFull)
	}
}

// sync waits until both channels handled what was queued before it.
func (n *Notifier) sync() {
	for _, q := range []chan item{n.mailQ, n.hookQ} {
		d := make(chan struct{})
		q <- item{done: d}
		<-d
	}
}

func passes(min string, no Notice) bool {
	return no.Change == "test" || api.SeverityRank(no.Alert.Severity) >= api.SeverityRank(min)
}

// mailLoop sends the e-mail: the first notice of a storm at once, the
// others of the digest interval that follows in one mail at its end; a
// digest mail starts another interval, so a long storm gets one mail per
// interval. Only a mail that was sent starts an interval: after a failure
// the next notice (the outbox sends the failed ones again) goes at once.
func (n *Notifier) mailLoop() {
	ticks := n.opts.Ticks
	if ticks == nil {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		ticks = t.C
	}
	var batch []Notice
	var windowEnd time.Time
	const maxBatch = 1000
	send := func(ctx context.Context, e *Email, ns []Notice) bool {
		subject, body := compose(ns, 0)
		err := n.opts.SendMail(ctx, *e, subject, body)
		if err != nil {
			n.log.Error("alert e-mail not sent; it is tried again", "smtp", e.Addr, "notices", len(ns), "err", err)
		} else {
			n.log.Info("alert e-mail sent", "to", strings.Join(e.To, ","), "notices", len(ns))
		}
		for _, no := range ns {
			no.done(ChannelEmail, err)
		}
		return err == nil
	}
	for {
		select {
		case <-n.ctx.Done():
			// Drain the queue into the batch and send it once.
			e, _ := n.config()
			for more := true; more; {
				select {
				case it := <-n.mailQ:
					switch {
					case it.done != nil:
						close(it.done)
					case e == nil || !passes(e.MinSeverity, it.n):
						it.n.done(ChannelEmail, nil)
					default:
						batch = append(batch, it.n)
					}
				default:
					more = false
				}
			}
			if len(batch) > 0 {
				if e == nil {
					for _, no := range batch {
						no.done(ChannelEmail, nil)
					}
				} else {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					send(ctx, e, batch)
					cancel()
				}
			}
			return
		case it := <-n.mailQ:
			if it.done != nil {
				close(it.done)
				continue
			}
			e, _ := n.config()
			if e == nil || !passes(e.MinSeverity, it.n) {
				it.n.done(ChannelEmail, nil)
				continue
			}
			if now := n.opts.Now(); e.Digest <= 0 || !now.Before(windowEnd) {
				if send(n.ctx, e, []Notice{it.n}) {
					windowEnd = now.Add(e.Digest)
				}
			} else if len(batch) < maxBatch {
				batch = append(batch, it.n)
			} else {
				it.n.done(ChannelEmail, ErrDigestFull)
			}
		case <-ticks:
			now := n.opts.Now()
			if len(batch) == 0 || now.Before(windowEnd) {
				continue
			}
			if e, _ := n.config(); e != nil {
				if send(n.ctx, e, batch) {
					windowEnd = now.Add(e.Digest)
				}
			} else {
				for _, no := range batch {
					no.done(ChannelEmail, nil) // e-mail was turned off
				}
			}
			batch = nil
		}
	}
}

func (n *Notifier) hookLoop() {
	for n.ctx.Err() == nil { // checked first: a closing Notifier drains, it does not post on a cancelled context
		select {
		case <-n.ctx.Done():
		case it := <-n.hookQ:
			if it.done != nil {
				close(it.done)
				continue
			}
			n.postNotice(n.ctx, it.n, n.opts.WebhookTries)
		}
	}
	// Drain the queue: one try each, within 10 s in all.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		select {
		case it := <-n.hookQ:
			if it.done != nil {
				close(it.done)
				continue
			}
			n.postNotice(ctx, it.n, 1)
		default:
			return
		}
	}
}

// postNotice posts one notice to the webhook, if it is on, and says so.
func (n *Notifier) postNotice(ctx context.Context, no Notice, tries int) {
	_, w := n.config()
	if w == nil || !passes(w.MinSeverity, no) {
		no.done(ChannelWebhook, nil)
		return
	}
	err := n.post(ctx, *w, no, tries)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w: %v", ErrClosed, err)
		}
		n.log.Error("alert webhook not sent; it is tried again", "url", redactURL(w.URL), "err", err)
	}
	no.done(ChannelWebhook, err)
}

// post sends a notice to the webhook, trying up to tries times: network
// errors, 408, 429 and 5xx are tried again, other answers are final.
func (n *Notifier) post(ctx context.Context, w Webhook, no Notice, tries int) error {
	body, err := json.Marshal(api.WebhookBody{Version: 1, Change: no.Change, Alert: no.Alert, Sent: n.opts.Now().UTC()})
	if err != nil {
		return err
	}
	b := retry.New(n.opts.WebhookBackoff, 30*time.Second)
	var last error
	for i := 0; i < tries; i++ {
		if i > 0 {
			if err := retry.Sleep(ctx, b.Next()); err != nil {
				return fmt.Errorf("%w (after: %v)", err, last)
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.URL, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("User-Agent", "asr-alerts/1")
		resp, err := n.opts.HTTPClient.Do(req)
		if err != nil {
			last = err
			continue
		}
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		switch {
		case resp.StatusCode >= 200 && resp.StatusCode < 300:
			return nil
		case resp.StatusCode == http.StatusRequestTimeout || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			last = fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(msg)))
		default:
			return fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(msg)))
		}
	}
	return fmt.Errorf("%d tries: %w", tries, last)
}

// redactURL drops a URL's user information and query, which may hold a
// token, for logs.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(bad URL)"
	}
	u.User, u.RawQuery = nil, ""
	return u.String()
}

// Test sends a test notice through every configured channel at once
// (no digest, one webhook try) and says what each did: errs maps
// "email" and "webhook" to their error; sent lists those that sent.
func (n *Notifier) Test(ctx context.Context, a api.Alert) (sent []string, errs map[string]error) {
	e, w := n.config()
	errs = map[string]error{}
	no := Notice{Change: "test", Alert: a}
	if e != nil {
		subject, body := compose([]Notice{no}, 0)
		if err := n.opts.SendMail(ctx, *e, subject, body); err != nil {
			errs["email"] = err
		} else {
			sent = append(sent, "email")
		}
	}
	if w != nil {
		if err := n.post(ctx, *w, no, 1); err != nil {
			errs["webhook"] = err
		} else {
			sent = append(sent, "webhook")
		}
	}
	return sent, errs
}

// about names what an alert is about: machine/disk, or its subject.
func about(a api.Alert) string {
	switch {
	case a.Machine != "" && a.Disk != "":
		return a.Machine + "/" + a.Disk
	case a.Machine != "":
		return a.Machine
	}
	return a.Subject
}

// headline is a notice's one-line summary, e.g. "WARNING rpo vm1: RPO 2m
// exceeds the threshold of 1m".
func headline(no Notice) string {
	tag := strings.ToUpper(no.Alert.Severity)
	switch no.Change {
	case api.AlertChangeResolved:
		tag = "RESOLVED"
	case api.AlertChangeEscalate:
		tag = "ESCALATED to " + tag
	case "test":
		tag = "TEST"
	}
	s := tag + " " + no.Alert.Kind
	if w := about(no.Alert); w != "" {
		s += " " + w
	}
	return s + ": " + no.Alert.Message
}

// compose makes a mail's subject and body from its notices (dropped:
// notices of the digest left out for its bound).
func compose(ns []Notice, dropped int) (subject, body string) {
	var b strings.Builder
	if len(ns) == 1 {
		subject = "[asr] " + headline(ns[0])
	} else {
		counts := map[string]int{}
		for _, no := range ns {
			counts[no.Change]++
		}
		var parts []string
		for _, c := range []string{api.AlertChangeRaised, api.AlertChangeEscalate, api.AlertChangeResolved} {
			if counts[c] > 0 {
				parts = append(parts, fmt.Sprintf("%d %s", counts[c], c))
			}
		}
		subject = fmt.Sprintf("[asr] digest of %d alert notices: %s", len(ns), strings.Join(parts, ", "))
		fmt.Fprintf(&b, "%d alert notices since the last mail:\n\n", len(ns))
	}
	for i, no := range ns {
		if i > 0 {
			b.WriteString("\n")
		}
		a := no.Alert
		fmt.Fprintf(&b, "%s\n", headline(no))
		if a.Machine != "" {
			fmt.Fprintf(&b, "  machine:  %s\n", a.Machine)
		}
		if a.Disk != "" {
			fmt.Fprintf(&b, "  disk:     %s\n", a.Disk)
		}
		if a.Subject != "" {
			fmt.Fprintf(&b, "  subject:  %s\n", a.Subject)
		}
		fmt.Fprintf(&b, "  severity: %s\n", a.Severity)
		if !a.Raised.IsZero() {
			fmt.Fprintf(&b, "  raised:   %s\n", a.Raised.UTC().Format(time.RFC3339))
		}
		if !a.Resolved.IsZero() {
			fmt.Fprintf(&b, "  resolved: %s\n", a.Resolved.UTC().Format(time.RFC3339))
		}
		if a.Action != "" && no.Change != api.AlertChangeResolved {
			fmt.Fprintf(&b, "  action:   %s\n", a.Action)
		}
		if a.ID != 0 && no.Change != api.AlertChangeResolved {
			fmt.Fprintf(&b, "  (acknowledge: asr alerts ack %d)\n", a.ID)
		}
	}
	if dropped > 0 {
		fmt.Fprintf(&b, "\n%d more notices were left out of this digest; see asr alerts --all.\n", dropped)
	}
	if len(subject) > 200 {
		subject = subject[:197] + "..."
	}
	return subject, b.String()
}
