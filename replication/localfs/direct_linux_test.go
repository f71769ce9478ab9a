package localfs

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// resident says, page by page, whether [off, off+n) of path is in the page
// cache (mincore over a shared mapping, which reads nothing in).
func resident(t *testing.T, path string, off, n int64) []bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), off, int(n), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (n+4095)/4096)
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatal(e)
	}
	in := make([]bool, len(vec))
	for i, v := range vec {
		in[i] = v&1 != 0
	}
	return in
}

func anyTrue(bs []bool) bool { return bytes.IndexByte(boolBytes(bs), 1) >= 0 }
func allTrue(bs []bool) bool { return bytes.IndexByte(boolBytes(bs), 0) < 0 }
func boolBytes(bs []bool) []byte {
	b := make([]byte, len(bs))
	for i, v := range bs {
		if v {
			b[i] = 1
		}
	}
	return b
}

// directDisk opens a disk m/d0 of size bytes on a new target, which must
// write it direct.
func directDisk(t *testing.T, size int64) (*Target, *tdisk) {
	t.Helper()
	tg := mustOpen(t, t.TempDir())
	d := mustDisk(t, tg, "m/d0", size)
	t.Cleanup(func() { d.Close() })
	if d.d.direct == nil {
		t.Fatal("the replica was not opened O_DIRECT (the test's directory is on a file system that refuses it?)")
	}
	return tg, d
}

// One flush mixing large aligned writes (direct), small and unaligned ones
// (buffered) and overlaps among them leaves the replica as the writes in
// their order would, and the direct writes' pages out of the page cache.
func TestDirectWritesInOrderAndUncached(t *testing.T) {
	tg, d := directDisk(t, 32<<20)
	model := make([]byte, 32<<20)
	rnd := rand.New(rand.NewPCG(1, 2))
	write := func(off int64, n int) {
		t.Helper()
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rnd.Uint32())
		}
		if err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	const mib = 1 << 20
	write(mib+4096, 8192)         // buffered, then overwritten by the next
	write(mib, mib)               // direct
	write(2*mib, mib)             // direct, in the same run
	write(2*mib+mib/2, mib/2)     // direct, overlaps the last: the next run
	write(mib+mib/2, 4096)        // buffered, after the direct write under it
	write(8*mib+512, mib)         // unaligned: buffered
	write(12*mib, 5*mib)          // direct, in pieces of the aligned buffer
	write(20*mib, directMin-4096) // too small: buffered
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(tg.diskDir("m/d0"), replicaName)
	if in := resident(t, path, 2*mib, mib/2); anyTrue(in) {
		t.Fatalf("a direct write's pages are in the page cache: %v", in)
	}
	if in := resident(t, path, 12*mib, 5*mib); anyTrue(in) {
		t.Fatal("the pieces of a large direct write are in the page cache")
	}
	if in := resident(t, path, 20*mib, directMin-4096); !allTrue(in) {
		t.Fatal("a buffered write's pages are not in the page cache: mincore tells nothing here")
	}
	got := make([]byte, len(model))
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		for i := range got {
			if got[i] != model[i] {
				t.Fatalf("the replica differs from the writes in order, first at byte %d", i)
			}
		}
	}
}

// A file system that refuses a direct write (EINVAL) gets it again
// buffered, and every later write buffered.
func TestDirectRefusedWritesBuffered(t *testing.T) {
	_, d := directDisk(t, 8<<20)
	var refused atomic.Int32 // the run's writes are concurrent
	d.d.direct.writeAt = func([]byte, int64) (int, error) {
		refused.Add(1)
		return 0, &os.PathError{Op: "write", Path: "replica", Err: syscall.EINVAL}
	}
	p := bytes.Repeat([]byte{7}, 1<<20)
	for _, off := range []int64{0, 1 << 20} {
		if err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if refused.Load() == 0 || d.d.direct != nil {
		t.Fatalf("refused %d times, direct writer %v: want the refusal seen and the writer gone", refused.Load(), d.d.direct)
	}
	if err := d.WriteAt(p, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	for _, off := range []int64{0, 1 << 20, 4 << 20} {
		if _, err := d.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("at %d: %v, want the write", off, err)
		}
	}
}

// A direct write that fails otherwise (EIO) fails the flush and keeps the
// change queued; the next flush writes it.
func TestDirectFailureKeepsTheChange(t *testing.T) {
	_, d := directDisk(t, 8<<20)
	real := d.d.direct.writeAt
	d.d.direct.writeAt = func([]byte, int64) (int, error) { return 0, syscall.EIO }
	p := bytes.Repeat([]byte{9}, 1<<20)
	if err := d.WriteAt(p, 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(t.Context()); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Flush: %v, want EIO", err)
	}
	if d.queued() != 1 || d.d.direct == nil {
		t.Fatalf("%d changes queued, direct writer %v: want the change kept and the writer kept", d.queued(), d.d.direct)
	}
	d.d.direct.writeAt = real
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	if _, err := d.ReadAt(got, 2<<20); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("%v: the change was lost", err)
	}
}
