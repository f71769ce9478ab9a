package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/asrdr/asr/replication/enroll"
)

// dataDialer dials the process server's data listener over mutual TLS at
// the address saved at registration. When that address does not answer, it
// asks the control URL where the data listener is now (the challenge's
// DataPort, fetched over the pinned CA) and, once a mutual-TLS handshake
// there has succeeded, saves the new address: a server restarted on another
// data port (a restarted demo, a reconfigured listener) is found again
// without registering anew.
//
// Before each dial it asks the control URL which process server serves the
// machine (GET /api/v1/agents/data-address, with its client certificate):
// a machine switched to a scale-out process server is dialled there, and
// back at the saved address once it is the built-in one's again. When the
// control URL does not answer, the last answer holds.
type dataDialer struct {
	dir     string // the state directory: certificate, key, pinned CA
	control string // the server's control URL
	st      *stateStore
	log     *slog.Logger

	scaleOut string // the last scale-out process server's address ("": the built-in one); the dialer's goroutine only
}

// dial connects to the data listener of the machine's process server,
// learning the built-in one's address again if the saved one fails.
func (d *dataDialer) dial(ctx context.Context) (net.Conn, error) {
	if where, err := d.where(ctx); err == nil {
		if where.DataAddr != d.scaleOut {
			d.log.Info("the machine's process server", "process_server", where.ProcessServer, "data", where.DataAddr)
		}
		d.scaleOut = where.DataAddr
	} else if ctx.Err() != nil {
		return nil, err
	}
	if d.scaleOut != "" {
		return tlsDialer(d.dir, d.scaleOut)(ctx)
	}
	addr := d.st.dataAddr()
	nc, err := tlsDialer(d.dir, addr)(ctx)
	if err == nil || ctx.Err() != nil {
		return nc, err
	}
	now, lerr := d.lookup(ctx)
	if lerr != nil || now == addr {
		// The control URL does not answer either, or names the same
		// address: the server is down, not moved.
		return nil, err
	}
	nc, err = tlsDialer(d.dir, now)(ctx)
	if err != nil {
		return nil, err
	}
	if err := d.st.update(func(s *state) { s.DataAddr = now }); err != nil {
		nc.Close()
		return nil, fmt.Errorf("save the data address: %w", err)
	}
	d.log.Info("the process server's data listener moved; using its new address", "old", addr, "new", now)
	return nc, nil
}

// lookup asks the control URL for the data listener's port (the
// registration challenge carries it), trusting only the pinned CA.
func (d *dataDialer) lookup(ctx context.Context) (string, error) {
	u, err := url.Parse(d.control)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return "", fmt.Errorf("control URL %q: want https://HOST:PORT", d.control)
	}
	caPEM, err := os.ReadFile(filepath.Join(d.dir, caFile))
	if err != nil {
		return "", err
	}
	pool, err := enroll.PoolFromPEM(caPEM)
	if err != nil {
		return "", err
	}
	host := u.Hostname()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS12}}}
	defer c.CloseIdleConnections()
	var ch enroll.Challenge
	if err := doJSON(ctx, c, http.MethodGet, d.control+"/api/v1/agents/challenge", nil, &ch); err != nil {
		return "", err
	}
	if ch.DataPort <= 0 || ch.DataPort > 65535 {
		return "", errors.New("the server named no data port")
	}
	return net.JoinHostPort(host, strconv.Itoa(ch.DataPort)), nil
}

// where asks the control URL which process server serves the machine,
// with the agent's client certificate (offering enroll.ClientCertALPN, the
// only connections the server asks a certificate of). A server from before
// scale-out answers 404: the built-in one.
func (d *dataDialer) where(ctx context.Context) (enroll.DataAddress, error) {
	var out enroll.DataAddress
	u, err := url.Parse(d.control)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return out, fmt.Errorf("control URL %q: want https://HOST:PORT", d.control)
	}
	cfg, err := tlsConfig(d.dir, u.Host)
	if err != nil {
		return out, err
	}
	cfg.NextProtos = []string{enroll.ClientCertALPN, "http/1.1"}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
	defer c.CloseIdleConnections()
	err = doJSON(ctx, c, http.MethodGet, d.control+"/api/v1/agents/data-address", nil, &out)
	var he *httpError
	if errors.As(err, &he) && he.Status == http.StatusNotFound {
		return enroll.DataAddress{}, nil
	}
	if err != nil {
		return out, err
	}
	if out.DataAddr != "" {
		if _, _, err := net.SplitHostPort(out.DataAddr); err != nil || len(out.DataAddr) > 256 {
			return enroll.DataAddress{}, fmt.Errorf("the server named data address %.80q: want HOST:PORT", out.DataAddr)
		}
	}
	return out, nil
}
