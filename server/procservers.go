package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Scale-out process servers (`asr process-server`): their registration
// (the agents' passphrase-proof exchange, with a proof of its own kind), a
// client certificate from the vault's CA, and heartbeats over mutual TLS on
// the control port. Registrations are in the vault database; heartbeats
// and figures only in memory (no database write per heartbeat).
//
// Not done yet: assigning machines to a scale-out process server, telling
// agents where to connect, `asr ps switch` and the automatic switch. Until
// then every machine is the built-in process server's, and a scale-out
// process server serves no machine (its data listener refuses every agent).

// defaultPSHeartbeatLost is how long a process server may go without a
// heartbeat before its critical alert; psHeartbeatEvery how often it is
// asked to send one.
const (
	defaultPSHeartbeatLost = 2 * time.Minute
	psHeartbeatEvery       = 5 * time.Second
)

// processServers is the in-memory side: the last heartbeat of each.
type processServers struct {
	mu   sync.Mutex
	last map[string]psBeat
}

type psBeat struct {
	at      time.Time
	figures api.ProcessServer
}

// controlTLS is the control listener's TLS configuration: a client
// certificate is asked for only on the connections of process servers
// (they offer enroll.ProcessServerALPN), so a browser never sees a
// certificate prompt.
func (s *Server) controlTLS() *tls.Config {
	base := &tls.Config{Certificates: []tls.Certificate{s.cert}, MinVersion: tls.VersionTLS12}
	ps := &tls.Config{Certificates: []tls.Certificate{s.cert}, MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: s.ca.Pool(),
		// The marker only selects this configuration: HTTP/1.1 is what is
		// spoken (net/http closes a connection of another protocol).
		NextProtos: []string{"http/1.1"}}
	base.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		if slices.Contains(h.SupportedProtos, enroll.ProcessServerALPN) {
			return ps, nil
		}
		return nil, nil
	}
	return base
}

// validPSName: a process server's name follows the machine names' rule
// and is not the built-in one's.
func validPSName(name string) error {
	if !replication.ValidMachineName(name) {
		return fmt.Errorf("process server name %q: want %s", name, replication.MachineNameRule)
	}
	if name == api.BuiltinProcessServer {
		return fmt.Errorf("process server name %q is the configuration server's own", name)
	}
	return nil
}

func (s *Server) handlePSRegister(w http.ResponseWriter, r *http.Request) error {
	var req enroll.ProcessServerRegisterRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	if !s.nonces.take(req.Nonce) { // single use, shared with the agents'
		return errorf(http.StatusConflict, "unknown, used or expired registration challenge; try again")
	}
	if !enroll.CheckProof(req.Proof, enroll.ProcessServerProof(s.regKey, req.Nonce, req.Name, req.DataAddr, []byte(req.CSRPEM))) {
		s.log.Warn("process server registration refused: wrong passphrase", "name", req.Name, "remote", r.RemoteAddr)
		time.Sleep(500 * time.Millisecond)
		return errorf(http.StatusForbidden, "wrong vault passphrase: nothing was registered")
	}
	if err := validPSName(req.Name); err != nil {
		return errorf(http.StatusBadRequest, "%v; nothing was registered", err)
	}
	host, port, err := net.SplitHostPort(req.DataAddr)
	if err != nil || host == "" || port == "" || len(req.DataAddr) > 256 {
		return errorf(http.StatusBadRequest, "data address %q: want HOST:PORT, the address its agents dial; nothing was registered", req.DataAddr)
	}
	certPEM, serial, err := s.ca.SignProcessServer([]byte(req.CSRPEM), enroll.ProcessServerCN(req.Name), host)
	if err != nil {
		return errorf(http.StatusBadRequest, "%v; nothing was registered", err)
	}
	created, err := s.db.RegisterProcessServer(r.Context(), store.ProcessServer{Name: req.Name, CertSerial: serial, DataAddr: req.DataAddr, Registered: s.now()})
	if err != nil {
		return err
	}
	if created {
		s.log.Info("process server registered", "process_server", req.Name, "data", req.DataAddr, "remote", r.RemoteAddr)
		s.raise(r.Context(), store.Event{Kind: "process-server-registered", Severity: api.SeverityInfo, Message: fmt.Sprintf("process server %s registered (data address %s)", req.Name, req.DataAddr)})
	} else {
		s.log.Warn("process server registered again; its earlier certificate is revoked", "process_server", req.Name, "data", req.DataAddr)
		s.raise(r.Context(), store.Event{Kind: "process-server-registered", Severity: api.SeverityInfo, Message: fmt.Sprintf("process server %s registered again (data address %s); its earlier certificate is revoked", req.Name, req.DataAddr)})
	}
	writeJSON(w, http.StatusOK, enroll.ProcessServerRegisterResponse{CertPEM: string(certPEM), Target: s.targetURL, VaultID: s.vaultID})
	return nil
}

// psFromCert names the process server whose verified client certificate
// made request r, checked against its latest registration.
func (s *Server) psFromCert(ctx context.Context, r *http.Request) (store.ProcessServer, error) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.PeerCertificates) == 0 {
		return store.ProcessServer{}, errorf(http.StatusUnauthorized, "a process server's client certificate is required (connect with ALPN %s)", enroll.ProcessServerALPN)
	}
	c := r.TLS.PeerCertificates[0]
	name, ok := strings.CutPrefix(c.Subject.CommonName, "ps:")
	if !ok {
		return store.ProcessServer{}, errorf(http.StatusForbidden, "certificate %q is not a process server's", c.Subject.CommonName)
	}
	p, err := s.db.ProcessServerByName(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return p, errorf(http.StatusForbidden, "process server %s is not registered with this vault (removed?): register it again", name)
	} else if err != nil {
		return p, err
	}
	if p.CertSerial != c.SerialNumber.Text(16) {
		return p, errorf(http.StatusForbidden, "process server %s: certificate superseded by a later registration", name)
	}
	return p, nil
}

