package server_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// These are in-process integration tests: a real server and a real agent in
// this process, over real TLS and a real NBD socket. The e2e suite does the
// same with separate processes and external NBD clients.

type rig struct {
	t          *testing.T
	listen     string // kept across restarts: agents know the addresses
	dataListen string
	dir        string
	srv        *server.Server
	srvCtx     context.CancelFunc
	srvErr     chan error
	client     *api.Client
	log        *slog.Logger
	tune       func(*server.Config) // adjusts the config before each start
	opened     func(*server.Server) // called after each Open, before Run
}

// hung bounds every wait of these tests for a state: a safety net that ends
// a hung run, never the pace a loaded machine has to keep.
const hung = 3 * time.Minute

// hungTest bounds the context a whole test shares among its many waits
// and calls: a test that ran 182 s under load (the unit stage beside the
// e2e stage) hit a 3-minute context mid-recovery, whose connection it
// then closed. Only a safety net, well inside the package's timeout.
const hungTest = 20 * time.Minute

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func startServer(t *testing.T, dir string) *rig {
	t.Helper()
	r := &rig{t: t, dir: dir, log: quietLogger()}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	return r
}

func (r *rig) start() {
	t := r.t
	t.Helper()
	if r.listen == "" {
		r.listen, r.dataListen = "127.0.0.1:0", "127.0.0.1:0"
	}
	cfg := server.Config{DataDir: filepath.Join(r.dir, "srv"), Listen: r.listen, DataListen: r.dataListen, Logger: r.log}
	if r.tune != nil {
		r.tune(&cfg)
	}
	srv, err := server.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	r.listen, r.dataListen = srv.Addr().String(), srv.DataAddr().String()
	if cfg.Now == nil {
		// Automatic resyncs wait for the vault's resync window; with the
		// default (22:00-06:00) a test run at night would see them start,
		// and maybe end, before it looks. On the real clock the window is
		// put half a day away, so a resync starts when a test asks for it,
		// at whatever time the suite runs. (Tests about the window inject
		// a clock and keep the default, or set their own.)
		ctx := context.Background()
		if _, err := srv.DB().Setting(ctx, "resync_window"); errors.Is(err, store.ErrNotFound) {
			away := time.Now().Add(12 * time.Hour)
			if err := srv.DB().SetSetting(ctx, "resync_window", away.Format("15:04")+"-"+away.Add(time.Hour).Format("15:04")); err != nil {
				t.Fatal(err)
			}
		}
	}
	if r.opened != nil {
		r.opened(srv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.srv, r.srvCtx, r.srvErr = srv, cancel, make(chan error, 1)
	go func() { r.srvErr <- srv.Run(ctx) }()
	c, err := api.NewClient(srv.URL(), filepath.Join(r.dir, "srv", server.AdminTokenFile), filepath.Join(r.dir, "srv", "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	r.client = c
	t.Cleanup(r.stop)
}

func (r *rig) stop() {
	if r.srv == nil {
		return
	}
	r.srvCtx()
	<-r.srvErr
	r.srv.Close()
	r.srv = nil
}

func (r *rig) agentConfig(name string, disks ...agent.DiskSpec) agent.Config {
	return agent.Config{Server: r.srv.URL(), PassphraseFile: filepath.Join(r.dir, "srv", server.PassphraseFile),
		StateDir: filepath.Join(r.dir, name), Name: name, Disks: disks, NBD: "unix:" + filepath.Join(r.dir, name+".sock"),
		CrashInterval: time.Hour, SpoolMax: 64 << 20, Logger: r.log}
}

type runningAgent struct {
	a    *agent.Agent
	stop context.CancelFunc
	done chan error
}

func startAgent(t *testing.T, cfg agent.Config) *runningAgent {
	t.Helper()
	a, err := agent.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ra := &runningAgent{a: a, stop: cancel, done: make(chan error, 1)}
	go func() { ra.done <- a.Run(ctx) }()
	t.Cleanup(func() { ra.close() })
	return ra
}

func (ra *runningAgent) close() {
	if ra.a == nil {
		return
	}
	ra.stop()
	<-ra.done
	ra.a.Close()
	ra.a = nil
}

func mustDisk(t *testing.T, path string, size int64, seed uint64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, 0))
	buf := make([]byte, 64<<10)
	for off := int64(0); off < size; off += 4 * int64(len(buf)) { // a quarter has data
		for i := range buf {
			buf[i] = byte(r.IntN(256))
		}
		f.WriteAt(buf, off)
	}
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func (r *rig) machine(name string) api.Machine {
	r.t.Helper()
	var m api.Machine
	if err := r.client.Do(context.Background(), http.MethodGet, "/api/v1/machines/"+name, nil, &m); err != nil {
		r.t.Fatal(err)
	}
	return m
}

func (r *rig) waitProtected(name string) {
	r.t.Helper()
	deadline := time.Now().Add(hung)
	for time.Now().Before(deadline) {
		var m api.Machine
		if err := r.client.Do(context.Background(), http.MethodGet, "/api/v1/machines/"+name, nil, &m); err == nil && m.State == replication.StateProtected {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.t.Fatalf("machine %s not protected in time: %+v", name, r.machine(name))
}

func (r *rig) recover(name, point, out string) {
	r.t.Helper()
	if _, err := r.client.RecoverPoint(context.Background(), name, point, out, replication.RecoverOptions{}); err != nil {
		r.t.Fatal(err)
	}
}

func TestReplicateTagRecover(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	d0, d1 := filepath.Join(dir, "d0.img"), filepath.Join(dir, "d1.img")
	mustDisk(t, d0, 8<<20, 1)
	mustDisk(t, d1, 4<<20+512, 2)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0}, agent.DiskSpec{Name: "d1", Path: d1})
	ra := startAgent(t, cfg)

	// Write through the splitter while the initial copy runs.
	c0, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer c0.Close()
	c1, err := nbd.Dial(ctx, cfg.NBD, "d1")
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	rnd := rand.New(rand.NewPCG(9, 9))
	write := func(n int) {
		for i := 0; i < n; i++ {
			c := c0
			if i%3 == 0 {
				c = c1
			}
			b := make([]byte, 512*(1+rnd.IntN(64)))
			for j := range b {
				b[j] = byte(rnd.IntN(256))
			}
			off := rnd.Int64N((c.Size()-int64(len(b)))/512) * 512
			if err := c.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
			if i%50 == 0 {
				if err := c.WriteZeroes(off, 8192); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	write(300)
	r.waitProtected("vm1")

	type snap struct {
		id     string
		d0, d1 [32]byte
	}
	var points []snap
	for round := 0; round < 3; round++ {
		write(200)
		// Quiesced: no write in flight while tagging.
		p, err := r.client.Tag(ctx, "vm1", round == 1, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		points = append(points, snap{p.ID, fileSum(t, d0), fileSum(t, d1)})
	}
	write(100) // later writes must not leak into earlier points

	// The process server's figures count what came in and went out.
	var ps api.ProcessServer
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/process-server", nil, &ps); err != nil {
		t.Fatal(err)
	}
	if ps.Compression <= 0 || ps.CacheFreeB == 0 || ps.CacheFree <= 0 || ps.CacheFree > 1 ||
		!slices.Contains([]string{api.CacheOK, api.CacheWarning, api.CacheCritical}, ps.CacheState) ||
		ps.Target == "" {
		t.Fatalf("process server figures: %+v", ps)
	}
	for _, p := range points {
		out := filepath.Join(dir, "out-"+p.id)
		r.recover("vm1", p.id, out)
		if fileSum(t, filepath.Join(out, "d0.img")) != p.d0 || fileSum(t, filepath.Join(out, "d1.img")) != p.d1 {
			t.Fatalf("point %s: recovered images differ from the source at that point", p.id)
		}
	}

	// The same points, straight from the target with no server running.
	ra.close()
	r.stop()
	tgt, err := server.OpenTarget(ctx, "file://"+filepath.Join(dir, "srv", "target"), "", server.ExistingTarget)
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	pass, err := api.ReadSecretFile(filepath.Join(dir, "srv", server.PassphraseFile))
	if err != nil {
		t.Fatal(err)
	}
	cat, _, err := replication.OpenVault(ctx, tgt, pass)
	if err != nil {
		t.Fatal(err)
	}
	// Everything on the target but the vault descriptor is encrypted.
	objs, _ := tgt.ListObjects(ctx, "")
	for _, o := range objs {
		b, _ := tgt.GetObject(ctx, o.Key)
		if o.Key != "vault" && !bytes.HasPrefix(b, []byte("ASRENC")) {
			t.Errorf("object %s on the target is not encrypted", o.Key)
		}
	}
	m, err := cat.FindMachine(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range points {
		pt, err := cat.FindPoint(ctx, m.ID, p.id)
		if err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(dir, "offline-"+p.id)
		if _, err := replication.RecoverPoint(ctx, cat, m, pt, out, replication.RecoverOptions{}); err != nil {
			t.Fatal(err)
		}
		if fileSum(t, filepath.Join(out, "d0.img")) != p.d0 || fileSum(t, filepath.Join(out, "d1.img")) != p.d1 {
			t.Fatalf("offline point %s differs", p.id)
		}
	}
}

func TestWrongPassphraseRegistersNothing(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 1<<20, 1)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	bad := filepath.Join(dir, "bad-pass")
	os.WriteFile(bad, []byte("not-the-passphrase\n"), 0o600)
	cfg.PassphraseFile = bad
	_, err := agent.New(context.Background(), cfg)
	if !errors.Is(err, agent.ErrWrongPassphrase) {
		t.Fatalf("agent.New = %v, want ErrWrongPassphrase", err)
	}
	ms, err := r.srv.Machines(context.Background())
	if err != nil || len(ms) != 0 {
		t.Fatalf("machines after a refused registration: %v, %v", ms, err)
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, "cert.pem")); err == nil {
		t.Fatal("the agent kept a certificate")
	}
}

func TestAgentAndServerRestartResume(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 16<<20, 3)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	id := ra.a.MachineID()
	ra.close()

	// Writes while the server is down are spooled and arrive later.
	r.stop()
	ra = startAgent(t, cfg)
	if ra.a.MachineID() != id {
		t.Fatalf("restarted agent has a new identity")
	}
	c, err := nbd.Dial(ctx, cfg.NBD, "d")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteAt(bytes.Repeat([]byte{0xee}, 1<<20), 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	r.start()
	p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("recovered image differs after restarts")
	}
}

// syncBuffer is a goroutine-safe buffer for capturing logs.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestMalformedDataConnectionHarmsNothingElse(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	var logs syncBuffer
	r := &rig{t: t, dir: dir, log: slog.New(slog.NewTextHandler(&logs, nil))}
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 2<<20, 1)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	startAgent(t, cfg)
	r.waitProtected("vm1")

	// A client without a certificate is refused in the TLS handshake.
	caPEM, _ := os.ReadFile(filepath.Join(dir, "srv", "ca.pem"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	addr := r.srv.DataAddr().String()
	if c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}); err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a data connection without a client certificate was accepted")
		}
		c.Close()
	}

	// The agent's own certificate, then garbage instead of frames.
	cert, err := tls.LoadX509KeyPair(filepath.Join(cfg.StateDir, "cert.pem"), filepath.Join(cfg.StateDir, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	for i, junk := range [][]byte{
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		append([]byte("ASRF\x01\x01\x00\x00"), bytes.Repeat([]byte{0xff}, 64)...), // huge lengths, bad checksum
	} {
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{cert}})
		if err != nil {
			t.Fatal(err)
		}
		c.Write(junk)
		c.CloseWrite() // no more bytes: a short junk becomes a truncated frame
		// A connection the server kept open would stay open for good.
		c.SetReadDeadline(time.Now().Add(hung))
		if _, err := io.ReadAll(c); err != nil && !errors.Is(err, io.EOF) {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("junk %d: the server kept a malformed connection open", i)
			}
		}
		c.Close()
	}
	deadline := time.Now().Add(hung)
	for !strings.Contains(logs.String(), "protocol error") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "protocol error") {
		t.Fatalf("no logged reason for the closed connections:\n%s", logs.String())
	}
	// The real agent is unaffected.
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil {
		t.Fatalf("tag after malformed connections: %v", err)
	}
}

