package localfs

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/diskcore"
	"github.com/asrdr/asr/store/atomicfile"
)

const (
	replicaName = "replica.img"
	snapDirName = "snap"
	cowExt      = ".cow"
	deletedExt  = ".deleted"
	tmpMark     = "~tmp"

	// opOverhead is what a queued change costs beyond its data.
	opOverhead = 64
	// saveBatch is the most records written to a log in one call.
	saveBatch = 256
	// holeCheckBlocks is the shortest run of blocks worth asking the file
	// system whether it is a hole before reading it.
	holeCheckBlocks = 64
)

// punch punches holes; tests replace it to exercise the fallback.
var punch = punchHole

// zeros is a source of zero bytes for comparisons and zero-filling writes.
var zeros [256 << 10]byte

// epoch is one snapshot's undo log, open and indexed. It is the snapshot's
// ref in diskcore.
type epoch struct {
	name string // snapshot name; kept after deletion, for errors
	seq  uint64 // chain order
	path string
	f    *os.File

	// index maps a block to the offset of its record. Written by the writer
	// under disk.mu; read by readers under disk.mu (shared) and by the writer
	// without it.
	index map[uint64]int64

	// Writer-only bookkeeping of the file.
	count        int64 // records in the file
	synced       int64 // records made durable by the last fsync
	hdrCommitted int64 // committed count written in the header
	hidden       bool  // deleted: renamed to <seq>.deleted
}

// op is a change queued until Flush. data is nil for a zero op.
type op struct {
	off, n int64
	data   []byte
}

// disk is the storage of an open replica disk: diskcore.Disk. diskcore
// calls the writer's methods one at a time.
type disk struct {
	t   *Target
	key string
	dir string

	// The writer's.
	replica *os.File
	direct  *directWriter // the replica opened O_DIRECT (direct.go); nil where refused
	ops     []op
	opBytes int64
	readBuf []byte
	recBuf  []byte

	// mu guards size, nblocks, chain, the epochs' indexes, and closed.
	// Readers hold it shared while they read a chunk; the writer holds it
	// exclusively while it publishes saved blocks, applies a change or
	// resizes the disk, and reads those without it.
	mu      sync.RWMutex
	size    int64
	nblocks uint64
	chain   []*epoch // oldest first, hidden epochs included
	closed  bool
}

var (
	_ diskcore.Disk       = (*disk)(nil)
	_ diskcore.Extenter   = (*disk)(nil)
	_ diskcore.OwningDisk = (*disk)(nil)
)

func (t *Target) diskDir(key string) string {
	return filepath.Join(t.dir, disksDir, filepath.FromSlash(key)+diskSuffix)
}

// diskStorage is the target's disk tree as diskcore.Storage.
type diskStorage struct{ t *Target }

