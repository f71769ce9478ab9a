package procserver

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// faultyCache makes the open cache file's writes (and cuts) fail.
type faultyCache struct {
	cacheFile
	writeErr, cutErr error
}

func (f *faultyCache) Write(p []byte) (int, error) {
	if f.writeErr != nil {
		n, _ := f.cacheFile.Write(p[:len(p)/2]) // a torn frame
		return n, f.writeErr
	}
	return f.cacheFile.Write(p)
}

func (f *faultyCache) Truncate(size int64) error {
	if f.cutErr != nil {
		return f.cutErr
	}
	return f.cacheFile.Truncate(size)
}

// A cache write that fails is cut back out; if the cut fails too, the
// cache stops for good (like a failed fsync): nothing more is appended
// after the garbage or acknowledged until a restart recovers the file.
func TestFailedCacheCutIsSticky(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cutErr error
	}{{"cut", nil}, {"cut fails", errors.New("injected truncate error")}} {
		t.Run(tc.name, func(t *testing.T) {
			r := mustTLSRig(t)
			a := protectWithLogA(t, r)
			m, _ := r.s.known(machineID)
			m.cache.mu.Lock()
			ff := &faultyCache{cacheFile: m.cache.open, writeErr: errors.New("injected write error"), cutErr: tc.cutErr}
			m.cache.open = ff
			m.cache.mu.Unlock()
			a.send(dataFrame(4, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("lost write")}))
			a.waitClosed()
			m.cache.mu.Lock()
			ff.writeErr, ff.cutErr = nil, nil // the disk works again
			broken := m.cache.broken
			m.cache.mu.Unlock()
			b, w, err := r.hello(t, logA, 4, 5)
			if tc.cutErr == nil {
				if broken != nil || err != nil || w.DurableSeq != 3 {
					t.Fatalf("after a write that was cut back: broken %v, hello %+v %v", broken, w, err)
				}
				b.ship(4, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("sent again")}, replication.Record{Kind: replication.KindTag})
				waitApplied(t, r.s, 5)
				return
			}
			if broken == nil || err == nil || !strings.Contains(err.Error(), "could not be made durable") {
				t.Fatalf("after a failed cut: broken %v, hello %+v %v; want the cache stopped", broken, w, err)
			}
		})
	}
}

// faults injects failures into every open cache file the process server
// makes, through its seam (Config.createCacheFile, cacheConfig.create).
type faults struct {
	mu       sync.Mutex
	syncErr  error
	syncGate chan struct{} // the next Sync waits until it is closed
	parked   chan struct{} // closed once that Sync waits
}

func (fs *faults) create(path string) (cacheFile, error) {
	f, err := createCacheFile(path)
	if err != nil {
		return nil, err
	}
	return &faultyFile{cacheFile: f, fs: fs}, nil
}

func (fs *faults) failSyncs(err error) {
	fs.mu.Lock()
	fs.syncErr = err
	fs.mu.Unlock()
}

// holdNextSync makes the next Sync wait until release is called; parked
// is closed once it waits.
func (fs *faults) holdNextSync() (parked <-chan struct{}, release func()) {
	gate, p := make(chan struct{}), make(chan struct{})
	fs.mu.Lock()
	fs.syncGate, fs.parked = gate, p
	fs.mu.Unlock()
	return p, sync.OnceFunc(func() { close(gate) })
}

type faultyFile struct {
	cacheFile
	fs *faults
}

func (f *faultyFile) Sync() error {
	f.fs.mu.Lock()
	err, gate, parked := f.fs.syncErr, f.fs.syncGate, f.fs.parked
	f.fs.syncGate, f.fs.parked = nil, nil
	f.fs.mu.Unlock()
	if gate != nil {
		close(parked)
		<-gate
	}
	if err != nil {
		return err
	}
	return f.cacheFile.Sync()
}

// readUntilClosed reads what the server sends until it closes the
// connection, and returns the highest sequence number acknowledged.
func (ta *testAgent) readUntilClosed() (acked uint64) {
	ta.t.Helper()
	ta.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		f, _, err := replication.ReadFrame(ta.br, nil)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			ta.t.Fatal("the server did not close the connection")
		}
		if err != nil {
			return acked
		}
		if f.Type == replication.FrameAck {
			acked = max(acked, f.Seq)
		}
	}
}

