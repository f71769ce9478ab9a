// Package server is asr's configuration server: it owns the vault (SQLite
// state, CA, passphrase, admin token), registers agents, serves the control
// API and the web console over HTTPS, and hosts the process server
// (replication/procserver) on the data listener.
package server

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"

	"github.com/asrdr/asr/azure"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/replication/localfs"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/hoststat"
	"github.com/asrdr/asr/server/pki"
	"github.com/asrdr/asr/store"
	"github.com/asrdr/asr/store/atomicfile"
)

// Version is the server's version, set by main.
var Version = "dev"

// Files in the data directory.
const (
	PassphraseFile = "passphrase"
	AdminTokenFile = "admin-token"
	DatabaseFile   = "vault.db"
	CacheDir       = "cache"
)

// DefaultDataDir is where `asr server` keeps everything by default.
const DefaultDataDir = "./asr-data"

// Config configures a server.
type Config struct {
	DataDir           string
	Listen            string // control API and console
	DataListen        string // agents' data connections (mutual TLS)
	Target            string // file://PATH (default DataDir/target)
	AdminPasswordFile string // if set, the console password is set from it at start
	Hosts             []string
	// AdvertiseURL is the control URL pushed agents register with,
	// https://HOST:PORT (default: the listener's address, URL).
	AdvertiseURL  string
	CacheMaxBytes int64
	// TargetTier is the target's storage tier (replication.TierStandard
	// or TierPremium), which bounds policy retention.
	TargetTier string
	// PolicyEvery is how often the RPO is checked against the thresholds
	// (default 5s); PruneEvery how often old points are pruned (default 1m).
	PolicyEvery, PruneEvery time.Duration
	// ResyncEvery is how often due resyncs are started (default 2s).
	ResyncEvery time.Duration
	// NBDListen is where failovers' NBD exports are served ("": a
	// loopback port the kernel chooses; `asr server` defaults to
	// DefaultNBDListen; "off": only the data directory's UNIX socket).
	NBDListen string
	// ARMCredential and ARMOptions reach Azure Resource Manager for
	// failovers to Azure. ARMOptions nil: the public cloud, the SDK's
	// defaults; `asr server --azure-*` sets them (azure.Cloud: a national
	// cloud, or another endpoint). ARMCredential nil: azidentity's default
	// chain, asking the authority of ARMOptions' cloud. In-process tests
	// set both to reach the SDK's fake servers directly.
	ARMCredential azcore.TokenCredential
	ARMOptions    *arm.ClientOptions
	// DrillCheckEvery is how often the plans' drill schedules are checked
	// (default 1m).
	DrillCheckEvery time.Duration
	// HeartbeatLost is how long an agent may stay disconnected before its
	// alert (default 15m; critical at 4 times it); HealthHold how long
	// the process server's health figures, a vCenter's outage and the
	// target's errors must hold before they raise an alert (default 15m,
	// as in ASR); AlertClear how long a condition must be clearly false
	// before its alert clears (default 2m). See alerts.go.
	HeartbeatLost, HealthHold, AlertClear time.Duration
	// PSHeartbeatLost is how long a scale-out process server may go
	// without a heartbeat before its critical alert (default 2m).
	PSHeartbeatLost time.Duration
	// AutoSwitch moves the machines of a scale-out process server with no
	// heartbeat for PSHeartbeatLost to the healthy ones, spread by churn
	// (procservers.go, autoSwitch).
	AutoSwitch bool
	// Placement is where a newly registered machine is served:
	// PlacementBuiltin (the built-in process server, ASR's default) or
	// PlacementAuto (the least loaded healthy process server, the
	// built-in one included; placement.go).
	Placement string
	// HistoryEvery is how often every machine's RPO and bytes received
	// are sampled for the console's charts (default 1m).
	HistoryEvery time.Duration
	// Now is the clock for retention and events (default time.Now).
	Now    func() time.Time
	Logger *slog.Logger
}

