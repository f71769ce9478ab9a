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
// Machines are assigned to a process server (the built-in one unless the
// operator switched them: `asr ps switch`); each process server opens only
// the machines it serves (procserver.Config.Serves), under the machine's
// lease on the target, and agents ask the control URL where their process
// server is at each connect (GET /api/v1/agents/data-address); with
// Config.AutoSwitch the machines of a silent process server move to the
// healthy ones, spread by churn (autoSwitch).

// defaultPSHeartbeatLost is how long a process server may go without a
// heartbeat before its critical alert; psHeartbeatEvery how often it is
// asked to send one.
const (
	defaultPSHeartbeatLost = 2 * time.Minute
	psHeartbeatEvery       = 5 * time.Second
)

// processServers is the in-memory side: the last heartbeat of each, and
// the assignments (a copy of the table, written through).
type processServers struct {
	switchMu sync.Mutex // one switch at a time

	mu       sync.Mutex
	last     map[string]psBeat
	assigned map[string]string // machine id -> scale-out process server; absent: the built-in one
	// What the heartbeats report (procservers_report.go): each machine's
	// figures, the newest news taken from each process server, the
	// commands waiting for their results (by id).
	machines map[string]psMachine
	runs     map[string]psRun
	cmds     map[string]*psCmd
	images   map[string]*psImage // image streams awaited, by command id (procservers_points.go)
}

type psBeat struct {
	at       time.Time
	figures  api.ProcessServer
	machines map[string]bool // the machines it has open
}

// loadAssignments reads the assignments (at open, before the process
// server, which asks servesBuiltin).
func (s *Server) loadAssignments(ctx context.Context) error {
	a, err := s.db.Assignments(ctx)
	if err != nil {
		return err
	}
	s.pss.mu.Lock()
	s.pss.assigned = a
	s.pss.mu.Unlock()
	return nil
}

// assignedTo is the scale-out process server a machine is assigned to (""
// for the built-in one).
func (s *Server) assignedTo(machineID string) string {
	s.pss.mu.Lock()
	defer s.pss.mu.Unlock()
	return s.pss.assigned[machineID]
}

// servesBuiltin is the built-in process server's Config.Serves.
func (s *Server) servesBuiltin(machineID string) error {
	if ps := s.assignedTo(machineID); ps != "" {
		return fmt.Errorf("machine %s is served by process server %s, not the configuration server's built-in one", machineID, ps)
	}
	return nil
}

