package enroll

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"
)

// The client side of registration, shared by the agent and the scale-out
// process server: fetch a challenge, check the server's passphrase proof,
// pin the vault's CA, then post the registration over the pinned
// connection.

// ErrWrongPassphrase is returned when registration fails because the
// passphrase is not the vault's (either side's proof does not check).
var ErrWrongPassphrase = errors.New("wrong vault passphrase")

// PermanentError marks a registration failure that trying again will not
// fix: a wrong passphrase, a bad server URL, a server an operator must
// reconfigure, a local file that cannot be written.
type PermanentError struct{ Err error }

func (e *PermanentError) Error() string { return e.Err.Error() }
func (e *PermanentError) Unwrap() error { return e.Err }

// Permanent wraps err as a PermanentError.
func Permanent(err error) error { return &PermanentError{err} }

// HTTPError is a server's refusal: its status and message.
type HTTPError struct {
	Status  int
	Message string
}

func (e *HTTPError) Error() string { return fmt.Sprintf("HTTP %d: %s", e.Status, e.Message) }

// Retryable reports whether a later registration try may succeed.
func Retryable(err error) bool {
	var pe *PermanentError
	if errors.As(err, &pe) || errors.Is(err, ErrWrongPassphrase) {
		return false
	}
	var he *HTTPError
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

// DoJSON sends in (nil: no body) and decodes the answer into out (nil:
// ignored); an answer other than 2xx is an *HTTPError with the server's
// message. At most 1 MiB of answer is read.
func DoJSON(ctx context.Context, c *http.Client, method, url string, in, out any) error {
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
	return Do(c, req, out)
}

// Do sends req and decodes the answer into out (nil: ignored), as
// DoJSON does for a request made by the caller (a streamed body).
func Do(c *http.Client, req *http.Request, out any) error {
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
		return &HTTPError{Status: resp.StatusCode, Message: msg}
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(b, out)
}

// Enrolment is a registration under way whose server has proven it knows
// the passphrase: its challenge, the proof key and the pinned CA.
type Enrolment struct {
	URL       string // https://HOST:PORT
	Host      string
	Challenge Challenge
	Key       ProofKey
	Pool      *x509.CertPool
}

// Begin fetches a challenge from serverURL and checks the server's proof of
// the passphrase, then that its certificate is from the CA it sent; only
// then is the CA pinned (first contact: the CA is not known before).
func Begin(ctx context.Context, serverURL string, passphrase []byte) (*Enrolment, error) {
	u, err := url.Parse(serverURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, Permanent(fmt.Errorf("server URL %q: want https://HOST:PORT", serverURL))
	}
	host := u.Hostname()
	var peer []*x509.Certificate
	insecure := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			peer = cs.PeerCertificates
			return nil
		},
	}}}
	defer insecure.CloseIdleConnections()
	var ch Challenge
	if err := DoJSON(ctx, insecure, http.MethodGet, serverURL+"/api/v1/agents/challenge", nil, &ch); err != nil {
		return nil, fmt.Errorf("contact server %s: %w", serverURL, err)
	}
	if len(ch.Salt) == 0 {
		return nil, Permanent(fmt.Errorf("the server at %s sent a challenge without a registration salt: it is older than this asr; upgrade it", serverURL))
	}
	// The salt and cost come from a server not yet authenticated: bounded
	// before the derivation allocates anything.
	key, err := DeriveProofKey(passphrase, ch.Salt, ch.KDF)
	if err != nil {
		return nil, Permanent(fmt.Errorf("the server at %s: %w", serverURL, err))
	}
	if !CheckProof(ch.Proof, ServerProof(key, ch.Nonce, []byte(ch.CAPEM))) {
		return nil, fmt.Errorf("%w: the server at %s could not prove it knows this passphrase (or it is not the asr server you meant)", ErrWrongPassphrase, serverURL)
	}
	// The server has proven the passphrase: a CA or certificate that does
	// not check is a server to reconfigure, not a network accident.
	pool, err := PoolFromPEM([]byte(ch.CAPEM))
	if err != nil {
		return nil, Permanent(fmt.Errorf("server CA: %w", err))
	}
	if len(peer) == 0 {
		return nil, Permanent(errors.New("server presented no certificate"))
	}
	inter := x509.NewCertPool()
	for _, c := range peer[1:] {
		inter.AddCert(c)
	}
	if _, err := peer[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, DNSName: host}); err != nil {
		return nil, Permanent(fmt.Errorf("server certificate is not from the vault CA: %w", err))
	}
	return &Enrolment{URL: serverURL, Host: host, Challenge: ch, Key: key, Pool: pool}, nil
}

// PinnedClient is an HTTP client that trusts only the pinned CA.
func (e *Enrolment) PinnedClient() *http.Client {
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.Pool, ServerName: e.Host}}}
}

// Post sends a registration request over the pinned connection; a 403 (the
// server's check of this side's proof) is ErrWrongPassphrase.
func (e *Enrolment) Post(ctx context.Context, path string, in, out any) error {
	c := e.PinnedClient()
	defer c.CloseIdleConnections()
	if err := DoJSON(ctx, c, http.MethodPost, e.URL+path, in, out); err != nil {
		var he *HTTPError
		if errors.As(err, &he) && he.Status == http.StatusForbidden {
			return fmt.Errorf("%w: %s", ErrWrongPassphrase, he.Message)
		}
		return fmt.Errorf("register with %s: %w", e.URL, err)
	}
	return nil
}
