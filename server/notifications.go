package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/notify"
	"github.com/asrdr/asr/store"
)

// Notification settings live in the settings table as JSON (version 1);
// the SMTP password is sealed with the vault's data key, like a vCenter's.
const (
	emailSetting    = "notify_email"
	webhookSetting  = "notify_webhook"
	smtpSecretKind  = "smtp-password"
	smtpSecretKey   = "notify/smtp"
	notifySettingV1 = 1
)

// storedEmail is the e-mail channel as stored. Never rename a field.
type storedEmail struct {
	Version     int      `json:"v"`
	SMTP        string   `json:"smtp"`
	From        string   `json:"from"`
	To          []string `json:"to"`
	StartTLS    bool     `json:"starttls"`
	User        string   `json:"user,omitempty"`
	Secret      []byte   `json:"secret,omitempty"` // the sealed password
	MinSeverity string   `json:"min_severity"`
	Digest      int64    `json:"digest_ns"`
	CAPEM       string   `json:"ca_pem,omitempty"` // the SMTP server's CA, PEM; "": the system's roots
}

type storedWebhook struct {
	Version     int    `json:"v"`
	URL         string `json:"url"`
	MinSeverity string `json:"min_severity"`
}

// notifySettings reads the stored settings (nil where a channel is off).
func (s *Server) notifySettings(ctx context.Context) (*storedEmail, *storedWebhook, error) {
	var e *storedEmail
	var w *storedWebhook
	if v, err := s.db.Setting(ctx, emailSetting); err == nil && v != "" {
		e = &storedEmail{}
		if err := json.Unmarshal([]byte(v), e); err != nil {
			return nil, nil, fmt.Errorf("setting %s: %w", emailSetting, err)
		}
		if e.Version != notifySettingV1 {
			return nil, nil, fmt.Errorf("setting %s: version %d unknown to this server", emailSetting, e.Version)
		}
	} else if err != nil && !errors.Is(err, store.ErrNotFound) {
		return nil, nil, err
	}
	if v, err := s.db.Setting(ctx, webhookSetting); err == nil && v != "" {
		w = &storedWebhook{}
		if err := json.Unmarshal([]byte(v), w); err != nil {
			return nil, nil, fmt.Errorf("setting %s: %w", webhookSetting, err)
		}
		if w.Version != notifySettingV1 {
			return nil, nil, fmt.Errorf("setting %s: version %d unknown to this server", webhookSetting, w.Version)
		}
	} else if err != nil && !errors.Is(err, store.ErrNotFound) {
		return nil, nil, err
	}
	return e, w, nil
}

// loadNotifications configures the notifier from the stored settings.
func (s *Server) loadNotifications(ctx context.Context) error {
	se, sw, err := s.notifySettings(ctx)
	if err != nil {
		return err
	}
	var e *notify.Email
	var w *notify.Webhook
	if se != nil {
		e = &notify.Email{Addr: se.SMTP, From: se.From, To: se.To, StartTLS: se.StartTLS, User: se.User,
			MinSeverity: se.MinSeverity, Digest: time.Duration(se.Digest)}
		if se.CAPEM != "" {
			pool, err := notify.ParseCA([]byte(se.CAPEM))
			if err != nil {
				return fmt.Errorf("setting %s: %w", emailSetting, err)
			}
			e.TLSConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		}
		if len(se.Secret) > 0 {
			pw, err := s.cat.Codec.Open(smtpSecretKey, smtpSecretKind, se.Secret)
			if err != nil {
				return fmt.Errorf("the sealed SMTP password does not open with this vault's key: %w", err)
			}
			e.Password = string(pw)
		}
	}
	if sw != nil {
		w = &notify.Webhook{URL: sw.URL, MinSeverity: sw.MinSeverity}
	}
	s.alerts.notify.Configure(e, w)
	return nil
}

// Notifications returns the notification settings (no password).
func (s *Server) Notifications(ctx context.Context) (api.NotificationSettings, error) {
	se, sw, err := s.notifySettings(ctx)
	if err != nil {
		return api.NotificationSettings{}, err
	}
	var out api.NotificationSettings
	if se != nil {
		out.Email = &api.EmailSettings{SMTP: se.SMTP, From: se.From, To: se.To, StartTLS: se.StartTLS, User: se.User,
			PasswordSet: len(se.Secret) > 0, MinSeverity: se.MinSeverity, Digest: time.Duration(se.Digest).String(), CAPEM: se.CAPEM}
	}
	if sw != nil {
		out.Webhook = &api.WebhookSettings{URL: sw.URL, MinSeverity: sw.MinSeverity}
	}
	return out, nil
}

