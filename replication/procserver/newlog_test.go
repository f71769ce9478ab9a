package procserver

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/server/pki"
)

// tlsRig is a process server listening for agents over mutual TLS, as in
// `asr server`, and the client certificate of machineID.
type tlsRig struct {
	s      *Server
	cat    *replication.Catalog
	target *gatedTarget
	addr   string
	client *tls.Config

	cfg       Config
	serverTLS *tls.Config
	stopServe func()

	mu        sync.Mutex
	atConnect []replication.MachineCatalog // the catalog on the target when each Welcome was about to be sent
}

// gatedTarget holds every object write while its gate is shut (the
// target is out of reach: the applier stalls, the cache holds the log).
type gatedTarget struct {
	replication.Target
	mu   sync.Mutex
	gate chan struct{}
	err  error // every PutObject fails with it (fail) until open
}

func (g *gatedTarget) PutObject(ctx context.Context, key string, data []byte) error {
	g.mu.Lock()
	gate, err := g.gate, g.err
	g.mu.Unlock()
	if err != nil {
		return err
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done(): // the server closes
			return ctx.Err()
		}
	}
	return g.Target.PutObject(ctx, key, data)
}

func (g *gatedTarget) shut() {
	g.mu.Lock()
	g.gate = make(chan struct{})
	g.mu.Unlock()
}

// fail makes every PutObject fail with err until open.
func (g *gatedTarget) fail(err error) {
	g.mu.Lock()
	g.err = err
	g.mu.Unlock()
}

func (g *gatedTarget) open() {
	g.mu.Lock()
	g.err = nil
	if g.gate != nil {
		close(g.gate)
		g.gate = nil
	}
	g.mu.Unlock()
}

func mustTLSRig(t *testing.T) *tlsRig { t.Helper(); return mustTLSRigWith(t, nil) }

