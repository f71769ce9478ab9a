package diskcore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/asrdr/asr/replication"
)

// snapshot is the core's record of one snapshot of a disk.
type snapshot struct {
	name string
	ref  any    // the storage's
	seq  uint64 // the order the core learned of it: creation order

	// Guarded by disk.smu.
	refs    int  // open readers
	deleted bool // out of the listing, kept for its readers or a retry
}

// disk is the shared state of an open replica disk; handles point at it.
type disk struct {
	disks   *Disks
	key     string
	st      Disk
	handles int // guarded by disks.mu

	size atomic.Int64 // changed by Resize under wmu

	// wmu serializes the writer: WriteAt, ZeroAt, Flush, ReadAt, Resize,
	// Snapshot, DeleteSnapshot, the drops, close: every call of st but
	// OpenSnapshot.
	wmu sync.Mutex

	// smu guards live, held, seq and the snapshots' refs and deleted. It is
	// taken after wmu, never before.
	smu    sync.Mutex
	live   []*snapshot // in name order
	held   []*snapshot // deleted, not dropped yet: in seq order
	seq    uint64
	closed atomic.Bool // set under wmu and smu
}

func byName(a, b *snapshot) int { return strings.Compare(a.name, b.name) }

func (d *disk) newSnapshot(name string, ref any, deleted bool) *snapshot {
	d.seq++
	return &snapshot{name: name, ref: ref, seq: d.seq, deleted: deleted}
}

// Handle is a replica disk of a target built on this package: a handle on
// the disk's shared state. It implements replication.ReplicaDisk.
type Handle struct {
	d      *disk
	closed atomic.Bool
}

// extHandle is a Handle on a disk whose storage is an Extenter.
type extHandle struct {
	*Handle
}

var (
	_ replication.ReplicaDisk      = (*Handle)(nil)
	_ replication.DataExtenter     = (*extHandle)(nil)
	_ replication.SnapshotExtenter = (*extHandle)(nil)
)

func (d *disk) newHandle() replication.ReplicaDisk {
	h := &Handle{d: d}
	if _, ok := d.st.(Extenter); ok {
		return &extHandle{h}
	}
	return h
}

// Size returns the disk's size in bytes.
func (h *Handle) Size() int64 { return h.d.size.Load() }

// lock takes the writer lock of a usable disk; for a change (write), of a
// target that may change it.
func (h *Handle) lock(write bool) (*disk, error) {
	d := h.d
	if h.closed.Load() {
		return nil, fmt.Errorf("disk %s: %w", d.key, replication.ErrClosed)
	}
	d.wmu.Lock()
	if d.closed.Load() {
		d.wmu.Unlock()
		return nil, fmt.Errorf("disk %s: %w", d.key, replication.ErrClosed)
	}
	if write {
		if err := d.disks.checkWrite(d.key); err != nil {
			d.wmu.Unlock()
			return nil, fmt.Errorf("disk %s: %w", d.key, err)
		}
	}
	return d, nil
}

func (d *disk) checkRange(off, n int64) error {
	size := d.size.Load()
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("range %d+%d outside the disk's %d bytes", off, n, size)
	}
	return nil
}

// WriteAt writes p at off; the storage may hold it until Flush.
func (h *Handle) WriteAt(p []byte, off int64) error {
	return h.change("write", off, int64(len(p)), func(st Disk) error { return st.Write(p, off) })
}

// WriteAtOwned is WriteAt for a p the caller never changes again
// (replication.OwningWriter): a storage that can keep it (OwningDisk) does,
// instead of a copy; any other is given it as by WriteAt.
func (h *Handle) WriteAtOwned(p []byte, off int64) error {
	return h.change("write", off, int64(len(p)), func(st Disk) error {
		if o, ok := st.(OwningDisk); ok {
			return o.WriteOwned(p, off)
		}
		return st.Write(p, off)
	})
}

// ZeroAt makes n bytes at off read as zero; the storage may hold the change
// until Flush.
func (h *Handle) ZeroAt(off, n int64) error {
	return h.change("zero", off, n, func(st Disk) error { return st.Zero(off, n) })
}

// change checks the range [off, off+n) and makes the change, by do, under
// the writer lock; op names it in errors.
func (h *Handle) change(op string, off, n int64, do func(Disk) error) error {
	if err := h.d.checkRange(off, n); err != nil {
		return fmt.Errorf("%s disk %s: %w", op, h.d.key, err)
	}
	if n == 0 {
		return nil
	}
	d, err := h.lock(true)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer d.wmu.Unlock()
	if err := do(d.st); err != nil {
		return fmt.Errorf("%s disk %s at %d+%d: %w", op, d.key, off, n, err)
	}
	return d.flushIfFull()
}

