package nbd

import (
	"fmt"
	"io"
	"os"
	"sync"
)

// FileBackend is a Backend over a regular file or block device. It does no
// replication: it serves plain images to tests, demos and tools. The export
// size is the file's size when the FileBackend is made.
type FileBackend struct {
	f    *os.File
	size int64
}

var _ Backend = (*FileBackend)(nil)

// NewFileBackend returns a Backend for f. The caller keeps ownership of f
// and closes it once no connection uses the backend any more.
func NewFileBackend(f *os.File) (*FileBackend, error) {
	// Seeking to the end works for block devices too, whose Stat size is
	// 0; the file offset is put back for the caller's sake.
	cur, err := f.Seek(0, io.SeekCurrent)
	if err != nil {
		return nil, fmt.Errorf("size of %s: %w", f.Name(), err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("size of %s: %w", f.Name(), err)
	}
	if _, err := f.Seek(cur, io.SeekStart); err != nil {
		return nil, fmt.Errorf("size of %s: %w", f.Name(), err)
	}
	return &FileBackend{f: f, size: size}, nil
}

// Size returns the export size.
func (b *FileBackend) Size() int64 { return b.size }

// ReadAt fills p from off.
func (b *FileBackend) ReadAt(p []byte, off int64) error {
	n, err := b.f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	return fmt.Errorf("read %s: %d of %d bytes at %d: %w", b.f.Name(), n, len(p), off, err)
}

// WriteAt writes p at off, syncing the data before returning if fua is set.
func (b *FileBackend) WriteAt(p []byte, off int64, fua bool) error {
	if _, err := b.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("write %s: %w", b.f.Name(), err)
	}
	if fua {
		return b.Flush()
	}
	return nil
}

// WriteZeroes zeroes n bytes at off, with fallocate where the file system
// supports it and by writing zeroes otherwise.
func (b *FileBackend) WriteZeroes(off, n int64, fua bool) error {
	if !zeroRangeFast(b.f, off, n) {
		if err := b.writeZeroes(off, n); err != nil {
			return err
		}
	}
	if fua {
		return b.Flush()
	}
	return nil
}

var zeroBlock = sync.OnceValue(func() []byte { return make([]byte, 1<<20) })

func (b *FileBackend) writeZeroes(off, n int64) error {
	z := zeroBlock()
	for n > 0 {
		k := min(n, int64(len(z)))
		if _, err := b.f.WriteAt(z[:k], off); err != nil {
			return fmt.Errorf("write zeroes to %s: %w", b.f.Name(), err)
		}
		off, n = off+k, n-k
	}
	return nil
}

// Trim punches a hole where the platform supports it; elsewhere it is a
// no-op, which the protocol allows.
func (b *FileBackend) Trim(off, n int64, fua bool) error {
	if punchHole(b.f, off, n) && fua {
		return b.Flush()
	}
	return nil
}

// Flush makes completed writes durable.
func (b *FileBackend) Flush() error {
	if err := datasync(b.f); err != nil {
		return fmt.Errorf("sync %s: %w", b.f.Name(), err)
	}
	return nil
}
