package server

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/overlay"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// The failback policy applied to the reverse direction of a reprotected
// machine (docs/ARCHITECTURE.md, "Failback"): the reverse RPO (how far
// the original disks are behind the failed-over machine) measured, shown
// and alerted against the failback policy's threshold, and reverse points
// (the moments the original disks were a crash-consistent copy) recorded
// at its crash-consistent interval and pruned past its retention.
//
// The reverse RPO is the age of the oldest write to the exports not yet
// acknowledged by the original agent; 0 when nothing is pending. A
// reverseMap has one bit per block, no per-block time (that would cost
// 8 bytes per 64 KiB block), so it keeps a bound instead, exact when the
// map empties and at most one generation late otherwise:
//
//   - safe: every write before it is on the original. When a block is
//     marked while nothing is pending, safe is that moment (everything
//     before it was acknowledged).
//   - a generation: the blocks pending when it starts (at genStart). Each
//     is taken after genStart (its read then holds every write before
//     genStart) and acknowledged; once all are, safe becomes genStart and
//     the next take starts a new generation. A block in flight and not
//     dirty at genStart counts as taken (its read holds its every write).
//
// The RPO reported is now - safe: never less than the true one, more by
// at most the last generation's length (the time to drain what was
// pending at its start).

// revAge is a reverseMap's age bookkeeping, under the map's mu.
type revAge struct {
	now    func() time.Time
	pend   int64     // blocks dirty or in flight
	safe   time.Time // while pend > 0: every write before it is on the original (zero: not known)
	synced bool      // the first pass is done: nothing was pending at some moment since backdate, or loaded from a saved map
	marks  uint64    // blocks marked so far: a moment every disk was empty is checked against it

	genOn             bool
	genStart          time.Time
	genBits, genTaken []uint64
	genLeft           int64
}

func (a *revAge) safeNanos() int64 {
	if a.pend == 0 || a.safe.IsZero() {
		return 0
	}
	return a.safe.UnixNano()
}

// marked, before block b's dirty bit is set at now.
func (m *reverseMap) marked(b int64, now time.Time) {
	a := &m.age
	a.marks++
	if (m.dirty[b/64]|m.inflight[b/64])&(1<<(b%64)) != 0 {
		return
	}
	if a.pend == 0 {
		// Everything written before is on the original.
		a.safe, a.synced = now, true
	}
	a.pend++
}

// startGeneration, at a take: a generation of the blocks pending now, if
// none is under way.
func (m *reverseMap) startGeneration() {
	a := &m.age
	if a.genOn || a.pend == 0 {
		return
	}
	if a.genBits == nil {
		a.genBits, a.genTaken = make([]uint64, len(m.dirty)), make([]uint64, len(m.dirty))
	}
	a.genLeft = 0
	for i := range m.dirty {
		a.genBits[i] = m.dirty[i] | m.inflight[i]
		a.genTaken[i] = m.inflight[i] &^ m.dirty[i]
		a.genLeft += int64(bits.OnesCount64(a.genBits[i]))
	}
	a.genStart, a.genOn = a.now(), true
}

// taken, as block b goes in flight.
func (m *reverseMap) taken(b int64) {
	if a := &m.age; a.genOn && a.genBits[b/64]&(1<<(b%64)) != 0 {
		a.genTaken[b/64] |= 1 << (b % 64)
	}
}

// acked, once block b's in-flight bit is cleared (acknowledged).
func (m *reverseMap) acked(b int64) {
	a := &m.age
	w, bit := b/64, uint64(1)<<(b%64)
	if a.genOn && a.genTaken[w]&bit != 0 {
		a.genTaken[w] &^= bit
		a.genBits[w] &^= bit
		a.genLeft--
	}
	if m.dirty[w]&bit == 0 {
		a.pend--
	}
}

// ackedAll, after a batch's acknowledgements: a generation all on the
// original moves safe to its start.
func (m *reverseMap) ackedAll() {
	a := &m.age
	if a.genOn && a.genLeft == 0 {
		if a.safe.IsZero() || a.genStart.After(a.safe) {
			a.safe = a.genStart
		}
		a.genOn = false
	}
	if a.pend == 0 {
		a.synced, a.genOn = true, false
	}
}

// failed, as block b goes back from in flight to dirty.
func (m *reverseMap) failed(b int64) {
	if a := &m.age; a.genOn {
		a.genTaken[b/64] &^= 1 << (b % 64)
	}
}

// loaded sets the bookkeeping of a map read from its file: safe in Unix
// ns (0: not known, a version 1 map).
func (m *reverseMap) loaded(safe int64) {
	a := &m.age
	a.pend = 0
	for i := range m.dirty {
		a.pend += int64(bits.OnesCount64(m.dirty[i]))
	}
	a.synced = true
	if safe != 0 {
		a.safe = time.Unix(0, safe)
	}
}

// backdate says the blocks pending now were written at t or later: the
// overlay's blocks, marked at reprotect, were written since the failover,
// and are the first pass.
func (m *reverseMap) backdate(t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.age.pend == 0 {
		return
	}
	m.age.synced = false
	if m.age.safe.IsZero() || t.Before(m.age.safe) {
		m.age.safe = t
		m.gen++
	}
}

