package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"testing"
	"testing/synctest"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// Calls a fakeShipHandler passes on.
type (
	welcomeCall struct {
		hello replication.Hello
		w     replication.Welcome
	}
	ackCall  uint64
	tagCall  replication.TagRequest
	holdCall struct {
		c replication.Cut
		w frameWriter
	}
	decideCall struct {
		t replication.FrameType
		c replication.Cut
	}
	resyncCall replication.ResyncJob
	wantCall   replication.Want
	policyCall replication.AgentPolicy
	freezeCall struct {
		t  replication.FrameType
		fr replication.Freeze
	}
)

// fakeShipHandler is the rest of the agent, for the shipper alone: it
// passes every call on calls.
type fakeShipHandler struct {
	calls      chan any
	welcomeErr error
}

func newFakeShipHandler() *fakeShipHandler { return &fakeShipHandler{calls: make(chan any, 100)} }

func (h *fakeShipHandler) hello() replication.Hello {
	return replication.Hello{MachineID: "m1", LogID: "0123456789abcdef"}
}
func (h *fakeShipHandler) welcome(hello replication.Hello, w replication.Welcome) error {
	h.calls <- welcomeCall{hello, w}
	return h.welcomeErr
}
func (h *fakeShipHandler) handshakeEnded()        {}
func (h *fakeShipHandler) acked(seq uint64) error { h.calls <- ackCall(seq); return nil }
func (h *fakeShipHandler) tagRequest(_ context.Context, tr replication.TagRequest) {
	h.calls <- tagCall(tr)
}
func (h *fakeShipHandler) hold(c replication.Cut, w frameWriter) { h.calls <- holdCall{c, w} }
func (h *fakeShipHandler) cutDecision(t replication.FrameType, c replication.Cut) {
	h.calls <- decideCall{t, c}
}
func (h *fakeShipHandler) resync(job replication.ResyncJob) error {
	h.calls <- resyncCall(job)
	return nil
}
func (h *fakeShipHandler) freeze(_ context.Context, fr replication.Freeze) error {
	h.calls <- freezeCall{replication.FrameFreeze, fr}
	return nil
}
func (h *fakeShipHandler) thaw(fr replication.Freeze) error {
	h.calls <- freezeCall{replication.FrameThaw, fr}
	return nil
}
func (h *fakeShipHandler) want(w replication.Want) { h.calls <- wantCall(w) }
func (h *fakeShipHandler) reverseWrite(seq uint64, d replication.ReverseData) replication.ReverseAck {
	return replication.ReverseAck{ID: d.ID, Seq: seq, Error: "fake"}
}
func (h *fakeShipHandler) reverseSum(r replication.ReverseSum) replication.ReverseAck {
	return replication.ReverseAck{ID: r.ID, Seq: r.Seq, Error: "fake"}
}
func (h *fakeShipHandler) policy(p replication.AgentPolicy) { h.calls <- policyCall(p) }
func (h *fakeShipHandler) status() replication.Status       { return replication.Status{LastSeq: 1} }

var _ shipHandler = (*fakeShipHandler)(nil)

// next returns the handler's next call.
func (h *fakeShipHandler) next(t *testing.T) any {
	t.Helper()
	select {
	case c := <-h.calls:
		return c
	case <-time.After(time.Minute):
		t.Fatal("no call to the handler")
		return nil
	}
}

// fakeProcServer is the process server's end of one connection.
type fakeProcServer struct {
	t  *testing.T
	nc net.Conn
	br *bufio.Reader
}

// read returns the next frame the agent sent that is not a status report.
func (s *fakeProcServer) read() (replication.Frame, error) {
	for {
		f, _, err := replication.ReadFrame(s.br, nil)
		if err != nil || f.Type != replication.FrameStatus {
			return f, err
		}
	}
}

func (s *fakeProcServer) mustRead(want replication.FrameType) replication.Frame {
	s.t.Helper()
	f, err := s.read()
	if err != nil {
		s.t.Fatal(err)
	}
	if f.Type != want {
		s.t.Fatalf("got a %s frame, want %s", f.Type, want)
	}
	return f
}

func (s *fakeProcServer) send(f replication.Frame) {
	s.t.Helper()
	if err := replication.WriteFrame(s.nc, &f); err != nil {
		s.t.Fatal(err)
	}
}

