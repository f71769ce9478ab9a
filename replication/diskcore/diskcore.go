// Package diskcore is the replica-disk machinery every replication.Target
// shares; a target supplies only its storage, through the Storage and Disk
// interfaces here. The core owns what the contract says of disks, whatever
// holds their bytes:
//
//   - one open state per key, shared by every handle on it (the applier and a
//     recovery may hold the same disk), the disk closed with its last handle,
//     and DeleteDisk refusing an open disk (replication.ErrDiskOpen);
//   - argument checks: keys, sizes, ranges, snapshot names, a canceled
//     context, a closed target, disk, handle or reader (replication.ErrClosed);
//   - snapshot names: validated, in increasing order (ErrSnapshotOrder), an
//     existing name a no-op, the listing of the live ones;
//   - deferred deletion: a snapshot deleted while readers hold it leaves the
//     listing at once and is dropped when its last reader closes (or when the
//     disk closes, which ends its readers); a drop that fails is retried at
//     the next chance;
//   - the write buffer's policy: a storage may hold writes until Flush, up to
//     a bound (64 MiB), past which the core flushes; Snapshot, Close and the
//     last handle's Close flush first;
//   - locking: one writer at a time per disk (WriteAt, ZeroAt, Flush, ReadAt,
//     Resize, Snapshot, DeleteSnapshot, the drops, Close), readers of
//     snapshots beside it.
//
// What stays with the target is how the bytes are kept: the local target's
// sparse file and copy-on-write undo logs, Azure's page blob and blob
// snapshots, the memory target's block maps; how writes are held until Flush
// (a queue of changes whose undo data is saved first, a map of 512-byte
// pages); and its own formats, unchanged.
package diskcore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/asrdr/asr/replication"
)

// DefaultBufferLimit bounds the bytes a disk's storage holds before the core
// flushes it (Disk.Buffered).
const DefaultBufferLimit = 64 << 20

// Storage is where a target keeps its replica disks.
type Storage interface {
	// LoadDisk opens the disk at key, creating it (all zeros) with size bytes
	// if it does not exist and size is not 0. With size 0 a missing disk is
	// an error wrapping replication.ErrNotFound; an existing disk of another
	// size than a non-zero size is an error (CheckSize) that changes nothing.
	// The core never loads a disk that is open.
	LoadDisk(ctx context.Context, key string, size int64) (Loaded, error)
	// DeleteDisk removes the disk at key with its snapshots; a missing disk
	// is nil. The core never deletes an open disk.
	DeleteDisk(ctx context.Context, key string) error
}

// Loaded is a disk as LoadDisk found it.
type Loaded struct {
	Disk Disk
	Size int64
	// Snapshots are the live snapshots.
	Snapshots []Snapshot
	// Held are snapshots deleted while readers held them, which a crash (or a
	// close) left behind: the core drops them now, no reader holding them.
	Held []any
}

// Add adds a snapshot LoadDisk found: a live one called name, or one
// hidden (deleted, to drop).
func (l *Loaded) Add(name string, ref any, hidden bool) {
	if hidden {
		l.Held = append(l.Held, ref)
		return
	}
	l.Snapshots = append(l.Snapshots, Snapshot{Name: name, Ref: ref})
}

// Snapshot is one of a disk's snapshots as its storage knows it.
type Snapshot struct {
	Name string
	// Ref is the storage's own handle on the snapshot, which the core gives
	// back in the calls about it.
	Ref any
}

