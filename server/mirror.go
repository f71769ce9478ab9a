package server

import (
	"context"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/retry"
	"github.com/asrdr/asr/store"
)

// The vault database keeps copies, for the console and the API, of what
// the process server reports: disk states (the catalog on the target is
// their truth), recovery points (the same), agent contact, events, resync
// progress. The process server reports through callbacks that run on its
// replication path (the applier's goroutine under its lock, an agent
// connection's reader), and the database is one SQLite connection with
// synchronous=FULL: a write there must never hold replication up. So a
// callback only notes the news for its machine in memory (the newest
// catalog view replaces the one before: coalesced) and returns; the
// mirror's goroutine writes the news, and what fails stays noted and is
// tried again, with a log line, until it is written. Nothing is lost by a
// stop either: the process server reports every machine's catalog entry
// again when it opens it, and the first write of each machine brings its
// points table in step with the catalog.

// news is what is noted for one machine ("": the vault) and not yet
// written. A writer takes out what it wrote, so a failure leaves the rest.
type news struct {
	state   *replication.MachineCatalog // the newest catalog view
	points  []replication.Point         // new recovery points, in order
	events  []store.Event               // in order
	contact *contact
	resyncs map[uint32]replication.ResyncStatus // each disk's latest progress
	// reconcile brings the machine's points table in step with the
	// catalog again (a scale-out process server dropped points it could
	// not report).
	reconcile bool
}

// contact is what the agent's connection attempts say.
type contact struct {
	version string // the agent's version ("": unchanged)
	uuid    string // the guest's BIOS UUID the agent reports ("": unchanged)
	modes   string // the disks' capture modes as JSON ("": unchanged)
	touch   bool   // last seen now
	err     string // the machine's error to show ("": none)
	setErr  bool   // err is to be written
}

// merge adds what n2, noted after n, says.
func (n *news) merge(n2 *news) {
	if n2.state != nil {
		n.state = n2.state
	}
	n.points = append(n.points, n2.points...)
	n.reconcile = n.reconcile || n2.reconcile
	n.events = append(n.events, n2.events...)
	if c2 := n2.contact; c2 != nil {
		if n.contact == nil {
			n.contact = &contact{}
		}
		c := n.contact
		if c2.version != "" {
			c.version = c2.version
		}
		if c2.uuid != "" {
			c.uuid = c2.uuid
		}
		if c2.modes != "" {
			c.modes = c2.modes
		}
		c.touch = c.touch || c2.touch
		if c2.setErr {
			c.err, c.setErr = c2.err, true
		}
	}
	for d, st := range n2.resyncs {
		if n.resyncs == nil {
			n.resyncs = map[uint32]replication.ResyncStatus{}
		}
		n.resyncs[d] = st
	}
}

// maxEvents bounds the events noted for one machine while the database
// cannot take them; past it the oldest are dropped, with a log line
// (events are for people to read: a bound, not a stall).
const maxEvents = 10000

// mirror writes the news noted for each machine to the vault database on
// its own goroutine (see above). Open starts it; close writes what is
// left, once, and stops it.
type mirror struct {
	write      func(ctx context.Context, id string, n *news) error
	log        *slog.Logger
	retry      time.Duration // the first wait after a failure (doubling up to maxRetry)
	maxRetry   time.Duration
	closeAfter time.Duration // how long close tries to write what is left

	mu       sync.Mutex
	pending  map[string]*news
	noted    uint64        // news noted so far
	written  uint64        // all news up to this many is written
	progress chan struct{} // closed and replaced when written advances
	dropped  int           // events dropped since the last log line
	wake     chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// newMirror starts a mirror that writes news with write, waiting retry
// after a failure, doubling up to maxRetry.
func newMirror(write func(ctx context.Context, id string, n *news) error, log *slog.Logger, retry, maxRetry time.Duration) *mirror {
	m := &mirror{write: write, log: log, retry: retry, maxRetry: maxRetry, closeAfter: 5 * time.Second,
		pending: map[string]*news{}, progress: make(chan struct{}), wake: make(chan struct{}, 1)}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.wg.Add(1)
	go func() { defer m.wg.Done(); m.run() }()
	return m
}

// note records news for machine id. It never waits on the database (only
// on the mirror's own lock, which is never held across a write).
func (m *mirror) note(id string, n *news) {
	m.mu.Lock()
	p, ok := m.pending[id]
	if !ok {
		p = &news{}
		m.pending[id] = p
	}
	p.merge(n)
	if over := len(p.events) - maxEvents; over > 0 {
		p.events = p.events[over:]
		m.dropped += over
	}
	m.noted++
	m.mu.Unlock()
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// sync waits until everything noted before it was called is written.
func (m *mirror) sync(ctx context.Context) error {
	m.mu.Lock()
	want := m.noted
	for m.written < want {
		ch := m.progress
		m.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
		m.mu.Lock()
	}
	m.mu.Unlock()
	return nil
}

func (m *mirror) run() {
	backoff := retry.New(m.retry, m.maxRetry)
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.wake:
		}
		for m.pass(m.ctx) != nil {
			wait := backoff.Next()
			m.log.Warn("the vault database is behind the catalog; trying again", "retry_in", wait)
			if retry.Sleep(m.ctx, wait) != nil {
				return
			}
		}
		backoff.Reset()
	}
}

// pass writes the news pending now, machine by machine; what fails stays
// pending (merged before anything noted meanwhile).
func (m *mirror) pass(ctx context.Context) error {
	m.mu.Lock()
	batch, upTo, dropped := m.pending, m.noted, m.dropped
	m.pending, m.dropped = map[string]*news{}, 0
	m.mu.Unlock()
	if dropped > 0 {
		m.log.Error("the vault database could not take events for a long time; the oldest were dropped", "events", dropped)
	}
	ids := make([]string, 0, len(batch))
	for id := range batch {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var failed error
	for _, id := range ids {
		n := batch[id]
		err := m.write(ctx, id, n)
		if err == nil {
			continue
		}
		m.log.Error("writing to the vault database failed; it is tried again", "machine", id, "err", err)
		failed = err
		m.mu.Lock()
		if p, ok := m.pending[id]; ok {
			n.merge(p)
		}
		m.pending[id] = n
		m.mu.Unlock()
	}
	if failed != nil {
		return failed
	}
	m.mu.Lock()
	if upTo > m.written {
		m.written = upTo
		close(m.progress)
		m.progress = make(chan struct{})
	}
	m.mu.Unlock()
	return nil
}

// close stops the mirror and tries, once, to write what is left (the
// catalog keeps the truth of what is not: it is written at the next
// start).
func (m *mirror) close() {
	m.cancel()
	m.wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), m.closeAfter)
	defer cancel()
	if err := m.pass(ctx); err != nil {
		m.log.Warn("the vault database did not take everything before the stop; the catalog keeps it for the next start", "err", err)
	}
}