func (s *fakeProcServer) sendJSON(typ replication.FrameType, v any) {
	s.t.Helper()
	f, err := replication.JSONFrame(typ, v)
	if err != nil {
		s.t.Fatal(err)
	}
	s.send(f)
}

// mustShipper makes a shipper of sp whose connections come, as process
// servers' ends, on the returned channel.
func mustShipper(t *testing.T, sp *spool.Spool, h shipHandler) (*shipper, chan *fakeProcServer) {
	t.Helper()
	return mustShipperCodec(t, sp, h, shipPlain)
}

// mustShipperCodec is mustShipper with the agent's --compress and
// --compression.
func mustShipperCodec(t *testing.T, sp *spool.Spool, h shipHandler, codec shipCodecMode) (*shipper, chan *fakeProcServer) {
	t.Helper()
	conns := make(chan *fakeProcServer, 8)
	dial := func(ctx context.Context) (net.Conn, error) {
		c, s := net.Pipe()
		conns <- &fakeProcServer{t: t, nc: s, br: bufio.NewReader(s)}
		return c, nil
	}
	sh := newShipper(context.Background(), slog.New(slog.DiscardHandler), sp, &tagMarks{}, 0, codec, dial, h, &sendCounters{})
	t.Cleanup(sh.Close)
	return sh, conns
}

// TestShipperSession: Hello, Welcome, the records as DATA frames (the one
// with a tag flagged), acknowledgements and every request of the server
// passed to the handler, checked; a frame the agent does not expect ends
// the session and the shipper connects again.
func TestShipperSession(t *testing.T) {
	_, sp, _ := mustTestDisk(t, 1<<20)
	h := newFakeShipHandler()
	sh, conns := mustShipper(t, sp, h)
	for i := range 3 {
		rec := replication.Record{Kind: replication.KindTag}
		if i != 1 {
			rec = replication.Record{Kind: replication.KindWrite, Offset: uint64(i) * 4096, Length: 4096, Data: make([]byte, 4096)}
		}
		seq, err := sp.Append(context.Background(), &rec)
		if err != nil {
			t.Fatal(err)
		}
		if i == 1 {
			sh.tags.mark(seq)
		}
		sp.Complete(seq)
	}
	sh.start()
	srv := <-conns
	var hello replication.Hello
	if err := replication.DecodeJSON(ptr(srv.mustRead(replication.FrameHello)), &hello); err != nil || hello.MachineID != "m1" {
		t.Fatalf("hello %+v, %v", hello, err)
	}
	srv.sendJSON(replication.FrameWelcome, replication.Welcome{DurableSeq: 0})
	if c, ok := h.next(t).(welcomeCall); !ok || c.hello.MachineID != "m1" {
		t.Fatalf("handler call %+v, want the welcome", c)
	}
	var recs []replication.Record
	tagged := false
	for len(recs) < 3 {
		f := srv.mustRead(replication.FrameData)
		rs, _, err := replication.DefaultCodec().Records(&f, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			tagged = tagged || (r.Kind == replication.KindTag && f.Flags&replication.FlagTag != 0)
		}
		recs = append(recs, rs...)
	}
	if len(recs) != 3 || recs[0].Seq != 1 || !tagged {
		t.Fatalf("shipped %d records from %d, tag flagged %v", len(recs), recs[0].Seq, tagged)
	}
	c := sh.counters // counted once each frame's write returned
	waitFor(t, "the counters", func() bool { return c.records.Load() == 3 })
	if c.frames.Load() < 1 || !c.connected.Load() {
		t.Fatalf("counters: %d frames, connected %v", c.frames.Load(), c.connected.Load())
	}
	if sh.current() == nil {
		t.Fatal("no current session while connected")
	}

	srv.send(replication.Frame{Type: replication.FrameAck, Seq: 3})
	if c := h.next(t); c != ackCall(3) {
		t.Fatalf("handler call %+v, want ack 3", c)
	}
	srv.sendJSON(replication.FrameTagReq, replication.TagRequest{ID: 7, App: true})
	if c := h.next(t); c != tagCall(replication.TagRequest{ID: 7, App: true}) {
		t.Fatalf("handler call %+v, want the tag request", c)
	}
	srv.sendJSON(replication.FrameHold, replication.Cut{ID: 9})
	hc, ok := h.next(t).(holdCall)
	if !ok || hc.c.ID != 9 {
		t.Fatalf("handler call %+v, want the hold", hc)
	}
	// The cut answers on the session it came on.
	held, _ := replication.JSONFrame(replication.FrameHeld, hc.c)
	go hc.w.write(&held)
	srv.mustRead(replication.FrameHeld)
	srv.sendJSON(replication.FrameCut, replication.Cut{ID: 9})
	if c := h.next(t); c != (decideCall{replication.FrameCut, replication.Cut{ID: 9}}) {
		t.Fatalf("handler call %+v, want the cut", c)
	}
	srv.sendJSON(replication.FrameResync, replication.ResyncJob{ID: 4, Disk: 0, Reason: "operator"})
	if c, ok := h.next(t).(resyncCall); !ok || c.ID != 4 {
		t.Fatalf("handler call %+v, want the resync", c)
	}
	srv.sendJSON(replication.FrameWant, replication.Want{Job: 4, Batch: 1})
	if c, ok := h.next(t).(wantCall); !ok || c.Batch != 1 {
		t.Fatalf("handler call %+v, want the want", c)
	}
	srv.sendJSON(replication.FrameFreeze, replication.Freeze{ID: "f1", Req: 5})
	if c := h.next(t); c != (freezeCall{replication.FrameFreeze, replication.Freeze{ID: "f1", Req: 5}}) {
		t.Fatalf("handler call %+v, want the freeze", c)
	}
	srv.sendJSON(replication.FrameThaw, replication.Freeze{ID: "f1"})
	if c := h.next(t); c != (freezeCall{replication.FrameThaw, replication.Freeze{ID: "f1"}}) {
		t.Fatalf("handler call %+v, want the thaw", c)
	}
	srv.sendJSON(replication.FramePolicy, replication.AgentPolicy{CrashInterval: int64(time.Minute)})
	if c, ok := h.next(t).(policyCall); !ok || c.CrashInterval != int64(time.Minute) {
		t.Fatalf("handler call %+v, want the policy", c)
	}
	// Checked before the handler sees it: a policy with a negative
	// interval ends the session.
	srv.sendJSON(replication.FramePolicy, replication.AgentPolicy{CrashInterval: -1})
	for {
		if _, err := srv.read(); err != nil {
			break // the agent closed the connection
		}
	}
	again := <-conns // and connects again, resuming after what was acknowledged
	again.mustRead(replication.FrameHello)
	select {
	case c := <-h.calls:
		t.Fatalf("handler called with %+v for an invalid frame", c)
	default:
	}
	sh.Close()
	if sh.counters.connected.Load() || sh.current() != nil {
		t.Fatal("connected after Close")
	}
}