// A policy assigned to a running agent changes its point schedule at once,
// without a restart.
func TestPolicyReachesRunningAgent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 2<<20, 1)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	startAgent(t, cfg)
	r.waitProtected("vm1")
	// The default policy makes a point every 5 minutes: none come now.
	time.Sleep(1500 * time.Millisecond)
	var points []api.PointJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/points", nil, &points); err != nil || len(points) != 0 {
		t.Fatalf("points under the default policy: %v %v", points, err)
	}
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/policies", api.PolicyJSON{Name: "fast", CrashInterval: "5s"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/vm1/policy", api.AssignRequest{Policy: "fast"}, nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(hung)
	for len(points) < 2 && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
		if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/points", nil, &points); err != nil {
			t.Fatal(err)
		}
	}
	if len(points) < 2 {
		t.Fatalf("%d points %s after assigning a 5 s policy", len(points), hung)
	}
	for _, p := range points {
		if p.Kind != "crash" {
			t.Fatalf("scheduled point %+v is not crash-consistent", p)
		}
	}
}

func TestVaultCreatedOnceAndReused(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	r := startServer(t, dir)
	srvDir := filepath.Join(dir, "srv")
	for name, mode := range map[string]os.FileMode{"passphrase": 0o600, "admin-token": 0o600, "ca-key.pem": 0o600} {
		st, err := os.Stat(filepath.Join(srvDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s has mode %v, want %v", name, st.Mode().Perm(), mode)
		}
	}
	if _, err := os.Stat(filepath.Join(srvDir, "vault.db-wal")); err != nil {
		t.Errorf("vault database is not in WAL mode: %v", err)
	}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(srvDir, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	tok, ca, pass := read("admin-token"), read("ca.pem"), read("passphrase")
	r.stop()
	r.start()
	if read("admin-token") != tok || read("ca.pem") != ca || read("passphrase") != pass {
		t.Fatal("a restart replaced the vault's secrets or CA")
	}
	if _, err := r.srv.Machines(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestPolicyAPIRulesAndFailbackTwin(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := startServer(t, t.TempDir())
	var ps []api.PolicyJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/policies", nil, &ps); err != nil {
		t.Fatal(err)
	}
	if len(ps) != 2 || ps[0].Name != "default" || ps[1].Name != "default-failback" || ps[1].FailbackOf != "default" ||
		ps[0].Retention != "24h0m0s" || ps[0].AppFrequency != "4h0m0s" || ps[0].CrashInterval != "5m0s" {
		t.Fatalf("policies at first start: %+v", ps)
	}
	err := r.client.Do(ctx, http.MethodPost, "/api/v1/policies", api.PolicyJSON{Name: "long", Retention: "100h"}, nil)
	if err == nil || !strings.Contains(err.Error(), "retention") || !strings.Contains(err.Error(), "72h") {
		t.Fatalf("retention over the standard limit: %v", err)
	}
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/policies", api.PolicyJSON{Name: "gold", Retention: "48h", AppFrequency: "2h"}, nil); err != nil {
		t.Fatal(err)
	}
	err = r.client.Do(ctx, http.MethodPatch, "/api/v1/policies/gold", api.PolicyJSON{CrashInterval: "1s"}, nil)
	if err == nil || !strings.Contains(err.Error(), "crash-consistent interval") {
		t.Fatalf("crash interval under 5s: %v", err)
	}
	var gold api.PolicyJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/policies/gold", nil, &gold); err != nil {
		t.Fatal(err)
	}
	if gold.CrashInterval != "5m0s" || gold.Retention != "48h0m0s" {
		t.Fatalf("a rejected change changed the policy: %+v", gold)
	}
	// The twin has ASR's failback defaults, not gold's settings.
	var fb api.PolicyJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/policies/gold-failback", nil, &fb); err != nil || fb.FailbackOf != "gold" ||
		fb.RPOThreshold != "15m0s" || fb.Retention != "24h0m0s" || fb.AppFrequency != "1h0m0s" || fb.CrashInterval != "5m0s" || fb.PITWindow != "1h0m0s" ||
		!strings.Contains(fb.Notes, "app_frequency: not applied") {
		t.Fatalf("failback twin: %+v %v", fb, err)
	}
	if ps[1].RPOThreshold != "15m0s" || ps[1].AppFrequency != "1h0m0s" || ps[1].Retention != "24h0m0s" {
		t.Fatalf("default-failback: %+v", ps[1])
	}
	// Editable, under the same rules; a refused change changes nothing.
	if err := r.client.Do(ctx, http.MethodPatch, "/api/v1/policies/gold-failback", api.PolicyJSON{RPOThreshold: "10s", CrashInterval: "30s"}, &fb); err != nil ||
		fb.RPOThreshold != "10s" || fb.CrashInterval != "30s" || fb.FailbackOf != "gold" {
		t.Fatalf("set the failback policy: %+v %v", fb, err)
	}
	err = r.client.Do(ctx, http.MethodPatch, "/api/v1/policies/gold-failback", api.PolicyJSON{AppFrequency: "30m"}, nil)
	if err == nil || !strings.Contains(err.Error(), "app-consistent frequency") || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("a failback policy's app-consistent frequency under 1h: %v", err)
	}
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/policies/gold-failback", nil, &fb); err != nil || fb.AppFrequency != "1h0m0s" || fb.RPOThreshold != "10s" {
		t.Fatalf("after a refused change: %+v %v", fb, err)
	}
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/policies/gold", nil, &gold); err != nil || gold.RPOThreshold != "15m0s" || gold.CrashInterval != "5m0s" {
		t.Fatalf("editing the failback policy changed its replication policy: %+v %v", gold, err)
	}
	// A name taken by a twin is refused whole.
	err = r.client.Do(ctx, http.MethodPost, "/api/v1/policies", api.PolicyJSON{Name: "gold-failback"}, nil)
	if !isStatus(err, http.StatusConflict) {
		t.Fatalf("a policy named like a twin: %v", err)
	}
}