// DeleteDisk removes the disk at key with its snapshots; a missing disk is
// nil.
func (s diskStorage) DeleteDisk(ctx context.Context, key string) error {
	t := s.t
	ddir := t.diskDir(key)
	// The replica goes first: without it the disk does not exist, whatever
	// a crash leaves of the rest (creation clears stale logs).
	err := os.Remove(filepath.Join(ddir, replicaName))
	switch {
	case err == nil:
		if err := atomicfile.SyncDir(ddir); err != nil {
			return err
		}
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	// Only the disk's own files: other disks may nest below ddir.
	if err := os.RemoveAll(filepath.Join(ddir, snapDirName)); err != nil {
		return err
	}
	os.Remove(filepath.Join(ddir, replicaName+tmpMark))
	t.treeMu.Lock()
	removeEmptyParents(filepath.Join(t.dir, disksDir), ddir)
	t.treeMu.Unlock()
	return nil
}

// LoadDisk opens (or creates) a disk's files and indexes its snapshots. The
// deleted snapshots a crash left behind go to diskcore, which merges them
// away.
func (s diskStorage) LoadDisk(ctx context.Context, key string, size int64) (diskcore.Loaded, error) {
	t := s.t
	ddir := t.diskDir(key)
	f, err := os.OpenFile(filepath.Join(ddir, replicaName), os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		if size == 0 {
			return diskcore.Loaded{}, replication.ErrNotFound
		}
		f, err = t.createReplica(ddir, size)
	}
	if err != nil {
		return diskcore.Loaded{}, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return diskcore.Loaded{}, err
	}
	if err := diskcore.CheckSize(size, st.Size()); err != nil {
		f.Close()
		return diskcore.Loaded{}, err
	}
	d := &disk{
		t:       t,
		key:     key,
		dir:     ddir,
		size:    st.Size(),
		nblocks: uint64((st.Size() + blockSize - 1) / blockSize),
		replica: f,
	}
	if df, err := openDirect(filepath.Join(ddir, replicaName)); err == nil {
		d.direct = newDirectWriter(df)
	}
	if err := d.loadChain(); err != nil {
		d.closeFiles()
		return diskcore.Loaded{}, err
	}
	l := diskcore.Loaded{Disk: d, Size: d.size}
	for _, e := range d.chain {
		l.Add(e.name, e, e.hidden)
	}
	return l, nil
}

// createReplica makes a new disk directory with a sparse replica of size
// bytes, atomically: the replica appears complete or not at all.
func (t *Target) createReplica(ddir string, size int64) (*os.File, error) {
	t.treeMu.RLock()
	defer t.treeMu.RUnlock()
	if err := mkdirAllSync(filepath.Join(t.dir, disksDir), ddir); err != nil {
		return nil, err
	}
	snap := filepath.Join(ddir, snapDirName)
	if err := os.RemoveAll(snap); err != nil { // logs of a deleted disk
		return nil, err
	}
	if err := os.Mkdir(snap, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(ddir, replicaName)
	tmp := path + tmpMark
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(size)
	if errors.Is(err, syscall.EFBIG) {
		err = fmt.Errorf("the file system under %s cannot hold a file of %d bytes (%v): %w", ddir, size, err, replication.ErrDiskTooLarge)
	}
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = atomicfile.SyncDir(ddir)
	}
	if err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, err
	}
	return f, nil
}

// loadChain opens and scans the disk's logs.
func (d *disk) loadChain() error {
	snap := filepath.Join(d.dir, snapDirName)
	if err := os.MkdirAll(snap, 0o700); err != nil {
		return err
	}
	entries, err := os.ReadDir(snap)
	if err != nil {
		return err
	}
	for _, de := range entries {
		name := de.Name()
		path := filepath.Join(snap, name)
		var e *epoch
		switch {
		case strings.Contains(name, "~"):
			os.Remove(path) // a log whose creation a crash interrupted
			continue
		case strings.HasSuffix(name, cowExt) && replication.ValidKeyElem(strings.TrimSuffix(name, cowExt)):
			e, err = d.loadEpoch(path)
			if e != nil {
				e.name = strings.TrimSuffix(name, cowExt)
			}
		case strings.HasSuffix(name, deletedExt):
			e, err = d.loadEpoch(path)
			if e != nil {
				e.name, e.hidden = name, true
			}
		default:
			continue
		}
		if err != nil {
			return fmt.Errorf("snapshot log %s: %w", name, err)
		}
		d.chain = append(d.chain, e)
	}
	slices.SortFunc(d.chain, func(a, b *epoch) int { return cmp.Compare(a.seq, b.seq) })
	for i := 1; i < len(d.chain); i++ {
		if d.chain[i].seq == d.chain[i-1].seq {
			return fmt.Errorf("snapshot logs %s and %s share sequence %d: %w",
				filepath.Base(d.chain[i-1].path), filepath.Base(d.chain[i].path), d.chain[i].seq, replication.ErrCorrupt)
		}
	}
	return nil
}

