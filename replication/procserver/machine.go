package procserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/asrdr/asr/replication"
)

// machine is the process server's state for one machine, in parts by
// concern, each with its own lock and (where it has one) goroutine:
//
//   - cache (cache.go): the durable cache, its sync loop, sealing, recovery;
//   - rep (apply.go): the applier, its lock, and the apply loop;
//   - sess (session.go): the agent connection, how its log joins, acks;
//   - points (points.go): requests waiting for their recovery point, and
//     group cuts (group.go) waiting for the agent to hold;
//   - cmp (compare.go): resync compares;
//
// and scrubs (scrub.go) use the applier. openMachine wires them; close
// stops them.
type machine struct {
	s   *Server
	id  string
	log *slog.Logger

	cache  *cache
	rep    *replica
	sess   *session
	points *points
	cmp    *comparer
	rev    reverser // failback's REVERSE_ACKs (reverse.go)

	// lease is the machine's lease on a target several process servers
	// write (nil on a target without leases, which one server holds
	// whole): taken before anything of the machine is read or written,
	// released after its last write (close).
	lease replication.Lease
}

// openMachine recovers a machine's cache and catalog entry and starts its
// goroutines (each part's: stopped by close, or when the server's context
// ends).
func openMachine(ctx context.Context, s *Server, id, name string) (*machine, error) {
	m := &machine{s: s, id: id, log: s.log.With("machine", id), points: newPoints()}
	dir := filepath.Join(s.cfg.CacheDir, id)
	if l, ok := s.cfg.Catalog.T.(replication.MachineLeaser); ok {
		lease, err := takeLease(ctx, l, id, s.cfg.Name)
		if err != nil {
			return nil, err
		}
		m.lease = lease
	}
	opened, err := m.open(ctx, dir, name)
	if err != nil {
		if m.lease != nil {
			m.lease.Release()
		}
		return nil, err
	}
	return opened, nil
}

// open is openMachine's part under the lease.
func (m *machine) open(ctx context.Context, dir, name string) (*machine, error) {
	s, id := m.s, m.id
	a, err := replication.OpenApplier(ctx, s.cfg.Catalog, id, name, s.log)
	if err != nil {
		return nil, err
	}
	m.rep = newReplica(id, dir, s.cfg.Catalog, a, m.log)
	m.rep.handoff = newHandoff(&s.handoff)
	// Segments are kept from the first point on (keepSegment). A listing
	// that fails keeps them all, as if a point existed: never fewer.
	ps, err := s.cfg.Catalog.Points(ctx, id)
	if err != nil {
		m.log.Warn("cannot list the machine's points; every applied segment is kept on the target", "err", err)
	}
	m.rep.pointMade.Store(err != nil || len(ps) > 0)
	m.rep.onUploaded = s.uploadedBytes
	if s.cfg.OnQuarantine != nil {
		m.rep.onQuarantine = func(path, reason string) { s.cfg.OnQuarantine(id, path, reason) }
	}
	// The applier's callbacks run under its lock, on the apply path: they
	// must return at once (Config says so to the server).
	a.OnPoint = func(p replication.Point, reqID uint64) {
		m.rep.pointMade.Store(true)
		if s.cfg.OnPoint != nil {
			s.cfg.OnPoint(id, p)
		}
		m.points.resolve(reqID, pointResult{p: p})
	}
	a.OnNoPoint = func(reqID uint64, reason string) {
		m.points.resolve(reqID, pointResult{err: fmt.Errorf("no recovery point: %s", reason)})
	}
	a.OnState = s.cfg.OnState
	if s.cfg.OnState != nil {
		s.cfg.OnState(a.Machine()) // what the catalog holds at start
	}
	m.sess = newSession(id, m.log, nil, m.rep, &s.newLogWait)
	m.sess.policyFor = s.cfg.PolicyFor
	c, applied, err := openCache(s.ctx, cacheConfig{
		dir: dir, segmentBytes: s.cfg.SegmentBytes, sealAfter: s.cfg.SealAfter, total: &s.cacheBytes, log: m.log,
		create:    s.cfg.createCacheFile,
		onDurable: m.sess.ack,
		onFail:    func(error) { m.sess.kick() },
		onSealed:  m.rep.kick,
	}, a.AppliedSeq())
	if err != nil {
		a.Close()
		return nil, err
	}
	m.cache, m.sess.cache = c, c
	if err := m.rep.keepApplied(ctx, applied); err != nil {
		c.close()
		a.Close()
		return nil, err
	}
	m.rep.start(s.ctx, c)
	var onDamage func(Damage)
	if s.cfg.OnDamage != nil {
		onDamage = func(d Damage) { s.cfg.OnDamage(id, d) }
	}
	m.cmp = startComparer(s.ctx, id, m.log, m.rep, c, onDamage)
	return m, nil
}

