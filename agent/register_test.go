package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/replication/retry"
	"github.com/asrdr/asr/server/pki"
)

// fakeRegistrar is the server's side of registration, built from pki as the
// server builds it, with failures injected by count.
type fakeRegistrar struct {
	t    *testing.T
	srv  *httptest.Server
	ca   *pki.CA
	salt []byte
	kdf  replication.KDFParams
	key  enroll.ProofKey

	mu         sync.Mutex
	nonces     map[string]bool
	challenges int
	registers  int
	// challengeFail and registerFail are the statuses of the first
	// challenge and register requests (0: answer normally).
	challengeFail, registerFail []int
}

// cheapKDF keeps these tests fast: what is tested is the retry logic, not
// the derivation's cost.
var cheapKDF = replication.KDFParams{Time: 1, Memory: 64, Threads: 1}

func newFakeRegistrar(t *testing.T, passphrase string) *fakeRegistrar {
	t.Helper()
	ca, cert, err := pki.LoadOrCreate(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeRegistrar{t: t, ca: ca, salt: enroll.NewSalt(), kdf: cheapKDF, nonces: map[string]bool{}}
	if f.key, err = enroll.DeriveProofKey([]byte(passphrase), f.salt, f.kdf); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v1/agents/challenge", f.challenge)
	mux.HandleFunc("POST /api/v1/agents/register", f.register)
	f.srv = httptest.NewUnstartedServer(mux)
	f.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	f.srv.StartTLS()
	t.Cleanup(f.srv.Close)
	return f
}

func fail(w http.ResponseWriter, status int) {
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": fmt.Sprintf("injected %d", status)})
}

func (f *fakeRegistrar) challenge(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.challenges++
	if n := f.challenges - 1; n < len(f.challengeFail) && f.challengeFail[n] != 0 {
		fail(w, f.challengeFail[n])
		return
	}
	nonce := enroll.NewSalt()
	f.nonces[string(nonce)] = true
	json.NewEncoder(w).Encode(enroll.Challenge{Nonce: nonce, CAPEM: string(f.ca.CertPEM),
		Proof: enroll.ServerProof(f.key, nonce, f.ca.CertPEM), DataPort: 1, Salt: f.salt, KDF: f.kdf})
}

func (f *fakeRegistrar) register(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.registers++
	if n := f.registers - 1; n < len(f.registerFail) && f.registerFail[n] != 0 {
		fail(w, f.registerFail[n])
		return
	}
	var req enroll.RegisterRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || !f.nonces[string(req.Nonce)] {
		fail(w, http.StatusBadRequest)
		return
	}
	delete(f.nonces, string(req.Nonce))
	if !enroll.CheckProof(req.Proof, enroll.AgentProof(f.key, req.Nonce, req.Name, []byte(req.CSRPEM))) {
		fail(w, http.StatusForbidden)
		return
	}
	cert, _, err := f.ca.SignClient([]byte(req.CSRPEM), "id-"+req.Name)
	if err != nil {
		fail(w, http.StatusBadRequest)
		return
	}
	json.NewEncoder(w).Encode(enroll.RegisterResponse{MachineID: "id-" + req.Name, CertPEM: string(cert), DataPort: 1})
}

func (f *fakeRegistrar) counts() (challenges, registers int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.challenges, f.registers
}

// logHook is a slog handler that hands each record to fn.
type logHook struct{ fn func(slog.Record) }

func (h logHook) Enabled(context.Context, slog.Level) bool      { return true }
func (h logHook) Handle(_ context.Context, r slog.Record) error { h.fn(r); return nil }
func (h logHook) WithAttrs([]slog.Attr) slog.Handler            { return h }
func (h logHook) WithGroup(string) slog.Handler                 { return h }

// retryReasons collects the reason of each "retrying" record; onRetry, if
// set, runs with the number of retries so far.
type retryReasons struct {
	mu      sync.Mutex
	reasons []string
	onRetry func(n int)
}

func (rr *retryReasons) logger() *slog.Logger {
	return slog.New(logHook{func(r slog.Record) {
		if !strings.Contains(r.Message, "retrying") {
			return
		}
		var reason string
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "err" {
				reason = a.Value.String()
			}
			return true
		})
		rr.mu.Lock()
		rr.reasons = append(rr.reasons, reason)
		n := len(rr.reasons)
		rr.mu.Unlock()
		if rr.onRetry != nil {
			rr.onRetry(n)
		}
	}})
}

func (rr *retryReasons) get() []string {
	rr.mu.Lock()
	defer rr.mu.Unlock()
	return append([]string(nil), rr.reasons...)
}

var fastBackoff = retry.New(time.Millisecond, 4*time.Millisecond)

