package server_test

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The one-time login link the demo prints: its GET shows a button (a
// POST of the token) and signs nobody in, however often it is fetched (a
// link previewer does not use it up); the POST signs the browser in once:
// a session cookie and the machines page; posted again, it leads to the
// login form and signs nobody in.
func TestLoginLinkSignsInOnce(t *testing.T) {
	t.Parallel()
	r := startServer(t, t.TempDir())
	caPEM, err := os.ReadFile(filepath.Join(r.dir, "srv", "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	c := &http.Client{
		Transport:     &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	do := func(req *http.Request, cookies ...*http.Cookie) (*http.Response, string) {
		t.Helper()
		for _, ck := range cookies {
			req.AddCookie(ck)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(b)
	}
	get := func(u string, cookies ...*http.Cookie) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		return do(req, cookies...)
	}
	post := func(tok string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, r.srv.URL()+"/login/link", strings.NewReader(url.Values{"t": {tok}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		resp, _ := do(req)
		return resp
	}
	link := r.srv.LoginLink()
	if !strings.HasPrefix(link, r.srv.URL()+"/login/link?t=") {
		t.Fatalf("login link %q", link)
	}
	u, _ := url.Parse(link)
	tok := u.Query().Get("t")
	// Fetched (a previewer, a browser's prefetch): a form, no session.
	for i := 0; i < 3; i++ {
		resp, body := get(link)
		if resp.StatusCode != http.StatusOK || len(resp.Cookies()) != 0 || !strings.Contains(body, `method="post" action="/login/link"`) ||
			!strings.Contains(body, `name="t" value="`+tok+`"`) {
			t.Fatalf("GET of the link: %d, cookies %v:\n%s", resp.StatusCode, resp.Cookies(), body)
		}
	}
	resp := post(tok)
	var session *http.Cookie
	for _, ck := range resp.Cookies() {
		if ck.Name == "asr_session" && ck.Value != "" {
			session = ck
		}
	}
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/" || session == nil {
		t.Fatalf("login link: %d to %q, cookies %v; want 303 to / with a session", resp.StatusCode, resp.Header.Get("Location"), resp.Cookies())
	}
	if resp, _ := get(r.srv.URL()+"/", session); resp.StatusCode != http.StatusOK {
		t.Fatalf("the machines page with the link's session: %d", resp.StatusCode)
	}
	for _, again := range []string{tok, "0123", ""} {
		resp = post(again)
		if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" || len(resp.Cookies()) != 0 {
			t.Fatalf("POST %q: %d to %q, cookies %v; want 303 to /login and no session", again, resp.StatusCode, resp.Header.Get("Location"), resp.Cookies())
		}
	}
	if resp, _ := get(r.srv.URL() + "/login/link"); resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" {
		t.Fatalf("GET without a token: %d to %q", resp.StatusCode, resp.Header.Get("Location"))
	}
}
