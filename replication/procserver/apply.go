package procserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/retry"
)

// segmentQueue is where the apply loop takes sealed segments from, in
// order (the machine's cache).
type segmentQueue interface {
	next() (sealedSeg, bool)
	done(sg sealedSeg)
	sealSoon(seq uint64)
}

// replica is a machine's applier and the loop that applies its sealed
// segments, in order, to the replica disks on the target. mu is the
// applier's lock: the loop holds it while it applies a segment, and
// whoever reads the replica disks or changes the catalog entry holds it
// too, so they see the replica between segments. Nothing under mu waits on
// the vault database: the applier's callbacks (the process server's
// OnState, OnPoint) must return at once.
type replica struct {
	id  string
	dir string // the machine's cache directory (bad/ is under it)
	cat *replication.Catalog
	log *slog.Logger
	// onQuarantine reports a segment moved aside; onUploaded bytes
	// written to the target (figures).
	onQuarantine func(path, reason string)
	onUploaded   func(n int64)
	// pointMade says the machine has a recovery point: from then on every
	// applied segment is kept on the target for any-point-in-time
	// recovery. Before it (initial replication) only segments holding a tag
	// are: recovery to a time starts from a point and replays what follows
	// it, so changes before the first point are never replayed, and the
	// initial copy's data is not stored twice.
	pointMade atomic.Bool
	// applied counts the cache bytes of the segments applied since the
	// machine was opened (MachineStats.AppliedBytes): the same bytes the
	// backlog and the received count measure, as they came over the wire.
	applied atomic.Int64
	// handoff holds the records the connection's reader decoded and
	// checked, which the apply loop takes instead of decoding its frames
	// again (handoff.go).
	handoff *handoff

	mu     sync.Mutex
	a      *replication.Applier
	closed bool

	wake   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// removals takes the applied segment files to remove
	// (removeApplied); the apply loop closes it as it stops.
	removals chan string

	stateMu  sync.Mutex
	applyErr string        // the last segment's failure, until one applies
	progress chan struct{} // closed and replaced when the applied seq advances
}

func newReplica(id, dir string, cat *replication.Catalog, a *replication.Applier, log *slog.Logger) *replica {
	return &replica{id: id, dir: dir, cat: cat, a: a, log: log, wake: make(chan struct{}, 1), progress: make(chan struct{}),
		onQuarantine: func(string, string) {}, onUploaded: func(int64) {}, handoff: newHandoff(&handoffBudget{})}
}

// start starts the apply loop on the segments of q (stopped by parent or
// close).
func (r *replica) start(parent context.Context, q segmentQueue) {
	r.ctx, r.cancel = context.WithCancel(parent)
	r.removals = make(chan string, removalQueue)
	r.wg.Add(2)
	go func() { defer r.wg.Done(); defer close(r.removals); r.loop(q) }()
	go func() { defer r.wg.Done(); r.removeApplied() }()
	r.kick()
}

// kick wakes the apply loop (a segment was sealed).
func (r *replica) kick() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// with runs fn holding the applier.
func (r *replica) with(fn func(a *replication.Applier) error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.a == nil {
		return errors.New("applier not open")
	}
	return fn(r.a)
}

func (r *replica) appliedSeq() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.a.AppliedSeq()
}

func (r *replica) machine() replication.MachineCatalog {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.a.Machine()
}

// handles returns a disk's open replica and checksums.
func (r *replica) handles(idx uint32) (replication.ReplicaDisk, *replication.Sums, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rd, ok := r.a.Disk(idx)
	sums := r.a.Sums(idx)
	return rd, sums, ok && sums != nil
}

func (r *replica) setErr(msg string) {
	r.handoff.stall(msg != "")
	r.stateMu.Lock()
	r.applyErr = msg
	r.stateMu.Unlock()
}

func (r *replica) lastErr() string {
	r.stateMu.Lock()
	defer r.stateMu.Unlock()
	return r.applyErr
}

// advanced tells waiters the applied seq moved.
func (r *replica) advanced() {
	r.stateMu.Lock()
	close(r.progress)
	r.progress = make(chan struct{})
	r.stateMu.Unlock()
}

func (r *replica) progressed() <-chan struct{} {
	r.stateMu.Lock()
	defer r.stateMu.Unlock()
	return r.progress
}

