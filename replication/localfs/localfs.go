// Package localfs implements replication.Target on a local directory: the
// target of a replica site with its own storage, and the reference that
// replication/targettest holds every other target to.
//
// # Layout
//
//	<dir>/format                                 layout version: "ASRLFS", u16 version, CRC-32C
//	<dir>/lock                                   flock'ed while a Target has dir open (ErrLocked), but a Shared one
//	<dir>/leases/<machine id>                    flock'ed by the holder of the machine's lease (lease.go)
//	<dir>/objects/<key>                          one plain file per object
//	<dir>/disks/<key>.disk/replica.img           the disk's newest contents, a sparse file
//	<dir>/disks/<key>.disk/snap/<name>.cow       the undo log of snapshot <name>
//	<dir>/disks/<key>.disk/snap/<seq>.deleted    a deleted snapshot's log, kept for its readers
//
// Every directory is 0700 and every file 0600: replica images are guest data
// and the catalog names the machines (Open tightens an older target).
//
// Objects and disks live in separate trees, so no object key collides with a
// disk's files, and a disk directory carries the ".disk" suffix, so the disks
// "a" and "a/snap" cannot collide either. PutObject writes a temporary file
// whose name holds '~' (which no key can hold, so listings skip it), fsyncs
// it, renames it over the old object and fsyncs the directory. Because objects
// are plain files, a key cannot be both an object and the parent of others
// ("a" and "a/b"): the second PutObject fails.
//
// # Snapshots are copy-on-write undo logs
//
// replica.img always holds the newest contents. Each snapshot S_k starts an
// epoch, and snap/S_k.cow holds, for every 4 KiB block first changed during
// epoch k (after S_k was taken, before S_k+1), the block as it was at S_k.
// Reading snapshot k at block b takes the first of S_k, S_k+1, ..., S_newest
// whose log holds b, else replica.img. The logs are indexed in memory (block
// -> record offset, about 50 bytes per saved block); OpenDisk rebuilds the
// indexes by scanning the files.
//
// WriteAt and ZeroAt do not touch the replica. They first save the blocks they
// change that the newest log lacks (read from replica.img, appended to the
// log, no fsync), then queue the change in memory. Flush fsyncs the logs first
// and only then applies the queue to replica.img in order and fsyncs it: the
// undo data is durable before the replica changes, so a power loss at any
// point leaves every snapshot intact. The replica still holds, for every block
// the newest log lacks, the contents at the newest snapshot (queued changes
// are always in the log already), which is what makes the save right without
// looking at the queue. Replaying the same changes after a crash is harmless:
// blocks in the newest log are not saved again. A change that leaves a block
// as it is (zeroing a hole, rewriting the same bytes) saves nothing; zeroing
// skips holes with SEEK_DATA, so trimming a sparse disk is cheap. The queue is
// bounded (64 MiB), past which WriteAt flushes.
//
// Snapshot flushes, then creates the new log (temporary file, fsync, rename,
// directory fsync). Deleting S_k moves into S_k-1 the records of S_k for the
// blocks S_k-1 lacks (older snapshots read through S_k for those), fsyncs and
// commits S_k-1, and removes S_k's file; deleting the oldest just removes it.
// While readers of S_k are open the merge waits: the file is renamed to
// <seq>.deleted at once (so the deletion survives a crash), the snapshot
// leaves listings, and its epoch stays in the chain, indexed and open, until
// the last reader closes. Chain order is creation order (seq), not name order,
// so a new snapshot may sort before a deleted one still held. A disk closed
// while readers held a deleted snapshot merges it then (the readers fail
// from then on); deleted logs a crash leaves behind are merged at the next
// OpenDisk.
//
// # COW file format (version 1, little endian)
//
// Header, 48 bytes:
//
//	0  magic     "ASRCOW"
//	6  version   u16
//	8  blockSize u32 (4096)
//	12 -         u32 zero
//	16 seq       u64 creation order of the epoch within its disk
//	24 committed u64 records known durable (a lower bound)
//	32 -         12 bytes zero
//	44 hcrc      u32 CRC-32C of bytes 0..43
//
// Records, 4112 bytes each, from byte 48:
//
//	0  block u64 block index
//	8  crc   u32 CRC-32C of bytes 0..7, then of the data
//	12 -     u32 zero
//	16 data  4096 bytes (the disk's partial last block is zero-padded)
//
// Before each fsync of a log, committed is rewritten with the count the
// previous fsync made durable; a clean Close and a merge set it to the full
// count. When a log is opened, a bad record below committed is corruption
// (ErrCorrupt, with the log's name); a bad or partial record at or past it is
// the torn tail of a crash, cut off with everything after it. That is safe:
// records past the last fsync are never needed, since their blocks were not
// yet changed in replica.img. The rule also covers file systems that, after a
// crash, show unwritten blocks inside an appended region.
//
// # Concurrency
//
// The disks' handles, snapshot names and order, readers' references and
// deferred deletion are replication/diskcore's, shared with every target;
// this package is the storage under them. Per disk, one writer (serialized
// by diskcore) runs alongside any number of snapshot readers. Readers hold
// the disk's read lock while they look up the logs and read one 256 KiB
// chunk; the writer holds the write lock while it publishes saved blocks and
// while it applies each queued change, so a reader never sees a block
// changed but not saved. Opening a disk that is open already returns another
// handle on the same state (the applier and a recovery may share a disk);
// Close flushes, and the last handle's Close closes the files (merging the
// deleted snapshots its readers held), after which readers fail.
package localfs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/diskcore"
	"github.com/asrdr/asr/store/atomicfile"
)