// append writes a DATA frame of connection cc to the cache, and returns
// its key as written.
func (m *machine) append(cc *agentConn, f *replication.Frame) (replication.FrameKey, error) {
	return m.cache.append(cc.epoch, f)
}

// appendEncoded is append with f's header encoded by the caller (key).
func (m *machine) appendEncoded(cc *agentConn, f *replication.Frame, h *[replication.FrameHeaderSize]byte, key replication.FrameKey) error {
	return m.cache.appendEncoded(cc.epoch, f, h, key)
}

// backlog is what the cache holds that is not applied yet (an open file
// with no frames is not backlog) and when the oldest of it arrived (zero:
// nothing).
func (m *machine) backlog() (n int64, oldest time.Time) {
	st := m.cache.stats()
	return st.backlog, st.oldest
}

func (m *machine) stats() MachineStats {
	cs := m.cache.stats()
	st := MachineStats{DurableSeq: cs.durable, Segments: cs.segments, CacheBytes: cs.bytes, OldestSealed: cs.oldestSealed,
		ApplyError: m.rep.lastErr(), AppliedSeq: m.rep.appliedSeq(),
		BacklogBytes: cs.backlog, BacklogSince: cs.oldest, AppliedBytes: m.rep.applied.Load()}
	m.sess.stats(&st)
	return st
}

// close stops the machine's goroutines and closes its files: the
// connections have ended (the server closed them and waited).
func (m *machine) close() error {
	m.cmp.close()
	err := m.rep.close()
	h := m.rep.handoff
	h.close()
	m.log.Info("frames the applier took from the reader's decode (hits) and decoded again from the cache (misses) since the machine was opened, the frames that waited for the budget (waited), the segments applied without reading their file (whole), and the decode buffers the readers of every machine took back from the applied frames since the server started (reused)",
		"hits", h.hits.Load(), "misses", h.misses.Load(), "refused", h.refused.Load(), "waited", h.waited.Load(), "whole", h.whole.Load(), "reused", h.budget.pool.reused.Load())
	if cerr := m.cache.close(); err == nil {
		err = cerr
	}
	if m.lease != nil {
		// After the last write: the applier and the cache are closed.
		if lerr := m.lease.Release(); err == nil {
			err = lerr
		}
	}
	return err
}

// leaseWait is how long opening a machine waits for its lease while
// another process server holds it: the one it was switched away from
// applies its cache before it lets go.
var leaseWait = time.Minute

// takeLease takes a machine's lease, waiting up to leaseWait (or until ctx
// ends) while another holder has it.
func takeLease(ctx context.Context, l replication.MachineLeaser, id, holder string) (replication.Lease, error) {
	deadline := time.Now().Add(leaseWait)
	for {
		lease, err := l.LeaseMachine(ctx, id, holder)
		if !errors.Is(err, replication.ErrMachineLeased) || time.Now().After(deadline) {
			return lease, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(200 * time.Millisecond):
		}
	}
}
