// Package memtarget implements replication.Target in memory: the target of
// unit tests that do not test a particular storage (the applier, the
// process server), which then touch no file system and pay no fsync.
//
// Objects are byte strings in a map. A replica disk is sparse: only the
// 4 KiB blocks written are stored, and a block zeroed whole is dropped.
// Snapshots are copy-on-write, as the local target's undo logs: the first
// time a block changes after a snapshot, the block as it was moves to that
// snapshot (a pointer, not a copy, as the disk takes a new block), and
// reading snapshot k of block b takes the first of snapshot k, k+1, ... that
// holds b, else the disk. Deleting a snapshot hands what older snapshots
// still need to the previous one. Writes are not buffered: Flush has nothing
// to do. The disks' handles, snapshot order, readers and deferred deletion
// are replication/diskcore's, as for every target.
//
// What a Target stores outlives it in its Memory, so that a test can close a
// target and open another on the same contents (a restart), as the
// conformance suite does; one Target at a time has a Memory open.
package memtarget

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/diskcore"
)

const maxKeyLen = 1024

// Memory holds what targets store: objects and replica disks.
type Memory struct {
	mu      sync.Mutex
	open    bool // a Target has it open
	objects map[string][]byte
	disks   map[string]*disk
}

// NewMemory returns an empty Memory.
func NewMemory() *Memory {
	return &Memory{objects: map[string][]byte{}, disks: map[string]*disk{}}
}

// Target is a replication.Target in a Memory. Open it with Open or New.
type Target struct {
	m      *Memory
	name   string
	disks  *diskcore.Disks
	closed atomic.Bool
}

var _ replication.Target = (*Target)(nil)

var targets atomic.Uint64 // numbers the targets' names

// New returns a target on a new, empty Memory.
func New() *Target {
	t, _ := Open(NewMemory()) // a new Memory is not open
	return t
}

// Open opens a target on m, or fails with an error wrapping
// replication.ErrLocked while another Target has m open.
func Open(m *Memory) (*Target, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.open {
		return nil, fmt.Errorf("open memory target: %w", replication.ErrLocked)
	}
	m.open = true
	t := &Target{m: m, name: fmt.Sprintf("memory:%d", targets.Add(1))}
	t.disks = diskcore.New(storage{m}, diskcore.Config{Name: t.name, MaxKeyLen: maxKeyLen})
	return t, nil
}

// String names the target for logs.
func (t *Target) String() string { return t.name }

// Close closes every disk still open and lets another Target open the
// Memory.
func (t *Target) Close() error {
	if !t.closed.CompareAndSwap(false, true) {
		return nil
	}
	err := t.disks.Close()
	t.m.mu.Lock()
	t.m.open = false
	t.m.mu.Unlock()
	return err
}

// OpenDisk opens the replica disk at key (replication.Target).
func (t *Target) OpenDisk(ctx context.Context, key string, size int64) (replication.ReplicaDisk, error) {
	return t.disks.OpenDisk(ctx, key, size)
}

// DeleteDisk removes the disk at key with its snapshots (replication.Target).
func (t *Target) DeleteDisk(ctx context.Context, key string) error {
	return t.disks.DeleteDisk(ctx, key)
}

// PutObject stores a copy of data at key.
func (t *Target) PutObject(ctx context.Context, key string, data []byte) error {
	if err := t.disks.Check(ctx, "put object", key, false); err != nil {
		return err
	}
	t.m.mu.Lock()
	defer t.m.mu.Unlock()
	t.m.objects[key] = bytes.Clone(data)
	return nil
}

// GetObject returns a copy of the object at key, or an error wrapping
// replication.ErrNotFound.
func (t *Target) GetObject(ctx context.Context, key string) ([]byte, error) {
	if err := t.disks.Check(ctx, "get object", key, false); err != nil {
		return nil, err
	}
	t.m.mu.Lock()
	defer t.m.mu.Unlock()
	b, ok := t.m.objects[key]
	if !ok {
		return nil, fmt.Errorf("get object %s: %w", key, replication.ErrNotFound)
	}
	return bytes.Clone(b), nil
}

// ListObjects returns the objects whose keys start with prefix, sorted.
func (t *Target) ListObjects(ctx context.Context, prefix string) ([]replication.ObjectInfo, error) {
	if err := t.disks.Check(ctx, "list objects", prefix, true); err != nil {
		return nil, err
	}
	t.m.mu.Lock()
	defer t.m.mu.Unlock()
	out := []replication.ObjectInfo{}
	for k, b := range t.m.objects {
		if strings.HasPrefix(k, prefix) {
			out = append(out, replication.ObjectInfo{Key: k, Size: int64(len(b))})
		}
	}
	slices.SortFunc(out, func(a, b replication.ObjectInfo) int { return strings.Compare(a.Key, b.Key) })
	return out, nil
}

// DeleteObject removes the object at key; a missing object is not an error.
func (t *Target) DeleteObject(ctx context.Context, key string) error {
	if err := t.disks.Check(ctx, "delete object", key, false); err != nil {
		return err
	}
	t.m.mu.Lock()
	defer t.m.mu.Unlock()
	delete(t.m.objects, key)
	return nil
}

// storage is the Memory as diskcore.Storage.
type storage struct{ m *Memory }

// LoadDisk returns the disk at key, made if missing and size is not 0.
func (s storage) LoadDisk(ctx context.Context, key string, size int64) (diskcore.Loaded, error) {
	s.m.mu.Lock()
	defer s.m.mu.Unlock()
	d := s.m.disks[key]
	if d == nil {
		if size == 0 {
			return diskcore.Loaded{}, replication.ErrNotFound
		}
		d = &disk{size: size, blocks: map[int64]*block{}}
		s.m.disks[key] = d
	} else if err := diskcore.CheckSize(size, d.size); err != nil {
		return diskcore.Loaded{}, err
	}
	l := diskcore.Loaded{Disk: d, Size: d.size}
	for _, sn := range d.chain {
		l.Add(sn.name, sn, sn.hidden)
	}
	return l, nil
}

// DeleteDisk forgets the disk at key.
func (s storage) DeleteDisk(ctx context.Context, key string) error {
	s.m.mu.Lock()
	defer s.m.mu.Unlock()
	delete(s.m.disks, key)
	return nil
}