// Disk is the storage of one open replica disk. The core calls the methods
// but OpenSnapshot and SnapshotExtents one at a time (under its writer
// lock), with arguments it has checked: ranges inside the disk, names that
// pass replication.CheckSnapshotName, refs the storage gave it.
type Disk interface {
	// Write and Zero change [off, off+len(p)) or [off, off+n): at once, or
	// held until Flush. Write must not keep p.
	Write(p []byte, off int64) error
	Zero(off, n int64) error
	// Buffered is how many bytes of changes the storage holds for Flush
	// (what a held change costs is the storage's to say); at the core's
	// bound, it flushes.
	Buffered() int64
	// Flush makes every change durable. What it keeps after a failure is
	// retried by the next Flush.
	Flush(ctx context.Context) error
	// ReadAt fills p with the current contents at off, every change
	// included, flushed or not.
	ReadAt(p []byte, off int64) error
	// Resize grows the disk to size bytes (more than now); the new area
	// reads as zero and the snapshots keep their contents.
	Resize(ctx context.Context, size int64) error

	// Snapshot records the flushed contents (the core flushes first) as a
	// new snapshot called name, and returns its ref. The name sorts after
	// every live snapshot's; a deleted one may share it.
	Snapshot(ctx context.Context, name string) (any, error)
	// HideSnapshot takes snapshot s out of the live ones for good, before
	// DropSnapshot. With held set its readers still read it: it must not
	// come back as a live snapshot after a crash either, and must reach
	// Loaded.Held instead. A storage whose drop is one atomic step may do
	// nothing without held. On error, s stays live.
	HideSnapshot(ctx context.Context, s any, held bool) error
	// DropSnapshot deletes a hidden snapshot no reader holds, reclaiming
	// what only it used. On error it stays hidden and is dropped again
	// later.
	DropSnapshot(ctx context.Context, s any) error
	// OpenSnapshot returns a reader of snapshot s, live or hidden. It is
	// called under the core's snapshot lock, beside the writer: it must be
	// quick and must not wait for the writer.
	OpenSnapshot(s any) (Reader, error)
	// Close releases the disk's storage, flushed already; its readers fail
	// from now on. held are the snapshots hidden but not dropped yet (their
	// readers, if any, are done): drop them now or leave them to the next
	// LoadDisk's Loaded.Held.
	Close(ctx context.Context, held []any) error
}

// OwningDisk is a Disk that can keep the bytes of a write until Flush
// without copying them: WriteOwned is Write for a p its caller never
// changes again (Handle.WriteAtOwned).
type OwningDisk interface {
	WriteOwned(p []byte, off int64) error
}

// Reader reads one snapshot. The core checks the ranges: ReadAt is given
// ranges inside [0, Size()) and fills them whole or fails.
type Reader interface {
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
}

// Extenter is implemented by a Disk that can tell where data is stored;
// the core's handles on it then implement replication.DataExtenter and
// replication.SnapshotExtenter.
type Extenter interface {
	// DataExtents returns the ranges of the current contents that may hold
	// data, every change included.
	DataExtents(ctx context.Context) ([]replication.Range, error)
	// SnapshotExtents returns the ranges snapshot s holds itself.
	SnapshotExtents(ctx context.Context, s any) ([]replication.Range, error)
}

// Config is what the core needs of its target.
type Config struct {
	// Name names the target in errors, as its String does.
	Name string
	// MaxKeyLen bounds a disk's key (replication.CheckKey).
	MaxKeyLen int
	// BufferLimit is the bound of Disk.Buffered (0: DefaultBufferLimit).
	BufferLimit int64
	// Context serves the calls that take none (a flush by WriteAt, Close);
	// nil is context.Background().
	Context context.Context
	// CheckWrite, if set, is asked before every change of the disk at key:
	// a target that has lost its write lease (or the lease of the machine
	// the disk belongs to) refuses them (reads go on).
	CheckWrite func(key string) error
	// Logger logs what fails where no caller sees it (nil: slog.Default()).
	Logger *slog.Logger
}

// Disks is the open replica disks of one target, and the target's closed
// state. Its OpenDisk and DeleteDisk are the target's.
type Disks struct {
	st  Storage
	cfg Config

	mu     sync.Mutex       // guards open, closed and the disks' handles
	open   map[string]*disk // open disks by key
	closed bool
}

