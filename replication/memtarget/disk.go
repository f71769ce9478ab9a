package memtarget

import (
	"context"
	"errors"
	"maps"
	"slices"
	"sync"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/diskcore"
)

const blockSize = 4096

// block is one stored 4 KiB block. Bytes past the disk's end are zero.
type block [blockSize]byte

// zeros reads where no block is stored.
var zeros block

// disk is a replica disk in a Memory: diskcore.Disk. It outlives the
// targets that open it.
type disk struct {
	// mu guards everything: the writer (one at a time, by diskcore) holds it
	// while it changes anything, readers share it while they read.
	mu     sync.RWMutex
	size   int64
	blocks map[int64]*block // the current contents; a missing block is zero
	chain  []*snap          // oldest first, hidden ones included
}

// snap is a snapshot: the blocks changed after it, as they were then.
type snap struct {
	name   string
	size   int64
	saved  map[int64]*block // nil: the block was zero
	hidden bool
}

var (
	_ diskcore.Disk     = (*disk)(nil)
	_ diskcore.Extenter = (*disk)(nil)
)

// save hands the current block b to the newest snapshot if it has none of
// it yet, and returns whether it did; the disk then needs a new block b.
// The caller holds mu.
func (d *disk) save(b int64) bool {
	if len(d.chain) == 0 {
		return false
	}
	s := d.chain[len(d.chain)-1]
	if _, ok := s.saved[b]; ok {
		return false
	}
	s.saved[b] = d.blocks[b]
	return true
}

// writable returns block b to change in place: one no snapshot holds.
func (d *disk) writable(b int64) *block {
	cur := d.blocks[b]
	if d.save(b) || cur == nil {
		nb := new(block)
		if cur != nil {
			*nb = *cur
		}
		d.blocks[b] = nb
		return nb
	}
	return cur
}

// Write changes the blocks at once.
func (d *disk) Write(p []byte, off int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	end := off + int64(len(p))
	for b := off / blockSize; b*blockSize < end; b++ {
		bs := b * blockSize
		lo, hi := max(bs, off), min(bs+blockSize, end)
		copy(d.writable(b)[lo-bs:hi-bs], p[lo-off:hi-off])
	}
	return nil
}

// Zero drops the blocks the range covers whole and clears the others'
// part; blocks not stored are zero already.
func (d *disk) Zero(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	end := off + n
	first, last := off/blockSize, (end-1)/blockSize
	var in []int64
	if last-first+1 <= int64(len(d.blocks)) {
		for b := first; b <= last; b++ {
			if d.blocks[b] != nil {
				in = append(in, b)
			}
		}
	} else {
		for b := range d.blocks {
			if first <= b && b <= last {
				in = append(in, b)
			}
		}
	}
	for _, b := range in {
		bs := b * blockSize
		lo, hi := max(bs, off), min(bs+blockSize, end)
		if lo == bs && hi >= min(bs+blockSize, d.size) {
			d.save(b)
			delete(d.blocks, b)
			continue
		}
		clear(d.writable(b)[lo-bs : hi-bs])
	}
	return nil
}

// Buffered is 0: nothing waits for Flush.
func (d *disk) Buffered() int64 { return 0 }

// Flush has nothing to do.
func (d *disk) Flush(context.Context) error { return nil }

// ReadAt reads the current contents.
func (d *disk) ReadAt(p []byte, off int64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	readBlocks(p, off, func(b int64) *block { return d.blocks[b] })
	return nil
}

// readBlocks fills p from off with the blocks get returns (nil: zero).
func readBlocks(p []byte, off int64, get func(b int64) *block) {
	end := off + int64(len(p))
	for b := off / blockSize; b*blockSize < end; b++ {
		bs := b * blockSize
		lo, hi := max(bs, off), min(bs+blockSize, end)
		src := get(b)
		if src == nil {
			src = &zeros
		}
		copy(p[lo-off:hi-off], src[lo-bs:hi-bs])
	}
}

// Resize grows the disk; the blocks past the old end are not stored, so
// zero.
func (d *disk) Resize(_ context.Context, size int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.size = size
	return nil
}

// Snapshot starts a new snapshot: the blocks changed from now on are saved
// in it.
func (d *disk) Snapshot(_ context.Context, name string) (any, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := &snap{name: name, size: d.size, saved: map[int64]*block{}}
	d.chain = append(d.chain, s)
	return s, nil
}

// HideSnapshot marks the snapshot deleted; it stays in the chain for its
// readers, and for the next LoadDisk if a target closes with it held.
func (d *disk) HideSnapshot(_ context.Context, ref any, _ bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	ref.(*snap).hidden = true
	return nil
}

// DropSnapshot removes a snapshot from the chain. Older snapshots read
// through it the blocks the previous one lacks, so those move there.
func (d *disk) DropSnapshot(_ context.Context, ref any) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	i := slices.Index(d.chain, ref.(*snap))
	if i < 0 {
		return nil
	}
	if i > 0 {
		prev := d.chain[i-1]
		for b, blk := range d.chain[i].saved {
			if _, ok := prev.saved[b]; !ok {
				prev.saved[b] = blk
			}
		}
	}
	d.chain = slices.Delete(d.chain, i, i+1)
	return nil
}

// OpenSnapshot returns a reader of the snapshot.
func (d *disk) OpenSnapshot(ref any) (diskcore.Reader, error) {
	return &reader{d: d, s: ref.(*snap)}, nil
}

// Close drops the hidden snapshots; the disk stays in its Memory.
func (d *disk) Close(ctx context.Context, held []any) error {
	for _, s := range held {
		d.DropSnapshot(ctx, s) // cannot fail
	}
	return nil
}

// DataExtents returns the ranges of the blocks stored.
func (d *disk) DataExtents(context.Context) ([]replication.Range, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return ranges(slices.Sorted(maps.Keys(d.blocks)), d.size), nil
}

// SnapshotExtents returns the ranges of the blocks the snapshot saved.
func (d *disk) SnapshotExtents(_ context.Context, ref any) ([]replication.Range, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	s := ref.(*snap)
	return ranges(slices.Sorted(maps.Keys(s.saved)), s.size), nil
}

// ranges joins sorted block indexes into ranges, cut at size.
func ranges(blocks []int64, size int64) []replication.Range {
	var out []replication.Range
	for _, b := range blocks {
		off := b * blockSize
		if off >= size {
			break
		}
		n := min(blockSize, size-off)
		if k := len(out); k > 0 && out[k-1].Off+out[k-1].Len == off {
			out[k-1].Len += n
			continue
		}
		out = append(out, replication.Range{Off: off, Len: n})
	}
	return out
}

// reader reads one snapshot.
type reader struct {
	d *disk
	s *snap
}

// Size is the disk's size when the snapshot was taken.
func (r *reader) Size() int64 { return r.s.size }

// ReadAt takes each block from the first snapshot from this one on that
// saved it, else from the disk.
func (r *reader) ReadAt(p []byte, off int64) (int, error) {
	d := r.d
	d.mu.RLock()
	defer d.mu.RUnlock()
	pos := slices.Index(d.chain, r.s)
	if pos < 0 {
		return 0, errors.New("snapshot left the chain while held") // a bug
	}
	chain := d.chain[pos:]
	readBlocks(p, off, func(b int64) *block {
		for _, s := range chain {
			if blk, ok := s.saved[b]; ok {
				return blk
			}
		}
		return d.blocks[b]
	})
	return len(p), nil
}
