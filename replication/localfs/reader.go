package localfs

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	"github.com/asrdr/asr/replication"
)

// readChunk is how much a reader reads under one hold of the disk's lock.
const readChunk = 64 * blockSize

// recPool holds record-sized scratch buffers for readers.
var recPool = sync.Pool{New: func() any { return new([recSize]byte) }}

// snapshotReader reads a disk as it was at one snapshot (diskcore.Reader).
// diskcore holds a reference on the snapshot for it, which keeps the epoch
// (and so every block the snapshot needs) in the chain even if the snapshot
// is deleted.
type snapshotReader struct {
	d *disk
	e *epoch
}

// Size returns the disk's size.
func (r *snapshotReader) Size() int64 {
	r.d.mu.RLock()
	defer r.d.mu.RUnlock()
	return r.d.size
}

// ReadAt fills p, inside the disk, a chunk at a time.
func (r *snapshotReader) ReadAt(p []byte, off int64) (int, error) {
	for done := 0; done < len(p); {
		cur := off + int64(done)
		m := int(min(int64(len(p)-done), (cur/readChunk+1)*readChunk-cur))
		if err := r.readChunk(p[done:done+m], cur); err != nil {
			return done, err
		}
		done += m
	}
	return len(p), nil
}

// readChunk fills p from off, all under one hold of the read lock: the writer
// cannot change the replica between the index look-ups and the reads.
func (r *snapshotReader) readChunk(p []byte, off int64) error {
	d := r.d
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return replication.ErrClosed
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