// setClock sets the clock the map's marks and generations are timed by.
func (m *reverseMap) setClock(now func() time.Time) {
	m.mu.Lock()
	m.age.now = now
	m.mu.Unlock()
}

// mapLag is one map's figures at a moment.
type mapLag struct {
	pend   int64
	safe   time.Time
	synced bool
	marks  uint64
}

func (m *reverseMap) lag() mapLag {
	m.mu.Lock()
	defer m.mu.Unlock()
	return mapLag{pend: m.age.pend, safe: m.age.safe, synced: m.age.synced || m.age.pend == 0, marks: m.age.marks}
}

// reverseLag is how far a reprotected machine's original disks are behind.
type reverseLag struct {
	rpo     time.Duration // meaningful if known
	known   bool          // false: a map loaded from a version 1 file holds blocks of unknown age
	pending int64         // bytes not yet on the original disks
	synced  bool          // the first pass is done
	// consistent: nothing was pending on any disk at one moment (the
	// original disks were a copy of the failed-over ones then).
	consistent bool
}

// lag measures a run's reverse RPO at now: the largest of its disks'.
// A run still being set up is not known, nor past its first pass.
func (r *reverseRun) lag(now time.Time) reverseLag {
	if !r.fp.ready.Load() {
		return reverseLag{}
	}
	l := reverseLag{known: true, synced: true}
	var marks uint64
	for _, d := range r.disks {
		ml := d.m.lag()
		marks += ml.marks
		l.pending += ml.pend * overlay.BlockSize
		l.synced = l.synced && ml.synced
		if ml.pend == 0 {
			continue
		}
		if ml.safe.IsZero() {
			l.known = false
			continue
		}
		l.rpo = max(l.rpo, now.Sub(ml.safe))
	}
	if l.pending == 0 {
		// Every disk was empty when read; no mark since the first read
		// means they were all empty at once, at the last read.
		var again uint64
		for _, d := range r.disks {
			again += d.m.lag().marks
		}
		l.consistent = again == marks
	}
	return l
}

// reverseLagOf is machine id's reverse lag at now: its NBD failover's
// shipper, or the live stream of its recovered VM's agent; false if its
// changes are not being sent back.
func (s *Server) reverseLagOf(id string, now time.Time) (reverseLag, bool) {
	if run := s.reverseRunOf(id); run != nil {
		return run.lag(now), true
	}
	if a := s.recAgents.liveOf(id); a != nil {
		return a.lag(now), true
	}
	return reverseLag{}, false
}

// failbackPolicy is the failback policy of a machine's replication policy
// (its twin); a vault without one (never seen: twins are made with their
// policy) gets the failback defaults.
func (s *Server) failbackPolicy(ctx context.Context, policy string) (replication.Policy, error) {
	p, err := s.db.Policy(ctx, replication.FailbackName(policy))
	if errors.Is(err, store.ErrNotFound) {
		return replication.DefaultFailbackPolicy(policy), nil
	}
	return p, err
}

// reverseStatus is a reprotected machine's reverse direction for the API
// (nil when its changes are not being sent back).
func (s *Server) reverseStatus(ctx context.Context, m store.Machine) *api.ReverseStatus {
	now := s.now()
	var fp *failbackPolicyState
	if run := s.reverseRunOf(m.ID); run != nil {
		fp = &run.fp
	} else if a := s.recAgents.liveOf(m.ID); a != nil {
		fp = &a.fp
	}
	l, ok := s.reverseLagOf(m.ID, now)
	if !ok || fp == nil {
		return nil
	}
	rs := &api.ReverseStatus{RPO: l.rpo, RPOKnown: l.known, Pending: l.pending, FirstPassDone: l.synced,
		Policy: replication.FailbackName(m.Policy)}
	if p, err := s.failbackPolicy(ctx, m.Policy); err == nil {
		rs.Threshold = p.RPOThreshold
	}
	fp.mu.Lock()
	rs.LastPoint = fp.last
	fp.mu.Unlock()
	if l.consistent {
		rs.ConsistentAt = now
	} else {
		rs.ConsistentAt = rs.LastPoint
	}
	return rs
}