// Retention: points older than the policy's retention are pruned on
// schedule (with an injected clock), the newest is always kept, and their
// copy-on-write space is reclaimed.
func TestRetentionPrunesAndReclaims(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) {
		c.Now = func() time.Time { return time.Unix(0, clock.Load()) }
		c.PolicyEvery, c.PruneEvery = 50*time.Millisecond, 50*time.Millisecond
	}}
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 4<<20, 1)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	startAgent(t, cfg)
	r.waitProtected("vm1")
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/policies", api.PolicyJSON{Name: "short", Retention: "1h", AppFrequency: "0", PITWindow: "30m"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/vm1/policy", api.AssignRequest{Policy: "short"}, nil); err != nil {
		t.Fatal(err)
	}
	c, err := nbd.Dial(ctx, cfg.NBD, "d")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var ids []string
	for i := 0; i < 4; i++ {
		// Each point's churn is saved in its copy-on-write file.
		if err := c.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 1<<20), 0); err != nil {
			t.Fatal(err)
		}
		p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, p.ID)
	}
	cows := func() int {
		m, _ := filepath.Glob(filepath.Join(dir, "srv", "target", "disks", "machines", "*", "disks", "0.disk", "snap", "*.cow"))
		return len(m)
	}
	if n := cows(); n != 4 {
		t.Fatalf("%d snapshot files for 4 points", n)
	}
	clock.Add(int64(2 * time.Hour)) // every point is now past the retention
	deadline := time.Now().Add(hung)
	var points []api.PointJSON
	for time.Now().Before(deadline) {
		if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/points", nil, &points); err != nil {
			t.Fatal(err)
		}
		// The listing may drop a point before its snapshot files are
		// merged (catalog entry first): wait for both.
		if len(points) == 1 && cows() == 1 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(points) != 1 || points[0].ID != ids[3] {
		t.Fatalf("after the retention: %+v, want only the newest point %s", points, ids[3])
	}
	if n := cows(); n != 1 {
		t.Fatalf("%d snapshot files left, want 1: space not reclaimed", n)
	}
	// The newest point still recovers exactly.
	out := filepath.Join(dir, "out")
	r.recover("vm1", ids[3], out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("the kept point differs from the source")
	}
}

