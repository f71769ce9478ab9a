package localfs

import (
	"context"
	"slices"

	"github.com/asrdr/asr/replication"
)

// DataExtents returns the ranges of the replica that may hold data: the
// file's data extents (SEEK_DATA/SEEK_HOLE), after the queued changes are
// applied. Where the file system cannot tell, the whole disk.
func (d *disk) DataExtents(ctx context.Context) ([]replication.Range, error) {
	if err := d.applyQueue(); err != nil {
		return nil, err
	}
	var out []replication.Range
	for off := int64(0); off < d.size; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		start, ok := nextData(d.replica, off)
		if !ok {
			return []replication.Range{{Off: 0, Len: d.size}}, nil
		}
		if start >= d.size {
			break
		}
		end, ok := nextHole(d.replica, start)
		if !ok {
			return []replication.Range{{Off: 0, Len: d.size}}, nil
		}
		end = min(end, d.size)
		if end <= start {
			end = start + blockSize // a file system that answers oddly: move on
		}
		out = append(out, replication.Range{Off: start, Len: end - start})
		off = end
	}
	return out, nil
}

// SnapshotExtents returns the ranges a snapshot holds itself: the blocks its
// undo log saved because the disk changed after it. The rest of the
// snapshot reads from newer snapshots or the replica.
func (d *disk) SnapshotExtents(_ context.Context, ref any) ([]replication.Range, error) {
	e := ref.(*epoch)
	d.mu.RLock()
	blocks := make([]uint64, 0, len(e.index))
	for b := range e.index {
		blocks = append(blocks, b)
	}
	size := d.size
	d.mu.RUnlock()
	slices.Sort(blocks)
	var out []replication.Range
	for _, b := range blocks {
		off := int64(b) * blockSize
		if n := len(out); n > 0 && out[n-1].Off+out[n-1].Len == off {
			out[n-1].Len += blockSize
			continue
		}
		out = append(out, replication.Range{Off: off, Len: blockSize})
	}
	if n := len(out); n > 0 && out[n-1].Off+out[n-1].Len > size {
		out[n-1].Len = size - out[n-1].Off
	}
	return out, nil
}
