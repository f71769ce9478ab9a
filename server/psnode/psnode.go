// Package psnode is the scale-out process server role (`asr process-server`):
// the same process server (replication/procserver) as the configuration
// server's built-in one, run as its own process. It registers with the
// configuration server (the agents' passphrase-proof exchange, with a proof
// of its own kind, and a certificate from the vault's CA), opens the same
// target (shared: each machine's writes fenced by its lease on the target),
// serves its data listener, and reports its health and figures in a
// heartbeat over mutual TLS.
//
// It serves the machines the configuration server assigns to it (each
// heartbeat's reply), and hands over any other it has open (applied whole,
// then its lease let go). Its heartbeats also report what the machines do
// (report.go: what its process server's callbacks tell, as the built-in
// one's tell the configuration server) and carry the results of the
// commands the replies ask (commands.go: point requests, resyncs,
// pruning, scrubs, point checks; image.go: a recovery's image, POSTed to
// the configuration server); see docs/ARCHITECTURE.md, "Scale-out process
// servers".
package psnode

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
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/hoststat"
)

// Config configures a scale-out process server.
type Config struct {
	ConfigURL  string // the configuration server's control URL, https://HOST:PORT
	Passphrase []byte // the vault passphrase
	DataDir    string // its cache and its registration
	DataListen string // its agents' data listener
	// AdvertiseData is the data address agents dial (default: the data
	// listener's, its host replaced, when unspecified, by the address this
	// host reaches the configuration server from).
	AdvertiseData string
	Name          string
	// Target overrides the target URL the configuration server hands over
	// at registration (the same storage, reached another way).
	Target string
	// OpenTarget opens a target URL shared with the configuration server
	// (server.OpenTarget with server.SharedTarget; injected by the wiring).
	OpenTarget    func(ctx context.Context, url string) (replication.Target, error)
	CacheMaxBytes int64
	// ReportMachines bounds the machines one heartbeat reports (default
	// and at most api.MaxPSReportMachines; tests make it small).
	ReportMachines int
	Logger         *slog.Logger
}

// Node is a running scale-out process server.
type Node struct {
	cfg      Config
	log      *slog.Logger
	dataL    net.Listener
	dataAddr string
	cert     tls.Certificate
	enrol    *enroll.Enrolment
	target   replication.Target
	targetID string // what the target is, for the heartbeat's figures
	vaultID  string
	cat      *replication.Catalog // the vault's catalog on the target (image.go finds points there)
	ps       *procserver.Server
	// onDamage is the process server's OnDamage (a damage report in the
	// next heartbeat's news), for the damage a recovery's read finds.
	onDamage func(id string, d procserver.Damage)
	host     *hoststat.Sampler
	client   *http.Client  // mutual TLS to the configuration server
	out      *outbox       // the machines' news for the heartbeats (report.go)
	cmds     commands      // the configuration server's commands (commands.go)
	kick     chan struct{} // a heartbeat now (kickBeat)
	beatMu   sync.Mutex    // one heartbeat at a time

	mu       sync.Mutex
	assigned map[string]api.PSAssignment // the machines it serves, by id (the last heartbeat's reply)
	handing  map[string]bool             // machines being handed over (release)
	wg       sync.WaitGroup              // the hand-overs
	ctx      context.Context             // ends at Close: the hand-overs' context
	cancel   context.CancelFunc
}