// Crossing the policy's RPO threshold raises an event; coming back under it
// raises another.
func TestRPOThresholdEvents(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) {
		c.PolicyEvery, c.AlertClear = 50*time.Millisecond, 100*time.Millisecond
	}}
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 1<<20, 1)
	startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk}))
	r.waitProtected("vm1")
	events := func() []api.EventJSON {
		var es []api.EventJSON
		if err := r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=vm1", nil, &es); err != nil {
			t.Fatal(err)
		}
		return es
	}
	waitEvent := func(kind string) {
		t.Helper()
		deadline := time.Now().Add(hung)
		for time.Now().Before(deadline) {
			for _, e := range events() {
				if e.Kind == kind {
					return
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("no %s event; events: %+v", kind, events())
	}
	// A threshold the RPO (about the status interval) always exceeds.
	if err := r.client.Do(ctx, http.MethodPatch, "/api/v1/policies/default", api.PolicyJSON{RPOThreshold: "1ms"}, nil); err != nil {
		t.Fatal(err)
	}
	waitEvent("rpo-exceeded")
	if err := r.client.Do(ctx, http.MethodPatch, "/api/v1/policies/default", api.PolicyJSON{RPOThreshold: "1h"}, nil); err != nil {
		t.Fatal(err)
	}
	waitEvent("rpo-recovered")
}

// Any point in time: for instants between sequential writes, the recovered
// disk holds exactly the writes completed before the instant (a write in
// flight at the instant may or may not be there), through the server and
// from the target alone.
func TestRecoverAnyPointInTime(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 4<<20, 1)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil { // a base point
		t.Fatal(err)
	}
	c, err := nbd.Dial(ctx, cfg.NBD, "d")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	base, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	type write struct {
		off          int64
		data         []byte
		start, reply time.Time
	}
	var writes []write
	rnd := rand.New(rand.NewPCG(4, 4))
	for i := 0; i < 60; i++ {
		w := write{off: int64(rnd.IntN(1000)) * 4096, data: bytes.Repeat([]byte{byte(i + 1)}, 4096)}
		w.start = time.Now()
		if err := c.WriteAt(w.data, w.off); err != nil {
			t.Fatal(err)
		}
		w.reply = time.Now()
		writes = append(writes, w)
		time.Sleep(3 * time.Millisecond)
	}
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil { // everything kept on the target
		t.Fatal(err)
	}
	// model of the disk after the writes i with keep(i)
	model := func(keep func(int) bool) []byte {
		b := append([]byte(nil), base...)
		for i, w := range writes {
			if keep(i) {
				copy(b[w.off:], w.data)
			}
		}
		return b
	}
	check := func(got []byte, at time.Time) {
		t.Helper()
		// Writes replied before at must be in; writes started after at out;
		// a write spanning at either way (at most one: they are sequential).
		in := func(i int) bool { return writes[i].reply.Before(at) }
		if bytes.Equal(got, model(in)) {
			return
		}
		for i, w := range writes {
			if !w.start.After(at) && !w.reply.Before(at) {
				if bytes.Equal(got, model(func(j int) bool { return in(j) || j == i })) {
					return
				}
			}
		}
		t.Fatalf("image at %s is not the prefix of writes completed by then", at.Format(time.RFC3339Nano))
	}
	var instants []time.Time
	for _, i := range []int{0, 7, 30, 59} {
		instants = append(instants, writes[i].reply.Add(time.Millisecond))
	}
	instants = append(instants, writes[45].start.Add(-time.Millisecond))
	for k, at := range instants {
		out := filepath.Join(dir, fmt.Sprintf("pit-%d", k))
		if _, err := r.client.RecoverTime(ctx, "vm1", at, out, replication.RecoverOptions{}); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(filepath.Join(out, "d.img"))
		check(got, at)
	}
	// Before the first point: a clear error.
	if _, err := r.client.RecoverTime(ctx, "vm1", writes[0].start.Add(-time.Hour), filepath.Join(dir, "early"), replication.RecoverOptions{}); err == nil ||
		!strings.Contains(err.Error(), "before the oldest recovery point") {
		t.Fatalf("a time before every point: %v", err)
	}
	// The site is gone: the same from the target alone.
	ra.close()
	r.stop()
	tgt, err := server.OpenTarget(ctx, "file://"+filepath.Join(dir, "srv", "target"), "", server.ExistingTarget)
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	pass, err := api.ReadSecretFile(filepath.Join(dir, "srv", server.PassphraseFile))
	if err != nil {
		t.Fatal(err)
	}
	cat, _, err := replication.OpenVault(ctx, tgt, pass)
	if err != nil {
		t.Fatal(err)
	}
	m, err := cat.FindMachine(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	for k, at := range instants {
		out := filepath.Join(dir, fmt.Sprintf("pit-offline-%d", k))
		if _, _, _, err := replication.RecoverTime(ctx, cat, m, at, out, replication.RecoverOptions{}); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(filepath.Join(out, "d.img"))
		check(got, at)
	}
}

// A replication group's points are one cut across its machines: with
// writes made one after the other across three machines, every recovered
// group point holds a prefix of them (a write is in it only if every
// earlier write, on whichever machine, is too).
func TestGroupPointsAreConsistentCuts(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	checkGroupCuts(t, startServer(t, dir), dir, nil, 5)
}

// checkGroupCuts is TestGroupPointsAreConsistentCuts on rig r, with the
// machines named in on (vm0, vm1, vm2 -> a scale-out process server r
// runs) switched there before the writes and the cuts, and back to the
// built-in one before their recovery; cuts group points are made. Every
// member's point records the group point's cut.
func checkGroupCuts(t *testing.T, r *rig, dir string, on map[string]string, cuts int) {
	ctx := context.Background()
	const n = 3
	var clients []*nbd.Client
	var agents []*runningAgent
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("vm%d", i)
		disk := filepath.Join(dir, name+".img")
		if err := os.WriteFile(disk, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		os.Truncate(disk, 32<<20) // 65536 blocks: no wrap-around in this test
		cfg := r.agentConfig(name, agent.DiskSpec{Name: "d", Path: disk})
		agents = append(agents, startAgent(t, cfg))
		r.waitProtected(name)
		if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/"+name+"/group", api.GroupRequest{Group: "g"}, nil); err != nil {
			t.Fatal(err)
		}
		c, err := nbd.Dial(ctx, cfg.NBD, "d")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	for name, ps := range on {
		if _, err := r.client.SwitchProcessServer(ctx, name, ps); err != nil {
			t.Fatal(err)
		}
		r.waitConnected(name)
	}
	// Write k goes to machine k%n at block k/n: an 8-byte counter k+1.
	stop := make(chan struct{})
	var wrote atomic.Int64
	var full atomic.Bool // every block written
	done := make(chan error, 1)
	go func() {
		for k := 0; ; k++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if k/n >= 65536 {
				full.Store(true)
				<-stop
				done <- nil
				return
			}
			b := make([]byte, 512)
			binary.LittleEndian.PutUint64(b, uint64(k+1))
			if err := clients[k%n].WriteAt(b, int64(k/n)*512); err != nil {
				done <- err
				return
			}
			wrote.Store(int64(k + 1))
		}
	}()
	var gps []api.GroupPointJSON
	for i := 0; i < cuts; i++ {
		// Each cut comes after at least 20 more writes, however slow
		// they are (or after the last).
		from, deadline := wrote.Load(), time.Now().Add(hung)
		for wrote.Load() < from+20 && !full.Load() {
			if time.Now().After(deadline) {
				t.Fatalf("the writer is stuck at write %d", wrote.Load())
			}
			select {
			case err := <-done:
				t.Fatalf("the writer stopped: %v", err)
			case <-time.After(time.Millisecond):
			}
		}
		if i == 0 && full.Load() {
			t.Fatal("the writer wrote every block before the first cut: no cut runs under its writes")
		}
		var gp api.GroupPointJSON
		t0 := time.Now()
		if err := r.client.Do(ctx, http.MethodPost, "/api/v1/groups/g/points", TagRequestNoWait(), &gp); err != nil {
			t.Fatal(err)
		}
		t.Logf("group point %s in %s, after write %d", gp.ID, time.Since(t0).Round(time.Millisecond), wrote.Load())

		if len(gp.Members) != n || gp.Cut == "" {
			t.Fatalf("group point with %d members, cut %q", len(gp.Members), gp.Cut)
		}
		gps = append(gps, gp)
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for _, gp := range gps {
		for name, pid := range gp.Members {
			var p api.PointJSON
			if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/"+name+"/points/"+pid, nil, &p); err != nil {
				t.Fatal(err)
			}
			if p.ID != pid || p.Cut != gp.Cut {
				t.Fatalf("group point %s (cut %s): %s's point %s records cut %q: %+v", gp.ID, gp.Cut, name, pid, p.Cut, p)
			}
		}
	}
	for name := range on {
		if _, err := r.client.SwitchProcessServer(ctx, name, api.BuiltinProcessServer); err != nil {
			t.Fatal(err)
		}
	}
	if wrote.Load() < 100 {
		t.Fatalf("only %d writes during the cuts", wrote.Load())
	}
	for i, gp := range gps {
		present := map[uint64]bool{}
		for name, pid := range gp.Members {
			out := filepath.Join(dir, fmt.Sprintf("g%d", i), name)
			r.recover(name, pid, out)
			img, _ := os.ReadFile(filepath.Join(out, "d.img"))
			for off := 0; off+512 <= len(img); off += 512 {
				if v := binary.LittleEndian.Uint64(img[off:]); v > 0 && v <= uint64(wrote.Load()) {
					// only counters this test wrote, at their own block
					k := v - 1
					if machineOf := fmt.Sprintf("vm%d", k%n); machineOf == name && int(k/n)*512 == off {
						present[v] = true
					}
				}
			}
		}
		var max uint64
		for v := range present {
			if v > max {
				max = v
			}
		}
		for v := uint64(1); v < max; v++ {
			if !present[v] {
				t.Fatalf("group point %d holds write %d but not the earlier write %d: not a consistent cut", i, max, v)
			}
		}
		t.Logf("group point %s: the first %d writes", gp.ID, max)
	}
	for i, a := range agents {
		st := a.a.Stats()
		t.Logf("vm%d: %d holds, p50 %.0f ms, p99 %.0f ms", i, st.Holds.Count, st.Holds.P50Ms, st.Holds.P99Ms)
	}
}

// TagRequestNoWait is an empty tag request body.
func TagRequestNoWait() api.TagRequest { return api.TagRequest{} }

// Scan mode: a disk the guest writes directly (not through NBD) is copied
// by periodic scans; its points are marked inconsistent, except an
// application-consistent one, which scans while frozen.
func TestScanModeDisk(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	start := time.Now()
	deadline0 := func(*testing.T) time.Time { return start.Add(hung) }
	dir := t.TempDir()
	r := startServer(t, dir)
	root, data := filepath.Join(dir, "root.img"), filepath.Join(dir, "data.img")
	mustDisk(t, root, 8<<20, 1)
	mustDisk(t, data, 4<<20, 2)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "root", Path: root, Scan: true, ScanInterval: time.Second},
		agent.DiskSpec{Name: "data", Path: data})
	startAgent(t, cfg)
	r.waitProtected("vm1")
	if _, err := nbd.Dial(ctx, cfg.NBD, "root"); err == nil {
		t.Fatal("a scan-mode disk is served over NBD")
	}
	// The console and the API say which mode each disk runs in (as the
	// mirror writes what the agent's Hello said).
	for modes := map[string]string{}; modes["root"] != api.DiskModeScan || modes["data"] != api.DiskModeNBD; {
		if time.Now().After(deadline0(t)) {
			t.Fatalf("disk modes %v, want root scan and data nbd", modes)
		}
		time.Sleep(20 * time.Millisecond)
		for _, d := range r.machine("vm1").Disks {
			modes[d.Name] = d.Mode
		}
	}
	// The guest writes the root disk directly.
	f, err := os.OpenFile(root, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(bytes.Repeat([]byte("root-change "), 50000), 3<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 1<<20), 0); err != nil { // a block zeroed
		t.Fatal(err)
	}
	// A scan pass (every second) picks the changes up: points are taken
	// until one holds them. A point never splits a pass (both take the
	// agent's point lock), so a point either holds a pass's changes or not.
	deadline := time.Now().Add(hung)
	for n := 1; ; n++ {
		p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if p.Kind != replication.PointInconsistent {
			t.Fatalf("a point of a machine with a scan disk has kind %q, want %q", p.Kind, replication.PointInconsistent)
		}
		out := filepath.Join(dir, fmt.Sprintf("out1-%d", n))
		r.recover("vm1", p.ID, out)
		if fileSum(t, filepath.Join(out, "root.img")) == fileSum(t, root) && fileSum(t, filepath.Join(out, "data.img")) == fileSum(t, data) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("recovered disks still differ from the sources after %d points in %s of scans", n, hung)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A change right before an application-consistent point is in it: the
	// point scans while frozen.
	if _, err := f.WriteAt(bytes.Repeat([]byte{0x5a}, 4096), 6<<20); err != nil {
		t.Fatal(err)
	}
	p, err := r.client.Tag(ctx, "vm1", true, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if p.Kind != replication.PointApp {
		t.Fatalf("application-consistent point has kind %q", p.Kind)
	}
	out := filepath.Join(dir, "out2")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "root.img")) != fileSum(t, root) {
		t.Fatal("the application-consistent point misses a change made just before it")
	}
}

