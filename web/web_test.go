package web

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

const testToken = "admin-token-0123456789"

// testNow is the fixed clock of the tests.
var testNow = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

// fakeBackend is an in-memory Backend.
type fakeBackend struct {
	mu          sync.Mutex
	machines    []api.Machine
	machinesErr error
	password    string
	sessions    map[string]string // id → CSRF token
	next        int
	resyncs     []string // "machine/disk" of each StartResync
	resyncErr   error
	ps          api.ProcessServer
	psErr       error

	fakeVMware   // vCenters, inventory, policies, jobs (vmware_test.go)
	fakeRecovery // plans, failovers, points (recovery_test.go)
	fakeAlerts   // alerts, events, notifications (alerts_test.go)
	fakeConsole  // history, tags, policies, groups, machine events (console_test.go)
	fakePSs      // process servers and switches (processservers_test.go)
}

var _ Backend = (*fakeBackend)(nil)

func newFakeBackend(ms ...api.Machine) *fakeBackend {
	return &fakeBackend{machines: ms, sessions: map[string]string{}, ps: api.ProcessServer{
		BacklogBytes: 12 << 20, BacklogAge: 3 * time.Second, UploadRate: 20 << 20, Compression: 2.4,
		CacheFree: 0.62, CacheFreeB: 40 << 30, CacheState: api.CacheOK, Target: "file:///var/lib/asr/target"}}
}

func (b *fakeBackend) ProcessServer(context.Context) (api.ProcessServer, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ps, b.psErr
}

func (b *fakeBackend) Machines(context.Context) ([]api.Machine, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.machines, b.machinesErr
}

func (b *fakeBackend) CheckSecret(_ context.Context, s string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return s == testToken || (b.password != "" && s == b.password)
}

func (b *fakeBackend) HasPassword(context.Context) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.password != ""
}

func (b *fakeBackend) SetPassword(_ context.Context, pw string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(pw) < 12 {
		return errors.New("too short")
	}
	b.password = pw
	return nil
}

func (b *fakeBackend) CreateSession(context.Context) (string, string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.next++
	id, csrf := fmt.Sprintf("session-%d", b.next), fmt.Sprintf("csrf-%d", b.next)
	b.sessions[id] = csrf
	return id, csrf, nil
}

func (b *fakeBackend) Session(_ context.Context, id string) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	csrf, ok := b.sessions[id]
	if !ok {
		return "", errors.New("no such session")
	}
	return csrf, nil
}

func (b *fakeBackend) DeleteSession(_ context.Context, id string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.sessions, id)
	return nil
}

func (b *fakeBackend) StartResync(_ context.Context, machineID, disk string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.resyncErr != nil {
		return b.resyncErr
	}
	b.resyncs = append(b.resyncs, machineID+"/"+disk)
	return nil
}

// newTestHandler returns a console on b with the fixed clock and no login
// delay.
func newTestHandler(t *testing.T, b *fakeBackend) *Handler {
	t.Helper()
	h := New(b, Options{ServerURL: "https://asr.example.com:8443", Now: func() time.Time { return testNow }})
	h.auth.loginDelay = 0
	h.settings.failDelay = 0
	return h
}