// Open registers with the configuration server, opens the target and the
// process server's cache, and binds the data listener. A wrong passphrase
// is an error wrapping enroll.ErrWrongPassphrase, and nothing is made.
func Open(ctx context.Context, cfg Config) (*Node, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if !replication.ValidMachineName(cfg.Name) || cfg.Name == api.BuiltinProcessServer || cfg.Name == api.AutoProcessServer {
		return nil, fmt.Errorf("--name %q: want %s, neither %q nor %q (reserved)", cfg.Name, replication.MachineNameRule, api.BuiltinProcessServer, api.AutoProcessServer)
	}
	n := &Node{cfg: cfg, log: cfg.Logger.With("component", "process-server", "process_server", cfg.Name), host: hoststat.New(),
		assigned: map[string]api.PSAssignment{}, handing: map[string]bool{}, kick: make(chan struct{}, 1),
		cmds: commands{running: map[string]bool{}, results: map[string]api.PSCommandResult{}}}
	n.out = newOutbox(n.log, cfg.ReportMachines)
	n.ctx, n.cancel = context.WithCancel(context.Background())
	if err := n.open(ctx); err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

func (n *Node) open(ctx context.Context) error {
	cfg := n.cfg
	var err error
	// The challenge first: a wrong passphrase leaves nothing behind.
	if n.enrol, err = enroll.Begin(ctx, cfg.ConfigURL, cfg.Passphrase); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	if n.dataL, err = net.Listen("tcp", cfg.DataListen); err != nil {
		return fmt.Errorf("data listen %s: %w", cfg.DataListen, err)
	}
	if n.dataAddr, err = advertised(ctx, cfg.AdvertiseData, n.dataL.Addr().String(), n.enrol.URL); err != nil {
		return err
	}
	reg, err := n.register(ctx)
	if err != nil {
		return err
	}
	targetURL := reg.Target
	if cfg.Target != "" {
		targetURL = cfg.Target
	}
	if n.target, err = cfg.OpenTarget(ctx, targetURL); err != nil {
		return err
	}
	cat, v, err := replication.OpenVault(ctx, n.target, cfg.Passphrase)
	if err != nil {
		return fmt.Errorf("open the vault on %s: %w", n.target, err)
	}
	if v.ID != reg.VaultID {
		return fmt.Errorf("target %s holds vault %s, the configuration server's is %s: give this process server the configuration server's target", n.target, v.ID, reg.VaultID)
	}
	n.vaultID, n.targetID, n.cat = v.ID, n.target.String(), cat
	n.client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: n.enrol.Pool, ServerName: n.enrol.Host, Certificates: []tls.Certificate{n.cert},
		NextProtos: []string{enroll.ClientCertALPN, "http/1.1"}, MinVersion: tls.VersionTLS13}}}
	// What it serves, before the process server opens what its cache
	// holds (this first heartbeat has the host's figures only).
	n.host.Sample(time.Now())
	if err := n.beat(ctx, nil); err != nil {
		return fmt.Errorf("first heartbeat to %s: %w", n.enrol.URL, err)
	}
	pcfg := procserver.Config{
		Name:          cfg.Name,
		Serves:        n.serves,
		CacheDir:      filepath.Join(cfg.DataDir, "cache"),
		Catalog:       cat,
		Authorize:     n.authorize,
		PolicyFor:     n.policyFor,
		CacheMaxBytes: cfg.CacheMaxBytes,
		Logger:        n.log,
	}
	// What the configuration server's built-in process server reports
	// through the same callbacks goes to it in the heartbeats.
	n.out.callbacks(&pcfg)
	n.onDamage = pcfg.OnDamage
	ps, err := procserver.New(ctx, pcfg)
	if err != nil {
		return fmt.Errorf("process server: %w", err)
	}
	n.mu.Lock()
	n.ps = ps
	n.mu.Unlock()
	return nil
}

// register makes a key and has the configuration server sign its
// certificate (client, and server for the data listener). Every start
// registers again: the earlier certificate is revoked.
func (n *Node) register(ctx context.Context) (enroll.ProcessServerRegisterResponse, error) {
	var resp enroll.ProcessServerRegisterResponse
	keyPEM, csrPEM, err := enroll.NewKeyAndCSR(enroll.ProcessServerCN(n.cfg.Name))
	if err != nil {
		return resp, err
	}
	ch := n.enrol.Challenge
	req := enroll.ProcessServerRegisterRequest{Name: n.cfg.Name, DataAddr: n.dataAddr, CSRPEM: string(csrPEM), Nonce: ch.Nonce,
		Proof: enroll.ProcessServerProof(n.enrol.Key, ch.Nonce, n.cfg.Name, n.dataAddr, csrPEM)}
	if err := n.enrol.Post(ctx, "/api/v1/process-servers/register", req, &resp); err != nil {
		return resp, err
	}
	if n.cert, err = tls.X509KeyPair([]byte(resp.CertPEM), keyPEM); err != nil {
		return resp, fmt.Errorf("the configuration server's certificate for this process server: %w", err)
	}
	n.log.Info("registered with the configuration server", "config", n.enrol.URL, "data", n.dataAddr)
	return resp, nil
}