// Layout file: magic "ASRLFS", version u16, u32 zero, CRC-32C of bytes 0..11.
const (
	formatFile    = "format"
	formatSize    = 16
	formatVersion = 1
	lockFile      = "lock"
	objectsDir    = "objects"
	disksDir      = "disks"
	diskSuffix    = ".disk"
	maxKeyLen     = 1024
)

// bufferLimit bounds the bytes a disk queues before it flushes; tests lower
// it.
var bufferLimit int64 = diskcore.DefaultBufferLimit

var formatMagic = [6]byte{'A', 'S', 'R', 'L', 'F', 'S'}

// Target is a replication.Target on a local directory. Open it with Open.
type Target struct {
	dir  string
	lock *os.File

	// treeMu orders the creation of directories (held shared by PutObject
	// and disk creation) against the removal of empty ones (held exclusive
	// by the deletes), so a put never loses its freshly made parent.
	treeMu sync.RWMutex

	disks     *diskcore.Disks // the open disks, and whether t is closed
	closeOnce sync.Once
	closeErr  error
}

var _ replication.Target = (*Target)(nil)

// Option changes how Open opens a target.
type Option func(*options)

type options struct {
	noCreate bool
	shared   bool
}

// NoCreate makes Open create nothing: dir must hold a target already (its
// layout file), else Open fails with an error wrapping
// replication.ErrNotFound and leaves the path as it was. Readers of a target
// (recovery from the target alone) open it so, and a mistyped path does not
// become an empty target. Such an open does not tighten modes either.
func NoCreate() Option { return func(o *options) { o.noCreate = true } }

// Shared makes Open take no lock on the whole target: a scale-out process
// server writes a target the configuration server holds, and its writes
// are fenced per machine by LeaseMachine instead (every process server,
// the built-in one included, writes a machine only under its lease). A
// shared target must hold a target already, as with NoCreate.
func Shared() Option { return func(o *options) { o.shared, o.noCreate = true, true } }