// New returns the disks of a target whose storage is st.
func New(st Storage, cfg Config) *Disks {
	if cfg.BufferLimit <= 0 {
		cfg.BufferLimit = DefaultBufferLimit
	}
	if cfg.Context == nil {
		cfg.Context = context.Background()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Disks{st: st, cfg: cfg, open: map[string]*disk{}}
}

// CheckSize is the error of a disk of has bytes opened with a size of asked
// bytes (0 takes any size).
func CheckSize(asked, has int64) error {
	if asked != 0 && asked != has {
		return fmt.Errorf("asked for %d bytes, the disk has %d", asked, has)
	}
	return nil
}

// Check returns an error, wrapped in what op was, for an operation on key
// (an object's, or a prefix if prefix is set) that the target must refuse:
// a key outside the contract's rules, a canceled ctx, a closed target.
func (s *Disks) Check(ctx context.Context, op, key string, prefix bool) error {
	check, what := replication.CheckKey, op+" "+key
	if prefix {
		check, what = replication.CheckPrefix, fmt.Sprintf("%s %q", op, key)
	}
	if err := check(key, s.cfg.MaxKeyLen); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if err := s.CheckOpen(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// CheckOpen returns an error wrapping replication.ErrClosed once Close has
// begun.
func (s *Disks) CheckOpen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("%s: %w", s.cfg.Name, replication.ErrClosed)
	}
	return nil
}

// OpenDisk is replication.Target's: it opens the disk at key, creating it
// with size bytes if it does not exist, or returns another handle on it if it
// is open already.
func (s *Disks) OpenDisk(ctx context.Context, key string, size int64) (replication.ReplicaDisk, error) {
	if err := replication.CheckKey(key, s.cfg.MaxKeyLen); err != nil {
		return nil, fmt.Errorf("open disk: %w", err)
	}
	if size < 0 {
		return nil, fmt.Errorf("open disk %s: negative size %d", key, size)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open disk %s: %w", key, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("open disk %s: %s: %w", key, s.cfg.Name, replication.ErrClosed)
	}
	d := s.open[key]
	if d == nil {
		l, err := s.st.LoadDisk(ctx, key, size)
		if err != nil {
			return nil, fmt.Errorf("open disk %s: %w", key, err)
		}
		d = s.newDisk(ctx, key, l)
		s.open[key] = d
	} else if err := CheckSize(size, d.size.Load()); err != nil {
		return nil, fmt.Errorf("open disk %s: %w", key, err)
	}
	d.handles++
	return d.newHandle(), nil
}

// newDisk makes the shared state of a loaded disk and drops the snapshots
// whose deletion a crash interrupted. The caller holds mu.
func (s *Disks) newDisk(ctx context.Context, key string, l Loaded) *disk {
	d := &disk{disks: s, key: key, st: l.Disk}
	d.size.Store(l.Size)
	for _, ref := range l.Held {
		d.held = append(d.held, d.newSnapshot("", ref, true))
	}
	for _, sn := range l.Snapshots {
		d.live = append(d.live, d.newSnapshot(sn.Name, sn.Ref, false))
	}
	slices.SortFunc(d.live, byName)
	if len(d.held) > 0 {
		d.wmu.Lock()
		err := d.gcLocked(ctx)
		d.wmu.Unlock()
		if err != nil {
			// They stay hidden; the next deletion, reader close or close
			// tries again.
			s.cfg.Logger.Warn("dropping snapshots a crash left deleted", "target", s.cfg.Name, "disk", key, "err", err)
		}
	}
	return d
}

// DeleteDisk is replication.Target's: it removes the disk at key with its
// snapshots. A missing disk is nil; an open one fails with
// replication.ErrDiskOpen.
func (s *Disks) DeleteDisk(ctx context.Context, key string) error {
	if err := replication.CheckKey(key, s.cfg.MaxKeyLen); err != nil {
		return fmt.Errorf("delete disk: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete disk %s: %w", key, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("delete disk %s: %s: %w", key, s.cfg.Name, replication.ErrClosed)
	}
	if _, ok := s.open[key]; ok {
		return fmt.Errorf("delete disk %s: %w", key, replication.ErrDiskOpen)
	}
	if err := s.checkWrite(key); err != nil {
		return fmt.Errorf("delete disk %s: %w", key, err)
	}
	if err := s.st.DeleteDisk(ctx, key); err != nil {
		return fmt.Errorf("delete disk %s: %w", key, err)
	}
	return nil
}

// Close closes every open disk (flushing it), in key order; their handles
// and readers fail from now on, and so do OpenDisk, DeleteDisk and
// CheckOpen. Closing again is nil.
func (s *Disks) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	keys := make([]string, 0, len(s.open))
	for k := range s.open {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var errs []error
	for _, k := range keys {
		if err := s.open[k].close(s.cfg.Context); err != nil {
			errs = append(errs, fmt.Errorf("close disk %s: %w", k, err))
		}
		delete(s.open, k)
	}
	return errors.Join(errs...)
}

func (s *Disks) checkWrite(key string) error {
	if s.cfg.CheckWrite == nil {
		return nil
	}
	return s.cfg.CheckWrite(key)
}

// StorageOf returns the storage behind a replica disk of this package, for
// its target's own use (its tests), or nil.
func StorageOf(rd replication.ReplicaDisk) Disk {
	switch h := rd.(type) {
	case *Handle:
		return h.d.st
	case *extHandle:
		return h.d.st
	}
	return nil
}