// flushIfFull flushes once the storage holds as much as the bound. The
// caller holds wmu.
func (d *disk) flushIfFull() error {
	if d.st.Buffered() < d.disks.cfg.BufferLimit {
		return nil
	}
	if err := d.st.Flush(d.disks.cfg.Context); err != nil {
		return fmt.Errorf("flush disk %s: %w", d.key, err)
	}
	return nil
}

// Flush makes every change durable.
func (h *Handle) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("flush disk %s: %w", h.d.key, err)
	}
	d, err := h.lock(true)
	if err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	defer d.wmu.Unlock()
	if err := d.st.Flush(ctx); err != nil {
		return fmt.Errorf("flush disk %s: %w", d.key, err)
	}
	return nil
}

// ReadAt reads the disk's current contents: everything written, flushed or
// not.
func (h *Handle) ReadAt(p []byte, off int64) (int, error) {
	if err := h.d.checkRange(off, int64(len(p))); err != nil {
		return 0, fmt.Errorf("read disk %s: %w", h.d.key, err)
	}
	d, err := h.lock(false)
	if err != nil {
		return 0, fmt.Errorf("read: %w", err)
	}
	defer d.wmu.Unlock()
	if len(p) == 0 {
		return 0, nil
	}
	if err := d.st.ReadAt(p, off); err != nil {
		return 0, fmt.Errorf("read disk %s at %d+%d: %w", d.key, off, len(p), err)
	}
	return len(p), nil
}

// Resize grows the disk to size bytes; the new area reads as zero and the
// snapshots keep their contents. Shrinking fails with replication.ErrShrink.
func (h *Handle) Resize(ctx context.Context, size int64) error {
	d, err := h.lock(true)
	if err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	defer d.wmu.Unlock()
	old := d.size.Load()
	if size < old {
		return fmt.Errorf("resize disk %s from %d to %d bytes: %w", d.key, old, size, replication.ErrShrink)
	}
	if size == old {
		return nil
	}
	if err := d.st.Resize(ctx, size); err != nil {
		return fmt.Errorf("resize disk %s: %w", d.key, err)
	}
	d.size.Store(size)
	return nil
}

// visible returns the live snapshot called name. The caller holds smu.
func (d *disk) visible(name string) *snapshot {
	i, ok := slices.BinarySearchFunc(d.live, name, func(s *snapshot, name string) int { return strings.Compare(s.name, name) })
	if !ok {
		return nil
	}
	return d.live[i]
}

// Snapshot flushes the disk and records its contents as snapshot name. A
// name that exists already is a no-op; a new name must sort after every
// existing one (replication.ErrSnapshotOrder).
func (h *Handle) Snapshot(ctx context.Context, name string) error {
	if err := replication.CheckSnapshotName(name); err != nil {
		return fmt.Errorf("snapshot disk %s: %w", h.d.key, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("snapshot disk %s: %w", h.d.key, err)
	}
	d, err := h.lock(true)
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	defer d.wmu.Unlock()
	d.smu.Lock()
	exists := d.visible(name) != nil
	var last string
	if n := len(d.live); n > 0 {
		last = d.live[n-1].name
	}
	d.smu.Unlock()
	if exists {
		return nil
	}
	if last >= name {
		return fmt.Errorf("snapshot %s of disk %s: snapshot %s exists: %w", name, d.key, last, replication.ErrSnapshotOrder)
	}
	if err := d.st.Flush(ctx); err != nil {
		return fmt.Errorf("snapshot %s of disk %s: %w", name, d.key, err)
	}
	ref, err := d.st.Snapshot(ctx, name)
	if err != nil {
		return fmt.Errorf("snapshot %s of disk %s: %w", name, d.key, err)
	}
	d.smu.Lock()
	d.live = append(d.live, d.newSnapshot(name, ref, false))
	d.smu.Unlock()
	return nil
}

// Snapshots lists the disk's snapshots in name order.
func (h *Handle) Snapshots(ctx context.Context) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list snapshots of disk %s: %w", h.d.key, err)
	}
	if h.closed.Load() {
		return nil, fmt.Errorf("list snapshots of disk %s: %w", h.d.key, replication.ErrClosed)
	}
	d := h.d
	d.smu.Lock()
	defer d.smu.Unlock()
	if d.closed.Load() {
		return nil, fmt.Errorf("list snapshots of disk %s: %w", d.key, replication.ErrClosed)
	}
	names := make([]string, len(d.live))
	for i, s := range d.live {
		names[i] = s.name
	}
	return names, nil
}