// Open opens the target in dir, creating the directory (0700) if it is
// missing, unless NoCreate is given. It returns an error wrapping
// replication.ErrLocked if another Target (in this process or another) has
// dir open.
//
// Everything the target holds is private to its user: directories are made
// 0700 and files 0600 (replica images are guest data). A target made before
// that, whose directory others can read, is tightened here, its tree first
// and its directory last; a failure to tighten is logged, not fatal (the
// directory may belong to another user who lets this one write).
func Open(dir string, opts ...Option) (*Target, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	dir = filepath.Clean(dir)
	if o.noCreate {
		if err := checkExists(dir); err != nil {
			return nil, err
		}
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open target %s: %w", dir, err)
	}
	// The lock file is part of every target's layout (made before the
	// layout file), so making it here creates nothing in a NoCreate open.
	lock, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open target %s: %w", dir, err)
	}
	// A shared open keeps the file open unlocked, so Close is the same.
	if !o.shared {
		if err := lockFileExclusive(lock); err != nil {
			lock.Close()
			return nil, fmt.Errorf("open target %s: %w", dir, err)
		}
	}
	t := &Target{dir: dir, lock: lock}
	t.disks = diskcore.New(diskStorage{t}, diskcore.Config{Name: t.String(), MaxKeyLen: maxKeyLen, BufferLimit: bufferLimit})
	if err := t.checkFormat(!o.noCreate); err != nil {
		lock.Close()
		return nil, fmt.Errorf("open target %s: %w", dir, err)
	}
	if o.noCreate {
		// The object and disk trees may be missing (a target with nothing
		// in them yet): reads then find nothing, as they should.
		return t, nil
	}
	for _, sub := range []string{objectsDir, disksDir} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			lock.Close()
			return nil, fmt.Errorf("open target %s: %w", dir, err)
		}
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		lock.Close()
		return nil, fmt.Errorf("open target %s: %w", dir, err)
	}
	log := slog.Default().With("component", "localfs", "target", dir)
	if n, err := tighten(dir); err != nil {
		log.Warn("the target's files stay readable by other users: cannot tighten their modes to 0600/0700", "tightened", n, "err", err)
	} else if n > 0 {
		log.Info("made the target private to this user (directories 0700, files 0600)", "entries", n)
	}
	return t, nil
}

// checkExists returns an error wrapping replication.ErrNotFound unless dir
// holds a target's layout file. It creates nothing.
func checkExists(dir string) error {
	_, err := os.Stat(filepath.Join(dir, formatFile))
	if err == nil {
		return nil
	}
	if !isNotExist(err) {
		return fmt.Errorf("open target %s: %w", dir, err)
	}
	why := "no asr layout file in it"
	if st, serr := os.Stat(dir); isNotExist(serr) {
		why = "no such directory"
	} else if serr == nil && !st.IsDir() {
		why = "not a directory"
	}
	return fmt.Errorf("%s holds no asr vault (%s): %w", dir, why, replication.ErrNotFound)
}

// tighten takes the group and other permission bits off every directory
// and regular file under dir, then off dir itself, and returns how many it
// changed. The directory goes last, so a private directory means the walk
// was done before (and nothing below it is reachable by others anyway): it
// is not walked again, which keeps a start cheap on a target of many
// objects. Symbolic links are left alone (chmod would follow them).
func tighten(dir string) (int, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return 0, err
	}
	if st.Mode().Perm()&0o077 == 0 {
		return 0, nil
	}
	n := 0
	err = filepath.WalkDir(dir, func(path string, de fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if path == dir || (!de.IsDir() && !de.Type().IsRegular()) {
			return nil
		}
		info, err := de.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if perm := info.Mode().Perm(); perm&0o077 != 0 {
			if err := os.Chmod(path, perm&^0o077); err != nil {
				return err
			}
			n++
		}
		return nil
	})
	if err != nil {
		return n, err
	}
	if err := os.Chmod(dir, st.Mode().Perm()&^0o077); err != nil {
		return n, err
	}
	return n + 1, nil
}

