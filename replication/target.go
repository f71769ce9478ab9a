package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// ErrNotFound is returned (wrapped) by a Target when an object, disk or
// snapshot does not exist.
var ErrNotFound = errors.New("not found")

// ErrInvalidKey is returned (wrapped) by a Target for a key, prefix or
// snapshot name outside the contract's rules.
var ErrInvalidKey = errors.New("invalid key")

// ValidKeyElem reports whether s is a valid key element (and snapshot
// name): [A-Za-z0-9._-], not empty, not "." or "..".
func ValidKeyElem(s string) bool {
	if s == "" || s == "." || s == ".." {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// CheckKey checks a key of at most maxLen bytes against the contract.
func CheckKey(key string, maxLen int) error {
	if key == "" || len(key) > maxLen {
		return fmt.Errorf("key %q: %w", key, ErrInvalidKey)
	}
	for e := range strings.SplitSeq(key, "/") {
		if !ValidKeyElem(e) {
			return fmt.Errorf("key %q: %w", key, ErrInvalidKey)
		}
	}
	return nil
}

// CheckPrefix accepts "" and any prefix of a valid key of at most maxLen
// bytes: whole elements, each followed by '/', then an optional partial
// element.
func CheckPrefix(prefix string, maxLen int) error {
	if prefix == "" {
		return nil
	}
	if len(prefix) > maxLen {
		return fmt.Errorf("prefix %q: %w", prefix, ErrInvalidKey)
	}
	elems := strings.Split(prefix, "/")
	for i, e := range elems {
		if i < len(elems)-1 {
			if !ValidKeyElem(e) {
				return fmt.Errorf("prefix %q: %w", prefix, ErrInvalidKey)
			}
			continue
		}
		// The last part may be empty (trailing slash) or the start of an
		// element, such as "." of ".x".
		if e != "" && !ValidKeyElem(e+"x") {
			return fmt.Errorf("prefix %q: %w", prefix, ErrInvalidKey)
		}
	}
	return nil
}

// MaxSnapshotNameLen is the longest snapshot name the contract admits.
const MaxSnapshotNameLen = 200

// CheckSnapshotName checks a snapshot name against the contract: one key
// element (ValidKeyElem) of at most MaxSnapshotNameLen bytes.
func CheckSnapshotName(name string) error {
	if !ValidKeyElem(name) || len(name) > MaxSnapshotNameLen {
		return fmt.Errorf("snapshot name %q: %w", name, ErrInvalidKey)
	}
	return nil
}

// ErrShrink is returned when a replica disk would have to shrink.
var ErrShrink = errors.New("a replica disk cannot shrink")

// ErrDiskOpen is returned (wrapped) by DeleteDisk while the disk is open.
var ErrDiskOpen = errors.New("disk is open")

// ErrSnapshotOrder is returned (wrapped) by Snapshot for a new name that does
// not sort after every existing snapshot of the disk.
var ErrSnapshotOrder = errors.New("snapshot name out of order")

// ErrClosed is returned (wrapped) by a Target, a replica disk or a snapshot
// reader used after its Close (a disk's readers fail once the disk closes).
// It is os.ErrClosed, so that errors.Is matches either.
var ErrClosed = os.ErrClosed

// ErrLocked is returned by OpenTarget-style constructors when another server
// holds the target's write lease.
var ErrLocked = errors.New("target is in use by another server")

// Target is the storage that replicated data lands in: a local directory or an
// Azure Blob Storage container. It holds two kinds of things:
//
//   - objects: small-to-medium immutable or whole-replaced byte strings
//     (segments, catalog entries, the vault descriptor), and
//   - replica disks: fixed-size random-access images with point-in-time
//     snapshots (recovery points).
//
// Contract, for every implementation (checked by replication/targettest):
//   - Keys are slash-separated paths of [A-Za-z0-9._-] elements; a key, prefix
//     or snapshot name outside the rules is an error wrapping ErrInvalidKey.
//   - PutObject is atomic: a reader sees the old bytes or the new, never a mix;
//     when it returns nil the object is durable.
//   - GetObject of a missing key returns an error wrapping ErrNotFound.
//   - ListObjects returns the keys under a prefix in lexical order; a missing
//     prefix is an empty list.
//   - DeleteObject and DeleteDisk are idempotent: deleting what is missing is nil.
//   - All methods are safe for concurrent use on different keys.
//   - After Close, every method of the target, of its disks and of their
//     snapshot readers fails with an error wrapping ErrClosed (but Close,
//     which is nil, and Size).
type Target interface {
	PutObject(ctx context.Context, key string, data []byte) error
	GetObject(ctx context.Context, key string) ([]byte, error)
	ListObjects(ctx context.Context, prefix string) ([]ObjectInfo, error)
	DeleteObject(ctx context.Context, key string) error

	// OpenDisk opens the replica disk at key, creating it with the given size
	// (all zeros) if it does not exist. Opening an existing disk with another
	// size returns an error; size 0 opens an existing disk whatever its size,
	// or fails with ErrNotFound. Opening a disk that is open already returns
	// another handle on the same disk (the applier and a recovery share one).
	OpenDisk(ctx context.Context, key string, size int64) (ReplicaDisk, error)
	// DeleteDisk removes the disk at key with its snapshots. Deleting a disk
	// while a handle on it is open fails with ErrDiskOpen.
	DeleteDisk(ctx context.Context, key string) error

	// String names the target for logs and errors (no secrets).
	String() string
	Close() error
}

// ObjectInfo describes an object in a listing.
type ObjectInfo struct {
	Key  string
	Size int64
}

// ReplicaDisk is a replica ("seed") disk on a Target. One writer (the applier
// of the disk's machine) uses it at a time; readers of snapshots may run
// concurrently with the writer.
//
// Writes may be buffered until Flush. Snapshot captures the flushed contents;
// a snapshot never changes afterwards, whatever is written to the disk later.
// Snapshot names are single key elements (CheckSnapshotName) and must be
// given in increasing lexical order: a new name that does not sort after
// every existing snapshot fails with ErrSnapshotOrder. Taking a snapshot
// whose name exists already is a no-op (so an interrupted applier can redo
// it). Close flushes and releases the handle; the last handle's Close closes
// the disk, after which its snapshot readers fail with ErrClosed.
type ReplicaDisk interface {
	Size() int64
	WriteAt(p []byte, off int64) error
	ZeroAt(off, n int64) error
	Flush(ctx context.Context) error
	// ReadAt reads the current contents, everything written included (for
	// rebuilding the replica's hash index).
	ReadAt(p []byte, off int64) (int, error)
	// Resize grows the disk; the new area reads as zero and snapshots keep
	// their contents. Shrinking returns an error wrapping ErrShrink.
	Resize(ctx context.Context, size int64) error

	Snapshot(ctx context.Context, name string) error
	Snapshots(ctx context.Context) ([]string, error)
	// DeleteSnapshot removes a snapshot and reclaims the space only it used.
	// Deleting a missing snapshot is nil.
	DeleteSnapshot(ctx context.Context, name string) error
	// OpenSnapshot gives a stable reader of a snapshot's contents. The reader
	// stays valid until closed, even if the snapshot is deleted meanwhile.
	OpenSnapshot(ctx context.Context, name string) (SnapshotReader, error)

	Close() error
}

// OwningWriter is a ReplicaDisk that can take the bytes it is written
// instead of copying them: WriteAtOwned is WriteAt, but the disk may keep p
// (until its next flush), and the caller never changes p after the call.
// The applier uses it for records whose buffers nothing reuses
// (PreparedSegment.GiveData).
type OwningWriter interface {
	WriteAtOwned(p []byte, off int64) error
}

// SnapshotReader reads a disk as it was at a snapshot. ReadAt of a range
// inside the disk fills the whole buffer (no short reads).
type SnapshotReader interface {
	io.ReaderAt
	Size() int64
	Close() error
}
