//go:build linux

package localfs

import (
	"errors"
	"fmt"
	"math"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/asrdr/asr/replication"
)

const (
	fallocKeepSize  = 0x01 // FALLOC_FL_KEEP_SIZE
	fallocPunchHole = 0x02 // FALLOC_FL_PUNCH_HOLE
	seekDataWhence  = 3    // SEEK_DATA
)

// lockFileExclusive takes a non-blocking exclusive flock on f, held until f is
// closed. flock locks belong to the open file, so a second Open in the same
// process is refused too.
func lockFileExclusive(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var lerr error
	if err := rc.Control(func(fd uintptr) {
		lerr = syscall.Flock(int(fd), syscall.LOCK_EX|syscall.LOCK_NB)
	}); err != nil {
		return err
	}
	if errors.Is(lerr, syscall.EWOULDBLOCK) {
		return fmt.Errorf("%s: %w", f.Name(), replication.ErrLocked)
	}
	return lerr
}

// punchHole deallocates [off, off+n) of f, which then reads as zeros; the
// file keeps its size. It fails if the file system cannot punch holes.
func punchHole(f *os.File, off, n int64) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var perr error
	if err := rc.Control(func(fd uintptr) {
		for {
			perr = syscall.Fallocate(int(fd), fallocPunchHole|fallocKeepSize, off, n)
			if perr != syscall.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	return perr
}

// nextData returns the offset of the first data at or after off in f
// (math.MaxInt64 if there is none), and false if f cannot tell.
func nextData(f *os.File, off int64) (int64, bool) {
	pos, err := f.Seek(off, seekDataWhence)
	if err == nil {
		return pos, true
	}
	if errors.Is(err, syscall.ENXIO) {
		return math.MaxInt64, true
	}
	return 0, false
}

const seekHoleWhence = 4 // SEEK_HOLE

// nextHole returns the offset of the first hole at or after off in f (the
// file's end counts as one), and false if f cannot tell.
func nextHole(f *os.File, off int64) (int64, bool) {
	pos, err := f.Seek(off, seekHoleWhence)
	if err != nil {
		return 0, false
	}
	return pos, true
}

// startWriteback asks the kernel to start writing f's dirty pages in
// off..off+n to the disk, without waiting (sync_file_range with
// SYNC_FILE_RANGE_WRITE): the flush's fsync then waits for less. Only a
// hint: an error is ignored, the fsync still decides.
func startWriteback(f *os.File, off, n int64) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		unix.SyncFileRange(int(fd), off, n, unix.SYNC_FILE_RANGE_WRITE)
	})
}

// openDirect opens path for writes that bypass the page cache (O_DIRECT);
// a file system that does not take them (tmpfs) refuses the open.
func openDirect(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_WRONLY|syscall.O_DIRECT, 0)
}
