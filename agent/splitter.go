package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// Disk is one protected disk: the NBD write-splitter in front of the backing
// file or block device. Every change is appended to the spool and then
// written to the backing disk. Changes whose ranges do not overlap run
// concurrently (the NBD server serves a connection's requests in parallel);
// a change waits for every overlapping change in flight to finish first
// (the disk's range lock), so for every byte the log's order is the disk's
// order. The spool only ships a record once its change is on the backing
// disk (Spool.Complete), and after an unclean stop the agent re-reads the
// ranges of the last records the spool may have had in flight
// (spool.MaxInFlight), so the log never claims a change the source does
// not have, nor misses one.
type Disk struct {
	Index uint32
	Name  string
	Path  string

	f     *os.File
	fb    *nbd.FileBackend
	size  int64
	spool *spool.Spool
	ctx   context.Context
	lat   *latency
	log   *slog.Logger
	// diverged records that the log and the disk may disagree (a resync
	// is needed); set by the agent.
	diverged func(reason string)
	// scan is set for a scan-mode disk.
	scan *scanState
	// al is the agent's activity log (nil in tests that do without).
	al *activityLog
	// over and changes track changes while the spool overflows (nil:
	// appends wait for room instead).
	over    *overflow
	changes *changeMap
	// frozen, when set and true, refuses every change: the machine is
	// frozen for a planned failover (failover.go). Checked under mu.
	frozen *atomic.Bool

	// mu is the change lock. A guest change holds it shared for its whole
	// course (log, write, complete); whoever must see the disk with no
	// change in flight (the initial copy, points, resync and overflow
	// reads, a new log, a freeze) holds it exclusively.
	mu sync.RWMutex
	// ranges orders overlapping guest changes (held with mu shared).
	ranges rangeLock
	// afterLog, in tests, runs after a change is logged and before it
	// reaches the disk.
	afterLog func(seq uint64)

	writes atomic.Int64 // guest changes captured
	bytes  atomic.Int64 // guest bytes changed
}

var _ nbd.Backend = (*Disk)(nil)

func openDisk(ctx context.Context, index uint32, name, path string, sp *spool.Spool, lat *latency, log *slog.Logger) (*Disk, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open disk %s: %w", name, err)
	}
	fb, err := nbd.NewFileBackend(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	if fb.Size() == 0 {
		f.Close()
		return nil, fmt.Errorf("disk %s (%s) has size 0", name, path)
	}
	return &Disk{Index: index, Name: name, Path: path, f: f, fb: fb, size: fb.Size(), spool: sp, ctx: ctx, lat: lat,
		log: log.With("disk", name)}, nil
}

// Size returns the disk size.
func (d *Disk) Size() int64 { return d.size }

// ReadAt reads from the backing disk.
func (d *Disk) ReadAt(p []byte, off int64) error { return d.fb.ReadAt(p, off) }

// WriteAt captures a guest write.
func (d *Disk) WriteAt(p []byte, off int64, fua bool) error {
	return d.change(replication.KindWrite, p, off, int64(len(p)), fua)
}

// WriteZeroes captures NBD_CMD_WRITE_ZEROES.
func (d *Disk) WriteZeroes(off, n int64, fua bool) error {
	return d.change(replication.KindZero, nil, off, n, fua)
}

// Trim captures NBD_CMD_TRIM. The splitter zeroes the range (punching a hole
// where it can) rather than leaving it undefined, so source and replica agree.
func (d *Disk) Trim(off, n int64, fua bool) error {
	return d.change(replication.KindTrim, nil, off, n, fua)
}

// Flush makes every completed change durable in the spool and on the backing
// disk; the activity log then lets go of the disk's extents whose changes
// all completed before it began.
func (d *Disk) Flush() error {
	var g uint64
	if d.al != nil {
		g = d.al.completed()
	}
	if err := d.spool.Sync(); err != nil {
		return err
	}
	if err := d.fb.Flush(); err != nil {
		return err
	}
	if d.al != nil {
		d.al.flushedDisk(d.Index, g)
	}
	return nil
}

