package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"time"

	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/replication/retry"
	"github.com/asrdr/asr/store/atomicfile"
)

// ErrWrongPassphrase is returned when registration fails because the agent's
// passphrase is not the vault's.
var ErrWrongPassphrase = enroll.ErrWrongPassphrase

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

// The registration client's helpers are enroll's, shared with the
// scale-out process server.
type httpError = enroll.HTTPError

var (
	permanent = enroll.Permanent
	retryable = enroll.Retryable
	doJSON    = enroll.DoJSON
)

// register enrols the agent with the server and stores its identity in dir.
func register(ctx context.Context, serverURL string, passphrase []byte, name, dir string) (*state, error) {
	e, err := enroll.Begin(ctx, serverURL, passphrase)
	if err != nil {
		return nil, err
	}
	keyPEM, csrPEM, err := enroll.NewKeyAndCSR(name)
	if err != nil {
		return nil, permanent(err)
	}
	ch := e.Challenge
	req := enroll.RegisterRequest{Name: name, CSRPEM: string(csrPEM), Nonce: ch.Nonce,
		Proof: enroll.AgentProof(e.Key, ch.Nonce, name, csrPEM)}
	var resp enroll.RegisterResponse
	if err := e.Post(ctx, "/api/v1/agents/register", req, &resp); err != nil {
		return nil, err
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
		DataAddr: net.JoinHostPort(e.Host, strconv.Itoa(resp.DataPort))}
	if err := st.save(dir); err != nil {
		return nil, permanent(err)
	}
	return st, nil
}