// loadEpoch opens a log, indexes it and truncates a torn tail.
func (d *disk) loadEpoch(path string) (*epoch, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	s, err := scanCOW(io.NewSectionReader(f, 0, st.Size()), st.Size(), d.nblocks)
	if err != nil {
		f.Close()
		return nil, err
	}
	if s.damaged > 0 {
		slog.Warn("localfs: snapshot log records damaged since they were written (bit rot); reading those blocks of the snapshot fails",
			"log", path, "records", s.damaged)
	}
	if s.validEnd < st.Size() {
		if err := f.Truncate(s.validEnd); err != nil {
			f.Close()
			return nil, err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return nil, err
		}
	}
	// Records past the committed count may sit only in the page cache of a
	// process that died: count them as not durable, so the next Flush fsyncs
	// them before it changes the replica.
	return &epoch{
		seq:          s.header.seq,
		path:         path,
		f:            f,
		index:        s.index,
		count:        s.records,
		synced:       int64(s.header.committed),
		hdrCommitted: int64(s.header.committed),
	}, nil
}

// Write saves for the newest snapshot the old contents of the blocks p
// changes, at once, and queues the write until Flush (a copy of p: the
// caller may reuse it).
func (d *disk) Write(p []byte, off int64) error {
	return d.WriteOwned(bytes.Clone(p), off)
}

// WriteOwned is Write queueing p itself, which its caller never changes
// again (diskcore.OwningDisk): the applier's decoded records, whose copy
// cost a memmove of every byte applied.
func (d *disk) WriteOwned(p []byte, off int64) error {
	return d.change(off, int64(len(p)), p)
}

// Zero saves like Write and queues a change that makes n bytes at off read
// as zero, punching a hole in the replica where the file system can.
func (d *disk) Zero(off, n int64) error {
	return d.change(off, n, nil)
}

// change saves what a change overwrites, then queues it.
func (d *disk) change(off, n int64, data []byte) error {
	if err := d.save(off, n, data); err != nil {
		return err
	}
	d.ops = append(d.ops, op{off: off, n: n, data: data})
	d.opBytes += int64(len(data)) + opOverhead
	return nil
}

// Buffered is the bytes of queued changes, each counted with an overhead.
func (d *disk) Buffered() int64 { return d.opBytes }

// save appends to the newest log the current contents of every block of
// [off, off+n) that the log lacks and the change alters. The replica still
// holds those blocks as they were at the newest snapshot: a block changed
// since then is in the log already, queued changes included.
func (d *disk) save(off, n int64, data []byte) error {
	if len(d.chain) == 0 {
		return nil
	}
	e := d.chain[len(d.chain)-1]
	first := uint64(off / blockSize)
	last := uint64((off + n - 1) / blockSize)
	recs := d.recBuf[:0]
	var blocks []uint64
	for b := first; b <= last; {
		if _, ok := e.index[b]; ok {
			b++
			continue
		}
		if data == nil {
			// Zeroing a hole changes nothing: jump over holes (a trim of a
			// mostly empty disk costs one lseek per extent, not a read).
			if next := d.skipHole(b, last); next > b {
				b = next
				continue
			}
		}
		end := b + 1
		for end <= last && end-b < saveBatch {
			if _, ok := e.index[end]; ok {
				break
			}
			end++
		}
		old, err := d.readReplica(b, end)
		if err != nil {
			return err
		}
		for blk := b; blk < end; blk++ {
			cur := old[(blk-b)*blockSize : (blk-b+1)*blockSize]
			if d.unchanged(blk, cur, off, n, data) {
				continue
			}
			recs = slices.Grow(recs, recSize)[:len(recs)+recSize]
			rec := recs[len(recs)-recSize:]
			copy(rec[recHeaderSize:], cur)
			putRecord(rec, blk)
			blocks = append(blocks, blk)
		}
		if len(blocks) >= saveBatch {
			if err := d.appendRecords(e, recs, blocks); err != nil {
				return err
			}
			recs, blocks = recs[:0], blocks[:0]
		}
		b = end
	}
	d.recBuf = recs[:0]
	if len(blocks) == 0 {
		return nil
	}
	return d.appendRecords(e, recs, blocks)
}