// DeleteSnapshot deletes snapshot name; a missing one is nil. It leaves the
// listing at once; it is dropped now, or, while readers of it are open, when
// the last of them closes. If the drop fails, it stays out of the listing
// and the drop is tried again at the next deletion, reader close or close.
func (h *Handle) DeleteSnapshot(ctx context.Context, name string) error {
	if err := replication.CheckSnapshotName(name); err != nil {
		return fmt.Errorf("delete snapshot of disk %s: %w", h.d.key, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete snapshot %s of disk %s: %w", name, h.d.key, err)
	}
	d, err := h.lock(true)
	if err != nil {
		return fmt.Errorf("delete snapshot: %w", err)
	}
	defer d.wmu.Unlock()
	d.smu.Lock()
	s := d.visible(name)
	if s == nil {
		d.smu.Unlock()
		return nil
	}
	// Out of the listing at once, so no reader can open it from now on.
	d.live = slices.DeleteFunc(d.live, func(x *snapshot) bool { return x == s })
	held := s.refs > 0
	d.smu.Unlock()
	if err := d.st.HideSnapshot(ctx, s.ref, held); err != nil {
		d.smu.Lock()
		d.live = append(d.live, s)
		slices.SortFunc(d.live, byName)
		d.smu.Unlock()
		return fmt.Errorf("delete snapshot %s of disk %s: %w", name, d.key, err)
	}
	d.smu.Lock()
	s.deleted = true
	d.held = append(d.held, s)
	slices.SortFunc(d.held, func(a, b *snapshot) int { return cmp.Compare(a.seq, b.seq) })
	d.smu.Unlock()
	if err := d.gcLocked(ctx); err != nil {
		return fmt.Errorf("delete snapshot %s of disk %s: %w", name, d.key, err)
	}
	return nil
}

// gcLocked drops the deleted snapshots no reader holds, oldest first. The
// caller holds wmu.
func (d *disk) gcLocked(ctx context.Context) error {
	d.smu.Lock()
	var free []*snapshot
	for _, s := range d.held {
		if s.refs == 0 {
			free = append(free, s)
		}
	}
	d.smu.Unlock()
	if len(free) == 0 {
		return nil
	}
	if err := d.disks.checkWrite(d.key); err != nil {
		return err
	}
	var errs []error
	for _, s := range free {
		if err := d.st.DropSnapshot(ctx, s.ref); err != nil {
			errs = append(errs, err)
			continue
		}
		d.smu.Lock()
		d.held = slices.DeleteFunc(d.held, func(x *snapshot) bool { return x == s })
		d.smu.Unlock()
	}
	return errors.Join(errs...)
}

// OpenSnapshot returns a reader of snapshot name, or an error wrapping
// replication.ErrNotFound. The reader stays valid until closed, whatever is
// written, snapshotted or deleted meanwhile, until the disk closes.
func (h *Handle) OpenSnapshot(ctx context.Context, name string) (replication.SnapshotReader, error) {
	if err := replication.CheckSnapshotName(name); err != nil {
		return nil, fmt.Errorf("open snapshot of disk %s: %w", h.d.key, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, h.d.key, err)
	}
	if h.closed.Load() {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, h.d.key, replication.ErrClosed)
	}
	d := h.d
	d.smu.Lock()
	defer d.smu.Unlock()
	if d.closed.Load() {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, d.key, replication.ErrClosed)
	}
	s := d.visible(name)
	if s == nil {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, d.key, replication.ErrNotFound)
	}
	r, err := d.st.OpenSnapshot(s.ref)
	if err != nil {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, d.key, err)
	}
	s.refs++
	return &reader{d: d, s: s, r: r}, nil
}

// Close flushes the disk and releases the handle; the last handle closes the
// disk, after which its snapshot readers fail. Closing again is nil.
func (h *Handle) Close() error {
	if !h.closed.CompareAndSwap(false, true) {
		return nil
	}
	d, s := h.d, h.d.disks
	s.mu.Lock()
	defer s.mu.Unlock()
	d.handles--
	if d.handles > 0 {
		d.wmu.Lock()
		defer d.wmu.Unlock()
		if d.closed.Load() {
			return nil
		}
		if err := d.st.Flush(s.cfg.Context); err != nil {
			return fmt.Errorf("close disk %s: %w", d.key, err)
		}
		return nil
	}
	if s.open[d.key] == d {
		delete(s.open, d.key)
	}
	if err := d.close(s.cfg.Context); err != nil {
		return fmt.Errorf("close disk %s: %w", d.key, err)
	}
	return nil
}

