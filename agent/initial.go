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
func (a *Agent) initialCopy() {
	buf := make([]byte, initialChunk)
	for _, d := range a.disks {
		if a.done[d.Index].Load() {
			continue
		}
		cur := a.cursors[d.Index]
		start := cur.Load()
		a.log.Info("initial replication", "disk", d.Name, "from", start, "size", d.Size())
		began := time.Now()
		lastMark := start
		dropped := start &^ (dropAlign - 1)
		for off := start; off < d.Size(); {
			for a.spool.Fill() > initialSpoolShare {
				select {
				case <-a.ctx.Done():
					return
				case <-time.After(10 * time.Millisecond):
				}
			}
			if a.ctx.Err() != nil {
				return
			}
			// A hole of a sparse (thin) disk reads as zeros, which the
			// fresh replica holds already: skip it without reading. (A
			// guest write there is logged by the splitter as usual.)
			if next, ok := nextData(d.f, off); ok && next >= off+initialChunk {
				off = min(next&^(initialChunk-1), d.Size())
				cur.Store(off)
				dropped = max(dropped, off&^(dropAlign-1))
				if off-lastMark >= progressEvery || off == d.Size() {
					if err := a.markProgress(d, off, off == d.Size()); err != nil {
						if a.ctx.Err() == nil {
							a.log.Error("log initial replication progress", "disk", d.Name, "err", err)
						}
						return
					}
					lastMark = off
				}
				continue
			}
			n := min(int64(initialChunk), d.Size()-off)
			if _, err := d.baseChunk(buf[:n], off); err != nil {
				if a.ctx.Err() == nil {
					a.log.Error("initial replication read failed; retrying", "disk", d.Name, "offset", off, "err", err)
					time.Sleep(time.Second)
				}
				continue
			}
			off += n
			cur.Store(off)
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
			if off-lastMark >= progressEvery || off == d.Size() {
				if err := a.markProgress(d, off, off == d.Size()); err != nil {
					if a.ctx.Err() == nil {
						a.log.Error("log initial replication progress", "disk", d.Name, "err", err)
					}
					return
				}
				lastMark = off
			}
		}
		a.done[d.Index].Store(true)
		a.log.Info("initial replication read the whole disk", "disk", d.Name, "bytes", d.Size()-start, "took", time.Since(began).Round(time.Millisecond))
	}
}

func (a *Agent) markProgress(d *Disk, off int64, done bool) error {
	rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindProgress, Offset: uint64(off)}
	if done {
		rec.Flags = replication.FlagDone
	}
	// Not under progMu: Append may wait for acknowledgements, whose
	// handler takes progMu. Only this goroutine appends marks, so they stay
	// in seq order; a mark added after its ack is popped by the next one.
	seq, err := a.spool.Append(a.ctx, &rec)
	if err != nil {
		return err
	}
	a.spool.Complete(seq)
	a.progMu.Lock()
	a.prog = append(a.prog, progressMark{seq: seq, disk: d.Index, cursor: off, done: done})
	a.progMu.Unlock()
	return nil
}
