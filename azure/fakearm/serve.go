package fakearm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
)

// Server serves a fake ARM over HTTPS on the loopback interface, for the
// real asr binary (`asr server --azure-arm-endpoint URL
// --azure-authority-host URL --azure-ca-file CAFile`, with Env in its
// environment), together with the two endpoints of a Microsoft Entra ID
// tenant that azidentity's client-secret credential uses: the tenant's
// OpenID configuration and its token endpoint, which issues a random
// token for the one client it knows. ARM requests without a token it
// issued are refused (401): the binary's production credential path
// (DefaultAzureCredential, from the environment) is what reaches it.
//
// The SDK's fake servers are policy.Transporters that find the operation
// a request is for in the request's context (runtime.CtxAPINameKey),
// which the client's pipeline puts there and HTTP does not carry: the
// handler works it out from the method and the path, for the operations
// asr uses (apiName). A long-running operation's polls (the fake's
// PATH/get/fake/status) go to the operation that started at PATH. Each
// answer still in progress carries Retry-After-Ms, as ARM's carry a
// Retry-After, so the binary's pollers do not wait their default 5 s.
type Server struct {
	// URL is https://127.0.0.1:PORT: the ARM endpoint and the authority
	// host both.
	URL string
	// CAFile is a PEM file of the server's certificate.
	CAFile string
	// Tenant, ClientID and ClientSecret are the credential the token
	// endpoint accepts.
	Tenant, ClientID, ClientSecret string

	arm *ARM
	t   testing.TB

	mu       sync.Mutex
	tokens   map[string]bool
	inflight map[string]string // path of a running operation -> its API
	refused  int
}

// pollSuffix is what the SDK's fake poller adds to a long-running
// operation's path to poll it.
const pollSuffix = "/get/fake/status"

// Serve starts serving f until t ends.
func Serve(t testing.TB, f *ARM) *Server {
	t.Helper()
	s := &Server{arm: f, t: t, Tenant: "asr-e2e-tenant", ClientID: "asr-e2e-client",
		tokens: map[string]bool{}, inflight: map[string]string{}}
	s.ClientSecret = randomHex(16)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /"+s.Tenant+"/v2.0/.well-known/openid-configuration", s.openID)
	mux.HandleFunc("POST /"+s.Tenant+"/oauth2/v2.0/token", s.token)
	mux.HandleFunc("/subscriptions/", s.serveARM)
	srv := httptest.NewUnstartedServer(mux)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	s.URL = srv.URL
	s.CAFile = filepath.Join(t.TempDir(), "fake-arm-ca.pem")
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(s.CAFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// Env is the environment azidentity's EnvironmentCredential takes the
// server's client credential from.
func (s *Server) Env() []string {
	return []string{"AZURE_TENANT_ID=" + s.Tenant, "AZURE_CLIENT_ID=" + s.ClientID, "AZURE_CLIENT_SECRET=" + s.ClientSecret}
}

// Tokens counts the tokens issued; Refused the ARM requests refused for
// want of one.
func (s *Server) Tokens() (issued, refused int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.tokens), s.refused
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// openID is the tenant's OpenID configuration, as MSAL's tenant
// discovery reads it: the issuer must be on the authority's host.
func (s *Server) openID(w http.ResponseWriter, r *http.Request) {
	base := s.URL + "/" + s.Tenant
	writeJSON(w, http.StatusOK, map[string]string{
		"authorization_endpoint": base + "/oauth2/v2.0/authorize",
		"token_endpoint":         base + "/oauth2/v2.0/token",
		"issuer":                 base + "/v2.0",
	})
}

// token issues a token for the client credentials grant of the known
// client, for ARM's scope (the ARM endpoint's URL, /.default).
func (s *Server) token(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "client_credentials" || r.PostForm.Get("client_id") != s.ClientID ||
		r.PostForm.Get("client_secret") != s.ClientSecret {
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "invalid_client", "error_description": "unknown client or secret"})
		return
	}
	// MSAL adds openid, offline_access and profile to the scope asked.
	if scope := r.PostForm.Get("scope"); !slices.Contains(strings.Fields(scope), s.URL+"/.default") {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "invalid_scope", "error_description": "scope " + scope})
		return
	}
	tok := randomHex(24)
	s.mu.Lock()
	s.tokens[tok] = true
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"token_type": "Bearer", "access_token": tok, "expires_in": 3600, "ext_expires_in": 3600})
}