// Record size limits: a guest write is logged as records of at most
// maxDataRecord bytes (so a frame of records stays well under the wire
// limit whatever the client's request size), a zero or trim as records of at
// most maxZeroRecord (records carry a 32-bit length).
const (
	maxDataRecord = 4 << 20
	maxZeroRecord = 1 << 30
)

// change logs and applies one guest request, split into records, holding
// the change lock shared and the request's whole range, so no overlapping
// change comes between its pieces.
func (d *Disk) change(kind replication.Kind, p []byte, off, n int64, fua bool) error {
	d.mu.RLock()
	if d.frozen != nil && d.frozen.Load() {
		d.mu.RUnlock()
		return fmt.Errorf("disk %s is frozen for a planned failover: %w", d.Name, errFrozen)
	}
	d.ranges.lock(off, n)
	err := d.changeRange(kind, p, off, n)
	d.ranges.unlock(off, n)
	d.mu.RUnlock()
	if err == nil && fua {
		return d.Flush()
	}
	return err
}

func (d *Disk) changeRange(kind replication.Kind, p []byte, off, n int64) error {
	for n > 0 {
		k := min(n, int64(maxZeroRecord))
		var chunk []byte
		if kind.HasData() {
			k = min(n, int64(maxDataRecord))
			chunk, p = p[:k], p[k:]
		}
		if err := d.changeLocked(kind, chunk, off, k); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// changeLocked logs and applies one record's change. The caller holds the
// change lock (shared or exclusive) and the range.
func (d *Disk) changeLocked(kind replication.Kind, p []byte, off, n int64) error {
	if d.al != nil {
		g, err := d.al.touch(d.Index, off, n)
		if err != nil {
			return err
		}
		defer d.al.done(g)
	}
	if d.over != nil && d.over.active.Load() {
		return d.untracked(kind, p, off, n)
	}
	rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: kind, Offset: uint64(off), Length: uint32(n), Data: p}
	var seq uint64
	var err error
	if d.over != nil {
		seq, err = d.spool.TryAppend(&rec)
		if errors.Is(err, spool.ErrFull) {
			if d.over.enter(d) {
				return d.untracked(kind, p, off, n)
			}
			seq, err = d.spool.Append(d.ctx, &rec) // wait for room
		}
	} else {
		seq, err = d.spool.Append(d.ctx, &rec)
	}
	if err != nil {
		return fmt.Errorf("log change: %w", err)
	}
	if d.afterLog != nil {
		d.afterLog(seq)
	}
	switch kind {
	case replication.KindWrite:
		err = d.fb.WriteAt(p, off, false)
	default:
		err = d.fb.WriteZeroes(off, n, false)
	}
	if err != nil {
		// The log now holds a change the disk may not: log what the disk
		// really holds, right after it (no overlapping change can come
		// between: the caller holds the range).
		d.log.Error("backing write failed; logging the range as it is", "offset", off, "length", n, "err", err)
		d.spool.Complete(seq)
		if rerr := d.relogLocked(off, n); rerr != nil {
			reason := fmt.Sprintf("a write at %d+%d failed on the disk (%v) and the range could not be re-read (%v)", off, n, err, rerr)
			d.log.Error("the replica may now hold a change the disk does not; marking the disk for resync", "reason", reason)
			if d.diverged != nil {
				d.diverged(reason)
			}
		}
		return err
	}
	d.spool.Complete(seq)
	d.writes.Add(1)
	d.bytes.Add(n)
	d.lat.wrote(seq)
	return nil
}

// untracked makes a change while the spool overflows: the disk is written
// and the blocks marked in the changed-block map, nothing is logged.
func (d *Disk) untracked(kind replication.Kind, p []byte, off, n int64) error {
	d.changes.mark(off, n)
	d.over.marked.Add((n + mapBlock - 1) / mapBlock)
	var err error
	if kind == replication.KindWrite {
		err = d.fb.WriteAt(p, off, false)
	} else {
		err = d.fb.WriteZeroes(off, n, false)
	}
	if err != nil {
		return err
	}
	d.writes.Add(1)
	d.bytes.Add(n)
	return nil
}

// relogLocked appends the current contents of a range as records (zero
// chunks as zero records). The caller holds d.mu exclusively, or shared
// with the range.
func (d *Disk) relogLocked(off, n int64) error {
	if d.al != nil {
		g, err := d.al.touch(d.Index, off, n)
		if err != nil {
			return err
		}
		defer d.al.done(g)
	}
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(buf)))
		b := buf[:k]
		if _, err := d.f.ReadAt(b, off); err != nil && err != io.EOF {
			return err
		}
		rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindWrite, Offset: uint64(off), Length: uint32(k), Data: b}
		if replication.IsZero(b) {
			rec.Kind, rec.Data = replication.KindZero, nil
		}
		seq, err := d.spool.Append(d.ctx, &rec)
		if err != nil {
			return err
		}
		d.spool.Complete(seq)
		off, n = off+k, n-k
	}
	return nil
}