// waitApplied waits until the log is applied up to seq, having the open
// cache file sealed at once if it holds seq (files opened after it are
// sealed as usual: sealing every frame as it arrives would only slow the
// applier down).
func (r *replica) waitApplied(ctx context.Context, q segmentQueue, seq uint64, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	// The seal is asked again now and then: seq may reach the open file
	// after the first ask.
	again := time.NewTicker(100 * time.Millisecond)
	defer again.Stop()
	for waiting := false; ; waiting = true {
		progress := r.progressed()
		applied := r.appliedSeq()
		if applied >= seq {
			return nil
		}
		if !waiting {
			r.log.Info("resync compare waits until the replica has applied the log up to the resync's start", "applied_seq", applied, "seq", seq)
		}
		q.sealSoon(seq)
		select {
		case <-progress:
		case <-again.C:
		case <-deadline.C:
			return fmt.Errorf("the replica is not caught up with the resync's start (applied %d of %d) after %v", applied, seq, timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// loop applies sealed segments in order. A corrupt segment is never
// applied: it is moved aside, the machine is marked for resync, and later
// segments are applied after it (the replica is not trusted for points
// until the resync, so nothing is lost by keeping it current). A failure
// (the target out of reach) is retried with backoff; the cache holds the
// log meanwhile.
func (r *replica) loop(q segmentQueue) {
	backoff := retry.New(time.Second, time.Minute)
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-r.wake:
		case <-time.After(5 * time.Second):
			// Idle: the readers' pooled buffers go once none is taken.
			r.handoff.budget.pool.trim()
		}
		for r.ctx.Err() == nil {
			sg, ok := q.next()
			if !ok {
				break
			}
			err := r.applyOne(q, sg)
			if err == nil {
				backoff.Reset()
				continue
			}
			r.setErr(err.Error())
			wait := backoff.Next()
			r.log.Error("apply segment failed", "segment", filepath.Base(sg.path), "err", err, "retry_in", wait)
			if retry.Sleep(r.ctx, wait) != nil {
				return
			}
		}
	}
}

func (r *replica) applyOne(q segmentQueue, sg sealedSeg) error {
	ctx := r.ctx
	// Verified, decompressed and hashed outside the applier's lock, on
	// every CPU; a segment that fails is reported by the apply below. The
	// frames whose records the reader handed over are not decoded again;
	// what they count against the hand-off's budget is given back once
	// they are applied (or dropped), and the entries of frames the
	// applier is past (this segment's, taken or not) are dropped.
	var lent int64
	// bufs are the buffers the taken records alias: pooled for the
	// readers' next frames (handoffBudget.recycle) once the records are
	// applied and the replica flushed, when nothing refers to them any
	// more (a disk that failed may still hold the writes it queued).
	var bufs [][]byte
	applied := false
	defer func() {
		r.handoff.giveBack(lent)
		if applied {
			r.handoff.budget.recycle(bufs)
		}
	}()
	var data []byte // the segment file, read unless the hand-off has it all
	prep, bufs, lent, whole := r.preparedFromHandoff(sg)
	var perr error
	if !whole {
		var err error
		if data, err = os.ReadFile(sg.path); err != nil {
			return err
		}
	}
	defer r.handoff.dropThrough(sg.last)
	if !whole {
		prep, perr = replication.PrepareSegmentFrom(data, func(k replication.FrameKey) ([]replication.Record, bool) {
			recs, buf, n, ok := r.handoff.take(k)
			lent += n
			if ok {
				bufs = append(bufs, buf)
			}
			return recs, ok
		})
		if perr != nil && !errors.Is(perr, replication.ErrCorrupt) {
			return perr
		}
	}
	if perr == nil {
		// Nothing changes data (read here) or the hand-off's buffers
		// (the reader gave them away) again: the replica disks may keep
		// the records' bytes until their flush rather than copy them.
		prep.GiveData()
	}
	// Kept on the target first, so a point is never reported before the
	// changes after it can be replayed; a segment that fails verification
	// is not kept.
	if perr == nil {
		if kept, err := r.keepSegment(ctx, data, prep); err != nil {
			return err
		} else if kept {
			r.onUploaded(int64(len(data)))
		}
	}
	first := sg.first
	if data != nil {
		first, _ = replication.ParseSegmentHeader(data)
	}
	r.mu.Lock()
	if first > r.a.AppliedSeq()+1 {
		// A sequence gap: the records before this segment are lost.
		reason := fmt.Sprintf("changes %d to %d were lost before they were applied (sequence gap)", r.a.AppliedSeq()+1, first-1)
		r.log.Error("sequence gap", "from", r.a.AppliedSeq()+1, "to", first-1)
		err := r.a.MarkResync(ctx, -1, reason)
		if err == nil {
			err = r.a.SkipTo(ctx, first-1)
		}
		if err != nil {
			r.mu.Unlock()
			return err
		}
	}
	err := perr
	if err == nil {
		err = r.a.ApplyPrepared(ctx, prep)
		applied = err == nil
	}
	if errors.Is(err, replication.ErrCorrupt) {
		reason := fmt.Sprintf("segment %s failed verification (%v); it was not applied", filepath.Base(sg.path), err)
		r.log.Error("corrupt segment", "segment", filepath.Base(sg.path), "err", err)
		err = r.a.MarkResync(ctx, -1, reason)
		if err == nil {
			err = r.a.SkipTo(ctx, sg.last)
		}
		r.mu.Unlock()
		if err != nil {
			return err
		}
		// Kept for inspection, out of the way of the applier.
		bad := filepath.Join(r.dir, "bad")
		os.MkdirAll(bad, 0o700)
		if err := os.Rename(sg.path, filepath.Join(bad, filepath.Base(sg.path))); err != nil {
			r.log.Warn("could not move the corrupt segment aside", "err", err)
		}
		q.done(sg)
		r.setErr("")
		r.advanced()
		r.onQuarantine(filepath.Join(bad, filepath.Base(sg.path)), reason)
		return nil
	}
	r.mu.Unlock()
	if err != nil {
		return err
	}
	r.onUploaded(sg.raw)
	r.applied.Add(sg.size)
	select {
	case r.removals <- sg.path:
	default:
		r.remove(sg.path) // the remover is behind: here, then
	}
	q.done(sg)
	r.setErr("")
	r.advanced()
	return nil
}

// preparedFromHandoff prepares segment sg from the hand-off alone, its
// file not read, when the hand-off holds the records of every frame this
// process wrote to it (sg.keys) and the segment will not be kept on the
// target (no point yet: the initial copy, and no tag in it; a kept
// segment's bytes are read and scanned whole). The file's bytes are only
// ever needed after a restart, when they are read and checked whole
// (every frame's header and payload checksum): here the records applied
// are those decoded and checked from the payloads the cache wrote, still
// in memory since, as with every hand-off hit. It reports false (and
// takes nothing) otherwise; the caller then reads the file.
func (r *replica) preparedFromHandoff(sg sealedSeg) (*replication.PreparedSegment, [][]byte, int64, bool) {
	if len(sg.keys) == 0 || r.pointMade.Load() {
		return nil, nil, 0, false
	}
	// A frame flagged as a tag may hold a point's tag, which makes the
	// segment one to keep; the other records that ship like a tag (the
	// end of an initial copy or of a resync) do not.
	recs, be, bufs, lent, ok := r.handoff.takeAll(sg.keys, func(k replication.FrameKey, recs []replication.Record) bool {
		return k.Flags&replication.FlagTag == 0 || !slices.ContainsFunc(recs, func(rec replication.Record) bool {
			return rec.Kind == replication.KindTag
		})
	})
	if !ok {
		return nil, nil, 0, false
	}
	p, err := replication.PrepareHanded(sg.first, sg.last, sg.keys, recs, be)
	if err == nil && p.Tags {
		err = errors.New("a tag record in a frame not flagged as holding one")
	}
	if err != nil {
		// Not for frames this process wrote in order; the file decides.
		r.log.Warn("segment not prepared from the hand-off; reading its file", "segment", filepath.Base(sg.path), "err", err)
		r.handoff.giveBack(lent)
		return nil, nil, 0, false
	}
	return p, bufs, lent, true
}

// removalQueue is how many applied segment files may wait for the
// remover (removeApplied).
const removalQueue = 64

// removeApplied removes the files of applied segments, off the apply
// loop: unlinking a 32 MiB file just written takes about 10 ms here,
// time the applier spends on the next segment instead. A file a crash
// leaves behind holds only what is applied, and is removed when the
// cache opens (openCache's done, keepApplied).
func (r *replica) removeApplied() {
	for path := range r.removals {
		r.remove(path)
	}
}

func (r *replica) remove(path string) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		r.log.Warn("applied segment not removed from the cache; it is removed at the next start", "segment", filepath.Base(path), "err", err)
	}
}