// advertised is the data address agents dial: explicit, or the listener's
// with an unspecified host replaced by this host's address towards the
// configuration server.
func advertised(ctx context.Context, explicit, listen, configURL string) (string, error) {
	if explicit != "" {
		if _, _, err := net.SplitHostPort(explicit); err != nil {
			return "", fmt.Errorf("--advertise-data %q: want HOST:PORT", explicit)
		}
		return explicit, nil
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", err
	}
	if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
		return listen, nil
	}
	u, err := urlHostPort(configURL)
	if err != nil {
		return "", err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", u)
	if err != nil {
		return "", fmt.Errorf("find this host's address towards %s (or give --advertise-data): %w", configURL, err)
	}
	defer c.Close()
	local, _, _ := net.SplitHostPort(c.LocalAddr().String())
	return net.JoinHostPort(local, port), nil
}

// authorize accepts the agent of a machine assigned to this process server
// with the certificate of its latest registration. A machine not known
// yet asks the configuration server at once (a heartbeat): a machine just
// switched here connects before the next beat.
func (n *Node) authorize(ctx context.Context, machineID, serial string) (string, error) {
	a, ok := n.assignment(machineID)
	if !ok {
		if err := n.beat(ctx, nil); err != nil {
			return "", fmt.Errorf("ask the configuration server about machine %s: %w", machineID, err)
		}
		a, ok = n.assignment(machineID)
	}
	if !ok {
		return "", fmt.Errorf("machine %s is not assigned to process server %s: its agent asks the configuration server where to connect", machineID, n.cfg.Name)
	}
	if a.CertSerial != serial {
		return "", errors.New("certificate superseded by a later registration")
	}
	return a.Name, nil
}

func (n *Node) assignment(id string) (api.PSAssignment, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	a, ok := n.assigned[id]
	return a, ok
}

// policyFor is the process server's Config.PolicyFor: the point schedule
// the configuration server named for the machine.
func (n *Node) policyFor(id string) *replication.AgentPolicy {
	a, _ := n.assignment(id)
	return a.Policy
}

// serves is the process server's Config.Serves.
func (n *Node) serves(id string) error {
	if _, ok := n.assignment(id); !ok {
		return fmt.Errorf("machine %s is not assigned to process server %s", id, n.cfg.Name)
	}
	return nil
}

// follow takes a heartbeat's reply: the machines assigned now; any other
// machine it has open is handed over (applied whole, then let go), one
// goroutine each, owned by the node.
func (n *Node) follow(reply *api.ProcessServerHeartbeatReply) {
	if len(reply.Assigned) > api.MaxPSMachines {
		n.log.Error("the configuration server assigned too many machines; ignored", "machines", len(reply.Assigned), "max", api.MaxPSMachines)
		return
	}
	m := make(map[string]api.PSAssignment, len(reply.Assigned))
	for _, a := range reply.Assigned {
		m[a.MachineID] = a
	}
	n.mu.Lock()
	ps := n.ps
	was := n.assigned
	n.assigned = m
	n.mu.Unlock()
	if ps == nil {
		return
	}
	// A changed schedule goes to the agent now (a new connection gets it
	// in its Welcome: policyFor).
	for id, a := range m {
		if old, ok := was[id]; ok && a.Policy != nil && (old.Policy == nil || *old.Policy != *a.Policy) && n.ctx.Err() == nil {
			p := *a.Policy
			n.wg.Go(func() {
				if err := ps.SendPolicy(id, p); err != nil {
					n.log.Warn("push policy", "machine", id, "err", err)
				}
			})
		}
	}
	// Not under n.mu: the process server asks serves (n.mu) under its
	// own lock.
	open := ps.MachineIDs()
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, id := range open {
		if _, ok := m[id]; ok || n.handing[id] || n.ctx.Err() != nil {
			continue
		}
		n.handing[id] = true
		n.wg.Go(func() {
			defer func() {
				n.mu.Lock()
				delete(n.handing, id)
				n.mu.Unlock()
			}()
			n.log.Info("machine switched to another process server: applying its cache, then letting it go", "machine", id)
			if err := ps.Release(n.ctx, id); err != nil {
				n.log.Error("hand-over failed; tried again at the next heartbeat", "machine", id, "err", err)
				return
			}
			n.log.Info("machine handed over", "machine", id)
		})
	}
}

// DataAddr is the address agents dial.
func (n *Node) DataAddr() string { return n.dataAddr }