// An agent once gave up at the first failure: a server restarting or busy
// made it exit.
func TestRegisterRetriesUntilTheServerAnswers(t *testing.T) {
	f := newFakeRegistrar(t, "the-passphrase")
	f.challengeFail = []int{http.StatusServiceUnavailable, http.StatusTooManyRequests, http.StatusBadGateway}
	f.registerFail = []int{http.StatusConflict, http.StatusInternalServerError}
	var rr retryReasons
	dir := t.TempDir()
	st, err := registerRetry(context.Background(), rr.logger(), fastBackoff, f.srv.URL, []byte("the-passphrase\n"), "vm1", dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.MachineID != "id-vm1" {
		t.Errorf("machine id %q", st.MachineID)
	}
	if _, err := loadState(dir); err != nil {
		t.Errorf("state not saved: %v", err)
	}
	want := []string{"HTTP 503", "HTTP 429", "HTTP 502", "HTTP 409", "HTTP 500"}
	got := rr.get()
	if len(got) != len(want) {
		t.Fatalf("retries logged: %q, want one for each of %q", got, want)
	}
	for i := range want {
		if !strings.Contains(got[i], want[i]) {
			t.Errorf("retry %d logged %q, want the reason %s", i+1, got[i], want[i])
		}
	}
}

func TestRegisterRetriesWhileRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now: connection refused
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rr := retryReasons{onRetry: func(n int) {
		if n == 3 {
			cancel()
		}
	}}
	_, err = registerRetry(ctx, rr.logger(), fastBackoff, "https://"+addr, []byte("p"), "vm1", t.TempDir())
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("registerRetry = %v, want context.Canceled once the agent stops", err)
	}
	got := rr.get()
	if len(got) < 3 {
		t.Fatalf("retries logged: %q, want 3", got)
	}
	for _, r := range got {
		if !strings.Contains(r, "connection refused") {
			t.Errorf("retry logged %q, want the reason (connection refused)", r)
		}
	}
}

// The wait between tries ends when the agent stops, not when the wait does.
func TestRegisterWaitEndsWithContext(t *testing.T) {
	f := newFakeRegistrar(t, "the-passphrase")
	f.challengeFail = []int{http.StatusServiceUnavailable}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rr := retryReasons{onRetry: func(int) { cancel() }}
	hour := retry.New(time.Hour, time.Hour)
	_, err := registerRetry(ctx, rr.logger(), hour, f.srv.URL, []byte("the-passphrase"), "vm1", t.TempDir())
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("registerRetry = %v, want context.Canceled", err)
	}
	if c, _ := f.counts(); c != 1 {
		t.Errorf("%d challenges fetched, want 1", c)
	}
}

// A wrong passphrase, and what only an operator can fix, end registration
// at once: retrying would only hide the cause.
func TestRegisterFatalErrorsAreNotRetried(t *testing.T) {
	for _, tc := range []struct {
		what          string
		pass          string // the agent's passphrase
		tune          func(*fakeRegistrar)
		wantErr       error
		wantChallenge int
		wantRegister  int
	}{
		{what: "wrong passphrase (server proof)", pass: "not-it", wantErr: ErrWrongPassphrase, wantChallenge: 1},
		{what: "wrong passphrase (server says 403)", pass: "the-passphrase",
			tune:    func(f *fakeRegistrar) { f.registerFail = []int{http.StatusForbidden} },
			wantErr: ErrWrongPassphrase, wantChallenge: 1, wantRegister: 1},
		{what: "bad request", pass: "the-passphrase",
			tune:          func(f *fakeRegistrar) { f.registerFail = []int{http.StatusBadRequest} },
			wantChallenge: 1, wantRegister: 1},
		{what: "not an asr server", pass: "the-passphrase",
			tune:          func(f *fakeRegistrar) { f.challengeFail = []int{http.StatusNotFound} },
			wantChallenge: 1},
		{what: "absurd memory", pass: "the-passphrase",
			tune:    func(f *fakeRegistrar) { f.kdf.Memory = 4 << 20 }, // 4 GiB
			wantErr: enroll.ErrBadKDF, wantChallenge: 1},
		{what: "no salt (an older server)", pass: "the-passphrase",
			tune: func(f *fakeRegistrar) { f.salt = nil }, wantChallenge: 1},
	} {
		t.Run(tc.what, func(t *testing.T) {
			f := newFakeRegistrar(t, "the-passphrase")
			if tc.tune != nil {
				tc.tune(f)
			}
			var rr retryReasons
			dir := t.TempDir()
			_, err := registerRetry(context.Background(), rr.logger(), fastBackoff, f.srv.URL, []byte(tc.pass), "vm1", dir)
			if err == nil || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) {
				t.Fatalf("registerRetry = %v, want %v", err, tc.wantErr)
			}
			if got := rr.get(); len(got) != 0 {
				t.Errorf("retried: %q", got)
			}
			if c, r := f.counts(); c != tc.wantChallenge || r != tc.wantRegister {
				t.Errorf("%d challenges and %d registrations, want %d and %d", c, r, tc.wantChallenge, tc.wantRegister)
			}
			if _, err := os.Stat(filepath.Join(dir, certFile)); err == nil {
				t.Error("a certificate was kept")
			}
		})
	}
}