// serveARM answers an ARM request through the fake, as its transport
// would in process.
func (s *Server) serveARM(w http.ResponseWriter, r *http.Request) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	s.mu.Lock()
	ok = ok && s.tokens[tok]
	if !ok {
		s.refused++
	}
	s.mu.Unlock()
	if !ok {
		armError(w, http.StatusUnauthorized, "InvalidAuthenticationToken", "no token this tenant issued")
		return
	}
	path := r.URL.Path
	base, poll := strings.CutSuffix(path, pollSuffix)
	var api string
	if poll {
		s.mu.Lock()
		api = s.inflight[base]
		s.mu.Unlock()
	} else {
		api = apiName(r.Method, path)
	}
	if api == "" {
		s.t.Errorf("fake ARM: unexpected request %s %s", r.Method, path)
		armError(w, http.StatusNotFound, "NoRoute", "the fake ARM has no operation at "+r.Method+" "+path)
		return
	}
	req := r.Clone(context.WithValue(r.Context(), runtime.CtxAPINameKey{}, api))
	req.RequestURI = ""
	req.URL.Scheme, req.URL.Host = "https", r.Host
	resp, err := s.arm.Do(req)
	if err != nil {
		var re *azcore.ResponseError
		if errors.As(err, &re) {
			armError(w, re.StatusCode, re.ErrorCode, "")
			return
		}
		armError(w, http.StatusInternalServerError, "InternalError", err.Error())
		return
	}
	defer resp.Body.Close()
	s.mu.Lock()
	if resp.Header.Get("Fake-Poller-Status") == "InProgress" {
		s.inflight[base] = api
	} else {
		delete(s.inflight, base)
	}
	s.mu.Unlock()
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	if resp.Header.Get("Fake-Poller-Status") == "InProgress" {
		w.Header().Set("Retry-After-Ms", "20")
	}
	w.WriteHeader(resp.StatusCode)
	io.Copy(w, resp.Body)
}

// armError answers an ARM error: its code in x-ms-error-code and the
// body, as ARM does.
func armError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("x-ms-error-code", code)
	writeJSON(w, status, map[string]any{"error": map[string]string{"code": code, "message": msg}})
}

// apiName is the SDK's name of the operation a request is for (what the
// client's pipeline puts in CtxAPINameKey): the operations of the disks,
// snapshots, VMs, NICs and subnets asr calls; "" for any other.
func apiName(method, path string) string {
	_, rest, ok := strings.Cut(path, "/providers/")
	if !ok {
		return ""
	}
	parts := strings.Split(rest, "/")
	if len(parts) < 3 {
		return ""
	}
	provider, typ, action := strings.ToLower(parts[0]), strings.ToLower(parts[1]), ""
	switch {
	case len(parts) == 4:
		action = strings.ToLower(parts[3])
	case len(parts) == 5 && typ == "virtualnetworks" && strings.EqualFold(parts[3], "subnets"):
		typ = "subnets"
	case len(parts) != 3:
		return ""
	}
	client := map[string]string{
		"microsoft.compute/disks":             "DisksClient",
		"microsoft.compute/snapshots":         "SnapshotsClient",
		"microsoft.compute/virtualmachines":   "VirtualMachinesClient",
		"microsoft.network/networkinterfaces": "InterfacesClient",
		"microsoft.network/subnets":           "SubnetsClient",
	}[provider+"/"+typ]
	if client == "" {
		return ""
	}
	op := map[string]string{
		"GET":                 "Get",
		"PUT":                 "BeginCreateOrUpdate",
		"DELETE":              "BeginDelete",
		"GET instanceview":    "InstanceView",
		"POST begingetaccess": "BeginGrantAccess",
		"POST endgetaccess":   "BeginRevokeAccess",
		"POST deallocate":     "BeginDeallocate",
		"POST start":          "BeginStart",
	}[strings.TrimSpace(method+" "+action)]
	if op == "" {
		return ""
	}
	return client + "." + op
}