// keepSegment stores an applied segment (data, prepared as p) on the
// target, where recovery to any point in time replays it (pruned once
// older than the policy's window), unless no point can start a replay
// before its records (pointMade): it reports whether it kept it. A
// segment prepared without its file (data nil) is never one to keep
// (preparedFromHandoff).
func (r *replica) keepSegment(ctx context.Context, data []byte, p *replication.PreparedSegment) (bool, error) {
	if p.Empty() || !p.Tags && !r.pointMade.Load() {
		return false, nil
	}
	if data == nil {
		return false, fmt.Errorf("segment %d-%d to keep on the target was prepared without reading it", p.First, p.Last)
	}
	si := p.Info()
	if err := r.cat.PutSegment(ctx, r.id, si, data); err != nil {
		return false, fmt.Errorf("keep segment %d-%d on the target: %w", si.First, si.Last, err)
	}
	return true, nil
}

// keepApplied keeps segments applied before a stop on the target, unless
// they are there already (or need not be, keepSegment), and removes them
// from the cache.
func (r *replica) keepApplied(ctx context.Context, segs []sealedSeg) error {
	if len(segs) == 0 {
		return nil
	}
	kept, err := r.cat.Segments(ctx, r.id)
	if err != nil {
		return err
	}
	onTarget := map[uint64]bool{}
	for _, si := range kept {
		onTarget[si.First] = true
	}
	for _, sg := range segs {
		// Applied before the stop; it may not have reached the target's
		// any-point-in-time store yet.
		if !onTarget[sg.first] {
			data, err := os.ReadFile(sg.path)
			var p *replication.PreparedSegment
			if err == nil {
				p, err = replication.PrepareSegment(data)
			}
			if err == nil {
				_, err = r.keepSegment(ctx, data, p)
			}
			if err != nil {
				r.log.Warn("applied segment not kept for any-point-in-time recovery", "segment", filepath.Base(sg.path), "err", err)
			}
		}
		os.Remove(sg.path)
	}
	return nil
}

// close stops the apply loop and closes the replica disks.
func (r *replica) close() error {
	if r.cancel != nil {
		r.cancel()
	}
	r.wg.Wait()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	return r.a.Close()
}