func serve(h http.Handler, r *http.Request) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func postForm(path string, form url.Values) *http.Request {
	r := httptest.NewRequest(http.MethodPost, path, strings.NewReader(form.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	return r
}

// withSession adds the session cookie to r.
func withSession(r *http.Request, id string) *http.Request {
	r.AddCookie(&http.Cookie{Name: sessionCookie, Value: id})
	return r
}

// mustLogin signs in with the admin token and returns the session id and its
// CSRF token.
func mustLogin(t *testing.T, h *Handler, b *fakeBackend) (id, csrf string) {
	t.Helper()
	w := serve(h, postForm("/login", url.Values{"secret": {testToken}}))
	if w.Code != http.StatusSeeOther {
		t.Fatalf("login: status %d, want 303; body:\n%s", w.Code, w.Body)
	}
	c := mustCookie(t, w, sessionCookie)
	csrf, err := b.Session(context.Background(), c.Value)
	if err != nil {
		t.Fatalf("login: session cookie %q names no session", c.Value)
	}
	return c.Value, csrf
}

func mustCookie(t *testing.T, w *httptest.ResponseRecorder, name string) *http.Cookie {
	t.Helper()
	for _, c := range w.Result().Cookies() {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no %s cookie in the response", name)
	return nil
}

func TestLoginWrongSecret(t *testing.T) {
	b := newFakeBackend()
	h := newTestHandler(t, b)
	h.auth.loginDelay = 30 * time.Millisecond

	for _, secret := range []string{"", "guess", testToken + "x"} {
		start := time.Now()
		w := serve(h, postForm("/login", url.Values{"secret": {secret}}))
		if w.Code != http.StatusUnauthorized {
			t.Errorf("secret %q: status %d, want 401", secret, w.Code)
		}
		if !strings.Contains(w.Body.String(), "neither the admin token nor the console password") {
			t.Errorf("secret %q: no error text in the page:\n%s", secret, w.Body)
		}
		if !strings.Contains(w.Body.String(), `aria-invalid="true"`) {
			t.Errorf("secret %q: the field is not marked invalid", secret)
		}
		if len(w.Result().Cookies()) != 0 {
			t.Errorf("secret %q: cookies set: %v", secret, w.Result().Cookies())
		}
		if d := time.Since(start); d < h.auth.loginDelay {
			t.Errorf("secret %q: answered after %v, want at least %v", secret, d, h.auth.loginDelay)
		}
	}
	if len(b.sessions) != 0 {
		t.Errorf("sessions created: %v", b.sessions)
	}
}

func TestLoginRightSecret(t *testing.T) {
	b := newFakeBackend()
	b.password = "correct horse battery"
	h := newTestHandler(t, b)

	for _, secret := range []string{testToken, b.password} {
		w := serve(h, postForm("/login", url.Values{"secret": {secret}}))
		if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/" {
			t.Fatalf("status %d, Location %q; want 303 to /", w.Code, w.Header().Get("Location"))
		}
		c := mustCookie(t, w, sessionCookie)
		if !c.HttpOnly || !c.Secure || c.SameSite != http.SameSiteStrictMode || c.Path != "/" {
			t.Errorf("cookie %+v: want HttpOnly, Secure, SameSite=Strict, Path=/", c)
		}
		if _, ok := b.sessions[c.Value]; !ok {
			t.Errorf("cookie %q names no session", c.Value)
		}

		// The session opens the machines page, and the login page sends
		// a signed-in browser there.
		if w := serve(h, withSession(httptest.NewRequest("GET", "/", nil), c.Value)); w.Code != http.StatusOK {
			t.Errorf("GET / with the session: status %d", w.Code)
		}
		w = serve(h, withSession(httptest.NewRequest("GET", "/login", nil), c.Value))
		if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/" {
			t.Errorf("GET /login signed in: status %d, Location %q; want 303 to /", w.Code, w.Header().Get("Location"))
		}
	}
}

func TestLoginReplacesSession(t *testing.T) {
	b := newFakeBackend()
	h := newTestHandler(t, b)
	old, _ := mustLogin(t, h, b)
	w := serve(h, withSession(postForm("/login", url.Values{"secret": {testToken}}), old))
	if w.Code != http.StatusSeeOther {
		t.Fatalf("status %d", w.Code)
	}
	if _, ok := b.sessions[old]; ok {
		t.Error("the replaced session is still live")
	}
}

func TestLoginCrossOrigin(t *testing.T) {
	b := newFakeBackend()
	h := newTestHandler(t, b)
	for _, tt := range []struct {
		header, value string
		want          int
	}{
		{"Origin", "https://evil.example", http.StatusForbidden},
		{"Origin", "null", http.StatusForbidden},
		{"Sec-Fetch-Site", "cross-site", http.StatusForbidden},
		{"Sec-Fetch-Site", "same-site", http.StatusForbidden},
		{"Sec-Fetch-Site", "same-origin", http.StatusSeeOther},
		{"Origin", "https://example.com", http.StatusSeeOther}, // httptest's Host
	} {
		r := postForm("/login", url.Values{"secret": {testToken}})
		r.Header.Set(tt.header, tt.value)
		if w := serve(h, r); w.Code != tt.want {
			t.Errorf("%s: %s: status %d, want %d", tt.header, tt.value, w.Code, tt.want)
		}
	}
}

func TestRequireSession(t *testing.T) {
	b := newFakeBackend()
	h := newTestHandler(t, b)

	for _, path := range []string{"/", "/settings"} {
		w := serve(h, httptest.NewRequest("GET", path, nil))
		if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/login" {
			t.Errorf("GET %s: status %d, Location %q; want 303 to /login", path, w.Code, w.Header().Get("Location"))
		}
	}

	// An expired session is sent to login too, and its cookie dropped.
	w := serve(h, withSession(httptest.NewRequest("GET", "/", nil), "expired"))
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/login" {
		t.Errorf("GET / expired: status %d, Location %q; want 303 to /login", w.Code, w.Header().Get("Location"))
	}
	if c := mustCookie(t, w, sessionCookie); c.MaxAge >= 0 {
		t.Errorf("expired session cookie not cleared: %+v", c)
	}

	// htmx must not follow a redirect into the table: it gets HX-Redirect.
	r := withSession(httptest.NewRequest("GET", "/fragments/machines", nil), "expired")
	r.Header.Set("HX-Request", "true")
	w = serve(h, r)
	if w.Code != http.StatusUnauthorized || w.Header().Get("HX-Redirect") != "/login" {
		t.Errorf("fragment: status %d, HX-Redirect %q; want 401 and /login", w.Code, w.Header().Get("HX-Redirect"))
	}
	w = serve(h, httptest.NewRequest("GET", "/fragments/machines", nil))
	if w.Header().Get("HX-Redirect") != "/login" {
		t.Errorf("fragment without HX-Request: HX-Redirect %q, want /login", w.Header().Get("HX-Redirect"))
	}
}