func (s *Server) handlePSHeartbeat(w http.ResponseWriter, r *http.Request) error {
	p, err := s.psFromCert(r.Context(), r)
	if err != nil {
		return err
	}
	var hb api.ProcessServerHeartbeat
	if err := readJSON(r, &hb); err != nil {
		return err
	}
	if hb.Name != p.Name {
		return errorf(http.StatusBadRequest, "heartbeat names %q, the certificate %q", hb.Name, p.Name)
	}
	if hb.VaultID != s.vaultID {
		return errorf(http.StatusConflict, "process server %s writes to the target of vault %q; this configuration server's vault is %q (target %s): give it the same target", p.Name, hb.VaultID, s.vaultID, s.targetURL)
	}
	s.pss.mu.Lock()
	if s.pss.last == nil {
		s.pss.last = map[string]psBeat{}
	}
	s.pss.last[p.Name] = psBeat{at: s.now(), figures: hb.Figures}
	s.pss.mu.Unlock()
	// Three beats in the lost interval at least: one late beat is no alert.
	writeJSON(w, http.StatusOK, api.ProcessServerHeartbeatReply{Every: min(psHeartbeatEvery, s.cfg.PSHeartbeatLost/3)})
	return nil
}

// ProcessServers lists the built-in process server and the scale-out ones.
func (s *Server) ProcessServers(ctx context.Context) ([]api.ProcessServerInfo, error) {
	rows, err := s.db.ProcessServers(ctx)
	if err != nil {
		return nil, err
	}
	now := s.now()
	out := []api.ProcessServerInfo{{Name: api.BuiltinProcessServer, Builtin: true, DataAddr: s.dataL.Addr().String(),
		LastHeartbeat: now, State: api.PSHealthy, Figures: s.ProcessServer(), Machines: len(s.ps.MachineIDs())}}
	s.pss.mu.Lock()
	defer s.pss.mu.Unlock()
	for _, p := range rows {
		b := s.pss.last[p.Name]
		i := api.ProcessServerInfo{Name: p.Name, DataAddr: p.DataAddr, Registered: p.Registered, LastHeartbeat: b.at, Figures: b.figures, State: api.PSNoHeartbeat}
		if !b.at.IsZero() && now.Sub(b.at) <= s.cfg.PSHeartbeatLost {
			i.State = api.PSHealthy
		}
		out = append(out, i)
	}
	return out, nil
}

func (s *Server) handlePSList(w http.ResponseWriter, r *http.Request) error {
	l, err := s.ProcessServers(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, l)
	return nil
}

// RemoveProcessServer ends a scale-out process server's registration: its
// certificate no longer authenticates. (It would be refused while machines
// are assigned to it; none can be yet.)
func (s *Server) RemoveProcessServer(ctx context.Context, name string) error {
	if name == api.BuiltinProcessServer {
		return errorf(http.StatusBadRequest, "the built-in process server is part of the configuration server: it cannot be removed")
	}
	if err := s.db.RemoveProcessServer(ctx, name); errors.Is(err, store.ErrNotFound) {
		return errorf(http.StatusNotFound, "no process server named %q", name)
	} else if err != nil {
		return err
	}
	s.pss.mu.Lock()
	delete(s.pss.last, name)
	s.pss.mu.Unlock()
	s.raise(ctx, store.Event{Kind: "process-server-removed", Severity: api.SeverityInfo, Message: fmt.Sprintf("process server %s removed; its certificate no longer authenticates", name)})
	return nil
}

func (s *Server) handlePSRemove(w http.ResponseWriter, r *http.Request) error {
	if err := s.RemoveProcessServer(r.Context(), chi.URLParam(r, "name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// psHeartbeatObs observes each scale-out process server's heartbeat: none
// for PSHeartbeatLost is critical (a heartbeat clears it). No heartbeat is
// known from before this server started: the wait counts from the start.
func (s *Server) psHeartbeatObs(ctx context.Context, now time.Time) ([]alertObs, error) {
	rows, err := s.db.ProcessServers(ctx)
	if err != nil {
		return nil, err
	}
	s.pss.mu.Lock()
	defer s.pss.mu.Unlock()
	var obs []alertObs
	for _, p := range rows {
		last := s.alerts.started
		if b := s.pss.last[p.Name]; b.at.After(last) {
			last = b.at
		}
		down := now.Sub(last)
		o := alertObs{kind: api.AlertPSHeartbeat, key: p.Name, subject: "process server " + p.Name, clear: down <= s.cfg.PSHeartbeatLost}
		if !o.clear {
			o.level = 2
			o.message = fmt.Sprintf("no heartbeat from process server %s for %s (since %s)", p.Name, down.Round(time.Second), last.UTC().Format(time.RFC3339))
			o.action = fmt.Sprintf("check that asr process-server --name %s runs and reaches this server's control port; asr ps list shows its last heartbeat", p.Name)
		} else {
			o.message = "process server " + p.Name + " sends its heartbeat"
		}
		obs = append(obs, o)
	}
	return obs, nil
}