// SetEmail checks and stores the e-mail settings (nil: e-mail off). A
// request it refuses changes nothing.
func (s *Server) SetEmail(ctx context.Context, req *api.EmailSettings) error {
	if req == nil {
		if err := s.db.SetSetting(ctx, emailSetting, ""); err != nil {
			return err
		}
		s.log.Info("alert e-mail turned off")
		return s.loadNotifications(ctx)
	}
	digest := notify.DefaultDigest
	if req.Digest != "" {
		d, err := time.ParseDuration(req.Digest)
		if err != nil {
			return errorf(http.StatusBadRequest, "digest %q: not a duration (e.g. 5m, 0 for none); nothing was changed", req.Digest)
		}
		digest = d
	}
	var to []string
	for _, t := range req.To {
		if t = strings.TrimSpace(t); t != "" {
			to = append(to, t)
		}
	}
	e := notify.Email{Addr: strings.TrimSpace(req.SMTP), From: req.From, To: to, StartTLS: req.StartTLS, User: req.User,
		Password: req.Password, MinSeverity: req.MinSeverity, Digest: digest}
	if err := notify.ValidateEmail(&e); err != nil {
		return errorf(http.StatusBadRequest, "%v; nothing was changed", err)
	}
	if e.User == "" && e.Password != "" {
		return errorf(http.StatusBadRequest, "a password without a user; nothing was changed")
	}
	if req.CAPEM != "" {
		if req.NoCA {
			return errorf(http.StatusBadRequest, "a CA and no CA; nothing was changed")
		}
		if _, err := notify.ParseCA([]byte(req.CAPEM)); err != nil {
			return errorf(http.StatusBadRequest, "%v; nothing was changed", err)
		}
	}
	st := storedEmail{Version: notifySettingV1, SMTP: e.Addr, From: e.From, To: e.To, StartTLS: e.StartTLS, User: e.User,
		MinSeverity: e.MinSeverity, Digest: int64(e.Digest), CAPEM: req.CAPEM}
	old, _, err := s.notifySettings(ctx)
	if err != nil {
		return err
	}
	// What the request leaves out is kept only for the same server: the
	// sealed password for the same server and user (it is not sent to
	// another), the CA for the same server.
	same := old != nil && old.SMTP == e.Addr
	if st.CAPEM == "" && !req.NoCA && same {
		st.CAPEM = old.CAPEM
	}
	if e.User != "" {
		switch {
		case e.Password != "":
			sealed, err := s.cat.Codec.Seal(smtpSecretKey, smtpSecretKind, []byte(e.Password))
			if err != nil {
				return err
			}
			st.Secret = sealed
		case same && old.User == e.User:
			st.Secret = old.Secret
		case old != nil && len(old.Secret) > 0:
			return errorf(http.StatusBadRequest, "the SMTP server or user changed (was %s, user %q): give the password again (the stored one is only kept for the same server and user); nothing was changed",
				old.SMTP, old.User)
		}
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	if err := s.db.SetSetting(ctx, emailSetting, string(b)); err != nil {
		return err
	}
	s.log.Info("alert e-mail set", "smtp", e.Addr, "to", strings.Join(e.To, ","), "starttls", e.StartTLS, "min_severity", e.MinSeverity, "digest", e.Digest)
	return s.loadNotifications(ctx)
}

// SetWebhook checks and stores the webhook (nil: off).
func (s *Server) SetWebhook(ctx context.Context, req *api.WebhookSettings) error {
	if req == nil {
		if err := s.db.SetSetting(ctx, webhookSetting, ""); err != nil {
			return err
		}
		s.log.Info("alert webhook turned off")
		return s.loadNotifications(ctx)
	}
	w := notify.Webhook{URL: strings.TrimSpace(req.URL), MinSeverity: req.MinSeverity}
	if err := notify.ValidateWebhook(&w); err != nil {
		return errorf(http.StatusBadRequest, "%v; nothing was changed", err)
	}
	b, err := json.Marshal(storedWebhook{Version: notifySettingV1, URL: w.URL, MinSeverity: w.MinSeverity})
	if err != nil {
		return err
	}
	if err := s.db.SetSetting(ctx, webhookSetting, string(b)); err != nil {
		return err
	}
	s.log.Info("alert webhook set", "min_severity", w.MinSeverity)
	return s.loadNotifications(ctx)
}

// TestNotification sends a test notice through every configured channel
// now; the error (502) says what refused it.
func (s *Server) TestNotification(ctx context.Context) (api.TestNotificationResult, error) {
	now := s.now()
	a := api.Alert{Kind: api.AlertTest, Severity: api.SeverityWarning, State: api.AlertActive, Subject: "asr server " + s.URL(),
		Message: "a test notification from the asr server", Action: "nothing: this is a test", Raised: now, Updated: now}
	sent, errs := s.alerts.notify.Test(ctx, a)
	res := api.TestNotificationResult{Sent: sent}
	if e := errs["email"]; e != nil {
		res.Email = e.Error()
	}
	if e := errs["webhook"]; e != nil {
		res.Webhook = e.Error()
	}
	if len(sent) == 0 && len(errs) == 0 {
		return res, errorf(http.StatusConflict, "%v", errNoChannel)
	}
	var msgs []string
	if res.Email != "" {
		msgs = append(msgs, "e-mail: "+res.Email)
	}
	if res.Webhook != "" {
		msgs = append(msgs, "webhook: "+res.Webhook)
	}
	if len(msgs) > 0 {
		return res, errorf(http.StatusBadGateway, "test notification refused: %s", strings.Join(msgs, "; "))
	}
	return res, nil
}

func (s *Server) handleAlerts(w http.ResponseWriter, r *http.Request) error {
	all := false
	switch st := r.URL.Query().Get("state"); st {
	case "", api.AlertActive:
	case "all":
		all = true
	default:
		return errorf(http.StatusBadRequest, "state %q: want active or all", st)
	}
	as, err := s.Alerts(r.Context(), all)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, as)
	return nil
}

