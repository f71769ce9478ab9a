package web

import (
	"context"
	"net/http"
	"time"
)

// LoginLinker is what a Backend may implement to let a browser sign in by
// a one-time link (GET /login/link?t=TOKEN), such as the one `asr demo`
// prints: the token is good for one sign-in, then gone.
type LoginLinker interface {
	// TakeLoginLink reports whether token is a live one-time login token,
	// and ends it.
	TakeLoginLink(ctx context.Context, token string) bool
}

// loginLink signs the browser in with a one-time token; a token that is
// unknown, used or expired leads to the login form.
func (a *authHandler) loginLink(w http.ResponseWriter, r *http.Request) {
	ll, ok := a.backend.(LoginLinker)
	tok := r.URL.Query().Get("t")
	if !ok || tok == "" || !ll.TakeLoginLink(r.Context(), tok) {
		a.log.Info("console login link refused", "remote", r.RemoteAddr)
		select {
		case <-time.After(a.loginDelay):
		case <-r.Context().Done():
			return
		}
		http.Redirect(w, r, "/login", http.StatusSeeOther)
		return
	}
	a.log.Info("console login by link", "remote", r.RemoteAddr)
	a.startSession(w, r)
}
