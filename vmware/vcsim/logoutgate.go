package vcsim

import (
	"bytes"
	"encoding/xml"
	"io"
	"net/http"
	"regexp"
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
// session's WaitForUpdates(Ex) calls have returned, and ends them first
// the way a client would: a CancelWaitForUpdates on each one's
// collector, on behalf of the session. A wait past logoutWaitMax goes
// ahead anyway, so that the gate cannot hang a run itself.
type logoutGate struct {
	mu    sync.Mutex
	waits map[string]map[string]int // session key -> collector -> WaitForUpdates calls in the simulator
}

// logoutWaitMax bounds how long a Logout waits for its session's polls.
const logoutWaitMax = 2 * time.Minute

// maxSOAPBody bounds a request body the gate reads (a SOAP call is
// small; uploads go to /folder, not here).
const maxSOAPBody = 16 << 20

func newLogoutGate() *logoutGate { return &logoutGate{waits: map[string]map[string]int{}} }

// thisRE finds a call's managed object (its _this).
var thisRE = regexp.MustCompile(`<_this[^>]*>([^<]{1,200})</_this>`)

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
			pc := ""
			if m := thisRE.FindSubmatch(body); m != nil {
				pc = string(m[1])
			}
			g.add(key, pc, 1)
			defer g.add(key, pc, -1)
		case bytes.Contains(body, []byte("<Logout")):
			deadline := time.Now().Add(logoutWaitMax)
			for _, pc := range g.collectors(key) {
				cancelWait(next, r, pc)
			}
			g.idle(key, deadline)
		}
		next(w, r)
	}
}

func (g *logoutGate) add(key, pc string, n int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.waits[key]
	if m == nil {
		m = map[string]int{}
		g.waits[key] = m
	}
	if m[pc] += n; m[pc] <= 0 {
		delete(m, pc)
	}
	if len(m) == 0 {
		delete(g.waits, key)
	}
}

// collectors are the collectors of session key's calls in the simulator.
func (g *logoutGate) collectors(key string) []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	var pcs []string
	for pc := range g.waits[key] {
		if pc != "" {
			pcs = append(pcs, pc)
		}
	}
	return pcs
}

func (g *logoutGate) busy(key string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.waits[key]) > 0
}

// idle returns once no WaitForUpdates call of session key runs, or at
// deadline.
func (g *logoutGate) idle(key string, deadline time.Time) {
	for g.busy(key) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
}

// cancelWait serves a CancelWaitForUpdates of collector pc on behalf of
// r's session (its cookies and headers), its answer discarded.
func cancelWait(next http.HandlerFunc, r *http.Request, pc string) {
	var b bytes.Buffer
	b.WriteString(`<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><CancelWaitForUpdates xmlns="urn:vim25"><_this type="PropertyCollector">`)
	xml.EscapeText(&b, []byte(pc))
	b.WriteString(`</_this></CancelWaitForUpdates></soapenv:Body></soapenv:Envelope>`)
	req := r.Clone(r.Context())
	req.Body = io.NopCloser(&b)
	req.ContentLength = int64(b.Len())
	req.Header.Set("SOAPAction", "urn:vim25/8.0.0.0")
	next(discard{header: http.Header{}}, req)
}

// discard is a ResponseWriter that keeps nothing.
type discard struct{ header http.Header }

func (d discard) Header() http.Header       { return d.header }
func (discard) Write(p []byte) (int, error) { return len(p), nil }
func (discard) WriteHeader(int)             {}

// sessionKey is the session a request belongs to: the cookie or header
// govmomi's clients send.
func sessionKey(r *http.Request) string {
	if c, err := r.Cookie("vmware_soap_session"); err == nil && c.Value != "" {
		return c.Value
	}
	return r.Header.Get("vmware-api-session-id")
}