// skipHole returns the first block at or after b, up to last+1, that may
// hold data in the replica (b itself if it may, or the file system cannot tell).
func (d *disk) skipHole(b, last uint64) uint64 {
	pos, ok := nextData(d.replica, int64(b)*blockSize)
	if !ok || pos <= int64(b)*blockSize {
		return b
	}
	return min(uint64(pos/blockSize), last+1)
}

// unchanged reports whether the change leaves block blk, now cur, as it is:
// such a block needs no saving.
func (d *disk) unchanged(blk uint64, cur []byte, off, n int64, data []byte) bool {
	bstart := int64(blk) * blockSize
	lo, hi := max(bstart, off), min(bstart+blockSize, off+n)
	old := cur[lo-bstart : hi-bstart]
	if data == nil {
		return isZero(old)
	}
	return bytes.Equal(old, data[lo-off:hi-off])
}

func isZero(p []byte) bool {
	for len(p) > 0 {
		k := min(len(p), len(zeros))
		if !bytes.Equal(p[:k], zeros[:k]) {
			return false
		}
		p = p[k:]
	}
	return true
}

// readReplica returns blocks [b, end) of the replica, zero-padded past the
// disk's end, in a buffer reused by the next call.
func (d *disk) readReplica(b, end uint64) ([]byte, error) {
	n := int64(end-b) * blockSize
	if int64(cap(d.readBuf)) < n {
		d.readBuf = make([]byte, n)
	}
	buf := d.readBuf[:n]
	off := int64(b) * blockSize
	avail := min(n, d.size-off)
	if end-b >= holeCheckBlocks {
		if pos, ok := nextData(d.replica, off); ok && pos >= off+avail {
			clear(buf)
			return buf, nil
		}
	}
	m, err := d.replica.ReadAt(buf[:avail], off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read replica: %w", err)
	}
	clear(buf[m:])
	return buf, nil
}

// appendRecords writes records for blocks at the end of e's log and publishes
// them to readers.
func (d *disk) appendRecords(e *epoch, recs []byte, blocks []uint64) error {
	at := recordOffset(e.count)
	if _, err := e.f.WriteAt(recs, at); err != nil {
		return fmt.Errorf("append to snapshot log %s: %w", e.name, err)
	}
	d.mu.Lock()
	for i, b := range blocks {
		e.index[b] = at + int64(i)*recSize
	}
	d.mu.Unlock()
	e.count += int64(len(blocks))
	return nil
}

// Flush makes the queued changes durable: the snapshot logs are fsynced
// first, then the changes are applied to the replica, which is fsynced.
func (d *disk) Flush(context.Context) error { return d.flushLocked() }

func (d *disk) flushLocked() error {
	if err := d.syncLogs(); err != nil {
		return err
	}
	return d.applyLocked(len(d.ops), true)
}

// syncLogs makes every saved block durable.
func (d *disk) syncLogs() error {
	for _, e := range d.chain {
		if err := d.syncEpoch(e); err != nil {
			return err
		}
	}
	return nil
}

// syncEpoch fsyncs e's log if it has records not yet durable. The header
// first learns the count the previous fsync made durable, so after a crash it
// is a lower bound of the durable records.
func (d *disk) syncEpoch(e *epoch) error {
	if e.count == e.synced {
		return nil
	}
	if e.hdrCommitted < e.synced {
		if err := writeCommitted(e, e.synced); err != nil {
			return err
		}
	}
	if err := e.f.Sync(); err != nil {
		return fmt.Errorf("sync snapshot log %s: %w", e.name, err)
	}
	e.synced = e.count
	return nil
}