// mustTLSRigWith is mustTLSRig with the process server's config adjusted.
func mustTLSRigWith(t *testing.T, tune func(*Config)) *tlsRig {
	t.Helper()
	dir := t.TempDir()
	ca, cert, err := pki.LoadOrCreate(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, csrPEM, err := enroll.NewKeyAndCSR(machineID)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, _, err := ca.SignClient(csrPEM, machineID)
	if err != nil {
		t.Fatal(err)
	}
	clientCert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	cat := mustCatalog(t)
	r := &tlsRig{target: &gatedTarget{Target: cat.T}, client: &tls.Config{Certificates: []tls.Certificate{clientCert}, RootCAs: ca.Pool(),
		ServerName: "localhost", MinVersion: tls.VersionTLS13}}
	r.cat = &replication.Catalog{T: r.target, Codec: cat.Codec}
	t.Cleanup(r.target.open) // before the server closes: nothing may stay held
	cfg := Config{CacheDir: filepath.Join(dir, "cache"), Catalog: r.cat,
		Logger:    slog.New(slog.NewTextHandler(io.Discard, nil)),
		Authorize: func(context.Context, string, string) (string, error) { return "vm", nil },
		// Called after attach, before the Welcome is written.
		OnConnect: func(id string, _ replication.Hello) {
			m, err := r.cat.Machine(context.Background(), id)
			if err != nil {
				t.Errorf("catalog at connect: %v", err)
			}
			r.mu.Lock()
			r.atConnect = append(r.atConnect, m)
			r.mu.Unlock()
		}}
	if tune != nil {
		tune(&cfg)
	}
	r.cfg = cfg
	r.serverTLS = &tls.Config{Certificates: []tls.Certificate{cert},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool(), MinVersion: tls.VersionTLS13}
	r.start(t)
	t.Cleanup(r.stop)
	return r
}

// start starts the process server and its listener.
func (r *tlsRig) start(t *testing.T) {
	t.Helper()
	var err error
	if r.s, err = New(context.Background(), r.cfg); err != nil {
		t.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", r.serverTLS)
	if err != nil {
		t.Fatal(err)
	}
	r.addr = l.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.s.Serve(ctx, l); close(done) }()
	r.stopServe = func() { cancel(); <-done }
}

// stop stops the process server (as a restart or the test's end does).
func (r *tlsRig) stop() {
	if r.stopServe == nil {
		return
	}
	r.stopServe()
	r.stopServe = nil
	r.s.Close()
}

// restart stops the process server and starts it again on the same cache
// and target.
func (r *tlsRig) restart(t *testing.T) {
	t.Helper()
	r.stop()
	r.start(t)
}

// lastConnect returns the catalog as it was when the last Welcome was sent.
func (r *tlsRig) lastConnect() replication.MachineCatalog {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.atConnect[len(r.atConnect)-1]
}

// testAgent is the agent's end of a data connection.
type testAgent struct {
	t  *testing.T
	c  *tls.Conn
	br *bufio.Reader
}

// refusal is the server's ERROR answer to a Hello.
type refusal struct{ replication.ErrorMessage }

func (r *refusal) Error() string { return r.Message }

// hello connects and says hello; a refusal is returned as an error.
func (r *tlsRig) hello(t *testing.T, logID string, spoolFirst, nextSeq uint64) (*testAgent, replication.Welcome, error) {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", r.addr, r.client)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ta := &testAgent{t: t, c: c, br: bufio.NewReader(c)}
	h := replication.Hello{MachineID: machineID, AgentVersion: "test", LogID: logID, SpoolFirst: spoolFirst, NextSeq: nextSeq,
		Disks: []replication.DiskInfo{{Index: 0, Name: "d", Size: 1 << 20}}}
	f, err := replication.JSONFrame(replication.FrameHello, h)
	if err != nil {
		t.Fatal(err)
	}
	ta.send(f)
	f = ta.read()
	var w replication.Welcome
	switch f.Type {
	case replication.FrameWelcome:
		if err := replication.DecodeJSON(&f, &w); err != nil {
			t.Fatal(err)
		}
		return ta, w, nil
	case replication.FrameError:
		var e replication.ErrorMessage
		replication.DecodeJSON(&f, &e)
		return ta, w, &refusal{e}
	}
	t.Fatalf("answer to hello: %s frame", f.Type)
	return nil, w, nil
}

func (ta *testAgent) send(f replication.Frame) {
	ta.t.Helper()
	ta.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if err := replication.WriteFrame(ta.c, &f); err != nil {
		ta.t.Fatal(err)
	}
}

func (ta *testAgent) read() replication.Frame {
	ta.t.Helper()
	ta.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	f, _, err := replication.ReadFrame(ta.br, nil)
	if err != nil {
		ta.t.Fatal(err)
	}
	return f
}

// waitClosed reads until the server closes the connection.
func (ta *testAgent) waitClosed() {
	ta.t.Helper()
	ta.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		_, _, err := replication.ReadFrame(ta.br, nil)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			ta.t.Fatal("the server did not close the connection")
		}
		if err != nil {
			return
		}
	}
}

// ship sends records from seq first on and waits for their acknowledgement.
func (ta *testAgent) ship(first uint64, recs ...replication.Record) {
	ta.t.Helper()
	f := dataFrame(first, recs...)
	f.Flags |= replication.FlagTag // seal at once
	ta.send(f)
	last := first + uint64(len(recs)) - 1
	for {
		if a := ta.read(); a.Type == replication.FrameAck && a.Seq >= last {
			return
		}
	}
}

const (
	logA = "00000000000000aa"
	logB = "00000000000000bb"
)

// protectWithLogA protects the machine's disk with agent log A: its first
// connection (the catalog adopts the log), the initial copy, a write and a
// point, all applied (seq 1-3).
func protectWithLogA(t *testing.T, r *tlsRig) *testAgent {
	t.Helper()
	a, w, err := r.hello(t, logA, 1, 1)
	if err != nil || w.DurableSeq != 0 || w.NewLog {
		t.Fatalf("first hello: %+v, %v", w, err)
	}
	if m := r.lastConnect(); m.LogID != logA {
		t.Fatalf("the catalog did not adopt the first log's id: %q", m.LogID)
	}
	a.ship(1, replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone},
		replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("old log")},
		replication.Record{Kind: replication.KindTag})
	waitApplied(t, r.s, 3)
	return a
}