func TestLogoutCSRF(t *testing.T) {
	b := newFakeBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)

	for name, form := range map[string]url.Values{
		"no token":    {},
		"wrong token": {"csrf": {"csrf-999"}},
	} {
		if w := serve(h, withSession(postForm("/logout", form), id)); w.Code != http.StatusForbidden {
			t.Errorf("%s: status %d, want 403", name, w.Code)
		}
	}
	r := withSession(postForm("/logout", nil), id)
	r.Header.Set("X-CSRF-Token", "wrong")
	if w := serve(h, r); w.Code != http.StatusForbidden {
		t.Errorf("wrong header token: status %d, want 403", w.Code)
	}
	if _, ok := b.sessions[id]; !ok {
		t.Fatal("a rejected logout ended the session")
	}

	w := serve(h, withSession(postForm("/logout", url.Values{"csrf": {csrf}}), id))
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/login" {
		t.Fatalf("logout: status %d, Location %q; want 303 to /login", w.Code, w.Header().Get("Location"))
	}
	if c := mustCookie(t, w, sessionCookie); c.MaxAge >= 0 || c.Value != "" {
		t.Errorf("cookie not cleared: %+v", c)
	}
	if _, ok := b.sessions[id]; ok {
		t.Error("session still live after logout")
	}
	if w := serve(h, withSession(httptest.NewRequest("GET", "/", nil), id)); w.Code != http.StatusSeeOther {
		t.Errorf("GET / after logout: status %d, want 303", w.Code)
	}
}

func TestLogoutHTMXHeader(t *testing.T) {
	b := newFakeBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	r := withSession(httptest.NewRequest("POST", "/logout", nil), id)
	r.Header.Set("HX-Request", "true")
	r.Header.Set("X-CSRF-Token", csrf)
	w := serve(h, r)
	if w.Header().Get("HX-Redirect") != "/login" {
		t.Fatalf("status %d, HX-Redirect %q; want /login", w.Code, w.Header().Get("HX-Redirect"))
	}
	if _, ok := b.sessions[id]; ok {
		t.Error("session still live after logout")
	}
}

