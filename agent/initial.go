package agent

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

const (
	// initialChunk is the unit the initial copy reads and logs.
	initialChunk = 1 << 20
	// progressEvery is how often (in source bytes) the initial copy logs
	// its position; a restart re-reads at most this much.
	progressEvery = 16 << 20
	// dropAlign is the granularity at which the copy drops what it read
	// from the page cache (the largest page-cache folio, 2 MiB).
	dropAlign = 2 << 20
	// initialSpoolShare is the spool fill above which the initial copy
	// waits, keeping room for the guest's own writes.
	initialSpoolShare = 0.5
)

// copyPos is where a disk's initial copy stands.
type copyPos struct {
	cursor int64 // bytes read (and logged where not zero)
	done   bool
}

// progressMark is a progress record in the spool, not yet acknowledged:
// once it is, the state file may say the copy got that far.
type progressMark struct {
	seq    uint64
	disk   uint32
	cursor int64
	done   bool
}

// copier is the initial replication: it owns each disk's copy cursor and
// done flag, the progress marks not yet acknowledged, and the goroutine
// that copies.
type copier struct {
	log   *slog.Logger
	spool *spool.Spool
	disks diskSet
	tags  *tagMarks // the done record ships like a tag

	// cursors and done have one entry per disk, made at construction.
	cursors map[uint32]*atomic.Int64
	done    map[uint32]*atomic.Bool
	// gen counts the restarts (new logs, newlog.go); each one makes the
	// copy's next step stale and wakes the loop.
	gen  atomic.Uint64
	wake chan struct{}

	mu    sync.Mutex     // guards marks
	marks []progressMark // in seq order

	rt *routines // the copy
}

// newCopier makes the copier of disks, each resuming from its position
// in from (the start without one).
func newCopier(parent context.Context, log *slog.Logger, sp *spool.Spool, disks diskSet, tags *tagMarks, from map[uint32]copyPos) *copier {
	c := &copier{log: log, spool: sp, disks: disks, tags: tags, cursors: map[uint32]*atomic.Int64{}, done: map[uint32]*atomic.Bool{},
		wake: make(chan struct{}, 1), rt: newRoutines(parent)}
	for _, d := range disks {
		c.cursors[d.Index] = &atomic.Int64{}
		c.cursors[d.Index].Store(from[d.Index].cursor)
		c.done[d.Index] = &atomic.Bool{}
		c.done[d.Index].Store(from[d.Index].done)
	}
	return c
}

// start begins the copy.
func (c *copier) start() { c.rt.Go(c.loop) }

// Close stops the copy; a later start resumes from the cursors.
func (c *copier) Close() { c.rt.Close() }

// allDone reports whether every disk has finished its initial copy.
func (c *copier) allDone() bool {
	for _, d := range c.done {
		if !d.Load() {
			return false
		}
	}
	return true
}

// isDone reports whether disk index has finished its initial copy.
func (c *copier) isDone(index uint32) bool {
	d := c.done[index]
	return d != nil && d.Load()
}

// progress returns each disk's initial-copy state.
func (c *copier) progress() []replication.DiskProgress {
	out := make([]replication.DiskProgress, 0, len(c.disks))
	for _, d := range c.disks {
		out = append(out, replication.DiskProgress{Index: d.Index, Cursor: c.cursors[d.Index].Load(), Done: c.done[d.Index].Load()})
	}
	return out
}

// acked takes the progress marks the acknowledgement of seq made durable.
func (c *copier) acked(seq uint64) []progressMark {
	c.mu.Lock()
	defer c.mu.Unlock()
	var marks []progressMark
	for len(c.marks) > 0 && c.marks[0].seq <= seq {
		marks = append(marks, c.marks[0])
		c.marks = c.marks[1:]
	}
	return marks
}