// checkFormat verifies the layout file, writing it into a new target if
// create is set.
func (t *Target) checkFormat(create bool) error {
	path := filepath.Join(t.dir, formatFile)
	b, err := os.ReadFile(path)
	if isNotExist(err) && !create {
		return fmt.Errorf("no asr layout file: %w", replication.ErrNotFound)
	}
	if isNotExist(err) {
		h := make([]byte, formatSize)
		copy(h, formatMagic[:])
		binary.LittleEndian.PutUint16(h[6:], formatVersion)
		binary.LittleEndian.PutUint32(h[12:], replication.Checksum(h[:12]))
		return atomicfile.Write(path, h, 0o600)
	}
	if err != nil {
		return err
	}
	if len(b) != formatSize || [6]byte(b[:6]) != formatMagic {
		return fmt.Errorf("%s: not an asr target layout file: %w", path, replication.ErrCorrupt)
	}
	if got, want := replication.Checksum(b[:12]), binary.LittleEndian.Uint32(b[12:]); got != want {
		return fmt.Errorf("%s: checksum %08x, want %08x: %w", path, got, want, replication.ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(b[6:]); v != formatVersion {
		return fmt.Errorf("%s: layout version %d not supported (this build reads %d): %w", path, v, formatVersion, replication.ErrCorrupt)
	}
	return nil
}

// Dir returns the directory the target lives in.
func (t *Target) Dir() string { return t.dir }

// String names the target for logs.
func (t *Target) String() string { return "localfs:" + t.dir }

// Close closes every disk still open (flushing them) and releases the lock.
// Snapshot readers of those disks fail afterwards. Closing again is nil.
func (t *Target) Close() error {
	t.closeOnce.Do(func() {
		t.closeErr = errors.Join(t.disks.Close(), t.lock.Close())
	})
	return t.closeErr
}

// OpenDisk opens the replica disk at key, creating a sparse, all-zero disk of
// the given size if it does not exist (replication.Target).
func (t *Target) OpenDisk(ctx context.Context, key string, size int64) (replication.ReplicaDisk, error) {
	return t.disks.OpenDisk(ctx, key, size)
}

// DeleteDisk removes the disk at key with its snapshots (replication.Target).
func (t *Target) DeleteDisk(ctx context.Context, key string) error {
	return t.disks.DeleteDisk(ctx, key)
}

// The key rules are the Target contract's (replication.CheckKey).
func checkKey(key string) error       { return replication.CheckKey(key, maxKeyLen) }
func checkPrefix(prefix string) error { return replication.CheckPrefix(prefix, maxKeyLen) }

func (t *Target) objectPath(key string) string {
	return filepath.Join(t.dir, objectsDir, filepath.FromSlash(key))
}

// PutObject stores data at key atomically and durably.
func (t *Target) PutObject(ctx context.Context, key string, data []byte) error {
	if err := t.disks.Check(ctx, "put object", key, false); err != nil {
		return err
	}
	t.treeMu.RLock()
	defer t.treeMu.RUnlock()
	root := filepath.Join(t.dir, objectsDir)
	path := t.objectPath(key)
	if err := mkdirAllSync(root, filepath.Dir(path)); err != nil {
		return fmt.Errorf("put object %s: %w", key, err)
	}
	if err := atomicfile.Write(path, data, 0o600); err != nil {
		return fmt.Errorf("put object %s: %w", key, err)
	}
	return nil
}

// GetObject returns the object at key, or an error wrapping
// replication.ErrNotFound.
func (t *Target) GetObject(ctx context.Context, key string) ([]byte, error) {
	if err := t.disks.Check(ctx, "get object", key, false); err != nil {
		return nil, err
	}
	path := t.objectPath(key)
	b, err := os.ReadFile(path)
	if isNotExist(err) {
		return nil, fmt.Errorf("get object %s: %w", key, replication.ErrNotFound)
	}
	if err != nil {
		// A directory (the key is only a prefix of others) is not an object.
		if st, serr := os.Stat(path); serr == nil && st.IsDir() {
			return nil, fmt.Errorf("get object %s: %w", key, replication.ErrNotFound)
		}
		return nil, fmt.Errorf("get object %s: %w", key, err)
	}
	return b, nil
}

// ListObjects returns the objects whose keys start with prefix, sorted.
func (t *Target) ListObjects(ctx context.Context, prefix string) ([]replication.ObjectInfo, error) {
	if err := t.disks.Check(ctx, "list objects", prefix, true); err != nil {
		return nil, err
	}
	root := filepath.Join(t.dir, objectsDir)
	// Walk only the directory the prefix names fully.
	base := ""
	if i := strings.LastIndexByte(prefix, '/'); i >= 0 {
		base = prefix[:i]
	}
	start := root
	if base != "" {
		start = filepath.Join(root, filepath.FromSlash(base))
	}
	out := []replication.ObjectInfo{}
	err := filepath.WalkDir(start, func(path string, de fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // missing prefix, or removed while we walk
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, rerr := filepath.Rel(root, path)
		if rerr != nil {
			return rerr
		}
		key := filepath.ToSlash(rel)
		if de.IsDir() {
			if path == start {
				return nil
			}
			// Prune directories that cannot hold a match.
			dk := key + "/"
			if !strings.HasPrefix(dk, prefix) && !strings.HasPrefix(prefix, dk) {
				return filepath.SkipDir
			}
			return nil
		}
		if !de.Type().IsRegular() || !strings.HasPrefix(key, prefix) || checkKey(key) != nil {
			return nil // temporary files hold '~' and fail checkKey
		}
		info, ierr := de.Info()
		if errors.Is(ierr, fs.ErrNotExist) {
			return nil
		}
		if ierr != nil {
			return ierr
		}
		out = append(out, replication.ObjectInfo{Key: key, Size: info.Size()})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list objects %q: %w", prefix, err)
	}
	// Walk order is per directory; "a-b" sorts before "a/b" as keys.
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, nil
}

// DeleteObject removes the object at key; a missing object is not an error.
func (t *Target) DeleteObject(ctx context.Context, key string) error {
	if err := t.disks.Check(ctx, "delete object", key, false); err != nil {
		return err
	}
	path := t.objectPath(key)
	st, err := os.Lstat(path)
	if isNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete object %s: %w", key, err)
	}
	if st.IsDir() {
		return nil // only a prefix of other keys
	}
	t.treeMu.Lock()
	defer t.treeMu.Unlock()
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete object %s: %w", key, err)
	}
	if err := atomicfile.SyncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("delete object %s: %w", key, err)
	}
	removeEmptyParents(filepath.Join(t.dir, objectsDir), filepath.Dir(path))
	return nil
}

// isNotExist reports whether err says a path is missing, also when a parent
// of it is a file ("a/b" when "a" is an object).
func isNotExist(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR)
}

// mkdirAllSync makes dir and its missing parents below root, fsyncing the
// parent of each directory it makes.
func mkdirAllSync(root, dir string) error {
	if dir == root {
		return nil
	}
	if st, err := os.Stat(dir); err == nil {
		if !st.IsDir() {
			return fmt.Errorf("%s is not a directory", dir)
		}
		return nil
	}
	if err := mkdirAllSync(root, filepath.Dir(dir)); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return atomicfile.SyncDir(filepath.Dir(dir))
}

// removeEmptyParents removes dir and its parents up to (not including) root
// while they are empty. Failures are fine: a non-empty directory stays.
func removeEmptyParents(root, dir string) {
	for dir != root && strings.HasPrefix(dir, root+string(filepath.Separator)) {
		if err := os.Remove(dir); err != nil {
			return
		}
		parent := filepath.Dir(dir)
		atomicfile.SyncDir(parent)
		dir = parent
	}
}