// reverseRPOObs observes the reverse RPO of every reprotected machine
// against its failback policy's threshold, with the forward RPO's
// hysteresis (warning over it, critical over twice it, cleared under 80%
// of it). Before the first pass is on the original disks (reprotect's
// job) or with blocks of unknown age, it is kept (neither raised nor
// cleared). A machine no longer reprotected is not observed: its alert
// clears.
func (s *Server) reverseRPOObs(ctx context.Context, ms []store.Machine, now time.Time) ([]alertObs, error) {
	// The same pass checks that the original agents the recovered
	// agents' streams write through are still frozen.
	s.checkOriginalFrozen(ms)
	var obs []alertObs
	for _, m := range ms {
		l, ok := s.reverseLagOf(m.ID, now)
		if !ok {
			continue
		}
		action := fmt.Sprintf("the changes go back through the original machine's agent: check that it runs and is connected (asr status --machine %s; on the original guest: systemctl status asr-agent) and the network from this server to it; ", m.Name)
		if a := s.recAgents.liveOf(m.ID); a != nil && s.reverseRunOf(m.ID) == nil {
			action = fmt.Sprintf("the changes come from the asr agent in the recovered VM %s and go back through the original machine's agent: check that both run and are connected (asr status --machine %s --json: reverse_source) and the network between them and this server; ", a.vm, m.Name)
		}
		p, err := s.failbackPolicy(ctx, m.Policy)
		if err != nil {
			return nil, fmt.Errorf("failback policy of machine %s: %w", m.Name, err)
		}
		o := alertObs{kind: api.AlertReverseRPO, key: m.ID, machineID: m.ID, machine: m.Name}
		if !l.known || !l.synced || p.RPOThreshold <= 0 {
			o.keep = true
			obs = append(obs, o)
			continue
		}
		o.clear, o.level = l.rpo <= p.RPOThreshold*8/10, rpoLevel(l.rpo, p.RPOThreshold)
		o.message = fmt.Sprintf("reverse direction (failback): the original disks of %s are %s behind the failed-over machine, over the threshold of %s (failback policy %s); %d bytes written since are not on them yet",
			m.Name, l.rpo.Round(time.Second), p.RPOThreshold, p.Name, l.pending)
		o.action = action + fmt.Sprintf("the failed-over machine runs on meanwhile, a failback waits until these changes are on the original disks; critical at twice the threshold (asr policy set %s --rpo-threshold D changes it)", p.Name)
		if o.level == 0 {
			o.message = fmt.Sprintf("reverse direction (failback): the original disks of %s are %s behind, under the threshold of %s (failback policy %s)",
				m.Name, l.rpo.Round(time.Second), p.RPOThreshold, p.Name)
		}
		obs = append(obs, o)
	}
	return obs, nil
}

// failbackPolicyState is what a run keeps for the failback policy.
type failbackPolicyState struct {
	// ready: the run's disks are all there (startReverse registers the
	// run before it adds them); the readers here wait for it.
	ready atomic.Bool
	mu    sync.Mutex
	last  time.Time // the newest reverse point recorded (zero: none since the server started)
}

// reverseIdle runs when a run's shipper found nothing to send: if every
// disk is empty at one moment, the original disks are a crash-consistent
// copy of the failed-over machine as of now, recorded as a reverse point
// (an event) at most every failback policy's crash-consistent interval.
func (s *Server) reverseIdle(ctx context.Context, run *reverseRun) {
	s.reversePoint(ctx, run.machineID, &run.fp, func(now time.Time) bool { return run.lag(now).consistent }, run.total)
}

// reversePoint records a reverse point of machine id if consistent says
// the original disks are a crash-consistent copy now and the failback
// policy's crash-consistent interval has passed since the last (fp).
func (s *Server) reversePoint(ctx context.Context, id string, fp *failbackPolicyState, consistent func(time.Time) bool, sent func() int64) {
	now := s.now()
	fp.mu.Lock()
	last := fp.last
	fp.mu.Unlock()
	if !last.IsZero() && now.Sub(last) < replication.MinCrashInterval {
		return // no policy allows one yet: spare the database
	}
	if !consistent(now) {
		return
	}
	m, err := s.db.Machine(ctx, id)
	if err != nil {
		return
	}
	p, err := s.failbackPolicy(ctx, m.Policy)
	if err != nil {
		s.log.Error("failback policy", "machine", m.Name, "err", err)
		return
	}
	fp.mu.Lock()
	due := fp.last.IsZero() || now.Sub(fp.last) >= p.CrashInterval
	if due {
		fp.last = now
	}
	fp.mu.Unlock()
	if !due {
		return
	}
	s.raise(ctx, store.Event{MachineID: m.ID, Severity: api.SeverityInfo, Kind: eventReversePoint,
		Message: fmt.Sprintf("reverse point: the original disks hold every write to the failed-over machine up to %s (a crash-consistent copy; %d bytes sent back so far); a record, not a recoverable image: the original disks are written in place",
			now.UTC().Format(time.RFC3339), sent())})
}

// eventReversePoint is the kind of a reverse point's event.
const eventReversePoint = "reverse-point"

// pruneReversePoints deletes, for every machine, the reverse points
// older than its failback policy's retention.
func (s *Server) pruneReversePoints(ctx context.Context) error {
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return err
	}
	for _, m := range ms {
		p, err := s.failbackPolicy(ctx, m.Policy)
		if err != nil {
			return err
		}
		n, err := s.db.DeleteEvents(ctx, m.ID, eventReversePoint, s.now().Add(-p.Retention))
		if err != nil {
			return fmt.Errorf("machine %s: %w", m.Name, err)
		}
		if n > 0 {
			s.log.Info("reverse points pruned", "machine", m.ID, "count", n, "retention", p.Retention)
		}
	}
	return nil
}