// close flushes the disk, marks it closed, which ends its readers, and
// closes its storage with the snapshots left to drop.
func (d *disk) close(ctx context.Context) error {
	d.wmu.Lock()
	defer d.wmu.Unlock()
	if d.closed.Load() {
		return nil
	}
	err := d.st.Flush(ctx)
	d.smu.Lock()
	d.closed.Store(true)
	held := make([]any, len(d.held))
	for i, s := range d.held {
		held[i] = s.ref
	}
	d.held = nil
	d.smu.Unlock()
	return errors.Join(err, d.st.Close(ctx, held))
}

// DataExtents returns the ranges of the disk's current contents that may
// hold data (the storage's Extenter).
func (h *extHandle) DataExtents(ctx context.Context) ([]replication.Range, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("extents of disk %s: %w", h.d.key, err)
	}
	d, err := h.lock(false)
	if err != nil {
		return nil, fmt.Errorf("extents: %w", err)
	}
	defer d.wmu.Unlock()
	out, err := d.st.(Extenter).DataExtents(ctx)
	if err != nil {
		return nil, fmt.Errorf("extents of disk %s: %w", d.key, err)
	}
	return out, nil
}

// SnapshotExtents returns the ranges snapshot name holds itself (the
// storage's Extenter), or an error wrapping replication.ErrNotFound.
func (h *extHandle) SnapshotExtents(ctx context.Context, name string) ([]replication.Range, error) {
	if err := replication.CheckSnapshotName(name); err != nil {
		return nil, fmt.Errorf("snapshot extents of disk %s: %w", h.d.key, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("snapshot extents %s of disk %s: %w", name, h.d.key, err)
	}
	// The writer lock keeps the snapshot from being dropped meanwhile.
	d, err := h.lock(false)
	if err != nil {
		return nil, fmt.Errorf("snapshot extents: %w", err)
	}
	defer d.wmu.Unlock()
	d.smu.Lock()
	s := d.visible(name)
	d.smu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("snapshot extents %s of disk %s: %w", name, d.key, replication.ErrNotFound)
	}
	out, err := d.st.(Extenter).SnapshotExtents(ctx, s.ref)
	if err != nil {
		return nil, fmt.Errorf("snapshot extents %s of disk %s: %w", name, d.key, err)
	}
	return out, nil
}

// reader reads one snapshot. It holds a reference on the snapshot, which
// keeps it from being dropped even if it is deleted.
type reader struct {
	d      *disk
	s      *snapshot
	r      Reader
	closed atomic.Bool
}

var _ replication.SnapshotReader = (*reader)(nil)

// Size returns the size the storage gives the snapshot; it works after
// Close too.
func (r *reader) Size() int64 { return r.r.Size() }

// ReadAt reads len(p) bytes of the snapshot at off. Like any io.ReaderAt, it
// returns io.EOF with fewer bytes only at the end of the disk.
func (r *reader) ReadAt(p []byte, off int64) (int, error) {
	if r.closed.Load() || r.d.closed.Load() {
		return 0, fmt.Errorf("read snapshot %s of disk %s: %w", r.s.name, r.d.key, replication.ErrClosed)
	}
	if off < 0 {
		return 0, fmt.Errorf("read snapshot %s of disk %s: negative offset %d", r.s.name, r.d.key, off)
	}
	size := r.r.Size()
	if off >= size {
		return 0, io.EOF
	}
	n, eof := len(p), false
	if int64(n) > size-off {
		n, eof = int(size-off), true
	}
	if n == 0 {
		return 0, nil
	}
	if m, err := r.r.ReadAt(p[:n], off); err != nil {
		return m, fmt.Errorf("read snapshot %s of disk %s at %d+%d: %w", r.s.name, r.d.key, off, n, err)
	}
	if eof {
		return n, io.EOF
	}
	return n, nil
}

// Close releases the reader. If its snapshot was deleted and this was the
// last reader, the snapshot is dropped now.
func (r *reader) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	d := r.d
	d.smu.Lock()
	r.s.refs--
	gc := r.s.refs == 0 && r.s.deleted && !d.closed.Load()
	d.smu.Unlock()
	if !gc {
		return nil
	}
	d.wmu.Lock()
	defer d.wmu.Unlock()
	if d.closed.Load() {
		return nil
	}
	if err := d.gcLocked(d.disks.cfg.Context); err != nil {
		return fmt.Errorf("close snapshot reader of disk %s: %w", d.key, err)
	}
	return nil
}