func TestSetPassword(t *testing.T) {
	b := newFakeBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	set := func(form url.Values) *httptest.ResponseRecorder {
		return serve(h, withSession(postForm("/settings/password", form), id))
	}

	// No console password yet: the machines page suggests one.
	w := serve(h, withSession(httptest.NewRequest("GET", "/", nil), id))
	if !strings.Contains(w.Body.String(), "You are logged in with the admin token.") {
		t.Error("no banner suggesting a console password")
	}

	const pw = "correct horse battery"
	for name, form := range map[string]url.Values{
		"no token":    {"password": {pw}, "confirm": {pw}},
		"wrong token": {"password": {pw}, "confirm": {pw}, "csrf": {"csrf-999"}},
	} {
		if w := set(form); w.Code != http.StatusForbidden {
			t.Errorf("%s: status %d, want 403", name, w.Code)
		}
	}
	if b.password != "" {
		t.Fatal("password set without a CSRF token")
	}

	for _, tt := range []struct {
		name, pw, confirm, want string
	}{
		{"short", "short", "short", "at least 12 characters"},
		{"mismatch", pw, pw + "!", "differ"},
	} {
		w := set(url.Values{"password": {tt.pw}, "confirm": {tt.confirm}, "csrf": {csrf}})
		if w.Code != http.StatusUnprocessableEntity || !strings.Contains(w.Body.String(), tt.want) {
			t.Errorf("%s: status %d, want 422 with %q", tt.name, w.Code, tt.want)
		}
	}

	w = set(url.Values{"password": {pw}, "confirm": {pw}, "csrf": {csrf}})
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/settings?saved=1" {
		t.Fatalf("set: status %d, Location %q; body:\n%s", w.Code, w.Header().Get("Location"), w.Body)
	}
	if b.password != pw {
		t.Fatalf("password %q, want %q", b.password, pw)
	}
	w = serve(h, withSession(httptest.NewRequest("GET", "/settings?saved=1", nil), id))
	if !strings.Contains(w.Body.String(), "The console password is saved.") {
		t.Error("settings page does not confirm the change")
	}
	w = serve(h, withSession(httptest.NewRequest("GET", "/", nil), id))
	if strings.Contains(w.Body.String(), "You are logged in with the admin token.") {
		t.Error("password banner still shown")
	}

	// Changing it takes the current password or the admin token.
	const pw2 = "another long passphrase"
	w = set(url.Values{"current": {"wrong"}, "password": {pw2}, "confirm": {pw2}, "csrf": {csrf}})
	if w.Code != http.StatusUnprocessableEntity || b.password != pw {
		t.Errorf("wrong current password: status %d, password %q", w.Code, b.password)
	}
	w = set(url.Values{"current": {pw}, "password": {pw2}, "confirm": {pw2}, "csrf": {csrf}})
	if w.Code != http.StatusSeeOther || b.password != pw2 {
		t.Errorf("change: status %d, password %q", w.Code, b.password)
	}

	// The new password signs in.
	w = serve(h, postForm("/login", url.Values{"secret": {pw2}}))
	if w.Code != http.StatusSeeOther {
		t.Errorf("login with the new password: status %d", w.Code)
	}
}

func TestSecurityHeaders(t *testing.T) {
	b := newFakeBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for _, r := range []*http.Request{
		httptest.NewRequest("GET", "/login", nil),
		postForm("/login", url.Values{"secret": {"wrong"}}),
		withSession(httptest.NewRequest("GET", "/", nil), id),
		withSession(httptest.NewRequest("GET", "/fragments/machines", nil), id),
		withSession(httptest.NewRequest("GET", "/settings", nil), id),
		httptest.NewRequest("GET", asset("asr.css"), nil),
		httptest.NewRequest("GET", "/nowhere", nil),
		httptest.NewRequest("GET", "/", nil),
	} {
		w := serve(h, r)
		hdr := w.Header()
		for name, want := range map[string]string{
			"X-Content-Type-Options": "nosniff",
			"Referrer-Policy":        "same-origin",
			"X-Frame-Options":        "DENY",
		} {
			if got := hdr.Get(name); got != want {
				t.Errorf("%s %s: %s %q, want %q", r.Method, r.URL, name, got, want)
			}
		}
		csp := hdr.Get("Content-Security-Policy")
		for _, want := range []string{"default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"} {
			if !strings.Contains(csp, want) {
				t.Errorf("%s %s: CSP %q lacks %q", r.Method, r.URL, csp, want)
			}
		}
		if strings.Contains(csp, "unsafe") {
			t.Errorf("%s %s: CSP %q allows unsafe sources", r.Method, r.URL, csp)
		}
	}
}

