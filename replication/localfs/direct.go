package localfs

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// Large writes of the replica (an initial copy's data, a resync's, a
// guest's large writes) bypass the page cache: they are written through a
// second descriptor of the replica opened with O_DIRECT, from a reused,
// aligned buffer, straight to the disk. A buffered write copies every
// byte into a fresh page-cache page (on a VM whose freed memory goes back
// to its hypervisor, each such page first costs a fault there) and then
// writes it back at the flush's fsync; the direct write skips both, and
// the replica's data, which nothing reads soon, does not push other pages
// out of the cache. The flush's fsync still makes the writes durable (the
// disk's volatile cache, the file's block map): it is the same inode.
//
// Small writes (a guest's 4 KiB) stay buffered: a direct write waits for
// the disk, which costs more than the copy for them. The kernel keeps the
// two paths coherent: a direct write first writes back and drops the
// cached pages of its range.
//
// Where the file system refuses O_DIRECT (tmpfs) or an aligned write
// (EINVAL), the disk falls back to buffered writes for good.

const (
	// directMin is the smallest write sent direct.
	directMin = 256 << 10
	// directAlign is the alignment of a direct write's offset, length and
	// buffer: a page, which covers 512-byte and 4 KiB sectors alike.
	directAlign = 4096
	// directBuf is the size of each aligned buffer; a larger write goes
	// in pieces.
	directBuf = 1 << 20
	// directParallel is how many direct writes are in flight at once: a
	// direct write waits for the disk, and the disk takes several at a
	// time.
	directParallel = 4
)

// directWriter writes a replica through its O_DIRECT descriptor.
type directWriter struct {
	f *os.File
	// writeAt writes p at off (f.WriteAt; tests inject failures).
	writeAt func(p []byte, off int64) (int, error)
}

func newDirectWriter(f *os.File) *directWriter {
	return &directWriter{f: f, writeAt: f.WriteAt}
}

// directBufs keeps the aligned buffers of every disk's direct writes for
// the next, up to directKeep of them: the server's memory does not grow
// with the disks it holds, and a kept buffer's pages are not fresh ones.
var directBufs = make(chan []byte, directKeep)

// directKeep is how many aligned buffers directBufs keeps.
const directKeep = 4 * directParallel

func getDirectBuf() []byte {
	select {
	case b := <-directBufs:
		return b
	default:
		return alignedBuf(directBuf)
	}
}

func putDirectBuf(b []byte) {
	select {
	case directBufs <- b:
	default:
	}
}

// alignedBuf returns n bytes starting at a directAlign boundary.
func alignedBuf(n int) []byte {
	b := make([]byte, n+directAlign)
	skip := int(-uintptr(unsafe.Pointer(&b[0])) & (directAlign - 1))
	return b[skip : skip+n : skip+n]
}

// directEligible says whether a write of n bytes at off may go direct.
func directEligible(off int64, n int) bool {
	return n >= directMin && off%directAlign == 0 && n%directAlign == 0
}

// errDirectRefused is a direct write the file system refused (EINVAL): it
// is written again buffered, and the disk writes buffered from then on.
var errDirectRefused = errors.New("direct write refused")

// write writes p at off through an aligned buffer, in pieces of at most
// directBuf.
func (w *directWriter) write(p []byte, off int64) error {
	buf := getDirectBuf()
	defer putDirectBuf(buf)
	for len(p) > 0 {
		k := copy(buf, p)
		n, err := w.writeAt(buf[:k], off)
		if errors.Is(err, syscall.EINVAL) {
			return fmt.Errorf("%w: %v", errDirectRefused, err)
		}
		if err == nil && n < k {
			err = fmt.Errorf("short direct write: %d of %d bytes", n, k)
		}
		if err != nil {
			return err
		}
		p, off = p[k:], off+int64(k)
	}
	return nil
}

// writeAll writes ops, which do not overlap, at once (the caller gives at
// most directParallel), and returns their errors.
func (w *directWriter) writeAll(ops []op) error {
	if len(ops) == 1 {
		return w.write(ops[0].data, ops[0].off)
	}
	errs := make([]error, len(ops))
	var wg sync.WaitGroup
	for i, o := range ops {
		wg.Go(func() { errs[i] = w.write(o.data, o.off) })
	}
	wg.Wait()
	for _, err := range errs {
		if errors.Is(err, errDirectRefused) {
			return err
		}
	}
	return errors.Join(errs...)
}

func (w *directWriter) close() error { return w.f.Close() }