func ptr[T any](v T) *T { return &v }

// waitFor waits until cond holds (a minute at most).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited a minute for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// A refusal by the server is retried every refusedRetry, never sooner,
// and the disks go on meanwhile (nothing waits on the shipper); a failed
// Welcome (here: the agent's state older than the server's) counts as
// one.
func TestShipperRetriesRefusals(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, sp, _ := mustTestDisk(t, 1<<20)
		h := newFakeShipHandler()
		h.welcomeErr = &fatalError{"the agent's state is older than the server's"}
		sh, conns := mustShipper(t, sp, h)
		sh.start()
		start := time.Now()
		for i := range 3 {
			srv := <-conns
			if got := time.Since(start); got != time.Duration(i)*refusedRetry {
				t.Fatalf("connection %d after %s, want %s", i+1, got, time.Duration(i)*refusedRetry)
			}
			srv.mustRead(replication.FrameHello)
			if i == 0 {
				srv.sendJSON(replication.FrameError, replication.ErrorMessage{Fatal: true, Message: "unknown machine"})
			} else {
				srv.sendJSON(replication.FrameWelcome, replication.Welcome{})
				if _, ok := h.next(t).(welcomeCall); !ok {
					t.Fatal("no welcome")
				}
			}
			if _, err := srv.read(); !errors.Is(err, io.EOF) {
				t.Fatalf("connection %d: %v, want it closed by the agent", i+1, err)
			}
		}
		sh.Close()
	})
}