// mustReplicaHolds checks the replica's disk 0 holds want at off.
func mustReplicaHolds(t *testing.T, s *Server, off int64, want []byte) {
	t.Helper()
	err := s.WithApplier(context.Background(), machineID, func(a *replication.Applier) error {
		rd, _ := a.Disk(0)
		got := make([]byte, len(want))
		if _, err := rd.ReadAt(got, off); err != nil {
			return err
		}
		if !bytes.Equal(got, want) {
			t.Errorf("replica at %d holds %q, want %q", off, got, want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestFailedFsyncStopsTheCacheUntilARestart: an fsync of the cache file
// fails. What the file holds is unknown, so the frame is never
// acknowledged (the agent keeps it spooled), the connection ends, and the
// cache stops for good: even once the disk works again, the agent is
// refused (nothing more is appended or acknowledged) until a restart,
// which recovers the file; the agent then sends what the server does not
// hold, and nothing is lost.
func TestFailedFsyncStopsTheCacheUntilARestart(t *testing.T) {
	fs := &faults{}
	r := mustTLSRigWith(t, func(c *Config) { c.createCacheFile = fs.create })
	a := protectWithLogA(t, r)
	fs.failSyncs(errors.New("injected fsync error"))
	rec4 := replication.Record{Kind: replication.KindWrite, Offset: 8192, Data: []byte("written, fsync failed")}
	a.send(dataFrame(4, rec4))
	if acked := a.readUntilClosed(); acked >= 4 {
		t.Fatalf("seq %d acknowledged after its fsync failed", acked)
	}
	m, _ := r.s.known(machineID)
	if m.cache.brokenErr() == nil {
		t.Fatal("the cache goes on after a failed fsync")
	}
	fs.failSyncs(nil) // the disk works again: the cache stays stopped
	if _, _, err := r.hello(t, logA, 4, 5); err == nil || !strings.Contains(err.Error(), "could not be made durable") {
		t.Fatalf("hello after a failed fsync: %v; want a refusal until a restart", err)
	}
	if st, _ := r.s.Stats(machineID); st.DurableSeq != 3 || st.AppliedSeq != 3 {
		t.Fatalf("after a failed fsync: %+v; want durable and applied 3", st)
	}

	r.restart(t)
	// The agent still holds seq 4 (never acknowledged) and made seq 5.
	b, w, err := r.hello(t, logA, 4, 6)
	if err != nil || w.NewLog || (w.DurableSeq != 3 && w.DurableSeq != 4) {
		t.Fatalf("hello after the restart: %+v, %v", w, err)
	}
	t.Logf("after the restart the server holds up to seq %d", w.DurableSeq)
	recs := []replication.Record{rec4, {Kind: replication.KindTag}}
	b.ship(w.DurableSeq+1, recs[w.DurableSeq-3:]...)
	waitApplied(t, r.s, 5)
	mustReplicaHolds(t, r.s, 8192, rec4.Data)
	ps, _ := r.cat.Points(context.Background(), machineID)
	if len(ps) != 2 || ps[1].Seq != 5 {
		t.Fatalf("points %v: want the tag at seq 5 to make one", ps)
	}
}

// TestReplacedConnection: a second connection of the same agent (the
// first one broke on the agent's side, or the network kept it open)
// replaces the first: its Welcome names everything the first appended,
// acknowledged or not (made durable first), the first is closed and can
// append nothing more, and the second goes on from there.
func TestReplacedConnection(t *testing.T) {
	fs := &faults{}
	r := mustTLSRigWith(t, func(c *Config) { c.createCacheFile = fs.create })
	a := protectWithLogA(t, r)
	m, _ := r.s.known(machineID)
	first := m.sess.current()
	// Seq 4 is appended, but its acknowledgement is held up: the sync
	// loop waits in its fsync.
	parked, release := fs.holdNextSync()
	defer release()
	rec4 := replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("appended by the first connection")}
	a.send(dataFrame(4, rec4))
	<-parked
	b, w, err := r.hello(t, logA, 4, 5)
	if err != nil || w.NewLog || w.DurableSeq != 4 {
		t.Fatalf("welcome of the second connection %+v, %v: want it to name seq 4, which the first appended", w, err)
	}
	if acked := a.readUntilClosed(); acked >= 4 {
		t.Fatalf("the first connection was acknowledged seq %d", acked)
	}
	late := dataFrame(5, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("late")})
	if _, err := m.append(first, &late); !errors.Is(err, errReplaced) {
		t.Fatalf("the replaced connection appended: %v", err)
	}
	release()
	b.ship(5, replication.Record{Kind: replication.KindTag})
	waitApplied(t, r.s, 5)
	mustReplicaHolds(t, r.s, 4096, rec4.Data)
	mustReplicaHolds(t, r.s, 0, []byte("old log")) // not "late"
}

// heldWrite holds the open cache file's writes until gate is closed.
type heldWrite struct {
	cacheFile
	entered chan struct{} // closed at the first write
	gate    chan struct{}
	once    sync.Once
}

func (h *heldWrite) Write(p []byte) (int, error) {
	h.once.Do(func() { close(h.entered) })
	<-h.gate
	return h.cacheFile.Write(p)
}

// The connection's reader goes on reading and checking the next frame
// while the cache write of a frame is held (the cacheWriter): a damaged
// frame behind a held write is refused before that write ends. Read
// serially, it would be read only once the write ended.
func TestReaderOvertakesAHeldCacheWrite(t *testing.T) {
	refused := make(chan string, 1)
	r := mustTLSRigWith(t, func(c *Config) {
		c.OnRefused = func(_, reason string) {
			select {
			case refused <- reason:
			default:
			}
		}
	})
	a := protectWithLogA(t, r)
	m, _ := r.s.known(machineID)
	h := &heldWrite{entered: make(chan struct{}), gate: make(chan struct{})}
	m.cache.mu.Lock()
	h.cacheFile = m.cache.open
	m.cache.open = h
	m.cache.mu.Unlock()
	defer close(h.gate)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a.send(dataFrame(4, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("held write")}))
	select {
	case <-h.entered:
	case <-ctx.Done():
		t.Fatal("the first frame's cache write never started")
	}
	bad := dataFrame(5, replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("damaged")})
	bad.Payload[len(bad.Payload)-1] ^= 0xff // the record's CRC-32C no longer matches
	a.send(bad)
	select {
	case reason := <-refused:
		if !strings.Contains(reason, "seq 5") {
			t.Fatalf("refused %q, want the frame at seq 5", reason)
		}
	case <-ctx.Done():
		t.Fatal("the damaged frame was not read while the write before it was held")
	}
}