func writeCommitted(e *epoch, n int64) error {
	if _, err := e.f.WriteAt(encodeCOWHeader(cowHeader{seq: e.seq, committed: uint64(n)}), 0); err != nil {
		return fmt.Errorf("write snapshot log %s header: %w", e.name, err)
	}
	e.hdrCommitted = n
	return nil
}

// finishEpoch makes e's log wholly durable and committed, for a clean close
// and before a merged log is removed.
func (d *disk) finishEpoch(e *epoch) error {
	if err := d.syncEpoch(e); err != nil {
		return err
	}
	if e.hdrCommitted == e.count {
		return nil
	}
	if err := writeCommitted(e, e.count); err != nil {
		return err
	}
	if err := e.f.Sync(); err != nil {
		return fmt.Errorf("sync snapshot log %s: %w", e.name, err)
	}
	return nil
}

// applyLocked applies the first k queued changes to the replica, and fsyncs
// it if asked. The logs must be durable already.
func (d *disk) applyLocked(k int, sync bool) error {
	if k == 0 {
		return nil
	}
	for i := 0; i < k; {
		if j := d.directRun(i, k); j > i {
			d.mu.Lock()
			err := d.direct.writeAll(d.ops[i:j])
			d.mu.Unlock()
			if errors.Is(err, errDirectRefused) {
				d.stopDirect(err)
				continue // the same ops again, buffered
			}
			if err != nil {
				d.dropOps(i)
				return fmt.Errorf("apply to replica: %w", err)
			}
			i = j
			continue
		}
		d.mu.Lock()
		err := d.applyOp(d.ops[i])
		d.mu.Unlock()
		if err != nil {
			d.dropOps(i)
			return fmt.Errorf("apply to replica: %w", err)
		}
		i++
	}
	d.dropOps(k)
	if sync {
		if err := d.replica.Sync(); err != nil {
			return fmt.Errorf("sync replica: %w", err)
		}
	}
	return nil
}

// directRun returns the end of the run of queued changes from i (before k)
// that go direct together: writes of at least directMin, aligned, none
// overlapping another of the run, at most directParallel. It is i when the
// change at i is not one (or the disk writes buffered).
func (d *disk) directRun(i, k int) int {
	if d.direct == nil {
		return i
	}
	j := i
	for ; j < k && j-i < directParallel; j++ {
		o := d.ops[j]
		if o.data == nil || !directEligible(o.off, len(o.data)) {
			break
		}
		overlaps := false
		for _, p := range d.ops[i:j] {
			if o.off < p.off+p.n && p.off < o.off+o.n {
				overlaps = true
			}
		}
		if overlaps {
			break
		}
	}
	return j
}

// stopDirect makes the disk write buffered from now on.
func (d *disk) stopDirect(err error) {
	slog.Default().Warn("the replica's file system refused a direct write: writing through the page cache", "disk", d.key, "err", err)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.direct.close()
	d.direct = nil
}

// writebackMin is the smallest write whose writeback applyOp starts at
// once (an initial copy's chunk is 1 MiB; a guest's 4 KiB write is left
// to the fsync).
const writebackMin = 256 << 10

func (d *disk) dropOps(k int) {
	for _, o := range d.ops[:k] {
		d.opBytes -= int64(len(o.data)) + opOverhead
	}
	d.ops = slices.Delete(d.ops, 0, k)
	if len(d.ops) == 0 {
		d.ops = nil // let a large backing array go
	}
}

func (d *disk) applyOp(o op) error {
	if o.data != nil {
		_, err := d.replica.WriteAt(o.data, o.off)
		if err == nil && len(o.data) >= writebackMin {
			// The disk writes it while the next ops are copied in.
			startWriteback(d.replica, o.off, int64(len(o.data)))
		}
		return err
	}
	if punch(d.replica, o.off, o.n) == nil {
		return nil
	}
	for off, end := o.off, o.off+o.n; off < end; {
		k := min(end-off, int64(len(zeros)))
		if _, err := d.replica.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off += k
	}
	return nil
}