// Server is a running configuration server.
type Server struct {
	logins loginLinks // one-time console login links (loginlink.go)
	cfg    Config
	log    *slog.Logger
	db     *store.DB
	ca     *pki.CA
	cert   tls.Certificate
	pass   []byte
	token  string
	target replication.Target
	cat    *replication.Catalog
	ps     *procserver.Server
	// vaultID is the vault's id on the target (a scale-out process server
	// must show the same one); targetURL the target's URL, handed to
	// process servers at registration (no credentials in it).
	vaultID, targetURL string
	pss                processServers // scale-out process servers (procservers.go)

	httpL, dataL net.Listener
	httpSrv      *http.Server

	nonces  *nonceTable
	regSalt []byte          // the vault's registration salt
	regKey  enroll.ProofKey // registration proofs' key, derived once at open

	bytesMu sync.Mutex
	bytes   map[string]int64 // received bytes not yet added to the database
	// bytesShown is the largest received count machineView reported per
	// machine: a view whose database row was read before a flush moved
	// the pending count into it would otherwise count that part nowhere.
	bytesShown map[string]int64

	// The mirror writes what the process server reports to the database
	// (mirror.go, news.go); mirrorSeen and mirrorDisks are its writer's,
	// used on its goroutine only.
	mirror      *mirror
	mirrorSeen  map[string]bool
	mirrorDisks map[string][]store.Disk

	// resyncMu serializes the changes of resync rows (the mirror's
	// reconciliation with the catalog, the scheduler, operators' requests,
	// progress), each of which reads a row and writes it back.
	resyncMu sync.Mutex

	cutMu sync.Mutex // one replication-group cut at a time
	cuts  cuts       // the cuts with members on scale-out process servers (groupcut.go)

	// unprotectMu serializes the removals of unprotected machines
	// (unprotect.go); unprot (under unprotMu) notes the unprotected
	// machines (true: its row is being deleted) for the mirror;
	// unprotectedAtStart are those whose removal Run finishes.
	unprotectMu        sync.Mutex
	unprotMu           sync.Mutex
	unprot             map[string]bool
	unprotectedAtStart []store.Machine

	reqMu    sync.Mutex
	reqs     sync.WaitGroup // work a request started that outlives it
	stopping bool           // under reqMu: Close has begun, no more reqs

	scrubMu   sync.Mutex
	scrubbing bool         // a scheduled scrub is running
	loopTicks atomic.Int64 // passes of the resync loop (LoopTicks)
	now       func() time.Time

	alerts alertState // the alert engine and the notifier (alerts.go)

	resyncTestHook func(event string) // tests only: resyncHook

	jobs jobsState     // running jobs (jobs.go)
	vc   vcenterState  // vCenter discoveries (vmware.go)
	fo   failoverState // failovers' NBD exports (failover.go)
	rv   reverseState  // failback's shipments to the original disks (failback.go)
	// recAgents are the agents of recovered VMs (failback_agent.go).
	recAgents recoveredAgents

	fb altFailback // the alternate-location failback's test hook (failback_alt.go)

	host *hoststat.Sampler // the host's CPU and memory (hostLoop)

	metrics *metrics // GET /metrics: registry, job histograms, token (metrics.go)

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// Open creates or opens the vault in cfg.DataDir, opens the target, recovers
// the process server's cache and binds the listeners (so port 0 works and
// Addr reports the port). Run serves.
func Open(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.DataDir == "" {
		cfg.DataDir = DefaultDataDir
	}
	if cfg.TargetTier == "" {
		cfg.TargetTier = replication.TierStandard
	}
	if cfg.PolicyEvery <= 0 {
		cfg.PolicyEvery = 5 * time.Second
	}
	if cfg.PruneEvery <= 0 {
		cfg.PruneEvery = time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ResyncEvery <= 0 {
		cfg.ResyncEvery = 2 * time.Second
	}
	if cfg.DrillCheckEvery <= 0 {
		cfg.DrillCheckEvery = time.Minute
	}
	if cfg.HistoryEvery <= 0 {
		cfg.HistoryEvery = time.Minute
	}
	if err := checkPlacement(cfg.Placement); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("component", "server"), bytes: map[string]int64{},
		mirrorSeen: map[string]bool{}, mirrorDisks: map[string][]store.Disk{},
		now: cfg.Now, host: hoststat.New(), unprot: map[string]bool{},
		// Real time, not cfg.Now: a nonce's life is a security bound, not
		// something a test's clock should stretch.
		nonces: newNonceTable(noncesPerSource, maxNonces, nonceTTL, time.Now)}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if err := s.open(ctx); err != nil {
		s.Close()
		return nil, err
	}
	// Opening made garbage (its Argon2id for the vault and registration
	// keys ran in memory of its own, unmapped already:
	// replication/argon2id): give it back now rather than whenever the
	// runtime gets to it.
	debug.FreeOSMemory()
	return s, nil
}

func (s *Server) open(ctx context.Context) error {
	cfg := s.cfg
	if err := privateDir(cfg.DataDir, s.log); err != nil {
		return err
	}
	var err error
	if s.pass, err = loadOrCreateSecret(filepath.Join(cfg.DataDir, PassphraseFile), func() string {
		b := make([]byte, 24)
		rand.Read(b)
		return base64.RawURLEncoding.EncodeToString(b)
	}); err != nil {
		return err
	}
	tok, err := loadOrCreateSecret(filepath.Join(cfg.DataDir, AdminTokenFile), func() string {
		b := make([]byte, 24)
		rand.Read(b)
		return hex.EncodeToString(b)
	})
	if err != nil {
		return err
	}
	s.token = string(tok)
	if s.metrics, err = newMetrics(s, cfg.DataDir); err != nil {
		return err
	}
	if s.db, err = store.Open(ctx, filepath.Join(cfg.DataDir, DatabaseFile)); err != nil {
		return err
	}
	s.db.SetClock(cfg.Now)
	if err := s.ensureDefaultPolicy(ctx); err != nil {
		return err
	}
	if err := s.db.FailRunningJobs(ctx, "the server stopped while the job ran"); err != nil {
		return err
	}
	if s.ca, s.cert, err = pki.LoadOrCreate(cfg.DataDir, cfg.Hosts); err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	if err := s.loadRegistrationKey(ctx); err != nil {
		return err
	}
	if cfg.AdminPasswordFile != "" {
		pw, err := api.ReadSecretFile(cfg.AdminPasswordFile)
		if err != nil {
			return err
		}
		if err := s.SetPassword(ctx, string(pw)); err != nil {
			return err
		}
	}
	targetURL := cfg.Target
	if targetURL == "" {
		abs, err := filepath.Abs(filepath.Join(cfg.DataDir, "target"))
		if err != nil {
			return err
		}
		targetURL = "file://" + abs
	}
	lease, err := LeaseID(cfg.DataDir)
	if err != nil {
		return err
	}
	s.targetURL = targetURL
	if s.target, err = OpenTarget(ctx, targetURL, lease, CreateTarget); err != nil {
		return err
	}
	if err := s.openVault(ctx); err != nil {
		return err
	}
	if err := s.openAlerts(ctx); err != nil {
		return err
	}
	// Hash indexes were kept here before the block checksums moved to the
	// target (replication/sums.go).
	if old := filepath.Join(cfg.DataDir, "index"); exists(old) {
		s.log.Info("removing the old hash indexes (block checksums are kept on the target now)", "dir", old)
		if err := os.RemoveAll(old); err != nil {
			return err
		}
	}
	// Machines whose protection ended are never opened by the process
	// server; Run finishes a removal a stop cut short.
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return err
	}
	var removed []string
	for _, m := range ms {
		if m.Unprotected() {
			removed = append(removed, m.ID)
			s.unprotectedAtStart = append(s.unprotectedAtStart, m)
			s.noteUnprotected(m.ID, false)
		}
	}
	if err := s.loadAssignments(ctx); err != nil {
		return err
	}
	// Before the process server, which reports each machine it opens.
	s.mirror = newMirror(s.writeNews, s.log.With("component", "mirror"), time.Second, 30*time.Second)
	s.ps, err = procserver.New(ctx, procserver.Config{
		Removed:        removed,
		Serves:         s.servesBuiltin,
		CacheDir:       filepath.Join(cfg.DataDir, CacheDir),
		Catalog:        s.cat,
		Authorize:      s.authorizeAgent,
		OnState:        s.onState,
		OnPoint:        s.onPoint,
		OnBytes:        s.onBytes,
		OnDamage:       s.noteDamage,
		OnQuarantine:   s.onQuarantine,
		OnConnect:      s.onConnect,
		RecoveredAgent: s.recoveredAgent,
		OnRefused:      s.onRefused,
		OnCacheState:   s.onCacheState,
		OnStatus:       s.onStatus,
		PolicyFor:      s.policyFor,
		CacheMaxBytes:  cfg.CacheMaxBytes,
		Logger:         cfg.Logger.With("component", "procserver"),
	})
	if err != nil {
		return fmt.Errorf("process server: %w", err)
	}
	if s.httpL, err = net.Listen("tcp", cfg.Listen); err != nil {
		return fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	if s.dataL, err = net.Listen("tcp", cfg.DataListen); err != nil {
		return fmt.Errorf("data listen %s: %w", cfg.DataListen, err)
	}
	if err := s.openNBD(); err != nil {
		return err
	}
	return s.restoreFailovers(ctx)
}

// openVault makes sure the target belongs to this vault (or claims an empty
// target for it) and opens its catalog, sealed with the vault's data key.
func (s *Server) openVault(ctx context.Context) error {
	cat, v, err := replication.OpenVault(ctx, s.target, s.pass)
	if errors.Is(err, replication.ErrNotFound) {
		id, err := s.db.Setting(ctx, "vault_id")
		if errors.Is(err, store.ErrNotFound) {
			b := make([]byte, 8)
			rand.Read(b)
			id = hex.EncodeToString(b)
			if err := s.db.SetSetting(ctx, "vault_id", id); err != nil {
				return err
			}
		} else if err != nil {
			return err
		}
		nv, err := replication.NewVaultInfo(id, s.pass)
		if err != nil {
			return err
		}
		if err := (&replication.Catalog{T: s.target}).PutVault(ctx, nv); err != nil {
			return fmt.Errorf("write the vault descriptor on %s: %w", s.target, err)
		}
		cat, v, err = replication.OpenVault(ctx, s.target, s.pass)
		if err != nil {
			return err
		}
	} else if errors.Is(err, replication.ErrWrongPassphrase) {
		return fmt.Errorf("target %s belongs to vault %s, which this passphrase does not open: %w", s.target, v.ID, err)
	} else if err != nil {
		return fmt.Errorf("open the vault on %s: %w", s.target, err)
	}
	s.cat, s.vaultID = cat, v.ID
	return nil
}

// registrationSaltSetting names the setting that holds the vault's
// registration salt (hex).
const registrationSaltSetting = "registration_salt"

// loadRegistrationKey derives the key of the registration proofs from the
// passphrase and the vault's registration salt, making the salt on first
// use. This is the server's one Argon2id for registrations: challenges and
// proof checks are HMACs, so a flood of them costs little.
func (s *Server) loadRegistrationKey(ctx context.Context) error {
	v, err := s.db.Setting(ctx, registrationSaltSetting)
	switch {
	case errors.Is(err, store.ErrNotFound):
		s.regSalt = enroll.NewSalt()
		if err := s.db.SetSetting(ctx, registrationSaltSetting, hex.EncodeToString(s.regSalt)); err != nil {
			return fmt.Errorf("save the registration salt: %w", err)
		}
	case err != nil:
		return fmt.Errorf("registration salt: %w", err)
	default:
		if s.regSalt, err = hex.DecodeString(v); err != nil {
			return fmt.Errorf("registration salt in setting %s: %w", registrationSaltSetting, err)
		}
	}
	if s.regKey, err = enroll.DeriveProofKey(s.pass, s.regSalt, replication.VaultKDF); err != nil {
		return fmt.Errorf("registration key: %w", err)
	}
	return nil
}

// leaseFile holds the id of the leases a server (or a scale-out process
// server) takes on an Azure target, the container's and the machines', so
// that once restarted it takes its own leases back at once.
const leaseFile = "target-lease"

// LeaseID reads the lease id kept in dataDir, making one on first use.
func LeaseID(dataDir string) (string, error) {
	path := filepath.Join(dataDir, leaseFile)
	if b, err := os.ReadFile(path); err == nil {
		return strings.TrimSpace(string(b)), nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	var u [16]byte
	rand.Read(u[:])
	u[6], u[8] = u[6]&0x0f|0x40, u[8]&0x3f|0x80 // a version 4 UUID, as Azure wants lease ids
	id := fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:])
	return id, atomicfile.Write(path, []byte(id+"\n"), 0o600)
}

