package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strconv"
	"time"

	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/replication/retry"
	"github.com/asrdr/asr/store/atomicfile"
)

// ErrWrongPassphrase is returned when registration fails because the agent's
// passphrase is not the vault's.
var ErrWrongPassphrase = errors.New("wrong vault passphrase")

// defaultRegisterBackoff is the wait between registration tries: from
// 0.5 s, doubling, up to 30 s.
var defaultRegisterBackoff = retry.New(500*time.Millisecond, 30*time.Second)

// registerRetry registers, trying again with capped exponential backoff
// after any failure a later try may fix (the server down, restarting or
// overloaded, a timeout, a challenge evicted by others' challenges), until
// it succeeds or ctx ends. A wrong passphrase, and any refusal only an
// operator can fix, returns at once.
func registerRetry(ctx context.Context, log *slog.Logger, b retry.Backoff, serverURL string, passphrase []byte, name, dir string) (*state, error) {
	for try := 1; ; try++ {
		st, err := register(ctx, serverURL, passphrase, name, dir)
		if err == nil {
			return st, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("register with %s: %w (last error: %v)", serverURL, ctx.Err(), err)
		}
		if !retryable(err) {
			return nil, err
		}
		delay := b.Next()
		log.Warn("registration failed; retrying", "err", err, "try", try, "retry_in", delay)
		if retry.Sleep(ctx, delay) != nil {
			return nil, fmt.Errorf("register with %s: %w (last error: %v)", serverURL, ctx.Err(), err)
		}
	}
}

// permanentError marks a registration failure that trying again will not
// fix: a wrong passphrase, a bad --server, a server an operator must
// reconfigure, a local file that cannot be written.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return &permanentError{err} }

// retryable reports whether a later registration try may succeed.
func retryable(err error) bool {
	var pe *permanentError
	if errors.As(err, &pe) || errors.Is(err, ErrWrongPassphrase) {
		return false
	}
	var he *httpError
	if errors.As(err, &he) {
		switch he.Status {
		case http.StatusRequestTimeout, http.StatusConflict, http.StatusTooEarly, http.StatusTooManyRequests:
			return true
		}
		return he.Status >= 500
	}
	// No answer at all (refused, reset, timed out) or a garbled one.
	return true
}

// register enrols the agent with the server and stores its identity in dir.
func register(ctx context.Context, serverURL string, passphrase []byte, name, dir string) (*state, error) {
	u, err := url.Parse(serverURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, permanent(fmt.Errorf("--server %q: want https://HOST:PORT", serverURL))
	}
	host := u.Hostname()

	// First contact: the server's CA is not known yet, so the certificate is
	// checked after the server proves it knows the passphrase.
	var peer []*x509.Certificate
	insecure := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			peer = cs.PeerCertificates
			return nil
		},
	}}}
	defer insecure.CloseIdleConnections()
	var ch enroll.Challenge
	if err := doJSON(ctx, insecure, http.MethodGet, serverURL+"/api/v1/agents/challenge", nil, &ch); err != nil {
		return nil, fmt.Errorf("contact server %s: %w", serverURL, err)
	}
	if len(ch.Salt) == 0 {
		return nil, permanent(fmt.Errorf("the server at %s sent a challenge without a registration salt: it is older than this agent; upgrade it", serverURL))
	}
	// The salt and cost come from a server not yet authenticated: bounded
	// before the derivation allocates anything.
	key, err := enroll.DeriveProofKey(passphrase, ch.Salt, ch.KDF)
	if err != nil {
		return nil, permanent(fmt.Errorf("the server at %s: %w", serverURL, err))
	}
	if !enroll.CheckProof(ch.Proof, enroll.ServerProof(key, ch.Nonce, []byte(ch.CAPEM))) {
		return nil, fmt.Errorf("%w: the server at %s could not prove it knows this passphrase (or it is not the asr server you meant)", ErrWrongPassphrase, serverURL)
	}
	// The server has proven the passphrase: a CA or certificate that does
	// not check is a server to reconfigure, not a network accident.
	pool, err := enroll.PoolFromPEM([]byte(ch.CAPEM))
	if err != nil {
		return nil, permanent(fmt.Errorf("server CA: %w", err))
	}
	if len(peer) == 0 {
		return nil, permanent(errors.New("server presented no certificate"))
	}
	inter := x509.NewCertPool()
	for _, c := range peer[1:] {
		inter.AddCert(c)
	}
	if _, err := peer[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, DNSName: host}); err != nil {
		return nil, permanent(fmt.Errorf("server certificate is not from the vault CA: %w", err))
	}

	keyPEM, csrPEM, err := enroll.NewKeyAndCSR(name)
	if err != nil {
		return nil, permanent(err)
	}
	pinned := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: host}}}
	defer pinned.CloseIdleConnections()
	req := enroll.RegisterRequest{Name: name, CSRPEM: string(csrPEM), Nonce: ch.Nonce,
		Proof: enroll.AgentProof(key, ch.Nonce, name, csrPEM)}
	var resp enroll.RegisterResponse
	if err := doJSON(ctx, pinned, http.MethodPost, serverURL+"/api/v1/agents/register", req, &resp); err != nil {
		var he *httpError
		if errors.As(err, &he) && he.Status == http.StatusForbidden {
			return nil, fmt.Errorf("%w: %s", ErrWrongPassphrase, he.Message)
		}
		return nil, fmt.Errorf("register with %s: %w", serverURL, err)
	}
	if err := atomicfile.Write(filepath.Join(dir, keyFile), keyPEM, 0o600); err != nil {
		return nil, permanent(err)
	}
	if err := atomicfile.Write(filepath.Join(dir, certFile), []byte(resp.CertPEM), 0o644); err != nil {
		return nil, permanent(err)
	}
	if err := atomicfile.Write(filepath.Join(dir, caFile), []byte(ch.CAPEM), 0o644); err != nil {
		return nil, permanent(err)
	}
	st := &state{MachineID: resp.MachineID, Name: name, Server: serverURL,
		DataAddr: net.JoinHostPort(host, strconv.Itoa(resp.DataPort))}
	if err := st.save(dir); err != nil {
		return nil, permanent(err)
	}
	return st, nil
}

type httpError struct {
	Status  int
	Message string
}

func (e *httpError) Error() string { return fmt.Sprintf("HTTP %d: %s", e.Status, e.Message) }

func doJSON(ctx context.Context, c *http.Client, method, url string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e struct {
			Error string `json:"error"`
		}
		msg := string(bytes.TrimSpace(b))
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			msg = e.Error
		}
		return &httpError{Status: resp.StatusCode, Message: msg}
	}
	return json.Unmarshal(b, out)
}
