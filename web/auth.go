package web

import (
	"context"
	"crypto/subtle"
	"log/slog"
	"net/http"
	"strings"
	"time"
)

// sessionCookie is the cookie holding the console session id.
const sessionCookie = "asr_session"

// defaultLoginDelay is how long a failed login waits before answering, to
// slow down guessing.
const defaultLoginDelay = 500 * time.Millisecond

// maxFormBytes bounds the body of the console's forms.
const maxFormBytes = 64 << 10

// session is the signed-in session of a request.
type session struct {
	ID   string
	CSRF string
}

type sessionKey struct{}

// sessionFrom returns the session that requireSession put in ctx, or nil.
func sessionFrom(ctx context.Context) *session {
	s, _ := ctx.Value(sessionKey{}).(*session)
	return s
}

// authHandler serves signing in and out and guards the other pages.
type authHandler struct {
	backend    Backend
	log        *slog.Logger
	loginDelay time.Duration
}

// loginPage shows the login form, or goes to the machines if the browser is
// already signed in.
func (a *authHandler) loginPage(w http.ResponseWriter, r *http.Request) {
	if _, ok := a.lookup(r); ok {
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return
	}
	render(w, r, a.log, http.StatusOK, loginPage(""))
}

// login checks the secret and starts a session.
func (a *authHandler) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	secret := r.PostFormValue("secret")
	if secret == "" || !a.backend.CheckSecret(r.Context(), secret) {
		a.log.Info("console login failed", "remote", r.RemoteAddr)
		select {
		case <-time.After(a.loginDelay):
		case <-r.Context().Done():
			return
		}
		render(w, r, a.log, http.StatusUnauthorized,
			loginPage("That is neither the admin token nor the console password."))
		return
	}
	a.startSession(w, r)
}

// startSession signs the browser in: a new session, its cookie, and the
// machines page.
func (a *authHandler) startSession(w http.ResponseWriter, r *http.Request) {
	// A session cookie from before is replaced, so end its session too.
	if old, err := r.Cookie(sessionCookie); err == nil && old.Value != "" {
		if err := a.backend.DeleteSession(r.Context(), old.Value); err != nil {
			a.log.Warn("delete replaced console session", "err", err)
		}
	}
	id, _, err := a.backend.CreateSession(r.Context())
	if err != nil {
		a.log.Error("create console session", "err", err)
		httpError(w, r, http.StatusInternalServerError, "Could not start a session; see the server log.")
		return
	}
	a.log.Info("console login", "remote", r.RemoteAddr)
	http.SetCookie(w, &http.Cookie{
		Name:     sessionCookie,
		Value:    id,
		Path:     "/",
		HttpOnly: true,
		Secure:   true,
		SameSite: http.SameSiteStrictMode,
	})
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

// logout ends the session.
func (a *authHandler) logout(w http.ResponseWriter, r *http.Request) {
	if err := a.backend.DeleteSession(r.Context(), sessionFrom(r.Context()).ID); err != nil {
		a.log.Error("delete console session", "err", err)
		httpError(w, r, http.StatusInternalServerError, "Could not end the session; see the server log.")
		return
	}
	clearSessionCookie(w)
	redirect(w, r, "/login")
}

// lookup returns the live session named by the request's cookie.
func (a *authHandler) lookup(r *http.Request) (*session, bool) {
	c, err := r.Cookie(sessionCookie)
	if err != nil || c.Value == "" {
		return nil, false
	}
	csrf, err := a.backend.Session(r.Context(), c.Value)
	if err != nil || csrf == "" {
		a.log.Debug("console session not valid", "err", err)
		return nil, false
	}
	return &session{ID: c.Value, CSRF: csrf}, true
}

// requireSession lets only signed-in requests through; the others are sent
// to the login page.
func (a *authHandler) requireSession(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s, ok := a.lookup(r)
		if !ok {
			if _, err := r.Cookie(sessionCookie); err == nil {
				clearSessionCookie(w)
			}
			if isHTMX(r) || strings.HasPrefix(r.URL.Path, "/fragments/") {
				// A redirect would be followed by the XMLHttpRequest and
				// the login page swapped into the table; htmx instead
				// navigates on HX-Redirect.
				w.Header().Set("HX-Redirect", "/login")
				http.Error(w, "401 session expired", http.StatusUnauthorized)
				return
			}
			http.Redirect(w, r, "/login", http.StatusSeeOther)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), sessionKey{}, s)))
	})
}

// requireCSRF lets a request through only if it carries the session's CSRF
// token, in the X-CSRF-Token header (htmx) or the csrf form field. It must
// run after requireSession.
func requireCSRF(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s := sessionFrom(r.Context())
		token := r.Header.Get("X-CSRF-Token")
		if token == "" {
			r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
			token = r.PostFormValue("csrf")
		}
		if s == nil || s.CSRF == "" || subtle.ConstantTimeCompare([]byte(token), []byte(s.CSRF)) != 1 {
			httpError(w, r, http.StatusForbidden, "Invalid or missing CSRF token: reload the page and try again.")
			return
		}
		next.ServeHTTP(w, r)
	})
}

func clearSessionCookie(w http.ResponseWriter) {
	http.SetCookie(w, &http.Cookie{
		Name:     sessionCookie,
		Value:    "",
		Path:     "/",
		MaxAge:   -1,
		HttpOnly: true,
		Secure:   true,
		SameSite: http.SameSiteStrictMode,
	})
}

// isHTMX reports whether htmx sent the request.
func isHTMX(r *http.Request) bool { return r.Header.Get("HX-Request") == "true" }

// redirect sends the browser to url after a form post, with HX-Redirect if
// htmx made the request.
func redirect(w http.ResponseWriter, r *http.Request, url string) {
	if isHTMX(r) {
		w.Header().Set("HX-Redirect", url)
		w.WriteHeader(http.StatusNoContent)
		return
	}
	http.Redirect(w, r, url, http.StatusSeeOther)
}
