package server_test

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The one-time login link the demo prints signs a browser in once: a
// session cookie and the machines page; used again, it leads to the login
// form and signs nobody in.
func TestLoginLinkSignsInOnce(t *testing.T) {
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
	get := func(url string, cookies ...*http.Cookie) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		for _, ck := range cookies {
			req.AddCookie(ck)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	link := r.srv.LoginLink()
	if !strings.HasPrefix(link, r.srv.URL()+"/login/link?t=") {
		t.Fatalf("login link %q", link)
	}
	resp := get(link)
	var session *http.Cookie
	for _, ck := range resp.Cookies() {
		if ck.Name == "asr_session" && ck.Value != "" {
			session = ck
		}
	}
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/" || session == nil {
		t.Fatalf("login link: %d to %q, cookies %v; want 303 to / with a session", resp.StatusCode, resp.Header.Get("Location"), resp.Cookies())
	}
	if resp := get(r.srv.URL()+"/", session); resp.StatusCode != http.StatusOK {
		t.Fatalf("the machines page with the link's session: %d", resp.StatusCode)
	}
	for _, again := range []string{link, r.srv.URL() + "/login/link?t=0123", r.srv.URL() + "/login/link"} {
		resp = get(again)
		if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" || len(resp.Cookies()) != 0 {
			t.Fatalf("%s: %d to %q, cookies %v; want 303 to /login and no session", again, resp.StatusCode, resp.Header.Get("Location"), resp.Cookies())
		}
	}
}