// Snapshot starts the epoch of snapshot name: a new, empty undo log, which
// the blocks changed from now on are saved to. diskcore has flushed the
// disk.
func (d *disk) Snapshot(_ context.Context, name string) (any, error) {
	seq := uint64(1)
	if len(d.chain) > 0 {
		seq = d.chain[len(d.chain)-1].seq + 1
	}
	e, err := d.createEpoch(name, seq)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.chain = append(d.chain, e)
	d.mu.Unlock()
	return e, nil
}

// createEpoch makes an empty log, atomically and durably.
func (d *disk) createEpoch(name string, seq uint64) (*epoch, error) {
	snap := filepath.Join(d.dir, snapDirName)
	path := filepath.Join(snap, name+cowExt)
	tmp := path + tmpMark
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	_, err = f.Write(encodeCOWHeader(cowHeader{seq: seq}))
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = atomicfile.SyncDir(snap)
	}
	if err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, err
	}
	return &epoch{name: name, seq: seq, path: path, f: f, index: map[uint64]int64{}}, nil
}

// HideSnapshot renames the snapshot's log to <seq>.deleted, durably, so
// that its deletion holds whether the merge waits for readers or a crash
// interrupts it: the next LoadDisk hands it back as held.
func (d *disk) HideSnapshot(_ context.Context, ref any, _ bool) error {
	return d.hide(ref.(*epoch))
}

func (d *disk) hide(e *epoch) error {
	if e.hidden {
		return nil
	}
	snap := filepath.Join(d.dir, snapDirName)
	hidden := filepath.Join(snap, fmt.Sprintf("%016x%s", e.seq, deletedExt))
	if err := os.Rename(e.path, hidden); err != nil {
		return err
	}
	e.hidden, e.path = true, hidden
	return atomicfile.SyncDir(snap)
}

// DropSnapshot merges a deleted snapshot's log away (dropEpoch).
func (d *disk) DropSnapshot(_ context.Context, ref any) error {
	e := ref.(*epoch)
	if err := d.hide(e); err != nil {
		return err
	}
	i := slices.Index(d.chain, e)
	if i < 0 {
		return nil
	}
	return d.dropEpoch(i)
}

// dropEpoch removes epoch i from the chain. Older snapshots read through it
// for the blocks the previous epoch lacks, so those records move there first,
// durably, before the file goes. A crash in between leaves both files, which
// read the same; the next open redoes the merge, which skips what moved.
func (d *disk) dropEpoch(i int) error {
	e := d.chain[i]
	if i > 0 {
		if err := d.merge(e, d.chain[i-1]); err != nil {
			return err
		}
	}
	d.mu.Lock()
	d.chain = slices.Delete(d.chain, i, i+1)
	d.mu.Unlock()
	e.f.Close()
	if err := os.Remove(e.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove snapshot log %s: %w", e.name, err)
	}
	return atomicfile.SyncDir(filepath.Join(d.dir, snapDirName))
}

