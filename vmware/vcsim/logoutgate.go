package vcsim

import (
	"bytes"
	"io"
	"net/http"
	"sync"
	"time"
)

// logoutGate mends a lock-order deadlock inside govmomi's simulator
// (v0.56.0). A session's Logout holds the session's registry mutex and
// then waits for each ContainerView's object lock (Registry.Remove, then
// ContainerView.RemoveObject). A WaitForUpdatesEx of the same session,
// collecting on a view, holds that view's lock and waits for the same
// registry mutex (collect, getObject, Session.Get). A client that logs
// out while its own long poll still runs in the simulator (the server's
// watcher at shutdown: the client cancelled the request, the handler
// runs on) hung both for ever: docs/ARCHITECTURE.md, "Known limits",
// once in a CI-like run. The gate holds a session's Logout until that
// session's WaitForUpdates(Ex) calls have returned. The watcher's polls
// are bounded by their MaxWaitSeconds; a wait past logoutWaitMax goes
// ahead anyway, so that the gate cannot hang a run itself.
type logoutGate struct {
	mu    sync.Mutex
	waits map[string]int // session key -> WaitForUpdates calls in the simulator
}

// logoutWaitMax bounds how long a Logout waits for its session's polls.
const logoutWaitMax = 2 * time.Minute

// maxSOAPBody bounds a request body the gate reads (a SOAP call is
// small; uploads go to /folder, not here).
const maxSOAPBody = 16 << 20

func newLogoutGate() *logoutGate { return &logoutGate{waits: map[string]int{}} }

// wrap serves next behind the gate.
func (g *logoutGate) wrap(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		key := sessionKey(r)
		if r.Method != http.MethodPost || key == "" {
			next(w, r)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, maxSOAPBody+1))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if len(body) > maxSOAPBody {
			http.Error(w, "request body too large", http.StatusRequestEntityTooLarge)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		switch {
		case bytes.Contains(body, []byte("<WaitForUpdates")): // WaitForUpdatesEx too
			g.add(key, 1)
			defer g.add(key, -1)
		case bytes.Contains(body, []byte("<Logout")):
			g.idle(key, time.Now().Add(logoutWaitMax))
		}
		next(w, r)
	}
}

func (g *logoutGate) add(key string, n int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.waits[key] += n; g.waits[key] <= 0 {
		delete(g.waits, key)
	}
}

func (g *logoutGate) busy(key string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waits[key] > 0
}

// idle returns once no WaitForUpdates call of session key runs, or at
// deadline.
func (g *logoutGate) idle(key string, deadline time.Time) {
	for g.busy(key) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
}

// sessionKey is the session a request belongs to: the cookie or header
// govmomi's clients send.
func sessionKey(r *http.Request) string {
	if c, err := r.Cookie("vmware_soap_session"); err == nil && c.Value != "" {
		return c.Value
	}
	return r.Header.Get("vmware-api-session-id")
}
