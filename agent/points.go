package agent

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// Points: every crash interval (once all disks are copied), every
// application-consistent interval, and whenever the server asks, the agent
// appends a tag record to its log; the server makes a recovery point when
// it applies one. One point is made at a time. The machine's policy sets
// the intervals; in a replication group the server makes the points
// (group.go).

// tagMarks are the sequence numbers of the records that ship like a tag
// (FlagTag: tags, the end of an initial copy or of a resync) and have not
// been sent yet; the
// server seals its cache file at once when a frame carries one.
type tagMarks struct {
	mu   sync.Mutex
	seqs []uint64 // sorted
}

// mark records that the record seq ships like a tag. It is called before
// the record is completed: the sender never reads past the completed
// prefix, so it cannot ship the record without knowing. Append is not done
// under the lock: it may wait for spool space, which only the sender, which
// takes the lock, frees.
func (m *tagMarks) mark(seq uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	i, _ := slices.BinarySearch(m.seqs, seq)
	m.seqs = slices.Insert(m.seqs, i, seq)
}

// has reports whether a marked record lies in [first, last], forgetting
// the marks up to last (they are being sent).
func (m *tagMarks) has(first, last uint64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	found := false
	i := 0
	for ; i < len(m.seqs) && m.seqs[i] <= last; i++ {
		found = found || m.seqs[i] >= first
	}
	m.seqs = m.seqs[i:]
	return found
}

// reset forgets every mark: a new log dropped the records.
func (m *tagMarks) reset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.seqs = nil
}

// pending returns the marks not yet sent.
func (m *tagMarks) pending() []uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.seqs)
}

// freezeConfig is how application-consistent points quiesce the guest
// (freeze.go).
type freezeConfig struct {
	preFreeze, postThaw string        // scripts, run with "freeze" and "thaw"
	mounts              []string      // file systems frozen with FIFREEZE
	timeout             time.Duration // the time box (default 10s)
}

// pointTick is how often the schedule looks whether a point is due.
const pointTick = 100 * time.Millisecond

// points makes the recovery points: it owns the point lock, the schedule
// (the policy's intervals) and its loop, and the goroutines of the points
// the server asks for.
type points struct {
	log     *slog.Logger
	spool   *spool.Spool
	disks   diskSet
	tags    *tagMarks
	events  *eventQueue
	freeze  freezeConfig
	freezer freezer
	// ready reports whether scheduled points may be made: not before
	// every disk's initial copy is complete.
	ready func() bool
	// whileFrozen, if set, runs inside an application-consistent freeze
	// before the disks are flushed (scan-mode disks are read whole then).
	whileFrozen func() error

	// mu makes one point at a time; group cuts, scan passes and the
	// switch to a new log hold it too (Lock, Unlock).
	mu            sync.Mutex
	crashInterval atomic.Int64
	appFrequency  atomic.Int64
	inGroup       atomic.Bool // the server makes this machine's points

	rt *routines // the schedule loop and the points the server asks for
}

func newPoints(parent context.Context, log *slog.Logger, sp *spool.Spool, disks diskSet, tags *tagMarks, events *eventQueue,
	crashInterval, appFrequency time.Duration, fc freezeConfig) *points {
	p := &points{log: log, spool: sp, disks: disks, tags: tags, events: events, freeze: fc, freezer: osFreezer{},
		ready: func() bool { return true }, rt: newRoutines(parent)}
	p.crashInterval.Store(int64(crashInterval))
	p.appFrequency.Store(int64(appFrequency))
	return p
}

// Lock takes the point lock: no point is made until Unlock.
func (p *points) Lock() { p.mu.Lock() }

// Unlock releases the point lock.
func (p *points) Unlock() { p.mu.Unlock() }

// start begins the schedule.
func (p *points) start() { p.rt.Go(p.loop) }

// Close stops the schedule and waits for the points in progress.
func (p *points) Close() { p.rt.Close() }

// request makes a point the server asked for, on its own goroutine (the
// receiver must not wait for a freeze). ctx is the session's: a failure
// after it ended is not worth a log line.
func (p *points) request(ctx context.Context, reqID uint64, app bool) {
	p.rt.Go(func() {
		if err := p.point(reqID, app); err != nil && ctx.Err() == nil {
			p.log.Error("requested tag failed", "err", err)
		}
	})
}

// point makes a recovery point now: application-consistent (freeze
// sequence, see freeze.go) or crash-consistent. One point at a time.
func (p *points) point(reqID uint64, app bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if app {
		return p.appPoint(reqID)
	}
	return p.tag(reqID, false)
}

// tag appends a recovery-point tag record; app marks it application-
// consistent (the caller has quiesced the guest).
func (p *points) tag(reqID uint64, app bool) error {
	_, err := p.tagSeq(reqID, app, 0)
	return err
}

// tagSeq is tag, returning the tag record's sequence number; flags are
// added to the record's (replication.FlagCut: a group cut's tag).
func (p *points) tagSeq(reqID uint64, app bool, flags uint8) (uint64, error) {
	rec := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindTag, Offset: reqID, Flags: flags}
	switch {
	case app:
		rec.Flags |= replication.FlagApp
	case p.disks.hasScan():
		rec.Flags |= replication.FlagScan
	}
	seq, err := p.spool.Append(p.rt.ctx, &rec)
	if err != nil {
		return 0, err
	}
	p.tags.mark(seq)
	p.spool.Complete(seq)
	return seq, nil
}

// loop makes the scheduled points: crash-consistent every crash
// interval, application-consistent every app frequency (when set), as the
// machine's policy says. An application-consistent point also counts as the
// crash-consistent one due at the same time.
func (p *points) loop() {
	lastCrash, lastApp := time.Now(), time.Now()
	t := time.NewTicker(pointTick)
	defer t.Stop()
	for {
		select {
		case <-p.rt.ctx.Done():
			return
		case now := <-t.C:
			crashDue := now.Sub(lastCrash) >= time.Duration(p.crashInterval.Load())
			appEvery := time.Duration(p.appFrequency.Load())
			appDue := appEvery > 0 && now.Sub(lastApp) >= appEvery
			if p.inGroup.Load() {
				lastCrash, lastApp = now, now // the server makes the group's points
				continue
			}
			if !crashDue && !appDue {
				continue
			}
			if !p.ready() {
				lastCrash, lastApp = now, now // no points before the copy is complete
				continue
			}
			if err := p.point(0, appDue); err != nil && p.rt.ctx.Err() == nil {
				p.log.Error("scheduled point failed", "app", appDue, "err", err)
			}
			lastCrash = now
			if appDue {
				lastApp = now
			}
		}
	}
}

// setPolicy applies the point schedule of the machine's policy.
func (p *points) setPolicy(pol replication.AgentPolicy) {
	if pol.CrashInterval > 0 {
		p.crashInterval.Store(pol.CrashInterval)
	}
	p.appFrequency.Store(pol.AppFrequency)
	p.inGroup.Store(pol.Group != "")
	p.log.Info("policy applied", "crash_interval", time.Duration(pol.CrashInterval), "app_frequency", time.Duration(pol.AppFrequency), "group", pol.Group)
}
