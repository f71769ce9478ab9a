package localfs

import (
	"context"
	"fmt"
	"slices"

	"github.com/asrdr/asr/replication"
)

var (
	_ replication.DataExtenter     = (*Disk)(nil)
	_ replication.SnapshotExtenter = (*Disk)(nil)
)

// DataExtents returns the ranges of the replica that may hold data: the
// file's data extents (SEEK_DATA/SEEK_HOLE), after the queued changes are
// applied. Where the file system cannot tell, the whole disk.
func (h *Disk) DataExtents(ctx context.Context) ([]replication.Range, error) {
	d, err := h.lockWriter()
	if err != nil {
		return nil, fmt.Errorf("extents: %w", err)
	}
	defer d.wmu.Unlock()
	if len(d.ops) > 0 {
		if err := d.syncLogs(); err != nil {
			return nil, fmt.Errorf("extents of disk %s: %w", d.key, err)
		}
		if err := d.applyLocked(len(d.ops), false); err != nil {
			return nil, fmt.Errorf("extents of disk %s: %w", d.key, err)
		}
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

// SnapshotExtents returns the ranges snapshot name holds itself: the blocks
// its undo log saved because the disk changed after it. The rest of the
// snapshot reads from newer snapshots or the replica.
func (h *Disk) SnapshotExtents(ctx context.Context, name string) ([]replication.Range, error) {
	if err := checkSnapName(name); err != nil {
		return nil, fmt.Errorf("snapshot extents of disk %s: %w", h.d.key, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	d := h.d
	d.mu.RLock()
	e := d.visible(name)
	var blocks []uint64
	if e != nil {
		blocks = make([]uint64, 0, len(e.index))
		for b := range e.index {
			blocks = append(blocks, b)
		}
	}
	d.mu.RUnlock()
	if e == nil {
		return nil, fmt.Errorf("snapshot extents %s of disk %s: %w", name, d.key, replication.ErrNotFound)
	}
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
	if n := len(out); n > 0 && out[n-1].Off+out[n-1].Len > d.size {
		out[n-1].Len = d.size - out[n-1].Off
	}
	return out, nil
}