// TestNoInlineCode checks the pages keep to the CSP: every script is a file,
// no element has a style attribute or an event handler.
func TestNoInlineCode(t *testing.T) {
	b := newFakeBackend(testMachines()...)
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for _, r := range []*http.Request{
		httptest.NewRequest("GET", "/login", nil),
		withSession(httptest.NewRequest("GET", "/", nil), id),
		withSession(httptest.NewRequest("GET", "/machines", nil), id),
		withSession(httptest.NewRequest("GET", "/machines/"+resyncMachine.Name, nil), id),
		withSession(httptest.NewRequest("GET", "/policies", nil), id),
		withSession(httptest.NewRequest("GET", "/policies/gold/edit", nil), id),
		withSession(httptest.NewRequest("GET", "/groups", nil), id),
		withSession(httptest.NewRequest("GET", "/infrastructure", nil), id),
		withSession(httptest.NewRequest("GET", "/no/such/page", nil), id),
		withSession(httptest.NewRequest("GET", "/settings", nil), id),
	} {
		body := serve(h, r).Body.String()
		for i, s := range strings.Split(body, "<script")[1:] {
			tag := s[:strings.Index(s, ">")]
			if !strings.Contains(tag, ` src="/static/`) || !strings.HasPrefix(s[len(tag):], "></script>") {
				t.Errorf("%s: script %d is inline: <script%s", r.URL, i, s[:min(len(s), 80)])
			}
		}
		for _, bad := range []string{" style=", " onclick=", " onload=", "hx-on", "<style", "javascript:", "http://", "https://fonts"} {
			if strings.Contains(body, bad) {
				t.Errorf("%s: page contains %q", r.URL, bad)
			}
		}
		if !strings.Contains(body, `<meta name="htmx-config"`) {
			t.Errorf("%s: no htmx-config meta", r.URL)
		}
	}
}

func TestMachinesPolling(t *testing.T) {
	b := newFakeBackend(testMachines()...)
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)

	page := serve(h, withSession(httptest.NewRequest("GET", "/machines", nil), id)).Body.String()
	for _, want := range []string{
		`hx-get="/fragments/machines"`, `hx-trigger="every 2s"`, `hx-swap="outerHTML"`,
		`hx-headers="{&#34;X-CSRF-Token&#34;:&#34;` + csrf + `&#34;}"`,
		`<input type="hidden" name="csrf" value="` + csrf + `">`,
	} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %s", want)
		}
	}

	frag := serve(h, withSession(httptest.NewRequest("GET", "/fragments/machines", nil), id))
	body := frag.Body.String()
	if !strings.HasPrefix(body, `<section id="machines"`) || !strings.HasSuffix(body, "</section>") {
		t.Errorf("fragment is not the machines section alone:\n%.200s", body)
	}
	if !strings.Contains(page, body) {
		t.Error("the page does not contain the fragment as served alone")
	}
}

func TestMachinesError(t *testing.T) {
	b := newFakeBackend()
	b.machinesErr = errors.New("database is locked")
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)

	w := serve(h, withSession(httptest.NewRequest("GET", "/", nil), id))
	if w.Code != http.StatusInternalServerError || !strings.Contains(w.Body.String(), "database is locked") {
		t.Errorf("page: status %d, want 500 with the error", w.Code)
	}
	// htmx swaps only successful responses, and the error must replace the
	// stale table.
	w = serve(h, withSession(httptest.NewRequest("GET", "/fragments/machines", nil), id))
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), "database is locked") {
		t.Errorf("fragment: status %d, want 200 with the error", w.Code)
	}
	if !strings.Contains(w.Body.String(), `hx-trigger="every 2s"`) {
		t.Error("the error fragment stops polling")
	}
}