// privateDir makes the data directory (0700), or takes the group and other
// bits off an existing one, with a log line: it holds the vault's secrets,
// its database and the cache of guest data.
func privateDir(dir string, log *slog.Logger) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	perm := st.Mode().Perm()
	if perm&0o077 == 0 {
		return nil
	}
	if err := os.Chmod(dir, perm&^0o077); err != nil {
		return fmt.Errorf("data directory %s is readable by other users (mode %04o) and cannot be made private: %w", dir, perm, err)
	}
	log.Warn("the data directory was open to other users; made it private to this one", "dir", dir,
		"was", fmt.Sprintf("%04o", perm), "now", fmt.Sprintf("%04o", perm&^0o077))
	return nil
}

// TargetMode says whether OpenTarget may create what it opens.
type TargetMode int

const (
	// CreateTarget makes the directory or container when missing, and the
	// layout in it: the server claims a new target.
	CreateTarget TargetMode = iota
	// ExistingTarget creates nothing: the target must hold an asr vault
	// already, else the error wraps replication.ErrNotFound and says so.
	// Every reader of a target opens it so (asr recover and asr points
	// with --target), so a mistyped path or container leaves nothing
	// behind.
	ExistingTarget
	// SharedTarget opens a target the configuration server holds, for a
	// scale-out process server: it must exist, and its writes are fenced
	// per machine (replication.MachineLeaser) instead of by the whole
	// target's lock (localfs.Shared, azure.Config.Shared).
	SharedTarget
)

