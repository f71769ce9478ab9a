package replication

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
)

// Scrubbing reads what a replica holds and checks it against its block
// checksums (sums.go), so that bit rot is found before a recovery needs the
// damaged block: the current contents of each disk, and the blocks each
// recovery point holds itself (saved before the disk changed after it),
// where the target can tell which those are.

// DataExtenter is implemented by replica disks that can tell where data may
// be stored; the rest reads as zeros without being stored (holes). A scrub
// reads only those ranges. Ranges are sorted and do not overlap.
type DataExtenter interface {
	DataExtents(ctx context.Context) ([]Range, error)
}

// SnapshotExtenter is implemented by replica disks that can tell which
// ranges a snapshot holds itself; it shares the rest with newer snapshots
// or the current contents (which a scrub checks there). Ranges are sorted
// and do not overlap.
type SnapshotExtenter interface {
	SnapshotExtents(ctx context.Context, name string) ([]Range, error)
}

// ScrubChunks returns the chunk indexes of a replica disk a scrub reads:
// those where the disk or its sums may hold data, or every chunk when the
// target cannot tell.
func ScrubChunks(ctx context.Context, rd ReplicaDisk, sums *Sums) ([]int64, error) {
	n := (rd.Size() + HashChunk - 1) / HashChunk
	de, ok1 := rd.(DataExtenter)
	se, ok2 := sums.Disk().(DataExtenter)
	if !ok1 || !ok2 {
		out := make([]int64, n)
		for i := range out {
			out[i] = int64(i)
		}
		return out, nil
	}
	data, err := de.DataExtents(ctx)
	if err != nil {
		return nil, err
	}
	sext, err := se.DataExtents(ctx)
	if err != nil {
		return nil, err
	}
	set := map[int64]bool{}
	for _, r := range data {
		for c := r.Off / HashChunk; c*HashChunk < r.Off+r.Len && c < n; c++ {
			set[c] = true
		}
	}
	for _, r := range sext { // sum page c covers chunk c
		for c := r.Off / sumPageSize; c*sumPageSize < r.Off+r.Len && c < n; c++ {
			set[c] = true
		}
	}
	out := make([]int64, 0, len(set))
	for c := range set {
		out = append(out, c)
	}
	slices.Sort(out)
	return out, nil
}

// CheckChunk reads chunk c of a replica disk's current contents and returns
// the offsets of its blocks that do not match their checksums. The caller
// keeps the disk's writer (the applier) out meanwhile.
func CheckChunk(rd ReplicaDisk, sums *Sums, c int64, buf []byte) ([]int64, error) {
	off := c * HashChunk
	n := min(int64(HashChunk), rd.Size()-off)
	if n <= 0 {
		return nil, fmt.Errorf("chunk %d past the disk's end", c)
	}
	b := buf[:n]
	if err := ReadFull(rd)(b, off); err != nil {
		return nil, fmt.Errorf("read replica at %d: %w", off, err)
	}
	es, err := sums.Entries(c)
	if err != nil {
		return nil, err
	}
	var bad []int64
	for i := range es {
		lo := int64(i) * HashBlock
		if lo >= n {
			break
		}
		if BlockEntry(b[lo:min(lo+HashBlock, n)]) != es[i] {
			bad = append(bad, off+lo)
		}
	}
	return bad, nil
}

// SampleChunks returns up to k chunk indexes of a disk of size bytes, at
// random (a quick check of a replica before a resync relies on its sums).
func SampleChunks(size int64, k int) []int64 {
	n := (size + HashChunk - 1) / HashChunk
	if int64(k) >= n {
		out := make([]int64, n)
		for i := range out {
			out[i] = int64(i)
		}
		return out
	}
	seen := map[int64]bool{}
	var out []int64
	for len(out) < k {
		c := rand.Int64N(n)
		if !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	slices.Sort(out)
	return out
}

// CheckPoint reads the given ranges (all of the disk if nil) of disk idx
// at point p through its checksums and returns the damaged blocks' offsets
// and the bytes read. A point without checksums returns checked == false.
func CheckPoint(ctx context.Context, m MachineCatalog, p Point, idx uint32, rd, sums ReplicaDisk, ranges []Range) (damaged []int64, read int64, checked bool, err error) {
	r, err := OpenPointDisk(ctx, m, p, idx, rd, sums, true)
	if err != nil {
		return nil, 0, false, err
	}
	defer r.Close()
	if !r.Checked() {
		return nil, 0, false, nil
	}
	if ranges == nil {
		ranges = []Range{{Off: 0, Len: r.Size()}}
	}
	buf := make([]byte, HashChunk)
	for _, rg := range ranges {
		end := min(rg.Off+rg.Len, r.Size())
		for off := rg.Off &^ (HashBlock - 1); off < end; {
			if err := ctx.Err(); err != nil {
				return nil, read, true, err
			}
			n := min(int64(len(buf)), end-off)
			if _, err := r.ReadAt(buf[:n], off); err != nil {
				return nil, read, true, err
			}
			read += n
			off += n
		}
	}
	return r.Damaged(), read, true, nil
}

// BlockRanges turns sorted block offsets into ranges of whole blocks,
// merging neighbours.
func BlockRanges(offs []int64) []Range {
	var out []Range
	for _, off := range offs {
		if n := len(out); n > 0 && out[n-1].Off+out[n-1].Len == off {
			out[n-1].Len += HashBlock
			continue
		}
		out = append(out, Range{Off: off, Len: HashBlock})
	}
	return out
}
