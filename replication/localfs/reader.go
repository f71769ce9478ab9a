package localfs

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/asrdr/asr/replication"
)

// readChunk is how much a reader reads under one hold of the disk's lock.
const readChunk = 64 * blockSize

// recPool holds record-sized scratch buffers for readers.
var recPool = sync.Pool{New: func() any { return new([recSize]byte) }}

// snapshotReader reads a disk as it was at one snapshot. It holds a reference
// on the snapshot's epoch, which keeps the epoch (and so every block the
// snapshot needs) in the chain even if the snapshot is deleted.
type snapshotReader struct {
	d      *disk
	e      *epoch
	closed atomic.Bool
}

var _ replication.SnapshotReader = (*snapshotReader)(nil)

// Size returns the disk's size; it works after Close too.
func (r *snapshotReader) Size() int64 { return r.d.size }

// ReadAt reads len(p) bytes of the snapshot at off. Like any io.ReaderAt, it
// returns io.EOF with fewer bytes only at the end of the disk.
func (r *snapshotReader) ReadAt(p []byte, off int64) (int, error) {
	if r.closed.Load() {
		return 0, fmt.Errorf("read snapshot %s of disk %s: %w", r.e.name, r.d.key, ErrClosed)
	}
	if off < 0 {
		return 0, fmt.Errorf("read snapshot %s of disk %s: negative offset %d", r.e.name, r.d.key, off)
	}
	size := r.d.size
	if off >= size {
		return 0, io.EOF
	}
	n, eof := len(p), false
	if int64(n) > size-off {
		n, eof = int(size-off), true
	}
	for done := 0; done < n; {
		cur := off + int64(done)
		m := int(min(int64(n-done), (cur/readChunk+1)*readChunk-cur))
		if err := r.readChunk(p[done:done+m], cur); err != nil {
			return done, fmt.Errorf("read snapshot %s of disk %s at %d: %w", r.e.name, r.d.key, cur, err)
		}
		done += m
	}
	if eof {
		return n, io.EOF
	}
	return n, nil
}

// readChunk fills p from off, all under one hold of the read lock: the writer
// cannot change the replica between the index look-ups and the reads.
func (r *snapshotReader) readChunk(p []byte, off int64) error {
	d := r.d
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return ErrClosed
	}
	pos := slices.Index(d.chain, r.e)
	if pos < 0 {
		return errors.New("snapshot epoch left the chain while held") // a bug
	}
	chain := d.chain[pos:]
	rec := recPool.Get().(*[recSize]byte)
	defer recPool.Put(rec)

	end := off + int64(len(p))
	run := int64(-1) // start of blocks to read from the replica
	readRun := func(to int64) error {
		if run < 0 {
			return nil
		}
		dst := p[run-off : to-off]
		m, err := d.replica.ReadAt(dst, run)
		if err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		clear(dst[m:])
		run = -1
		return nil
	}
	for b := uint64(off / blockSize); int64(b)*blockSize < end; b++ {
		bstart := int64(b) * blockSize
		lo, hi := max(bstart, off), min(bstart+blockSize, end)
		var src *epoch
		var at int64
		for _, e := range chain {
			if o, ok := e.index[b]; ok {
				src, at = e, o
				break
			}
		}
		if src == nil {
			if run < 0 {
				run = lo
			}
			continue
		}
		if err := readRun(lo); err != nil {
			return err
		}
		if _, err := src.f.ReadAt(rec[:], at); err != nil {
			return fmt.Errorf("snapshot log %s: %w", src.name, err)
		}
		if got, err := checkRecord(rec[:], d.nblocks); err != nil || got != b {
			return fmt.Errorf("snapshot log %s: record at %d for block %d: %v: %w", src.name, at, b, err, replication.ErrCorrupt)
		}
		copy(p[lo-off:hi-off], rec[recHeaderSize+lo-bstart:recHeaderSize+hi-bstart])
	}
	return readRun(end)
}

// Close releases the reader. If its snapshot was deleted and this was the
// last reader, the snapshot's log is merged away now.
func (r *snapshotReader) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	d := r.d
	d.mu.Lock()
	r.e.refs--
	gc := r.e.refs == 0 && r.e.deleted && !d.closed
	d.mu.Unlock()
	if !gc {
		return nil
	}
	d.wmu.Lock()
	defer d.wmu.Unlock()
	if d.closed {
		return nil
	}
	if err := d.gcLocked(); err != nil {
		return fmt.Errorf("close snapshot reader of disk %s: %w", d.key, err)
	}
	return nil
}