// OpenTarget opens a target storage URL: file://PATH, or
// azure://ACCOUNT/CONTAINER with credentials from the environment
// (AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with
// AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN). lease is the id proposed
// for the leases taken on an Azure container, its write lease and the
// machines' ("": a new one; LeaseID keeps one in a data directory); mode
// says whether a missing target is created.
func OpenTarget(ctx context.Context, raw, lease string, mode TargetMode) (replication.Target, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("target %q: %w", raw, err)
	}
	switch u.Scheme {
	case "file":
		path := u.Path
		if u.Host != "" && u.Host != "localhost" {
			// file://relative/path is a common slip; accept it as relative.
			path = u.Host + u.Path
		}
		if path == "" {
			return nil, fmt.Errorf("target %q: no path", raw)
		}
		var opts []localfs.Option
		switch mode {
		case ExistingTarget:
			opts = append(opts, localfs.NoCreate())
		case SharedTarget:
			opts = append(opts, localfs.Shared())
		}
		t, err := localfs.Open(path, opts...)
		if errors.Is(err, replication.ErrLocked) {
			return nil, fmt.Errorf("target %s is in use by a running asr server (stop it, or ask it with --server): %w", path, err)
		} else if err != nil {
			return nil, err
		}
		return t, nil
	case "azure":
		cfg, err := azure.ParseURL(raw, os.Getenv)
		if err != nil {
			return nil, err
		}
		cfg.LeaseID = lease
		cfg.NoCreate = mode == ExistingTarget
		cfg.Shared = mode == SharedTarget
		t, err := azure.Open(ctx, cfg)
		if errors.Is(err, replication.ErrLocked) {
			return nil, fmt.Errorf("%w (stop it, or ask it with --server)", err)
		} else if err != nil {
			return nil, err // not a typed nil in the interface
		}
		return t, nil
	}
	return nil, fmt.Errorf("target %q: unknown scheme (want file://PATH or azure://ACCOUNT/CONTAINER)", raw)
}