func TestStatic(t *testing.T) {
	h := newTestHandler(t, newFakeBackend())
	for _, tt := range []struct {
		name, contentType string
	}{
		{"asr.css", "text/css; charset=utf-8"},
		{"htmx.min.js", "text/javascript; charset=utf-8"},
		{"favicon.svg", "image/svg+xml"},
	} {
		w := serve(h, httptest.NewRequest("GET", asset(tt.name), nil))
		if w.Code != http.StatusOK || w.Header().Get("Content-Type") != tt.contentType {
			t.Errorf("%s: status %d, Content-Type %q; want 200, %q", tt.name, w.Code, w.Header().Get("Content-Type"), tt.contentType)
		}
		if w.Body.Len() == 0 {
			t.Errorf("%s: empty", tt.name)
		}
		if cc := w.Header().Get("Cache-Control"); !strings.Contains(cc, "immutable") {
			t.Errorf("%s: versioned URL has Cache-Control %q", tt.name, cc)
		}
		etag := w.Header().Get("ETag")

		// Unversioned (or stale) URLs revalidate.
		w = serve(h, httptest.NewRequest("GET", "/static/"+tt.name, nil))
		if cc := w.Header().Get("Cache-Control"); w.Code != http.StatusOK || !strings.Contains(cc, "no-cache") {
			t.Errorf("%s unversioned: status %d, Cache-Control %q", tt.name, w.Code, cc)
		}
		r := httptest.NewRequest("GET", "/static/"+tt.name, nil)
		r.Header.Set("If-None-Match", etag)
		if w := serve(h, r); w.Code != http.StatusNotModified {
			t.Errorf("%s If-None-Match: status %d, want 304", tt.name, w.Code)
		}
	}
	for _, p := range []string{"/static/", "/static/nope.js", "/static/../web.go", "/static/static/asr.css"} {
		if w := serve(h, httptest.NewRequest("GET", p, nil)); w.Code != http.StatusNotFound {
			t.Errorf("GET %s: status %d, want 404", p, w.Code)
		}
	}
	if w := serve(h, httptest.NewRequest("POST", asset("asr.css"), nil)); w.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST static: status %d, want 405", w.Code)
	}
}

// TestMountedInChi checks the console works mounted at "/" of a chi router
// beside an API, as the server mounts it.
func TestMountedInChi(t *testing.T) {
	b := newFakeBackend(protectedMachine)
	h := newTestHandler(t, b)
	root := chi.NewRouter()
	root.Get("/api/v1/version", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("api")) })
	root.Mount("/", h)

	if w := serve(root, httptest.NewRequest("GET", "/api/v1/version", nil)); w.Body.String() != "api" {
		t.Errorf("API: %q", w.Body)
	}
	id, _ := mustLogin(t, h, b)
	for _, p := range []string{"/", "/fragments/machines", "/settings", "/login", asset("asr.css")} {
		r := httptest.NewRequest("GET", p, nil)
		if p != "/login" {
			r = withSession(r, id)
		}
		if w := serve(root, r); w.Code != http.StatusOK {
			t.Errorf("GET %s through chi: status %d", p, w.Code)
		}
	}
	if w := serve(root, postForm("/login", url.Values{"secret": {testToken}})); w.Code != http.StatusSeeOther {
		t.Errorf("POST /login through chi: status %d", w.Code)
	}
}

// TestResync covers the resync confirmation and its POST: the CSRF token is
// required, unknown machines and disks are refused without starting
// anything, and a backend refusal shows on the page.
func TestResync(t *testing.T) {
	b := newFakeBackend(resyncMachine, protectedMachine)
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	path := "/machines/" + resyncMachine.ID + "/resync"

	// The machines page links to the confirmation, which asks before
	// starting anything.
	w := serve(h, withSession(httptest.NewRequest("GET", "/machines", nil), id))
	if !strings.Contains(w.Body.String(), `href="`+path+`"`) {
		t.Errorf("the machines page has no link to %s", path)
	}
	w = serve(h, withSession(httptest.NewRequest("GET", path, nil), id))
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), "Resync every disk of this machine?") {
		t.Fatalf("confirmation page: status %d:\n%s", w.Code, w.Body)
	}
	if len(b.resyncs) != 0 {
		t.Fatalf("GET started a resync: %v", b.resyncs)
	}

	for _, tt := range []struct {
		name   string
		path   string
		form   url.Values
		status int
	}{
		{"no csrf", path, url.Values{"disk": {"sdb"}}, http.StatusForbidden},
		{"wrong csrf", path, url.Values{"disk": {"sdb"}, "csrf": {"x"}}, http.StatusForbidden},
		{"unknown machine", "/machines/nope/resync", url.Values{"csrf": {csrf}}, http.StatusNotFound},
		{"unknown disk", path, url.Values{"disk": {"sdz"}, "csrf": {csrf}}, http.StatusNotFound},
	} {
		w := serve(h, withSession(postForm(tt.path, tt.form), id))
		if w.Code != tt.status {
			t.Errorf("%s: status %d, want %d", tt.name, w.Code, tt.status)
		}
	}
	if w := serve(h, withSession(httptest.NewRequest("GET", path+"?disk=sdz", nil), id)); w.Code != http.StatusNotFound {
		t.Errorf("confirmation of an unknown disk: status %d, want 404", w.Code)
	}
	if len(b.resyncs) != 0 {
		t.Fatalf("refused requests started resyncs: %v", b.resyncs)
	}

	b.resyncErr = errors.New("disk sdb is still in its initial replication")
	w = serve(h, withSession(postForm(path, url.Values{"disk": {"sdb"}, "csrf": {csrf}}), id))
	if w.Code != http.StatusUnprocessableEntity || !strings.Contains(w.Body.String(), "still in its initial replication") {
		t.Errorf("refused resync: status %d, body:\n%s", w.Code, w.Body)
	}
	b.resyncErr = nil

	w = serve(h, withSession(postForm(path, url.Values{"disk": {"sdb"}, "csrf": {csrf}}), id))
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/machines/files-02" {
		t.Errorf("resync: status %d, Location %q; want 303 to the machine's page", w.Code, w.Header().Get("Location"))
	}
	w = serve(h, withSession(postForm(path, url.Values{"csrf": {csrf}}), id))
	if w.Code != http.StatusSeeOther {
		t.Errorf("resync of every disk: status %d", w.Code)
	}
	if want := []string{resyncMachine.ID + "/sdb", resyncMachine.ID + "/"}; !slices.Equal(b.resyncs, want) {
		t.Errorf("resyncs started %v, want %v", b.resyncs, want)
	}
}