// An operator's resync compares the disk with its replica and sends only
// what differs: here blocks changed behind the splitter's back.
func TestOperatorResyncSendsOnlyTheDelta(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	const size = 16 << 20
	mustDisk(t, disk, size, 7)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	// 20 blocks of 4 KiB changed directly in the file: the log never saw them.
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	rnd := rand.New(rand.NewPCG(5, 5))
	const changed = 20
	for i := 0; i < changed; i++ {
		b := make([]byte, 4096)
		for j := range b {
			b[j] = byte(rnd.IntN(256))
		}
		f.WriteAt(b, int64(rnd.IntN(size/4096))*4096)
	}
	f.Close()
	var rows []api.ResyncJSON
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/vm1/resync", api.ResyncRequest{}, &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].State != "running" {
		t.Fatalf("resync not started at once: %+v", rows)
	}
	// Done when the disk is protected again and the row is gone.
	deadline := time.Now().Add(hung)
	for {
		var left []api.ResyncJSON
		r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/resync", nil, &left)
		if len(left) == 0 && r.machine("vm1").State == replication.StateProtected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("resync not done: %+v, machine %+v", left, r.machine("vm1"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	st := ra.a.Stats()
	_ = st
	p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("after the resync the replica differs from the source")
	}
	var es []api.EventJSON
	r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=vm1", nil, &es)
	var msg string
	for _, e := range es {
		if e.Kind == "resync-done" {
			msg = e.Message
		}
	}
	var compared, sent int64
	if _, err := fmt.Sscanf(msg[strings.Index(msg, "compared"):], "compared %d bytes, sent %d", &compared, &sent); err != nil {
		t.Fatalf("resync-done event %q: %v", msg, err)
	}
	if compared != size || sent > changed*4096 || sent < 4096 {
		t.Fatalf("compared %d bytes and sent %d for %d changed blocks of 4 KiB", compared, sent, changed)
	}
	t.Logf("compared %d bytes, sent %d (%d blocks changed)", compared, sent, changed)
}

// One operator request starts one resync job, even when the resync loop
// runs while the request is starting it: the request marks the row
// scheduled, and the loop, which starts scheduled rows, must not start it a
// second time (the second job would replace the first on the agent). The
// request's start is held until the loop has tried the row.
func TestOperatorResyncStartsOneJob(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	var attempts, starts, passes atomic.Int64
	release := make(chan struct{})
	var releaseOnce sync.Once
	wake := make(chan struct{}, 1)
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.ResyncEvery = 5 * time.Millisecond }}
	r.opened = func(s *server.Server) {
		server.SetResyncHook(s, func(event string) {
			switch event {
			case "attempt":
				attempts.Add(1)
			case "start":
				if starts.Add(1) == 1 {
					<-release // the first start waits for the test
				}
			case "pass":
				passes.Add(1)
			}
			select {
			case wake <- struct{}{}:
			default:
			}
		})
	}
	r.start()
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) }) // before the server stops
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		safety := time.NewTimer(2 * time.Minute) // a hung server, not a slow one
		defer safety.Stop()
		for !ok() {
			select {
			case <-wake:
			case <-safety.C:
				t.Fatalf("%s: %d attempts, %d starts, %d passes of the loop", what, attempts.Load(), starts.Load(), passes.Load())
			}
		}
	}
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 8<<20, 11)
	startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk}))
	r.waitProtected("vm1")

	type result struct {
		rows []api.ResyncJSON
		err  error
	}
	done := make(chan result, 1)
	go func() {
		var rows []api.ResyncJSON
		err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/vm1/resync", api.ResyncRequest{}, &rows)
		done <- result{rows, err}
	}()
	// The request's attempt comes first (there is no row before it); the
	// second is the loop's, which sees the row the request marked.
	waitFor("the loop did not try the requested resync", func() bool { return attempts.Load() >= 2 })
	releaseOnce.Do(func() { close(release) })
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	if len(res.rows) != 1 || res.rows[0].State != "running" {
		t.Fatalf("resync not started at once: %+v", res.rows)
	}
	// Once a pass of the loop that began before the request returned has
	// ended, the loop's attempt is over.
	p := passes.Load()
	waitFor("the loop did not finish its pass", func() bool { return passes.Load() > p })
	if n := starts.Load(); n != 1 {
		t.Fatalf("one operator request started %d resync jobs", n)
	}
}