func loadOrCreateSecret(path string, gen func() string) ([]byte, error) {
	b, err := api.ReadSecretFile(path)
	if err == nil {
		return b, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	v := gen()
	if err := os.WriteFile(path, []byte(v+"\n"), 0o600); err != nil {
		return nil, err
	}
	return []byte(v), nil
}

// Addr returns the control listener's address.
func (s *Server) Addr() net.Addr { return s.httpL.Addr() }

// DataAddr returns the data listener's address.
func (s *Server) DataAddr() net.Addr { return s.dataL.Addr() }

// URL is the base URL of the control API.
func (s *Server) URL() string {
	host, port, _ := net.SplitHostPort(s.httpL.Addr().String())
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "https://" + net.JoinHostPort(host, port)
}

// AdminToken returns the admin API token.
func (s *Server) AdminToken() string { return s.token }

// Run serves the control API, the console and the data listener until ctx is
// done.
func (s *Server) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, s.cancel)
	defer stop()
	s.httpSrv = &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		TLSConfig:         s.controlTLS(),
	}
	dataTLS := tls.NewListener(s.dataL, &tls.Config{
		Certificates: []tls.Certificate{s.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    s.ca.Pool(),
		MinVersion:   tls.VersionTLS13,
	})
	if err := s.startDiscovery(s.ctx); err != nil {
		return err
	}
	errc := make(chan error, 2)
	s.wg.Add(11)
	go func() { defer s.wg.Done(); s.hostLoop() }()
	go func() { defer s.wg.Done(); s.historyLoop() }()
	go func() { defer s.wg.Done(); s.serveNBD(s.ctx) }()
	go func() { defer s.wg.Done(); s.drillLoop() }()
	go func() { defer s.wg.Done(); s.finishUnprotects(s.unprotectedAtStart) }()
	go func() { defer s.wg.Done(); s.resyncLoop() }()
	go func() { defer s.wg.Done(); s.policyLoop() }()
	go func() { defer s.wg.Done(); s.groupLoop() }()
	go func() {
		defer s.wg.Done()
		err := s.httpSrv.ServeTLS(s.httpL, "", "")
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		errc <- err
	}()
	go func() { defer s.wg.Done(); errc <- s.ps.Serve(s.ctx, dataTLS) }()
	go func() { defer s.wg.Done(); s.flushLoop() }()
	s.wg.Go(s.alertLoop)
	s.log.Info("asr server running", "console", s.URL(), "data", s.dataL.Addr().String(), "target", s.target.String(), "data_dir", s.cfg.DataDir)
	var err error
	select {
	case <-s.ctx.Done():
	case err = <-errc:
		s.cancel()
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	s.httpSrv.Shutdown(sctx)
	cancel()
	return err
}

// Close stops everything and closes the vault.
func (s *Server) Close() error {
	s.cancel()
	if s.httpL != nil {
		s.httpL.Close()
	}
	if s.dataL != nil {
		s.dataL.Close()
	}
	s.wg.Wait()
	s.closeAlerts()
	s.closeNBD()
	s.stopDiscovery()
	s.reqMu.Lock()
	s.stopping = true
	s.reqMu.Unlock()
	s.reqs.Wait()
	var first error
	keep := func(err error) {
		if err != nil && first == nil {
			first = err
		}
	}
	if s.ps != nil {
		keep(s.ps.Close())
	}
	if s.db != nil {
		s.saveStreams() // after the process server: the recovered agents' last writes counted
	}
	if s.mirror != nil {
		s.mirror.close() // after the process server: nothing more is noted
	}
	if s.db != nil {
		keep(s.flushBytes(context.Background()))
		keep(s.db.Close())
	}
	if s.target != nil {
		keep(s.target.Close())
	}
	return first
}

// authorizeAgent accepts a data connection from a registered machine whose
// certificate is the one issued at its latest registration.
func (s *Server) authorizeAgent(ctx context.Context, id, serial string) (string, error) {
	m, err := s.db.Machine(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return "", fmt.Errorf("no machine %s is registered with this vault (a machine unprotected with --delete-replica is gone): register the agent again", id)
	} else if err != nil {
		return "", err
	}
	if m.Unprotected() {
		// Shown on the machine too: its agent is still out there.
		reason := unprotectedReason(m)
		s.onRefused(id, reason)
		return "", errors.New(reason)
	}
	if m.CertSerial != serial {
		return "", errors.New("certificate superseded by a later registration")
	}
	if err := s.servesBuiltin(id); err != nil {
		return "", err
	}
	return m.Name, nil
}

func (s *Server) onBytes(id string, n int64) {
	s.bytesMu.Lock()
	s.bytes[id] += n
	s.bytesMu.Unlock()
}

// flushLoop adds received byte counts to the database every few seconds.
func (s *Server) flushLoop() {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			if err := s.flushBytes(s.ctx); err != nil {
				s.log.Error("save byte counts", "err", err)
			}
		}
	}
}

func (s *Server) flushBytes(ctx context.Context) error {
	s.bytesMu.Lock()
	counts := s.bytes
	s.bytes = map[string]int64{}
	s.bytesMu.Unlock()
	for id, n := range counts {
		if err := s.db.TouchMachine(ctx, id, "", n); err != nil {
			return err
		}
	}
	return nil
}

// newMachineID returns a random machine id (32 hex characters).
func newMachineID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// goRequest runs fn in a goroutine that Close waits for, unless the server
// is stopping (then it returns false and fn does not run).
func (s *Server) goRequest(fn func()) bool {
	s.reqMu.Lock()
	defer s.reqMu.Unlock()
	if s.stopping {
		return false
	}
	s.reqs.Go(fn)
	return true
}
