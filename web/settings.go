package web

import (
	"fmt"
	"log/slog"
	"net/http"
	"time"
	"unicode/utf8"
)

// minPasswordLen is the shortest console password accepted, as the server
// enforces it; checking here too gives a clear message before any work.
const minPasswordLen = 12

// settingsHandler serves the settings page: the console password.
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
}

// page serves the settings page.
func (h *settingsHandler) page(w http.ResponseWriter, r *http.Request) {
	render(w, r, h.log, http.StatusOK, settingsPage(settingsView{
		Session:     sessionFrom(r.Context()),
		HasPassword: h.backend.HasPassword(r.Context()),
		Saved:       r.URL.Query().Get("saved") == "1",
	}))
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
