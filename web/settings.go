package web

import (
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// minPasswordLen is the shortest console password accepted, as the server
// enforces it; checking here too gives a clear message before any work.
const minPasswordLen = 12

// settingsHandler serves the settings page: the console password and
// the alerts' notifications.
type settingsHandler struct {
	backend Backend
	log     *slog.Logger
	// failDelay slows down guessing the current password, as on login.
	failDelay time.Duration
}

// settingsView is what the settings page shows.
type settingsView struct {
	Session     *session
	HasPassword bool
	Saved       bool
	Error       string
	// Notify is how alerts are sent; NotifySaved says what was just saved
	// or sent, NotifyErr why a change or a test was refused.
	Notify      api.NotificationSettings
	NotifySaved string
	NotifyErr   string
	// EmailInput and WebhookInput are what was typed into a form the
	// server refused: the form shows them again (never the password), not
	// the stored settings, so the operator corrects the mistake instead of
	// typing everything again.
	EmailInput   *api.EmailSettings
	WebhookInput *api.WebhookSettings
}

// page serves the settings page.
func (h *settingsHandler) page(w http.ResponseWriter, r *http.Request) {
	v := h.view(r)
	switch r.URL.Query().Get("notify") {
	case "email":
		v.NotifySaved = "The e-mail settings are saved."
	case "webhook":
		v.NotifySaved = "The webhook is saved."
	case "test":
		v.NotifySaved = "A test notification was sent" + sentTo(strings.Split(r.URL.Query().Get("sent"), ",")) + "."
	}
	render(w, r, h.log, http.StatusOK, settingsPage(v))
}

func (h *settingsHandler) view(r *http.Request) settingsView {
	ctx := r.Context()
	v := settingsView{Session: sessionFrom(ctx), HasPassword: h.backend.HasPassword(ctx),
		Saved: r.URL.Query().Get("saved") == "1"}
	n, err := h.backend.Notifications(ctx)
	if err != nil {
		h.log.Error("notification settings", "err", err)
		v.NotifyErr = "Could not load the notification settings: " + err.Error()
	}
	v.Notify = n
	return v
}

// setNotifications saves the e-mail or webhook settings (or turns them
// off: the form's "off" button), or sends a test notification.
func (h *settingsHandler) setNotifications(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	off := r.PostFormValue("off") != ""
	switch chi.URLParam(r, "channel") {
	case "email":
		var e *api.EmailSettings
		if !off {
			e = &api.EmailSettings{SMTP: r.PostFormValue("smtp"), From: r.PostFormValue("from"),
				To: splitList(r.PostFormValue("to")), StartTLS: r.PostFormValue("starttls") != "",
				User: r.PostFormValue("user"), Password: r.PostFormValue("password"),
				MinSeverity: r.PostFormValue("min_severity"), Digest: r.PostFormValue("digest"),
				CAPEM: strings.TrimSpace(r.PostFormValue("ca_pem")), NoCA: r.PostFormValue("no_ca") != ""}
		}
		if err := h.backend.SetEmail(ctx, e); err != nil {
			v := h.view(r)
			v.NotifyErr = "The e-mail settings were not saved: " + err.Error()
			if e != nil {
				typed := *e
				typed.Password = ""
				v.EmailInput = &typed
			}
			render(w, r, h.log, http.StatusUnprocessableEntity, settingsPage(v))
			return
		}
		redirect(w, r, "/settings?notify=email")
	case "webhook":
		var wh *api.WebhookSettings
		if !off {
			wh = &api.WebhookSettings{URL: r.PostFormValue("url"), MinSeverity: r.PostFormValue("min_severity")}
		}
		if err := h.backend.SetWebhook(ctx, wh); err != nil {
			v := h.view(r)
			v.NotifyErr = "The webhook was not saved: " + err.Error()
			v.WebhookInput = wh
			render(w, r, h.log, http.StatusUnprocessableEntity, settingsPage(v))
			return
		}
		redirect(w, r, "/settings?notify=webhook")
	case "test":
		res, err := h.backend.TestNotification(ctx)
		if err != nil {
			// A channel that sent did send: say so, or the operator
			// would expect nothing in the mailbox and try again.
			v := h.view(r)
			v.NotifyErr = "The test notification failed: " + err.Error()
			if len(res.Sent) > 0 {
				v.NotifyErr += " (it was sent" + sentTo(res.Sent) + ")"
			}
			render(w, r, h.log, http.StatusUnprocessableEntity, settingsPage(v))
			return
		}
		redirect(w, r, "/settings?notify=test&sent="+strings.Join(res.Sent, ","))
	default:
		http.Error(w, "404 page not found", http.StatusNotFound)
	}
}

// sentTo says where a test notification went (" by e-mail and to the
// webhook"); it names only the channels it knows, so a link's query
// cannot put words on the page.
func sentTo(channels []string) string {
	var parts []string
	if slices.Contains(channels, "email") {
		parts = append(parts, "by e-mail")
	}
	if slices.Contains(channels, "webhook") {
		parts = append(parts, "to the webhook")
	}
	if len(parts) == 0 {
		return ""
	}
	return " " + strings.Join(parts, " and ")
}

// splitList splits a comma- or space-separated list.
func splitList(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\r' })
}

// setPassword sets or changes the console password. Changing it takes the
// current password (or the admin token), so that a browser left signed in
// is not enough to lock the others out.
func (h *settingsHandler) setPassword(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	v := settingsView{Session: sessionFrom(ctx), HasPassword: h.backend.HasPassword(ctx)}
	fail := func(status int, msg string) {
		v.Error = msg
		render(w, r, h.log, status, settingsPage(v))
	}
	if v.HasPassword && !h.backend.CheckSecret(ctx, r.PostFormValue("current")) {
		select {
		case <-time.After(h.failDelay):
		case <-ctx.Done():
			return
		}
		fail(http.StatusUnprocessableEntity, "The current password is wrong: enter the console password or the admin token.")
		return
	}
	pw := r.PostFormValue("password")
	switch {
	case utf8.RuneCountInString(pw) < minPasswordLen:
		fail(http.StatusUnprocessableEntity, fmt.Sprintf("The new password must have at least %d characters.", minPasswordLen))
		return
	case pw != r.PostFormValue("confirm"):
		fail(http.StatusUnprocessableEntity, "The two new passwords differ.")
		return
	}
	if err := h.backend.SetPassword(ctx, pw); err != nil {
		h.log.Warn("set console password", "err", err)
		fail(http.StatusUnprocessableEntity, "The password was not saved: "+err.Error())
		return
	}
	h.log.Info("console password set", "remote", r.RemoteAddr)
	redirect(w, r, "/settings?saved=1")
}

// emailField is a field of the stored e-mail settings, for the form.
func emailField(v settingsView, name string) string {
	e := v.Notify.Email
	if v.EmailInput != nil {
		e = v.EmailInput
	}
	if e == nil {
		return ""
	}
	switch name {
	case "smtp":
		return e.SMTP
	case "from":
		return e.From
	case "to":
		return strings.Join(e.To, ", ")
	case "user":
		return e.User
	case "min_severity":
		return e.MinSeverity
	case "digest":
		return e.Digest
	}
	return ""
}

// emailStartTLS is whether the form's STARTTLS box is ticked: as typed
// into a refused form, else as stored; on by default.
func emailStartTLS(v settingsView) bool {
	switch {
	case v.EmailInput != nil:
		return v.EmailInput.StartTLS
	case v.Notify.Email != nil:
		return v.Notify.Email.StartTLS
	}
	return true
}

// webhookField is a field of the stored webhook settings, for the form.
func webhookField(v settingsView, name string) string {
	w := v.Notify.Webhook
	if v.WebhookInput != nil {
		w = v.WebhookInput
	}
	if w == nil {
		return ""
	}
	switch name {
	case "url":
		return w.URL
	case "min_severity":
		return w.MinSeverity
	}
	return ""
}