// loopPasses counts the passes of a server's resync loop (its test hook), so
// that a test can know the loop has looked at the rows, instead of hoping
// it has within some time.
type loopPasses struct{ n atomic.Int64 }

// watch sets the hook on a server just opened (rig.opened).
func (l *loopPasses) watch(s *server.Server) {
	server.SetResyncHook(s, func(event string) {
		if event == "pass" {
			l.n.Add(1)
		}
	})
}

// waitWhole waits until a whole pass of the loop began and ended after the
// call: two more ends of a pass.
func (l *loopPasses) waitWhole(t *testing.T) {
	t.Helper()
	from, deadline := l.n.Load(), time.Now().Add(hung)
	for l.n.Load() < from+2 {
		if time.Now().After(deadline) {
			t.Fatalf("the resync loop made %d passes in %s", l.n.Load()-from, hung)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A disk that grows: the replica grows and the new area is resynced, by the
// scheduler, only once the resync window opens (injected clock); an
// operator's request would run at once.
func TestGrownDiskResyncedInTheWindow(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	var clock atomic.Int64
	noon := time.Date(2026, 11, 26, 12, 0, 0, 0, time.Local)
	clock.Store(noon.UnixNano())
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) {
		c.Now = func() time.Time { return time.Unix(0, clock.Load()) }
		c.ResyncEvery = 50 * time.Millisecond
	}}
	var loop loopPasses
	r.opened = loop.watch
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 8<<20, 3)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	ra.close()
	// Grow the disk to 12 MiB with data in the new area.
	f, _ := os.OpenFile(disk, os.O_RDWR, 0)
	f.WriteAt(bytes.Repeat([]byte("grown "), 100000), 9<<20)
	f.Close()
	os.Truncate(disk, 12<<20)
	startAgent(t, cfg)
	var rows []api.ResyncJSON
	deadline := time.Now().Add(hung)
	for len(rows) == 0 && time.Now().Before(deadline) {
		r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/resync", nil, &rows)
		time.Sleep(50 * time.Millisecond)
	}
	if len(rows) != 1 || !strings.Contains(rows[0].Reason, "grew") {
		t.Fatalf("no resync scheduled for the grown disk: %+v", rows)
	}
	// Nothing runs at noon: the loop has looked at the row and left it.
	loop.waitWhole(t)
	r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/resync", nil, &rows)
	if rows[0].State != "scheduled" || !strings.HasPrefix(rows[0].Scheduled, "2026-11-26T") {
		t.Fatalf("at noon: %+v, want scheduled for tonight", rows[0])
	}
	want := time.Date(2026, 11, 26, 22, 0, 0, 0, time.Local).UTC().Format(time.RFC3339)
	if rows[0].Scheduled != want {
		t.Fatalf("scheduled for %s, want %s", rows[0].Scheduled, want)
	}
	if _, err := r.client.Tag(ctx, "vm1", false, 10*time.Second); err == nil {
		t.Fatal("a point was made while the disk needs a resync")
	}
	// The window opens.
	clock.Store(time.Date(2026, 11, 26, 22, 30, 0, 0, time.Local).UnixNano())
	deadline = time.Now().Add(hung)
	for r.machine("vm1").State != replication.StateProtected {
		if time.Now().After(deadline) {
			t.Fatalf("not resynced in the window: %+v", r.machine("vm1"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("the grown disk's replica differs from the source")
	}
}

// TestScheduledResyncRetriesThenFails: an automatic resync whose agent is
// unreachable is retried with backoff inside the window; when the next try
// would fall outside it, it stays failed with the reason on the machine
// (API, event) until an operator starts it, which then runs at once.
func TestScheduledResyncRetriesThenFails(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	var clock atomic.Int64
	at := func(h, m, s int) { clock.Store(time.Date(2026, 11, 27, h, m, s, 0, time.Local).UnixNano()) }
	clock.Store(time.Date(2026, 11, 26, 12, 0, 0, 0, time.Local).UnixNano()) // outside the default window (22:00-06:00)
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) {
		c.Now = func() time.Time { return time.Unix(0, clock.Load()) }
		c.ResyncEvery = 20 * time.Millisecond
	}}
	var loop loopPasses
	r.opened = loop.watch
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 8<<20, 4)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	ra.close()
	os.Truncate(disk, 12<<20) // grown: needs a resync
	ra = startAgent(t, cfg)
	rows := func() []api.ResyncJSON {
		var rows []api.ResyncJSON
		r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/resync", nil, &rows)
		return rows
	}
	waitRow := func(what string, ok func(api.ResyncJSON) bool) api.ResyncJSON {
		t.Helper()
		deadline := time.Now().Add(hung)
		for {
			if rs := rows(); len(rs) == 1 && ok(rs[0]) {
				return rs[0]
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %+v", what, rows())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// The grown disk waits for the window; its agent goes away meanwhile.
	waitRow("resync scheduled", func(x api.ResyncJSON) bool { return x.State == "scheduled" })
	ra.close()
	at(5, 50, 0) // the next night, inside the window, near its end
	first := waitRow("first attempt fails", func(x api.ResyncJSON) bool { return x.Attempts == 1 })
	if first.State != "scheduled" || first.LastError == "" {
		t.Fatalf("after one failed attempt inside the window: %+v", first)
	}
	loop.waitWhole(t) // the loop has looked at the row and left it
	if x := rows()[0]; x.Attempts != 1 {
		t.Fatalf("retried before its backoff: %+v", x)
	}
	at(5, 50, 31) // backoff 30 s over
	waitRow("second attempt", func(x api.ResyncJSON) bool { return x.Attempts == 2 && x.State == "scheduled" })
	at(5, 59, 0) // the next backoff (1 min) would end after 06:00
	failed := waitRow("failed when the window closes", func(x api.ResyncJSON) bool { return x.State == "failed" })
	if failed.Attempts != 3 || !strings.Contains(failed.LastError, "not connected") {
		t.Fatalf("failed resync: %+v", failed)
	}
	var es []api.EventJSON
	r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=vm1", nil, &es)
	if !slices.ContainsFunc(es, func(e api.EventJSON) bool { return e.Kind == "resync-failed" }) {
		t.Fatalf("no resync-failed event: %+v", es)
	}
	if d := r.machine("vm1").Disks[0]; d.Resync == nil || d.Resync.State != api.ResyncFailed || d.Resync.LastError == "" {
		t.Fatalf("the machine does not show the failure: %+v", d.Resync)
	}
	// Failed stays failed, even in the window.
	at(5, 55, 0)
	loop.waitWhole(t)
	if x := rows()[0]; x.State != "failed" {
		t.Fatalf("a failed resync restarted by itself: %+v", x)
	}
	// The operator fixes the cause (the agent is back) and presses Resync
	// at noon: it runs at once.
	at(12, 0, 0)
	startAgent(t, cfg)
	// Pressed once the agent is back: a press before it connects fails
	// its attempt, whose retry waits 30 s of a clock that stands still.
	for deadline := time.Now().Add(hung); !r.machine("vm1").Connected; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not come back: %+v", r.machine("vm1"))
		}
	}
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/vm1/resync", api.ResyncRequest{}, nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(hung)
	for r.machine("vm1").State != replication.StateProtected {
		if time.Now().After(deadline) {
			t.Fatalf("the operator's resync did not run: %+v %+v", r.machine("vm1"), rows())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Spool overflow: with the server away the spool fills; the guest's writes
// go on (tracked in a changed-block map, not stalled), and when the server
// is back the marked blocks, and only they, are resent.
func TestSpoolOverflowResendsChangedBlocks(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 32<<20, 9) // room for the 24 MiB written below
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	cfg.SpoolMax = 16 << 20 // the smallest the agent takes
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	r.stop()
	c, err := nbd.Dial(ctx, cfg.NBD, "d")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rnd := rand.New(rand.NewPCG(6, 6))
	chunk := make([]byte, 1<<20)
	// 24 MiB of writes into a 16 MiB spool: the last ones overflow. None
	// may stall the guest.
	for i := 0; i < 24; i++ {
		for j := range chunk {
			chunk[j] = byte(rnd.IntN(256))
		}
		done := make(chan error, 1)
		go func() { done <- c.WriteAt(chunk, int64(i)<<20) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(hung): // a stalled write waits for the server: forever
			t.Fatalf("write %d stalled: the spool is full and the agent did not fall back to a changed-block map", i)
		}
	}
	r.start()
	resynced := func() bool {
		var es []api.EventJSON
		r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=vm1", nil, &es)
		for _, e := range es {
			if e.Kind == "spool-overflow-resynced" {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(hung)
	for {
		if resynced() {
			if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err == nil {
				break // the done records are applied: points again
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("not consistent again after the overflow: %+v", r.machine("vm1"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	_ = ra
	p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("after the overflow the replica differs from the source")
	}
	var es []api.EventJSON
	r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=vm1", nil, &es)
	var marked int64 = -1
	for _, e := range es {
		if e.Kind == "spool-overflow-resynced" {
			fmt.Sscanf(e.Message[strings.Index(e.Message, "(")+1:], "%d blocks marked", &marked)
		}
	}
	if marked <= 0 || marked*4096 > 24<<20 {
		t.Fatalf("blocks marked during the overflow: %d (events %+v)", marked, es)
	}
	t.Logf("%d blocks of 4 KiB marked and resent", marked)
}

// lockedBuffer collects log output written from several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// An existing data directory open to other users (0755) is made private
// with a log line, the vault database is 0600, and a target outside the
// data directory is private too.
func TestDataDirAndTargetPrivate(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	data, target := filepath.Join(dir, "data"), filepath.Join(dir, "target")
	for _, d := range []string{data, target} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var logs lockedBuffer
	srv, err := server.Open(context.Background(), server.Config{DataDir: data, Listen: "127.0.0.1:0", DataListen: "127.0.0.1:0",
		Target: "file://" + target, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	srv.Close()
	for path, want := range map[string]os.FileMode{
		data:                                     0o700,
		filepath.Join(data, server.DatabaseFile): 0o600,
		target:                                   0o700,
		filepath.Join(target, "objects", "vault"): 0o600,
	} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.Mode().Perm(); got != want {
			t.Errorf("%s: mode %04o, want %04o", path, got, want)
		}
	}
	if !strings.Contains(logs.String(), "made it private") || !strings.Contains(logs.String(), "was=0755") {
		t.Errorf("no log line says the data directory was tightened:\n%s", logs.String())
	}
}