// Relog re-reads a range and logs its current contents (used after an
// unclean stop for the range of the disk's last logged change).
func (d *Disk) Relog(off, n int64) error {
	if off < 0 || n <= 0 || off >= d.size {
		// Not on the disk (a negative offset is a record's 64-bit one past
		// any disk): nothing there to log.
		return nil
	}
	n = min(n, d.size-off)
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.relogLocked(off, n)
}

// baseChunkLocked reads [off, off+len(buf)) and, unless it is all zero,
// logs it as initial-replication data. The caller holds the change lock so
// the chunk is exactly the disk's contents at its place in the log.
func (d *Disk) baseChunkLocked(buf []byte, off int64) (bool, error) {
	if _, err := d.f.ReadAt(buf, off); err != nil && err != io.EOF {
		return false, fmt.Errorf("read disk %s at %d: %w", d.Name, off, err)
	}
	if d.scan != nil {
		// What the replica will hold for this block, for the scans.
		d.scan.note(off, hashBlock(buf))
	}
	if replication.IsZero(buf) {
		return false, nil
	}
	rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindBase, Offset: uint64(off), Length: uint32(len(buf)), Data: buf}
	seq, err := d.spool.Append(d.ctx, &rec)
	if err != nil {
		return false, err
	}
	d.spool.Complete(seq)
	return true, nil
}

// rangeLock holds the byte ranges of a disk's changes in flight: a change
// waits until no change in flight overlaps its range. Changes in flight are
// few (the NBD server's in-flight limit per connection), so a list does.
type rangeLock struct {
	mu      sync.Mutex
	cond    sync.Cond
	held    []span
	waiting int // changes waiting for an overlapping one
}

type span struct{ off, end int64 }

func (l *rangeLock) overlaps(s span) bool {
	for _, h := range l.held {
		if h.off < s.end && s.off < h.end {
			return true
		}
	}
	return false
}

// lock waits until no held range overlaps [off, off+n), then holds it.
func (l *rangeLock) lock(off, n int64) {
	s := span{off, off + max(n, 1)}
	l.mu.Lock()
	if l.cond.L == nil {
		l.cond.L = &l.mu
	}
	for l.overlaps(s) {
		l.waiting++
		l.cond.Wait()
		l.waiting--
	}
	l.held = append(l.held, s)
	l.mu.Unlock()
}

// waiters returns the number of changes waiting for an overlapping one.
func (l *rangeLock) waiters() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.waiting
}

// unlock releases a range lock took.
func (l *rangeLock) unlock(off, n int64) {
	s := span{off, off + max(n, 1)}
	l.mu.Lock()
	for i, h := range l.held {
		if h == s {
			l.held = append(l.held[:i], l.held[i+1:]...)
			break
		}
	}
	l.cond.Broadcast()
	l.mu.Unlock()
}

// Close closes the backing file.
func (d *Disk) Close() error { return d.f.Close() }