// TestNewLogWelcome: an agent with another log id than the machine's (it
// registered again) and a log of its own up to seq 47 is never joined by
// number: the server answers new_log after its durable seq 3, with the
// complete disk, having recorded the new log in the catalog first; the new
// log's records then make no point before the resync.
func TestNewLogWelcome(t *testing.T) {
	r := mustTLSRig(t)
	old := protectWithLogA(t, r)
	b, w, err := r.hello(t, logB, 1, 48)
	if err != nil {
		t.Fatal(err)
	}
	if !w.NewLog || w.DurableSeq != 3 || !slices.Equal(w.Copied, []uint32{0}) {
		t.Fatalf("welcome %+v: want a new log after seq 3 with disk 0 copied", w)
	}
	m := r.lastConnect()
	d, _ := m.Disk(0)
	if m.LogID != logB || m.LogStart != 4 || !strings.Contains(m.LogReason, "new log at seq 4") || d.State != replication.StateResync {
		t.Fatalf("catalog when the welcome was sent: %+v", m)
	}
	old.waitClosed() // replaced: it can append nothing more
	b.ship(4, replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("new log")},
		replication.Record{Kind: replication.KindTag})
	waitApplied(t, r.s, 5)
	ps, _ := r.cat.Points(context.Background(), machineID)
	if len(ps) != 1 || ps[0].Seq != 3 {
		t.Fatalf("points %v: want only the old log's (seq 3)", ps)
	}
}

// TestNewLogWelcomeLost: the connection breaks right after the new-log
// Welcome, before the agent applied it: its next Hello has the new log id
// but its spool is still numbered as before (it starts below the new log's
// start), so it is told again; once it has applied it, it simply goes on.
func TestNewLogWelcomeLost(t *testing.T) {
	r := mustTLSRig(t)
	protectWithLogA(t, r)
	b, w, err := r.hello(t, logB, 1, 48)
	if err != nil || !w.NewLog {
		t.Fatalf("welcome %+v, %v", w, err)
	}
	b.c.Close() // lost before the agent read it
	_, w, err = r.hello(t, logB, 1, 48)
	if err != nil || !w.NewLog || w.DurableSeq != 3 || !slices.Equal(w.Copied, []uint32{0}) {
		t.Fatalf("hello of an agent that never applied the new log: %+v, %v; want the new log again", w, err)
	}
	b, w, err = r.hello(t, logB, 4, 6) // applied: spool from 4, two new records
	if err != nil || w.NewLog || w.DurableSeq != 3 {
		t.Fatalf("hello after the agent applied the new log: %+v, %v; want it to go on", w, err)
	}
	b.ship(4, replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("x")},
		replication.Record{Kind: replication.KindWrite, Offset: 8192, Data: []byte("y")})
	waitApplied(t, r.s, 5)
	if m, _ := r.cat.Machine(context.Background(), machineID); m.LogStart != 4 || m.Protected() {
		t.Fatalf("catalog: log start %d, protected %v", m.LogStart, m.Protected())
	}
}

// TestDisconnect: the machine's connection is closed at once; when
// Disconnect returns its reader has stopped and nothing it sends is used.
func TestDisconnect(t *testing.T) {
	r := mustTLSRig(t)
	a := protectWithLogA(t, r)
	m, _ := r.s.machine(context.Background(), machineID, "")
	cc := m.sess.current()
	if cc == nil {
		t.Fatal("no connection")
	}
	if err := r.s.Disconnect(context.Background(), machineID, "test"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-cc.stopped:
	default:
		t.Fatal("Disconnect returned before the connection's reader stopped")
	}
	if st, _ := r.s.Stats(machineID); st.Connected {
		t.Fatal("still connected")
	}
	f := dataFrame(4, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("late")})
	if _, err := m.append(cc, &f); err == nil {
		t.Fatal("the disconnected connection could still append")
	}
	a.waitClosed()
	// The agent may connect again (its log goes on).
	if _, w, err := r.hello(t, logA, 4, 4); err != nil || w.NewLog || w.DurableSeq != 3 {
		t.Fatalf("reconnect after Disconnect: %+v, %v", w, err)
	}
}