// Close ends a session still in its handshake at once (a server that
// does not answer the Hello does not hold the agent's stop).
func TestShipperCloseInHandshake(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, sp, _ := mustTestDisk(t, 1<<20)
		sh, conns := mustShipper(t, sp, newFakeShipHandler())
		sh.start()
		srv := <-conns
		srv.mustRead(replication.FrameHello)
		start := time.Now()
		sh.Close()
		if took := time.Since(start); took != 0 {
			t.Fatalf("Close took %s in the handshake", took)
		}
	})
}

// TestFrameCompressorKeepsItsRoom: frames of base data that S2 cannot
// shrink (an encrypted disk's copy) reuse one buffer: after the first,
// building one allocates nothing (it allocated the worst case's buffer
// for every frame).
func TestFrameCompressorKeepsItsRoom(t *testing.T) {
	noise := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{1}).Read(noise)
	rec := replication.Record{Seq: 1, Kind: replication.KindBase, Length: uint32(len(noise)), Data: noise}
	raw := replication.AppendRecord(nil, &rec)
	c := frameCompressor{mode: shipAuto, s2: true}
	var dst []byte
	allocs := testing.AllocsPerRun(10, func() {
		var f replication.Frame
		f, dst = c.frame(raw, 1, 1, dst)
		if f.Compressed() {
			t.Fatal("random data compressed")
		}
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations per frame, want none", allocs)
	}
}

// TestShipperCompression: each --compress/--compression setting sends the
// codec it names, S2 only to a server whose Welcome lists it (an older
// server gets zstd), the default S2 only for frames of base data (the
// initial copy) and zstd for the guest's changes. Either way the records
// arrive whole.
func TestShipperCompression(t *testing.T) {
	for _, c := range []struct {
		name string
		mode shipCodecMode
		kind replication.Kind // of the records
		s2   bool             // the server decodes S2
		want uint8            // the compression flag of every frame
	}{
		{"plain", shipPlain, replication.KindWrite, true, 0},
		{"plain/base", shipPlain, replication.KindBase, true, 0},
		{"auto/writes", shipAuto, replication.KindWrite, true, replication.FlagZstd},
		{"auto/base", shipAuto, replication.KindBase, true, replication.FlagS2},
		{"auto/base/old-server", shipAuto, replication.KindBase, false, replication.FlagZstd},
		{"auto/headers-only", shipAuto, replication.KindZero, true, 0},
		{"zstd/base", shipZstd, replication.KindBase, true, replication.FlagZstd},
		{"s2/writes", shipS2, replication.KindWrite, true, replication.FlagS2},
		{"s2/writes/old-server", shipS2, replication.KindWrite, false, replication.FlagZstd},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, sp, _ := mustTestDisk(t, 1<<20)
			sh, conns := mustShipperCodec(t, sp, newFakeShipHandler(), c.mode)
			data := bytes.Repeat([]byte("compressible "), 4096/13+1)[:4096]
			kind, n := c.kind, 4
			if !kind.HasData() {
				data, n = nil, 200 // 8 KiB of headers, which zstd would shrink
			}
			for i := range n {
				rec := replication.Record{Kind: kind, Offset: uint64(i) * 4096, Length: 4096, Data: data}
				seq, err := sp.Append(context.Background(), &rec)
				if err != nil {
					t.Fatal(err)
				}
				sp.Complete(seq)
			}
			sh.start()
			srv := <-conns
			srv.mustRead(replication.FrameHello)
			w := replication.Welcome{DurableSeq: 0}
			if c.s2 {
				w.Codecs = replication.ServerCodecs
			}
			srv.sendJSON(replication.FrameWelcome, w)
			got := 0
			for got < n {
				f := srv.mustRead(replication.FrameData)
				if got := f.Flags & (replication.FlagZstd | replication.FlagS2); got != c.want {
					t.Fatalf("frame flags %#x, want %#x", got, c.want)
				}
				rs, _, err := replication.DefaultCodec().Records(&f, nil)
				if err != nil {
					t.Fatal(err)
				}
				for _, r := range rs {
					if !bytes.Equal(r.Data, data) || r.Kind != kind {
						t.Fatalf("record %d: data or kind differs", r.Seq)
					}
				}
				got += len(rs)
			}
		})
	}
}
