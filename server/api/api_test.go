package api

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

func TestClientDo(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok" {
			w.WriteHeader(http.StatusUnauthorized)
			w.Write([]byte(`{"error": "missing or wrong admin token"}`))
			return
		}
		switch r.URL.Path {
		case "/api/v1/machines":
			w.Write([]byte(`[{"id": "1", "name": "vm1", "state": "protected", "disks": []}]`))
		case "/api/v1/plain":
			w.WriteHeader(http.StatusBadGateway)
			w.Write([]byte("  upstream gone \n"))
		default:
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"error": "no such thing"}`))
		}
	}))
	defer srv.Close()
	c := &Client{URL: srv.URL, Token: "tok", HTTP: srv.Client()}
	ctx := context.Background()
	var ms []Machine
	if err := c.Do(ctx, http.MethodGet, "/api/v1/machines", nil, &ms); err != nil || len(ms) != 1 || ms[0].Name != "vm1" || ms[0].State != StateProtected {
		t.Fatalf("machines: %+v, %v", ms, err)
	}
	for _, tc := range []struct {
		c    *Client
		path string
		want string
	}{
		{c, "/api/v1/nothing", "server: no such thing (HTTP 404)"},
		{c, "/api/v1/plain", "server: upstream gone (HTTP 502)"},
		{&Client{URL: srv.URL, Token: "wrong", HTTP: srv.Client()}, "/api/v1/machines", "server: missing or wrong admin token (HTTP 401)"},
	} {
		if err := tc.c.Do(ctx, http.MethodGet, tc.path, nil, nil); err == nil || err.Error() != tc.want {
			t.Errorf("GET %s: %v, want %q", tc.path, err, tc.want)
		}
	}
}

func TestNewClientRefuses(t *testing.T) {
	dir := t.TempDir()
	tok, ca := filepath.Join(dir, "token"), filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(tok, []byte("tok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ca, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		url, tok, ca, want string
	}{
		{"https://127.0.0.1:8443", filepath.Join(dir, "none"), ca, "admin token"},
		{"https://127.0.0.1:8443", tok, filepath.Join(dir, "none"), "server CA"},
		{"https://127.0.0.1:8443", tok, ca, "no certificate in PEM data"},
	} {
		if _, err := NewClient(tc.url, tc.tok, tc.ca); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewClient(%s, %s, %s): %v, want %q", tc.url, tc.tok, tc.ca, err, tc.want)
		}
	}
}

func TestReadSecretFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "secret")
	if err := os.WriteFile(p, []byte("  s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadSecretFile(p); err != nil || string(b) != "s3cret" {
		t.Errorf("ReadSecretFile = %q, %v", b, err)
	}
	if err := os.WriteFile(p, []byte("\n \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSecretFile(p); err == nil || !strings.Contains(err.Error(), "is empty") {
		t.Errorf("an empty secret file: %v", err)
	}
}

func TestPointViews(t *testing.T) {
	at := time.Date(2026, 12, 5, 10, 30, 0, 5, time.FixedZone("CET", 3600))
	if got := PointOf(replication.Point{ID: "42", Time: at, Kind: PointApp}); got != (PointJSON{ID: "42", Time: "2026-12-05T09:30:00.000000005Z", Kind: "app"}) {
		t.Errorf("PointOf = %+v", got)
	}
	gp := GroupPointOf(replication.GroupPoint{ID: "7", Time: at, Kind: PointCrash, Members: map[string]string{"id1": "3", "id2": "9"}},
		func(id string) string { return "vm-" + id })
	if gp.ID != "7" || gp.Kind != "crash" || gp.Time != "2026-12-05T09:30:00.000000005Z" || len(gp.Members) != 2 || gp.Members["vm-id1"] != "3" || gp.Members["vm-id2"] != "9" {
		t.Errorf("GroupPointOf = %+v", gp)
	}
}