// Run serves the data listener and sends heartbeats until ctx ends; it
// returns an error when the configuration server no longer knows this
// process server (removed, or registered again elsewhere).
func (n *Node) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	dataTLS := tls.NewListener(n.dataL, &tls.Config{
		Certificates: []tls.Certificate{n.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    n.enrol.Pool,
		MinVersion:   tls.VersionTLS13,
	})
	var wg sync.WaitGroup
	errc := make(chan error, 2)
	wg.Go(func() { errc <- n.ps.Serve(ctx, dataTLS) })
	wg.Go(func() { errc <- n.heartbeatLoop(ctx) })
	n.log.Info("asr process server running", "data", n.dataAddr, "target", n.targetID, "config", n.enrol.URL)
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	cancel()
	wg.Wait()
	return err
}

// heartbeatLoop samples the host and sends a heartbeat every interval the
// configuration server asks for (bounded to 1 s..1 min). A failure is
// logged and retried at the next beat; a refusal of this process server's
// certificate (403: removed, or registered again) ends the loop.
func (n *Node) heartbeatLoop(ctx context.Context) error {
	every := 5 * time.Second
	n.host.Sample(time.Now())
	for {
		var reply api.ProcessServerHeartbeatReply
		err := n.beat(ctx, &reply)
		if err == nil {
			every = reply.Every
		}
		var he *enroll.HTTPError
		switch {
		case ctx.Err() != nil:
			return nil
		case errors.As(err, &he) && (he.Status == http.StatusForbidden || he.Status == http.StatusConflict):
			return fmt.Errorf("the configuration server refused this process server's heartbeat: %w", err)
		case err != nil:
			n.log.Warn("heartbeat failed; trying again", "err", err, "retry_in", every)
		default:
			every = min(max(every, time.Second), time.Minute)
		}
		if n.waitBeat(ctx, every) != nil {
			return nil
		}
		n.host.Sample(time.Now())
	}
}

// beat sends a heartbeat (its figures, the machines it has open) and
// follows the reply's assignments; reply, if not nil, receives it.
func (n *Node) beat(ctx context.Context, reply *api.ProcessServerHeartbeatReply) error {
	if reply == nil {
		reply = &api.ProcessServerHeartbeatReply{}
	}
	n.beatMu.Lock()
	defer n.beatMu.Unlock()
	h := n.host.Last()
	n.mu.Lock()
	ps := n.ps
	n.mu.Unlock()
	var f procserver.Figures
	hb := api.ProcessServerHeartbeat{Name: n.cfg.Name, VaultID: n.vaultID, Machines: []string{}, Run: n.out.run}
	if ps != nil {
		// The results first: what a command reported (the damage a
		// scrub found) was noted before its result, so it rides in this
		// heartbeat's news or an earlier one's.
		hb.Results = n.cmds.pending()
		f, hb.Machines = ps.Figures(), ps.MachineIDs()
		hb.Reports, hb.ReportSeq = n.out.report(ps, hb.Machines)
	}
	hb.Figures = api.NewProcessServer(f, h.CPU, h.Memory, h.MemoryTotal, h.Err, n.targetID)
	if err := enroll.DoJSON(ctx, n.client, http.MethodPost, n.enrol.URL+"/api/v1/process-servers/heartbeat", hb, reply); err != nil {
		return err
	}
	n.out.answered(hb.ReportSeq)
	n.follow(reply)
	if ps != nil {
		n.followCommands(hb.Results, reply.Commands)
	}
	return nil
}

// Close stops the process server (its machines' leases released after
// their last writes) and closes the target.
func (n *Node) Close() error {
	var first error
	keep := func(err error) {
		if err != nil && first == nil {
			first = err
		}
	}
	if n.cancel != nil {
		n.cancel()
	}
	n.wg.Wait()
	if n.dataL != nil {
		n.dataL.Close()
	}
	if n.ps != nil {
		keep(n.ps.Close())
	}
	if n.target != nil {
		keep(n.target.Close())
	}
	if n.client != nil {
		n.client.CloseIdleConnections()
	}
	return first
}

func urlHostPort(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "", fmt.Errorf("--config %q: want https://HOST:PORT", raw)
	}
	if u.Port() == "" {
		return net.JoinHostPort(u.Hostname(), "443"), nil
	}
	return u.Host, nil
}