// controlTLS is the control listener's TLS configuration: a client
// certificate is asked for only on the connections of process servers
// (they offer enroll.ClientCertALPN), so a browser never sees a
// certificate prompt.
func (s *Server) controlTLS() *tls.Config {
	base := &tls.Config{Certificates: []tls.Certificate{s.cert}, MinVersion: tls.VersionTLS12}
	ps := &tls.Config{Certificates: []tls.Certificate{s.cert}, MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: s.ca.Pool(),
		// The marker only selects this configuration: HTTP/1.1 is what is
		// spoken (net/http closes a connection of another protocol).
		NextProtos: []string{"http/1.1"}}
	base.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		if slices.Contains(h.SupportedProtos, enroll.ClientCertALPN) {
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
	if name == api.BuiltinProcessServer || name == api.AutoProcessServer {
		return fmt.Errorf("process server name %q is reserved", name)
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
		return store.ProcessServer{}, errorf(http.StatusUnauthorized, "a process server's client certificate is required (connect with ALPN %s)", enroll.ClientCertALPN)
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
	if err := readJSONMax(r, &hb, api.MaxPSHeartbeatBytes); err != nil {
		return err
	}
	if hb.Name != p.Name {
		return errorf(http.StatusBadRequest, "heartbeat names %q, the certificate %q", hb.Name, p.Name)
	}
	if hb.VaultID != s.vaultID {
		return errorf(http.StatusConflict, "process server %s writes to the target of vault %q; this configuration server's vault is %q (target %s): give it the same target", p.Name, hb.VaultID, s.vaultID, s.targetURL)
	}
	if len(hb.Machines) > api.MaxPSMachines {
		return errorf(http.StatusBadRequest, "heartbeat names %d machines, at most %d", len(hb.Machines), api.MaxPSMachines)
	}
	if err := checkReports(&hb); err != nil {
		return errorf(http.StatusBadRequest, "%v; nothing of the heartbeat was taken", err)
	}
	open := make(map[string]bool, len(hb.Machines))
	for _, id := range hb.Machines {
		open[id] = true
	}
	s.pss.mu.Lock()
	if s.pss.last == nil {
		s.pss.last = map[string]psBeat{}
	}
	s.pss.last[p.Name] = psBeat{at: s.now(), figures: hb.Figures, machines: open}
	var ids []string
	for id, ps := range s.pss.assigned {
		if ps == p.Name {
			ids = append(ids, id)
		}
	}
	fresh, cmds, done := s.takeReports(p.Name, &hb, open)
	s.pss.mu.Unlock()
	if fresh {
		for _, r := range hb.Reports {
			if r.News != nil {
				s.applyPSNews(r.MachineID, r.News)
			}
		}
	}
	deliver(done)
	// Three beats in the lost interval at least: one late beat is no alert.
	reply := api.ProcessServerHeartbeatReply{Every: min(psHeartbeatEvery, s.cfg.PSHeartbeatLost/3), Assigned: []api.PSAssignment{}, Commands: cmds}
	for _, id := range ids {
		m, err := s.db.Machine(r.Context(), id)
		if errors.Is(err, store.ErrNotFound) {
			continue
		} else if err != nil {
			return err
		}
		if m.Unprotected() {
			continue // its agent is refused; nothing opens it
		}
		a := api.PSAssignment{MachineID: m.ID, Name: m.Name, CertSerial: m.CertSerial}
		if ap := s.policyFor(m.ID); ap != nil {
			// A group member's agent makes no points of its own: the
			// group's cuts reach it as commands (groupcut.go).
			a.Policy = ap
		}
		reply.Assigned = append(reply.Assigned, a)
	}
	writeJSON(w, http.StatusOK, reply)
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
	count := map[string]int{}
	for _, ps := range s.pss.assigned {
		count[ps]++
	}
	for _, p := range rows {
		b := s.pss.last[p.Name]
		i := api.ProcessServerInfo{Name: p.Name, DataAddr: p.DataAddr, Registered: p.Registered, LastHeartbeat: b.at, Figures: b.figures,
			State: api.PSNoHeartbeat, Machines: count[p.Name]}
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
// certificate no longer authenticates. It is refused while machines are
// assigned to it.
func (s *Server) RemoveProcessServer(ctx context.Context, name string) error {
	if name == api.BuiltinProcessServer {
		return errorf(http.StatusBadRequest, "the built-in process server is part of the configuration server: it cannot be removed")
	}
	s.pss.switchMu.Lock() // no switch to it meanwhile
	defer s.pss.switchMu.Unlock()
	s.pss.mu.Lock()
	n := 0
	for _, ps := range s.pss.assigned {
		if ps == name {
			n++
		}
	}
	s.pss.mu.Unlock()
	if n > 0 {
		return errorf(http.StatusConflict, "process server %s serves %d machines: switch them to another (asr ps switch --machine M --to PS) first; nothing was removed", name, n)
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
// known from before this server started: the wait counts from the start,
// or from the registration of one registered since.
func (s *Server) psHeartbeatObs(ctx context.Context, now time.Time) ([]alertObs, error) {
	rows, err := s.db.ProcessServers(ctx)
	if err != nil {
		return nil, err
	}
	s.pss.mu.Lock()
	defer s.pss.mu.Unlock()
	var obs []alertObs
	for _, p := range rows {
		last := heartbeatSince(s.alerts.started, p.Registered, s.pss.last[p.Name].at)
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

// heartbeatSince is when a process server's silence began: its last
// heartbeat, or if none since, the later of this server's start (no
// heartbeat is known from before it) and the process server's
// registration (one registered since has had no time to beat before it).
func heartbeatSince(started, registered, beat time.Time) time.Time {
	last := started
	for _, t := range []time.Time{registered, beat} {
		if t.After(last) {
			last = t
		}
	}
	return last
}

// SwitchProcessServer moves a machine to another process server (to: a
// scale-out one's name, api.BuiltinProcessServer, or api.AutoProcessServer:
// the least loaded healthy one). The assignment is
// written first (so the old process server opens it no more and the agent
// is told the new address), then the old one hands it over: it closes the
// agent's connection and applies everything its cache holds (every
// acknowledged write) before its lease on the target goes. The new one
// opens the machine, under the lease, when the agent connects; the agent
// re-sends from its log whatever was not acknowledged. It returns once the
// old process server has let the machine go (or ctx ends: the hand-over
// goes on, and the switch may be asked again).
func (s *Server) SwitchProcessServer(ctx context.Context, machine, to string) (string, error) {
	err := s.switchProcessServer(ctx, machine, &to)
	return to, err
}

// switchProcessServer is SwitchProcessServer; *to becomes the process
// server chosen for api.AutoProcessServer.
func (s *Server) switchProcessServer(ctx context.Context, machine string, to *string) error {
	s.pss.switchMu.Lock()
	defer s.pss.switchMu.Unlock()
	m, err := s.db.MachineByName(ctx, machine)
	if errors.Is(err, store.ErrNotFound) {
		return errorf(http.StatusNotFound, "no machine named %q", machine)
	} else if err != nil {
		return err
	}
	if m.Unprotected() {
		return errorf(http.StatusConflict, "machine %s is not protected any more", machine)
	}
	if f, err := s.db.LiveFailover(ctx, m.ID); err == nil {
		return errorf(http.StatusConflict, "machine %s has a live failover (%s): a switch waits until it is cleaned up or failed back", machine, f.ID)
	} else if !errors.Is(err, store.ErrNotFound) {
		return err
	}
	if *to == api.AutoProcessServer {
		if *to, err = s.leastLoaded(ctx); err != nil {
			return err
		}
	}
	newPS := *to
	if *to == api.BuiltinProcessServer {
		newPS = ""
	} else {
		if _, err := s.db.ProcessServerByName(ctx, *to); errors.Is(err, store.ErrNotFound) {
			return errorf(http.StatusNotFound, "no process server named %q", *to)
		} else if err != nil {
			return err
		}
		s.pss.mu.Lock()
		b := s.pss.last[*to]
		s.pss.mu.Unlock()
		if b.at.IsZero() || s.now().Sub(b.at) > s.cfg.PSHeartbeatLost {
			return errorf(http.StatusConflict, "process server %s sends no heartbeat: switch to a healthy one (asr ps list)", *to)
		}
	}
	old := s.assignedTo(m.ID)
	if old == newPS {
		if newPS != "" && slices.Contains(s.ps.MachineIDs(), m.ID) {
			// An earlier switch away from the built-in one whose
			// hand-over did not finish: finish it.
			return s.releaseBuiltin(ctx, m)
		}
		return nil
	}
	if old != "" {
		s.pss.mu.Lock()
		b := s.pss.last[old]
		s.pss.mu.Unlock()
		if b.at.IsZero() || s.now().Sub(b.at) > s.cfg.PSHeartbeatLost {
			return errorf(http.StatusConflict, "process server %s, which serves %s, sends no heartbeat: its cache may hold acknowledged changes not yet applied; start it again so it hands the machine over", old, machine)
		}
	}
	if err := s.db.Assign(ctx, m.ID, newPS); err != nil {
		return err
	}
	s.pss.mu.Lock()
	if newPS == "" {
		delete(s.pss.assigned, m.ID)
	} else {
		s.pss.assigned[m.ID] = newPS
	}
	since := s.now()
	s.pss.mu.Unlock()
	from := old
	if from == "" {
		from = api.BuiltinProcessServer
	}
	s.raise(ctx, store.Event{MachineID: m.ID, Kind: "process-server-switch", Severity: api.SeverityInfo,
		Message: fmt.Sprintf("%s switched from process server %s to %s", machine, from, *to)})
	if old == "" {
		return s.releaseBuiltin(ctx, m)
	}
	// A scale-out one learns it from its next heartbeat's reply and hands
	// it over; done when a heartbeat after that no longer names it.
	for {
		s.pss.mu.Lock()
		b := s.pss.last[old]
		s.pss.mu.Unlock()
		if b.at.After(since) && !b.machines[m.ID] {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("process server %s has not handed %s over yet (it applies its cache first): %w", old, machine, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (s *Server) handleSwitch(w http.ResponseWriter, r *http.Request) error {
	var req api.SwitchRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	to, err := s.SwitchProcessServer(r.Context(), chi.URLParam(r, "machine"), req.To)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.SwitchResult{ProcessServer: to})
	return nil
}

// agentFromCert is the machine whose verified client certificate made
// request r, checked against its latest registration.
func (s *Server) agentFromCert(ctx context.Context, r *http.Request) (store.Machine, error) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.PeerCertificates) == 0 {
		return store.Machine{}, errorf(http.StatusUnauthorized, "an agent's client certificate is required (connect with ALPN %s)", enroll.ClientCertALPN)
	}
	c := r.TLS.PeerCertificates[0]
	m, err := s.db.Machine(ctx, c.Subject.CommonName)
	if errors.Is(err, store.ErrNotFound) {
		return m, errorf(http.StatusForbidden, "no machine %s is registered with this vault", c.Subject.CommonName)
	} else if err != nil {
		return m, err
	}
	if m.CertSerial != c.SerialNumber.Text(16) {
		return m, errorf(http.StatusForbidden, "certificate superseded by a later registration")
	}
	return m, nil
}

// handleDataAddress tells an agent where its machine's process server is.
func (s *Server) handleDataAddress(w http.ResponseWriter, r *http.Request) error {
	m, err := s.agentFromCert(r.Context(), r)
	if err != nil {
		return err
	}
	ps := s.assignedTo(m.ID)
	if ps == "" {
		writeJSON(w, http.StatusOK, enroll.DataAddress{ProcessServer: api.BuiltinProcessServer})
		return nil
	}
	p, err := s.db.ProcessServerByName(r.Context(), ps)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, enroll.DataAddress{ProcessServer: ps, DataAddr: p.DataAddr})
	return nil
}

// autoSwitch moves the machines of every scale-out process server without
// a heartbeat for PSHeartbeatLost (counted from this server's start for
// one not heard since) to the healthy process servers, the built-in one
// included, spread by churn (spreadOver): never to a silent or removed
// one. The silent one cannot hand them over: what its cache acknowledged
// and did not apply is not on the target, so the new process server finds
// the agent's log past the catalog's applied sequence (a sequence gap) and
// the machine's disks are marked for a resync (its reason says so), never
// silently continued. Its lease guards the rest: a process server that is
// alive but cut off from this server keeps the machine's lease, so the new
// one cannot open the machine until it lets go (it learns of the switch at
// its next heartbeat and hands the machine over, drained, with no gap).
func (s *Server) autoSwitch(ctx context.Context) error {
	rows, err := s.db.ProcessServers(ctx)
	if err != nil {
		return err
	}
	now := s.now()
	s.pss.switchMu.Lock()
	defer s.pss.switchMu.Unlock()
	for _, p := range rows {
		s.pss.mu.Lock()
		last := s.alerts.started
		if p.Registered.After(last) {
			last = p.Registered
		}
		if b := s.pss.last[p.Name]; b.at.After(last) {
			last = b.at
		}
		var ids []string
		for id, ps := range s.pss.assigned {
			if ps == p.Name {
				ids = append(ids, id)
			}
		}
		s.pss.mu.Unlock()
		if now.Sub(last) <= s.cfg.PSHeartbeatLost || len(ids) == 0 {
			continue
		}
		slices.Sort(ids) // the same spread for the same machines
		l, err := s.ProcessServers(ctx)
		if err != nil {
			return err
		}
		var rate float64 // the silent one's churn, as its last heartbeat said
		for _, i := range l {
			if i.Name == p.Name {
				rate = i.Figures.UploadRate
			}
		}
		to := spreadOver(l, len(ids), rate)
		for i, id := range ids {
			name := id
			if m, err := s.db.Machine(ctx, id); err == nil {
				name = m.Name
			}
			if err := s.takeBackLocked(ctx, id, name, p.Name, to[i], "switched automatically"); err != nil {
				return err
			}
		}
	}
	return nil
}

// spreadOver chooses, for each of n machines of a silent process server
// whose last heartbeat reported an upload rate of rate bytes/s for them
// all, a healthy process server of l (pickLeastLoaded), one machine after
// the other, each counted on the one it goes to: one machine more, and its
// share of the churn (rate/n; when the silent one reported none, the mean
// churn per machine of the healthy ones), so they spread rather than pile
// on the least loaded one. The built-in one is always healthy: every
// machine gets a process server.
func spreadOver(l []api.ProcessServerInfo, n int, rate float64) []string {
	l = slices.Clone(l)
	share := rate / float64(n)
	if share <= 0 {
		var total float64
		machines := 0
		for _, p := range l {
			if p.State == api.PSHealthy {
				total += p.Figures.UploadRate
				machines += p.Machines
			}
		}
		if machines > 0 {
			share = total / float64(machines)
		}
	}
	to := make([]string, n)
	for i := range to {
		name, ok := pickLeastLoaded(l)
		if !ok {
			name = api.BuiltinProcessServer
		}
		to[i] = name
		for j := range l {
			if l[j].Name == name {
				l[j].Figures.UploadRate += share
				l[j].Machines++
			}
		}
	}
	return to
}

// SwitchAll moves every machine of process server from (a scale-out one's
// name, or api.BuiltinProcessServer) to another, one at a time
// (SwitchProcessServer each); it returns the machines moved, and stops at
// the first that fails.
func (s *Server) SwitchAll(ctx context.Context, from, to string) ([]string, error) {
	var ids []string
	if from == api.BuiltinProcessServer {
		ms, err := s.db.Machines(ctx)
		if err != nil {
			return nil, err
		}
		for _, m := range ms {
			if !m.Unprotected() && s.assignedTo(m.ID) == "" {
				ids = append(ids, m.ID)
			}
		}
	} else {
		if _, err := s.db.ProcessServerByName(ctx, from); errors.Is(err, store.ErrNotFound) {
			return nil, errorf(http.StatusNotFound, "no process server named %q", from)
		} else if err != nil {
			return nil, err
		}
		s.pss.mu.Lock()
		for id, ps := range s.pss.assigned {
			if ps == from {
				ids = append(ids, id)
			}
		}
		s.pss.mu.Unlock()
	}
	var moved []string
	for _, id := range ids {
		m, err := s.db.Machine(ctx, id)
		if err != nil {
			return moved, err
		}
		if _, err := s.SwitchProcessServer(ctx, m.Name, to); err != nil {
			return moved, fmt.Errorf("switch %s: %w", m.Name, err)
		}
		moved = append(moved, m.Name)
	}
	return moved, nil
}

func (s *Server) handleSwitchAll(w http.ResponseWriter, r *http.Request) error {
	var req api.SwitchRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	moved, err := s.SwitchAll(r.Context(), chi.URLParam(r, "name"), req.To)
	if err != nil {
		if len(moved) > 0 {
			return fmt.Errorf("%w (moved before that: %s)", err, strings.Join(moved, ", "))
		}
		return err
	}
	writeJSON(w, http.StatusOK, api.SwitchAllResult{Moved: append([]string{}, moved...)})
	return nil
}

// releaseBuiltin has the built-in process server hand machine m over, in
// a goroutine the server owns (the request may end first: the hand-over
// goes on; asking the switch again finishes it, or says it is under way).
func (s *Server) releaseBuiltin(ctx context.Context, m store.Machine) error {
	done := make(chan error, 1)
	if !s.goRequest(func() { done <- s.ps.Release(s.ctx, m.ID) }) {
		return errors.New("server stopping")
	}
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("the built-in process server's hand-over of %s: %w", m.Name, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("the built-in process server is still handing %s over (it applies its cache first): %w", m.Name, ctx.Err())
	}
}

// leastLoaded is the healthy process server (the built-in one included)
// with the least churn: the lowest upload rate to the target over the last
// 10 s (what its machines write, once applied), then the fewest machines.
func (s *Server) leastLoaded(ctx context.Context) (string, error) {
	l, err := s.ProcessServers(ctx)
	if err != nil {
		return "", err
	}
	name, ok := pickLeastLoaded(l)
	if !ok {
		return "", errorf(http.StatusConflict, "no healthy process server")
	}
	return name, nil
}

// pickLeastLoaded is leastLoaded's choice among l.
func pickLeastLoaded(l []api.ProcessServerInfo) (string, bool) {
	best := -1
	for i, p := range l {
		if p.State != api.PSHealthy {
			continue
		}
		if best < 0 || p.Figures.UploadRate < l[best].Figures.UploadRate ||
			p.Figures.UploadRate == l[best].Figures.UploadRate && p.Machines < l[best].Machines {
			best = i
		}
	}
	if best < 0 {
		return "", false
	}
	return l[best].Name, true
}