func (s *Server) handleAckAlert(w http.ResponseWriter, r *http.Request) error {
	id, err := strconv.ParseInt(chi.URLParam(r, "alert"), 10, 64)
	if err != nil || id <= 0 {
		return errorf(http.StatusBadRequest, "alert id %q: not a number", chi.URLParam(r, "alert"))
	}
	if err := s.AckAlert(r.Context(), id); err != nil {
		return err
	}
	a, err := s.db.Alert(r.Context(), id)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, alertJSON(a))
	return nil
}

func (s *Server) handleTestNotification(w http.ResponseWriter, r *http.Request) error {
	res, err := s.TestNotification(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

func (s *Server) handleNotifications(w http.ResponseWriter, r *http.Request) error {
	n, err := s.Notifications(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, n)
	return nil
}

func (s *Server) handleSetEmail(w http.ResponseWriter, r *http.Request) error {
	var req *api.EmailSettings
	if r.Method != http.MethodDelete {
		req = &api.EmailSettings{}
		if err := readJSON(r, req); err != nil {
			return err
		}
	}
	if err := s.SetEmail(r.Context(), req); err != nil {
		return err
	}
	return s.handleNotifications(w, r)
}

func (s *Server) handleSetWebhook(w http.ResponseWriter, r *http.Request) error {
	var req *api.WebhookSettings
	if r.Method != http.MethodDelete {
		req = &api.WebhookSettings{}
		if err := readJSON(r, req); err != nil {
			return err
		}
	}
	if err := s.SetWebhook(r.Context(), req); err != nil {
		return err
	}
	return s.handleNotifications(w, r)
}

// The console's part of alerts (web.Backend).

func (b consoleBackend) Alerts(ctx context.Context, all bool) ([]api.Alert, error) {
	return b.s.Alerts(ctx, all)
}

func (b consoleBackend) AckAlert(ctx context.Context, id int64) error {
	return notFound(b.s.AckAlert(ctx, id), fmt.Sprintf("alert %d", id))
}

func (b consoleBackend) Events(ctx context.Context, limit int) ([]api.EventJSON, error) {
	return b.s.Events(ctx, "", limit)
}

func (b consoleBackend) Notifications(ctx context.Context) (api.NotificationSettings, error) {
	return b.s.Notifications(ctx)
}

func (b consoleBackend) SetEmail(ctx context.Context, e *api.EmailSettings) error {
	return b.s.SetEmail(ctx, e)
}

func (b consoleBackend) SetWebhook(ctx context.Context, w *api.WebhookSettings) error {
	return b.s.SetWebhook(ctx, w)
}

func (b consoleBackend) TestNotification(ctx context.Context) (api.TestNotificationResult, error) {
	return b.s.TestNotification(ctx)
}