func TestResyncStatus(t *testing.T) {
	for _, tt := range []struct {
		rs   api.Resync
		want string
	}{
		{api.Resync{State: api.ResyncRunning}, "Running: starting"},
		{api.Resync{State: api.ResyncRunning, Total: 200, Compared: 90, Sent: 2048}, "Running: 45% compared, 2 KiB sent"},
		{api.Resync{State: api.ResyncScheduled}, "Starts as soon as the agent is connected"},
		{api.Resync{State: api.ResyncScheduled, Scheduled: testNow.Add(3 * time.Hour)}, "Scheduled for 2025-06-01 15:00:00 UTC (in 3 h 0 min)"},
		{api.Resync{State: api.ResyncScheduled, Attempts: 2, Scheduled: testNow.Add(2 * time.Minute)}, "Retry at 2025-06-01 12:02:00 UTC (in 2 min)"},
		{api.Resync{State: api.ResyncFailed, Attempts: 1}, "Failed after 1 attempt"},
	} {
		if got := resyncStatus(&tt.rs, testNow); got != tt.want {
			t.Errorf("%+v: %q, want %q", tt.rs, got, tt.want)
		}
	}
}

// TestProcessServerPanel: the machines page shows the process server's
// figures, marks a cache disk in warning or critical, and leaves the panel
// out (not the machines) when the figures cannot be read.
func TestProcessServerPanel(t *testing.T) {
	b := newFakeBackend(protectedMachine)
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	page := func() string {
		return serve(h, withSession(httptest.NewRequest("GET", "/fragments/machines", nil), id)).Body.String()
	}
	body := page()
	for _, want := range []string{"Process server", "12 MiB", "(oldest 3.0 s)", "20 MiB/s", "2.4x", "62% (40 GiB)", "file:///var/lib/asr/target"} {
		if !strings.Contains(body, want) {
			t.Errorf("panel lacks %q", want)
		}
	}
	if strings.Contains(body, "critical") || strings.Contains(body, "badge-warn") {
		t.Error("a healthy cache shows a warning")
	}
	b.mu.Lock()
	b.ps.CacheState, b.ps.CacheFree = api.CacheCritical, 0.2
	b.mu.Unlock()
	if body := page(); !strings.Contains(body, "critical: agents are held back") || !strings.Contains(body, "cache-critical") {
		t.Errorf("critical cache not shown:\n%s", body)
	}
	b.mu.Lock()
	b.ps.CacheState, b.ps.CacheFree = api.CacheWarning, 0.28
	b.mu.Unlock()
	if body := page(); !strings.Contains(body, `<strong class="badge badge-warn">warning</strong>`) {
		t.Errorf("warning not shown:\n%s", body)
	}
	b.mu.Lock()
	b.psErr = errors.New("down")
	b.mu.Unlock()
	if body := page(); strings.Contains(body, "Process server") || !strings.Contains(body, protectedMachine.Name) {
		t.Errorf("figures unavailable: the panel should go, the machines stay:\n%s", body)
	}
}