// TestSupersedeEndsLog: a vault from before log ids (the agent sends none,
// the catalog names none). The machine is re-registered: its log ends. An
// agent that cannot start a new log is refused; the new agent's log is a
// new one (without the end recorded, the catalog would adopt its id and
// join it by number), and only once.
func TestSupersedeEndsLog(t *testing.T) {
	r := mustTLSRig(t)
	a, w, err := r.hello(t, "", 1, 1)
	if err != nil || w.NewLog {
		t.Fatalf("legacy hello: %+v, %v", w, err)
	}
	a.ship(1, replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone},
		replication.Record{Kind: replication.KindTag})
	waitApplied(t, r.s, 2)
	if err := r.s.Supersede(context.Background(), machineID, "the machine was re-registered"); err != nil {
		t.Fatal(err)
	}
	if m, _ := r.cat.Machine(context.Background(), machineID); m.LogEnded != "the machine was re-registered" || m.LogID != "" {
		t.Fatalf("catalog after Supersede: %+v", m)
	}
	if _, _, err := r.hello(t, "not hex", 1, 40); err == nil || !strings.Contains(err.Error(), "hex") {
		t.Fatalf("a malformed log id: %v, want a refusal", err)
	}
	if _, _, err := r.hello(t, "", 1, 40); err == nil || !strings.Contains(err.Error(), "upgrade") {
		t.Fatalf("an agent without a log id after the log ended: %v, want a refusal", err)
	}
	_, w, err = r.hello(t, logB, 1, 40)
	if err != nil || !w.NewLog || w.DurableSeq != 2 {
		t.Fatalf("the new agent: %+v, %v; want a new log after seq 2", w, err)
	}
	if m := r.lastConnect(); m.LogEnded != "" || m.LogID != logB || !strings.Contains(m.LogReason, "re-registered") {
		t.Fatalf("catalog when the welcome was sent: %+v", m)
	}
	if _, w, err = r.hello(t, logB, 3, 3); err != nil || w.NewLog {
		t.Fatalf("the new agent, having applied the new log: %+v, %v", w, err)
	}
}

// TestNewLogWaitsForTheOldLog: a new log starts only once the old one is
// applied to its end (its last tag makes its point first). While the
// target is out of reach the agent is told to try again (not that an
// operator must act); then its log starts after everything the old agent
// was acknowledged.
func TestNewLogWaitsForTheOldLog(t *testing.T) {
	r := mustTLSRig(t)
	a := protectWithLogA(t, r)
	r.target.shut()
	a.ship(4, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("acknowledged")},
		replication.Record{Kind: replication.KindTag})
	r.s.newLogWait.Store(int64(100 * time.Millisecond))
	_, _, err := r.hello(t, logB, 1, 48)
	var ref *refusal
	if !errors.As(err, &ref) || ref.Fatal || !strings.Contains(ref.Message, "once the server has applied the old one") {
		t.Fatalf("new log while the old one is not applied: %v; want a refusal to try again soon", err)
	}
	if m, _ := r.cat.Machine(context.Background(), machineID); m.LogID != logA {
		t.Fatalf("the refused new log changed the catalog: %+v", m)
	}
	r.target.open()
	r.s.newLogWait.Store(int64(time.Minute))
	_, w, err := r.hello(t, logB, 1, 48)
	if err != nil || !w.NewLog || w.DurableSeq != 5 {
		t.Fatalf("welcome %+v, %v: want a new log after seq 5", w, err)
	}
	m := r.lastConnect()
	if m.AppliedSeq != 5 || m.LogStart != 6 {
		t.Fatalf("catalog when the welcome was sent: applied %d, log start %d", m.AppliedSeq, m.LogStart)
	}
	ps, _ := r.cat.Points(context.Background(), machineID)
	if len(ps) != 2 || ps[1].Seq != 5 {
		t.Fatalf("points %v: the old log's last tag (seq 5) must make its point", ps)
	}
}