// restart starts the copies again for a new log: the copied disks count as
// done, the others are copied again from their start; the marks of the
// dropped log are forgotten. The caller holds every disk's change lock, so
// each step of the copy comes wholly before the restart (and is dropped
// with the log) or after it (and sees that it is stale).
func (c *copier) restart(copied map[uint32]bool) {
	c.mu.Lock()
	c.marks = nil
	c.mu.Unlock()
	for _, d := range c.disks {
		cursor := int64(0)
		if copied[d.Index] {
			cursor = d.Size()
		}
		c.cursors[d.Index].Store(cursor)
		c.done[d.Index].Store(copied[d.Index])
	}
	c.gen.Add(1)
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// loop reads every disk not yet copied from its resume cursor to the end,
// logging non-zero chunks (the fresh replica is all zeros, so zero chunks
// need not travel), interleaved with the guest's writes in the log. A
// restart wakes it again.
func (c *copier) loop() {
	for {
		// The generation first: a restart after this read makes the
		// copy's next step stale, whatever cursor is read below.
		gen := c.gen.Load()
		// The chunk buffer lives only while there is a copy to make: the
		// agent's memory is small once every disk is copied.
		var buf []byte
		for _, d := range c.disks {
			if c.done[d.Index].Load() {
				continue
			}
			if buf == nil {
				buf = make([]byte, initialChunk)
			}
			if !c.copyDisk(d, buf, gen) {
				break
			}
		}
		select {
		case <-c.rt.ctx.Done():
			return
		case <-c.wake:
		}
	}
}

// copyDisk copies d from its cursor to its end, unless it is done. It
// returns false when the copies must stop: the agent stops, logging failed,
// or a restart (a new log) made them stale (gen is no longer current).
func (c *copier) copyDisk(d *Disk, buf []byte, gen uint64) bool {
	if c.done[d.Index].Load() {
		return true
	}
	cur := c.cursors[d.Index]
	start := cur.Load()
	c.log.Info("initial replication", "disk", d.Name, "from", start, "size", d.Size())
	began := time.Now()
	lastMark := start
	dropped := start &^ (dropAlign - 1)
	// mark logs the copy's position every progressEvery and at the end; it
	// returns false when the copies must stop.
	mark := func(off int64) bool {
		if off-lastMark < progressEvery && off != d.Size() {
			return true
		}
		current, err := c.markProgress(d, off, off == d.Size(), gen)
		if err != nil {
			if c.rt.ctx.Err() == nil {
				c.log.Error("log initial replication progress", "disk", d.Name, "err", err)
			}
			return false
		}
		if current {
			lastMark = off
		}
		return current
	}
	for off := start; off < d.Size(); {
		for c.spool.Fill() > initialSpoolShare {
			select {
			case <-c.rt.ctx.Done():
				return false
			case <-time.After(10 * time.Millisecond):
			}
		}
		if c.rt.ctx.Err() != nil {
			return false
		}
		// A hole of a sparse (thin) disk reads as zeros, which the fresh
		// replica holds already: skip it without reading. (A guest write
		// there is logged by the splitter as usual.)
		if next, ok := nextData(d.f, off); ok && next >= off+initialChunk {
			to := min(next&^(initialChunk-1), d.Size())
			if !c.skipTo(d, to, gen) {
				return false
			}
			off = to
			dropped = max(dropped, off&^(dropAlign-1))
			if !mark(off) {
				return false
			}
			continue
		}
		n := min(int64(initialChunk), d.Size()-off)
		current, err := c.copyChunk(d, buf[:n], off, gen)
		if !current {
			return false
		}
		if err != nil {
			if c.rt.ctx.Err() == nil {
				c.log.Error("initial replication read failed; retrying", "disk", d.Name, "offset", off, "err", err)
				time.Sleep(time.Second)
			}
			continue
		}
		off += n
		// The copy reads each block once: keep what it read out of the
		// page cache, where it would crowd out the guest's data and,
		// cached as large folios, make the guest's small writes slow.
		// Only whole large folios can be dropped, hence the alignment.
		if end := off &^ (dropAlign - 1); end > dropped || off == d.Size() {
			if off == d.Size() {
				end = off
			}
			dropCache(d.f, dropped, end-dropped)
			dropped = end
		}
		if !mark(off) {
			return false
		}
	}
	if start >= d.Size() && !c.setDone(d, gen) {
		return false
	}
	c.log.Info("initial replication read the whole disk", "disk", d.Name, "bytes", d.Size()-start, "took", time.Since(began).Round(time.Millisecond))
	return true
}

// copyChunk logs one chunk of d's initial copy (baseChunkLocked) and moves
// its cursor past it, under the disk's change lock, so that a new log's
// reset comes wholly before or after it. It logs nothing and returns false
// if the reset came before (gen is no longer current).
func (c *copier) copyChunk(d *Disk, buf []byte, off int64, gen uint64) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if c.gen.Load() != gen {
		return false, nil
	}
	if _, err := d.baseChunkLocked(buf, off); err != nil {
		return true, err
	}
	c.cursors[d.Index].Store(off + int64(len(buf)))
	return true, nil
}

// skipTo moves d's copy cursor over a hole to off, under the disk's change
// lock like copyChunk, unless a new log restarted the copies.
func (c *copier) skipTo(d *Disk, off int64, gen uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if c.gen.Load() != gen {
		return false
	}
	c.cursors[d.Index].Store(off)
	return true
}

// setDone marks d's copy complete unless a new log restarted it.
func (c *copier) setDone(d *Disk, gen uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if c.gen.Load() != gen {
		return false
	}
	c.done[d.Index].Store(true)
	return true
}

// markProgress logs the copy's position (and, with done, its end), under
// the disk's change lock like copyChunk: it returns false, logging
// nothing, if a new log restarted the copy.
func (c *copier) markProgress(d *Disk, off int64, done bool, gen uint64) (bool, error) {
	rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindProgress, Offset: uint64(off)}
	if done {
		rec.Flags = replication.FlagDone
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if c.gen.Load() != gen {
		return false, nil
	}
	// Append may wait for acknowledgements, whose handler takes c.mu:
	// not under c.mu. Only this goroutine appends marks, so they stay
	// in seq order; a mark added after its ack is popped by the next one.
	seq, err := c.spool.Append(c.rt.ctx, &rec)
	if err != nil {
		return true, err
	}
	if done {
		// The end of the copy ships like a tag: the server seals it at
		// once, and the disk is protected without waiting for the next
		// seal (up to a second).
		c.tags.mark(seq)
	}
	c.spool.Complete(seq)
	c.mu.Lock()
	c.marks = append(c.marks, progressMark{seq: seq, disk: d.Index, cursor: off, done: done})
	c.mu.Unlock()
	if done {
		c.done[d.Index].Store(true)
	}
	return true, nil
}
