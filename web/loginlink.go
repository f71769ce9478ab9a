package web

import (
	"context"
	"net/http"
	"time"
)

// LoginLinker is what a Backend may implement to let a browser sign in by
// a one-time link (/login/link?t=TOKEN), such as the one `asr demo`
// prints: the token is good for one sign-in, then gone. The link's GET
// shows a button that POSTs the token; only the POST uses it up, so a
// link previewer that fetches the link leaves it good.
type LoginLinker interface {
	// TakeLoginLink reports whether token is a live one-time login token,
	// and ends it.
	TakeLoginLink(ctx context.Context, token string) bool
}

// maxLoginLinkToken bounds the token a login link's page carries.
const maxLoginLinkToken = 256

// loginLinkPage shows the button that signs in with the link's token.
func (a *authHandler) loginLinkPage(w http.ResponseWriter, r *http.Request) {
	tok := r.URL.Query().Get("t")
	if _, ok := a.backend.(LoginLinker); !ok || tok == "" || len(tok) > maxLoginLinkToken {
		http.Redirect(w, r, "/login", http.StatusSeeOther)
		return
	}
	w.Header().Set("Referrer-Policy", "no-referrer")
	render(w, r, a.log, http.StatusOK, loginLinkPage(tok))
}

// loginLink signs the browser in with a one-time token (POST, form field
// t); a token that is unknown, used or expired leads to the login form.
func (a *authHandler) loginLink(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	ll, ok := a.backend.(LoginLinker)
	tok := r.PostFormValue("t")
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
