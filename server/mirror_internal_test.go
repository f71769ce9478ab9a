package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store"
)

// fakeDB is a mirror's writer that records what it writes, fails while
// told to, and can be held (a database that blocks).
type fakeDB struct {
	mu     sync.Mutex
	fail   error
	gate   chan struct{} // writes wait until it is closed (nil: they do not)
	states []uint64      // AppliedSeq of each catalog view written
	points []uint64
	events []string
	tries  int
	failed chan struct{}
}

func (f *fakeDB) write(ctx context.Context, id string, n *news) error {
	f.mu.Lock()
	gate := f.gate
	f.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tries++
	for len(n.points) > 0 { // written one by one: some get in before a failure
		if f.fail != nil {
			select {
			case f.failed <- struct{}{}:
			default:
			}
			return f.fail
		}
		f.points = append(f.points, n.points[0].Seq)
		n.points = n.points[1:]
	}
	if f.fail != nil {
		select {
		case f.failed <- struct{}{}:
		default:
		}
		return f.fail
	}
	if n.state != nil {
		f.states = append(f.states, n.state.AppliedSeq)
		n.state = nil
	}
	for _, e := range n.events {
		f.events = append(f.events, e.Kind)
	}
	*n = news{}
	return nil
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// Noting never waits on the writer: while it is held, news for a machine
// is coalesced (the newest catalog view replaces the ones before; points
// and events are kept in order), and sync waits until it is written.
func TestMirrorCoalescesWhileTheDatabaseIsHeld(t *testing.T) {
	t.Parallel()
	db := &fakeDB{gate: make(chan struct{})}
	m := newMirror(db.write, quietLog(), time.Second, time.Second)
	defer m.close()
	noted := make(chan struct{})
	go func() {
		for seq := uint64(1); seq <= 100; seq++ {
			m.note("aa", &news{state: &replication.MachineCatalog{ID: "aa", AppliedSeq: seq}})
			if seq%10 == 0 {
				m.note("aa", &news{points: []replication.Point{{Seq: seq}}})
			}
		}
		m.note("", &news{events: []store.Event{{Kind: "cache-ok"}}})
		close(noted)
	}()
	select {
	case <-noted:
	case <-time.After(time.Minute): // a hung test: noting waited on the database
		t.Fatal("noting waits on the database")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := m.sync(ctx); err == nil {
		t.Fatal("sync returned with the database held")
	}
	close(db.gate)
	if err := m.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	db.mu.Lock()
	defer db.mu.Unlock()
	if n := len(db.states); n == 0 || n > 3 || db.states[n-1] != 100 {
		t.Fatalf("catalog views written %v: want a few, the last the newest", db.states)
	}
	if len(db.points) != 10 || db.points[0] != 10 || db.points[9] != 100 {
		t.Fatalf("points written %v", db.points)
	}
	if len(db.events) != 1 {
		t.Fatalf("events %v", db.events)
	}
}

// A write that fails is tried again, with what failed kept (not what was
// written before the failure, which is taken out) and what was noted
// meanwhile merged after it; sync waits until everything is written.
func TestMirrorRetriesWhatFails(t *testing.T) {
	t.Parallel()
	db := &fakeDB{fail: errors.New("database is locked"), failed: make(chan struct{}, 1)}
	m := newMirror(db.write, quietLog(), time.Millisecond, 10*time.Millisecond)
	defer m.close()
	m.note("aa", &news{points: []replication.Point{{Seq: 1}}, state: &replication.MachineCatalog{AppliedSeq: 1}})
	<-db.failed
	m.note("aa", &news{points: []replication.Point{{Seq: 2}}, state: &replication.MachineCatalog{AppliedSeq: 2}})
	db.mu.Lock()
	db.fail = nil
	db.mu.Unlock()
	if err := m.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	db.mu.Lock()
	defer db.mu.Unlock()
	if len(db.points) != 2 || db.points[0] != 1 || db.points[1] != 2 {
		t.Fatalf("points written %v: want each once, in order", db.points)
	}
	if db.states[len(db.states)-1] != 2 || db.tries < 2 {
		t.Fatalf("views %v after %d tries", db.states, db.tries)
	}
}

// While the database takes nothing, a machine's events are bounded: the
// oldest go, with a log line, rather than memory without end.
func TestMirrorBoundsEvents(t *testing.T) {
	t.Parallel()
	db := &fakeDB{gate: make(chan struct{})}
	m := newMirror(db.write, quietLog(), time.Second, time.Second)
	defer m.close()
	for range maxEvents + 5 {
		m.note("aa", &news{events: []store.Event{{Kind: "x"}}})
	}
	m.mu.Lock()
	var held int
	for _, n := range m.pending {
		held += len(n.events)
	}
	m.mu.Unlock()
	if held > maxEvents {
		t.Fatalf("%d events held", held)
	}
	close(db.gate)
	if err := m.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
}
