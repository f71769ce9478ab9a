package agent

import (
	"time"

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

// initialCopy reads every disk not yet copied from its resume cursor to the
// end, logging non-zero chunks (the fresh replica is all zeros, so zero
// chunks need not travel), interleaved with the guest's writes in the log.
// A new log (newlog.go) may restart the copies: it wakes the loop again.
func (a *Agent) initialCopy() {
	buf := make([]byte, initialChunk)
	for {
		// The generation first: a new log started after this read makes
		// the copy's next step stale, whatever cursor is read below.
		gen := a.copyGen.Load()
		for _, d := range a.disks {
			if !a.copyDisk(d, buf, gen) {
				break
			}
		}
		select {
		case <-a.ctx.Done():
			return
		case <-a.copyWake:
		}
	}
}

// copyDisk copies d from its cursor to its end, unless it is done. It
// returns false when the copies must stop: the agent stops, logging failed,
// or a new log restarted them (gen is no longer current).
func (a *Agent) copyDisk(d *Disk, buf []byte, gen uint64) bool {
	if a.done[d.Index].Load() {
		return true
	}
	cur := a.cursors[d.Index]
	start := cur.Load()
	a.log.Info("initial replication", "disk", d.Name, "from", start, "size", d.Size())
	began := time.Now()
	lastMark := start
	dropped := start &^ (dropAlign - 1)
	// mark logs the copy's position every progressEvery and at the end; it
	// returns false when the copies must stop.
	mark := func(off int64) bool {
		if off-lastMark < progressEvery && off != d.Size() {
			return true
		}
		current, err := a.markProgress(d, off, off == d.Size(), gen)
		if err != nil {
			if a.ctx.Err() == nil {
				a.log.Error("log initial replication progress", "disk", d.Name, "err", err)
			}
			return false
		}
		if current {
			lastMark = off
		}
		return current
	}
	for off := start; off < d.Size(); {
		for a.spool.Fill() > initialSpoolShare {
			select {
			case <-a.ctx.Done():
				return false
			case <-time.After(10 * time.Millisecond):
			}
		}
		if a.ctx.Err() != nil {
			return false
		}
		// A hole of a sparse (thin) disk reads as zeros, which the fresh
		// replica holds already: skip it without reading. (A guest write
		// there is logged by the splitter as usual.)
		if next, ok := nextData(d.f, off); ok && next >= off+initialChunk {
			to := min(next&^(initialChunk-1), d.Size())
			if !a.skipTo(d, to, gen) {
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
		current, err := a.copyChunk(d, buf[:n], off, gen)
		if !current {
			return false
		}
		if err != nil {
			if a.ctx.Err() == nil {
				a.log.Error("initial replication read failed; retrying", "disk", d.Name, "offset", off, "err", err)
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
	if start >= d.Size() && !a.setDone(d, gen) {
		return false
	}
	a.log.Info("initial replication read the whole disk", "disk", d.Name, "bytes", d.Size()-start, "took", time.Since(began).Round(time.Millisecond))
	return true
}

// copyChunk logs one chunk of d's initial copy (baseChunkLocked) and moves
// its cursor past it, under the disk's change lock, so that a new log's
// reset comes wholly before or after it. It logs nothing and returns false
// if the reset came before (gen is no longer current).
func (a *Agent) copyChunk(d *Disk, buf []byte, off int64, gen uint64) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if a.copyGen.Load() != gen {
		return false, nil
	}
	if _, err := d.baseChunkLocked(buf, off); err != nil {
		return true, err
	}
	a.cursors[d.Index].Store(off + int64(len(buf)))
	return true, nil
}

// skipTo moves d's copy cursor over a hole to off, under the disk's change
// lock like copyChunk, unless a new log restarted the copies.
func (a *Agent) skipTo(d *Disk, off int64, gen uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if a.copyGen.Load() != gen {
		return false
	}
	a.cursors[d.Index].Store(off)
	return true
}

// setDone marks d's copy complete unless a new log restarted it.
func (a *Agent) setDone(d *Disk, gen uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if a.copyGen.Load() != gen {
		return false
	}
	a.done[d.Index].Store(true)
	return true
}

// markProgress logs the copy's position (and, with done, its end), under
// the disk's change lock like copyChunk: it returns false, logging
// nothing, if a new log restarted the copy.
func (a *Agent) markProgress(d *Disk, off int64, done bool, gen uint64) (bool, error) {
	rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindProgress, Offset: uint64(off)}
	if done {
		rec.Flags = replication.FlagDone
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if a.copyGen.Load() != gen {
		return false, nil
	}
	// Append may wait for acknowledgements, whose handler takes progMu:
	// not under progMu. Only this goroutine appends marks, so they stay
	// in seq order; a mark added after its ack is popped by the next one.
	seq, err := a.spool.Append(a.ctx, &rec)
	if err != nil {
		return true, err
	}
	a.spool.Complete(seq)
	a.progMu.Lock()
	a.prog = append(a.prog, progressMark{seq: seq, disk: d.Index, cursor: off, done: done})
	a.progMu.Unlock()
	if done {
		a.done[d.Index].Store(true)
	}
	return true, nil
}