// merge copies into p the records of e for blocks p lacks, then fsyncs and
// commits p.
func (d *disk) merge(e, p *epoch) error {
	type move struct {
		block uint64
		off   int64
	}
	var todo []move
	for b, off := range e.index {
		if _, ok := p.index[b]; !ok {
			todo = append(todo, move{b, off})
		}
	}
	if len(todo) == 0 {
		return nil
	}
	slices.SortFunc(todo, func(a, b move) int { return cmp.Compare(a.off, b.off) })
	buf := make([]byte, min(len(todo), saveBatch)*recSize)
	blocks := make([]uint64, 0, saveBatch)
	for len(todo) > 0 {
		batch := todo[:min(len(todo), saveBatch)]
		todo = todo[len(batch):]
		blocks = blocks[:0]
		// Read runs of adjacent records at once.
		for j := 0; j < len(batch); {
			k := j + 1
			for k < len(batch) && batch[k].off == batch[k-1].off+recSize {
				k++
			}
			if _, err := e.f.ReadAt(buf[j*recSize:k*recSize], batch[j].off); err != nil {
				return fmt.Errorf("merge snapshot log %s: %w", e.name, err)
			}
			j = k
		}
		for j, m := range batch {
			rec := buf[j*recSize : (j+1)*recSize]
			if b, err := checkRecord(rec, d.nblocks); err != nil || b != m.block {
				// Damaged since it was written (bit rot): moved as it is,
				// so that the older snapshot's read of the block fails as
				// this one's would, rather than the whole merge failing.
				slog.Warn("localfs: a damaged snapshot log record is merged as it is; reads of its block fail", "disk", d.key,
					"log", e.name, "block", m.block, "err", err)
			}
			blocks = append(blocks, m.block)
		}
		if err := d.appendRecords(p, buf[:len(batch)*recSize], blocks); err != nil {
			return err
		}
	}
	// Commit them in the header too: e, the other copy, is about to go, and
	// an uncommitted record that reads back damaged would be dropped quietly.
	return d.finishEpoch(p)
}

// OpenSnapshot returns a reader of the snapshot; its epoch stays in the
// chain, with every block the snapshot needs, until diskcore drops it.
func (d *disk) OpenSnapshot(ref any) (diskcore.Reader, error) {
	return &snapshotReader{d: d, e: ref.(*epoch)}, nil
}

// Close ends the readers, merges the deleted snapshots away (oldest first;
// those that fail stay for the next LoadDisk), commits the logs and closes
// the files. diskcore has flushed the disk.
func (d *disk) Close(ctx context.Context, held []any) error {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	var errs []error
	var drop []*epoch
	for _, e := range d.chain {
		if slices.Contains(held, any(e)) {
			drop = append(drop, e)
		}
	}
	for _, e := range drop {
		if err := d.DropSnapshot(ctx, e); err != nil {
			errs = append(errs, err)
		}
	}
	for _, e := range d.chain {
		if err := d.finishEpoch(e); err != nil {
			errs = append(errs, err)
		}
	}
	d.closeFiles()
	return errors.Join(errs...)
}

// closeFiles marks the disk closed and closes its files as they are.
func (d *disk) closeFiles() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	d.replica.Close()
	if d.direct != nil {
		d.direct.close()
	}
	for _, e := range d.chain {
		e.f.Close()
	}
}

// ReadAt reads the disk's current contents: everything written, flushed or
// not. Queued changes are applied first (their snapshot logs made durable,
// as in Flush, but the replica is not fsynced).
func (d *disk) ReadAt(p []byte, off int64) error {
	if err := d.applyQueue(); err != nil {
		return err
	}
	if n, err := d.replica.ReadAt(p, off); n < len(p) {
		return fmt.Errorf("read replica: %w", err)
	}
	return nil
}

// applyQueue applies the queued changes to the replica, their snapshot logs
// made durable first, without fsyncing the replica.
func (d *disk) applyQueue() error {
	if len(d.ops) == 0 {
		return nil
	}
	if err := d.syncLogs(); err != nil {
		return err
	}
	return d.applyLocked(len(d.ops), false)
}

// Resize grows the disk to size bytes; the new area reads as zero. The
// snapshots keep their contents (reading one past the size the disk had
// when it was taken gives zeros).
func (d *disk) Resize(_ context.Context, size int64) error {
	if err := d.flushLocked(); err != nil {
		return err
	}
	if err := d.replica.Truncate(size); err != nil {
		if errors.Is(err, syscall.EFBIG) {
			err = fmt.Errorf("the file system cannot hold a file of %d bytes (%v): %w", size, err, replication.ErrDiskTooLarge)
		}
		return err
	}
	if err := d.replica.Sync(); err != nil {
		return err
	}
	d.mu.Lock()
	d.size, d.nblocks = size, uint64((size+blockSize-1)/blockSize)
	d.mu.Unlock()
	return nil
}
