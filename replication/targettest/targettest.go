// Package targettest is the conformance suite of replication.Target. Every
// Target implementation runs it from its own tests:
//
//	func TestConformance(t *testing.T) {
//		targettest.Run(t, func(t *testing.T, dir string) replication.Target {
//			tg, err := localfs.Open(dir)
//			if err != nil {
//				t.Fatal(err)
//			}
//			return tg
//		})
//	}
//
// The suite checks every point of the contract written on replication.Target,
// ReplicaDisk and SnapshotReader: objects (atomic replace, not-found, sorted
// listings, idempotent deletes, key validation), disks (creation, reopening,
// sizes, range checks, partial last blocks) and snapshots (stability, order,
// deletion of any of them, readers that outlive writes, snapshots and their
// own deletion, concurrent readers), persistence across a close and reopen,
// and a randomized model test that checks every snapshot against in-memory
// copies. Run it with -race.
//
// What the suite takes as given beyond the written contract, so that every
// target behaves alike: keys and list prefixes that break the key rules are
// refused (BadKeys); ReadAt past the end of a disk returns io.EOF like any
// io.ReaderAt; PutObject, GetObject and ListObjects fail with the context's
// error once it is canceled. The suite calls Flush before every Snapshot, as
// the applier does, and closes every disk and reader before it reopens a
// target (but in Snapshots/HeldAtClose and Closed, which close them under
// their readers).
package targettest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/asrdr/asr/replication"
)

// OpenFunc opens a Target over the storage named dir, failing t if it cannot.
// The suite passes a fresh t.TempDir() per subtest, so each starts empty, and
// passes the same dir again, after closing the first Target, to check that
// what was written persists. A Target not kept on the local file system uses
// dir only as a name: the Azure target derives its container name from it.
type OpenFunc func(t *testing.T, dir string) replication.Target

// Run runs the conformance suite against the targets open makes.
func Run(t *testing.T, open OpenFunc) {
	tests := []struct {
		name string
		fn   func(t *testing.T, h *harness)
	}{
		{"Objects/PutGet", testPutGet},
		{"Objects/Replace", testReplace},
		{"Objects/ReplaceAtomic", testReplaceAtomic},
		{"Objects/GetMissing", testGetMissing},
		{"Objects/List", testList},
		{"Objects/Delete", testDelete},
		{"Objects/InvalidKeys", testInvalidKeys},
		{"Objects/Concurrent", testObjectsConcurrent},
		{"Objects/Canceled", testCanceled},
		{"Disks/Create", testDiskCreate},
		{"Disks/Reopen", testDiskReopen},
		{"Disks/WriteRead", testDiskWriteRead},
		{"Disks/LargeChanges", testDiskLargeChanges},
		{"Disks/OutOfRange", testDiskOutOfRange},
		{"Disks/ReadAtEdges", testReadAtEdges},
		{"Disks/Delete", testDeleteDisk},
		{"Disks/Shared", testSharedDisk},
		{"Disks/SeparateFromObjects", testDisksAndObjects},
		{"Disks/Concurrent", testDisksConcurrent},
		{"Snapshots/Stable", testSnapshotStable},
		{"Snapshots/SmallChanges", testSnapshotSmallChanges},
		{"Snapshots/Order", testSnapshotOrder},
		{"Snapshots/Missing", testSnapshotMissing},
		{"Snapshots/Delete", testSnapshotDelete},
		{"Snapshots/ReaderOutlivesChanges", testReaderOutlives},
		{"Snapshots/ConcurrentReaders", testConcurrentReaders},
		{"Snapshots/HeldAtClose", testHeldAtClose},
		{"Snapshots/Model", testModel},
		{"Persistence", testPersistence},
		{"Disks/CurrentRead", testCurrentRead},
		{"Disks/Resize", testResize},
		{"Closed", testClosed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.fn(t, newHarness(t, open))
		})
	}
}

// harness holds the target under test and reopens it over the same storage.
type harness struct {
	t    *testing.T
	ctx  context.Context
	open OpenFunc
	dir  string
	tg   replication.Target
}

func newHarness(t *testing.T, open OpenFunc) *harness {
	h := &harness{t: t, ctx: t.Context(), open: open, dir: t.TempDir()}
	h.tg = open(t, h.dir)
	t.Cleanup(func() {
		if h.tg != nil {
			if err := h.tg.Close(); err != nil {
				t.Errorf("close target: %v", err)
			}
		}
	})
	return h
}

// reopen closes the target and opens a new one over the same storage.
func (h *harness) reopen() {
	h.t.Helper()
	if err := h.tg.Close(); err != nil {
		h.t.Fatalf("close target: %v", err)
	}
	h.tg = nil
	h.tg = h.open(h.t, h.dir)
}

func (h *harness) mustPut(key string, data []byte) {
	h.t.Helper()
	if err := h.tg.PutObject(h.ctx, key, data); err != nil {
		h.t.Fatalf("PutObject(%q): %v", key, err)
	}
}

func (h *harness) mustGet(key string) []byte {
	h.t.Helper()
	b, err := h.tg.GetObject(h.ctx, key)
	if err != nil {
		h.t.Fatalf("GetObject(%q): %v", key, err)
	}
	return b
}

func (h *harness) mustList(prefix string) []replication.ObjectInfo {
	h.t.Helper()
	l, err := h.tg.ListObjects(h.ctx, prefix)
	if err != nil {
		h.t.Fatalf("ListObjects(%q): %v", prefix, err)
	}
	return l
}

func (h *harness) mustDelete(key string) {
	h.t.Helper()
	if err := h.tg.DeleteObject(h.ctx, key); err != nil {
		h.t.Fatalf("DeleteObject(%q): %v", key, err)
	}
}

func (h *harness) mustGetMissing(key string) {
	h.t.Helper()
	b, err := h.tg.GetObject(h.ctx, key)
	if !errors.Is(err, replication.ErrNotFound) {
		h.t.Fatalf("GetObject(%q) = %d bytes, %v; want ErrNotFound", key, len(b), err)
	}
}

// mustOpenDisk opens a disk and closes it when the test ends (closing twice
// is fine for the suite: it ignores the second error).
func (h *harness) mustOpenDisk(key string, size int64) replication.ReplicaDisk {
	h.t.Helper()
	d, err := h.tg.OpenDisk(h.ctx, key, size)
	if err != nil {
		h.t.Fatalf("OpenDisk(%q, %d): %v", key, size, err)
	}
	if size != 0 && d.Size() != size {
		h.t.Fatalf("OpenDisk(%q, %d): Size() = %d", key, size, d.Size())
	}
	return d
}

func mustClose(t *testing.T, c io.Closer) {
	t.Helper()
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

func mustWrite(t *testing.T, d replication.ReplicaDisk, p []byte, off int64) {
	t.Helper()
	if err := d.WriteAt(p, off); err != nil {
		t.Fatalf("WriteAt(%d bytes at %d): %v", len(p), off, err)
	}
}

func mustZero(t *testing.T, d replication.ReplicaDisk, off, n int64) {
	t.Helper()
	if err := d.ZeroAt(off, n); err != nil {
		t.Fatalf("ZeroAt(%d, %d): %v", off, n, err)
	}
}

func mustFlush(t *testing.T, d replication.ReplicaDisk) {
	t.Helper()
	if err := d.Flush(t.Context()); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// mustSnapshot flushes and snapshots, as the applier does at a recovery point.
func mustSnapshot(t *testing.T, d replication.ReplicaDisk, name string) {
	t.Helper()
	mustFlush(t, d)
	if err := d.Snapshot(t.Context(), name); err != nil {
		t.Fatalf("Snapshot(%q): %v", name, err)
	}
}

func mustOpenSnapshot(t *testing.T, d replication.ReplicaDisk, name string) replication.SnapshotReader {
	t.Helper()
	r, err := d.OpenSnapshot(t.Context(), name)
	if err != nil {
		t.Fatalf("OpenSnapshot(%q): %v", name, err)
	}
	return r
}

func mustSnapshots(t *testing.T, d replication.ReplicaDisk, want ...string) {
	t.Helper()
	got, err := d.Snapshots(t.Context())
	if err != nil {
		t.Fatalf("Snapshots: %v", err)
	}
	if want == nil {
		want = []string{}
	}
	if len(got) != len(want) || (len(got) > 0 && !slices.Equal(got, want)) {
		t.Fatalf("Snapshots() = %q, want %q", got, want)
	}
}

// checkReader reads the whole of r in one call and compares it with want.
func checkReader(t *testing.T, r replication.SnapshotReader, want []byte, what string) {
	t.Helper()
	if r.Size() != int64(len(want)) {
		t.Fatalf("%s: Size() = %d, want %d", what, r.Size(), len(want))
	}
	got := make([]byte, len(want))
	n, err := r.ReadAt(got, 0)
	if n != len(want) || (err != nil && err != io.EOF) {
		t.Fatalf("%s: ReadAt whole disk = %d, %v", what, n, err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("%s: byte %d (block %d) is %#02x, want %#02x", what, i, i/4096, got[i], want[i])
	}
}

// checkSnapshot opens snapshot name, compares it with want, and closes it.
func checkSnapshot(t *testing.T, d replication.ReplicaDisk, name string, want []byte) {
	t.Helper()
	r := mustOpenSnapshot(t, d, name)
	defer mustClose(t, r)
	checkReader(t, r, want, "snapshot "+name)
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func newRand(t *testing.T, seed uint64) *rand.Rand {
	t.Logf("seed %d", seed)
	return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
}

// ----- objects -----

func testPutGet(t *testing.T, h *harness) {
	h.mustPut("a", []byte("hello"))
	if got := h.mustGet("a"); string(got) != "hello" {
		t.Fatalf("GetObject = %q", got)
	}
	h.mustPut("empty", nil)
	if got := h.mustGet("empty"); len(got) != 0 {
		t.Fatalf("empty object = %q", got)
	}
	big := randBytes(newRand(t, 1), 3<<20+17)
	h.mustPut("x/y/z/w/big.bin", big)
	if got := h.mustGet("x/y/z/w/big.bin"); !bytes.Equal(got, big) {
		t.Fatalf("big object differs at %d", firstDiff(got, big))
	}
	// Unusual but valid keys.
	for _, k := range []string{"A-Z_0.9", "_x", "-y", "..a", "a..", "seg/0000000000000001-00000000000000ff.seg"} {
		h.mustPut(k, []byte(k))
		if got := h.mustGet(k); string(got) != k {
			t.Fatalf("GetObject(%q) = %q", k, got)
		}
	}
	// The caller's slice is not retained.
	p := []byte("mutable")
	h.mustPut("m", p)
	p[0] = 'X'
	if got := h.mustGet("m"); string(got) != "mutable" {
		t.Fatalf("object changed with the caller's slice: %q", got)
	}
}

func testReplace(t *testing.T, h *harness) {
	h.mustPut("k", bytes.Repeat([]byte("old"), 1000))
	h.mustPut("k", []byte("new"))
	if got := h.mustGet("k"); string(got) != "new" {
		t.Fatalf("after replace: %q", got)
	}
	if l := h.mustList("k"); len(l) != 1 || l[0].Size != 3 {
		t.Fatalf("listing after replace: %+v", l)
	}
}

// testReplaceAtomic replaces an object over and over while readers check they
// always see one whole version.
func testReplaceAtomic(t *testing.T, h *harness) {
	a := bytes.Repeat([]byte{'a'}, 256<<10)
	b := bytes.Repeat([]byte{'b'}, 300<<10)
	h.mustPut("atomic", a)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				got, err := h.tg.GetObject(h.ctx, "atomic")
				if err != nil {
					t.Errorf("GetObject during replace: %v", err)
					return
				}
				if !bytes.Equal(got, a) && !bytes.Equal(got, b) {
					t.Errorf("GetObject during replace: %d bytes, a mix of versions", len(got))
					return
				}
			}
		}()
	}
	for i := range 40 {
		v := a
		if i%2 == 0 {
			v = b
		}
		if err := h.tg.PutObject(h.ctx, "atomic", v); err != nil {
			t.Errorf("PutObject: %v", err)
			break
		}
	}
	close(stop)
	wg.Wait()
}

func testGetMissing(t *testing.T, h *harness) {
	h.mustGetMissing("nope")
	h.mustGetMissing("no/such/path")
	h.mustPut("dir/file", []byte("x"))
	h.mustGetMissing("dir") // a prefix is not an object
	h.mustGetMissing("dir/fil")
	h.mustGetMissing("dir/file/more")
}

func testList(t *testing.T, h *harness) {
	if l := h.mustList(""); len(l) != 0 {
		t.Fatalf("empty target lists %+v", l)
	}
	keys := []string{"b", "a/2", "a/1", "a/b/3", "ab", "a-x", "a.x", "c/d/e/f"}
	for i, k := range keys {
		h.mustPut(k, bytes.Repeat([]byte{'z'}, i))
	}
	size := map[string]int64{}
	for i, k := range keys {
		size[k] = int64(i)
	}
	check := func(prefix string, want ...string) {
		t.Helper()
		l := h.mustList(prefix)
		if l == nil && len(want) == 0 {
			return
		}
		var got []string
		for _, o := range l {
			got = append(got, o.Key)
			if o.Size != size[o.Key] {
				t.Errorf("ListObjects(%q): %s has size %d, want %d", prefix, o.Key, o.Size, size[o.Key])
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("ListObjects(%q) = %q, want %q", prefix, got, want)
		}
	}
	// Lexical order of whole keys: '-' < '.' < '/' < letters.
	check("", "a-x", "a.x", "a/1", "a/2", "a/b/3", "ab", "b", "c/d/e/f")
	check("a/", "a/1", "a/2", "a/b/3")
	check("a", "a-x", "a.x", "a/1", "a/2", "a/b/3", "ab")
	check("a/b", "a/b/3")
	check("a/b/", "a/b/3")
	check("c/d/", "c/d/e/f")
	check("c/d/e/f", "c/d/e/f")
	check("missing/")
	check("missing")
	check("a/zz/")
	check("a/1/")
}

func testDelete(t *testing.T, h *harness) {
	h.mustPut("d/1", []byte("1"))
	h.mustPut("d/sub/2", []byte("2"))
	h.mustDelete("d/sub/2")
	h.mustGetMissing("d/sub/2")
	if l := h.mustList("d/"); len(l) != 1 || l[0].Key != "d/1" {
		t.Fatalf("after delete: %+v", l)
	}
	h.mustDelete("d/sub/2") // again
	h.mustDelete("never/was")
	h.mustDelete("d") // a prefix, not an object
	if got := h.mustGet("d/1"); string(got) != "1" {
		t.Fatalf("d/1 = %q", got)
	}
	// A key emptied of children can become an object, and back.
	h.mustDelete("d/1")
	h.mustPut("d", []byte("now an object"))
	if got := h.mustGet("d"); string(got) != "now an object" {
		t.Fatalf("d = %q", got)
	}
	h.mustDelete("d")
	h.mustPut("d/again", []byte("x"))
	if l := h.mustList(""); len(l) != 1 || l[0].Key != "d/again" {
		t.Fatalf("listing = %+v", l)
	}
}

// BadKeys are keys every Target must refuse.
var BadKeys = []string{"", "/a", "a/", "a//b", "../x", "a/../b", "..", ".", "a/.", "./a", "a b", `a\b`, "ä", "a:b", "a\x00b", "a*"}

func testInvalidKeys(t *testing.T, h *harness) {
	ctx := h.ctx
	for _, k := range BadKeys {
		if err := h.tg.PutObject(ctx, k, []byte("x")); err == nil {
			t.Errorf("PutObject(%q) accepted", k)
		}
		if _, err := h.tg.GetObject(ctx, k); err == nil {
			t.Errorf("GetObject(%q) accepted", k)
		}
		if err := h.tg.DeleteObject(ctx, k); err == nil {
			t.Errorf("DeleteObject(%q) accepted", k)
		}
		if d, err := h.tg.OpenDisk(ctx, k, 4096); err == nil {
			t.Errorf("OpenDisk(%q) accepted", k)
			d.Close()
		}
		if err := h.tg.DeleteDisk(ctx, k); err == nil {
			t.Errorf("DeleteDisk(%q) accepted", k)
		}
	}
	for _, p := range []string{"/a", "../", "a//", "a b", "a/../"} {
		if _, err := h.tg.ListObjects(ctx, p); err == nil {
			t.Errorf("ListObjects(%q) accepted", p)
		}
	}
	if l := h.mustList(""); len(l) != 0 {
		t.Fatalf("bad keys left objects: %+v", l)
	}
}

// testObjectsConcurrent puts, gets, lists and deletes different keys sharing
// parents from many goroutines.
func testObjectsConcurrent(t *testing.T, h *harness) {
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 25 {
				key := fmt.Sprintf("c/shared/%d/%d", g, i%3)
				val := fmt.Appendf(nil, "%d-%d", g, i)
				if err := h.tg.PutObject(h.ctx, key, val); err != nil {
					t.Errorf("PutObject(%s): %v", key, err)
					return
				}
				got, err := h.tg.GetObject(h.ctx, key)
				if err != nil || !bytes.Equal(got, val) {
					t.Errorf("GetObject(%s) = %q, %v; want %q", key, got, err, val)
					return
				}
				if _, err := h.tg.ListObjects(h.ctx, "c/"); err != nil {
					t.Errorf("ListObjects: %v", err)
					return
				}
				if i%2 == 1 {
					if err := h.tg.DeleteObject(h.ctx, key); err != nil {
						t.Errorf("DeleteObject(%s): %v", key, err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	// Each goroutine's last iteration (24, key i%3 == 0) was a put.
	l := h.mustList("c/shared/")
	for g := range 8 {
		if !slices.ContainsFunc(l, func(o replication.ObjectInfo) bool { return o.Key == fmt.Sprintf("c/shared/%d/0", g) }) {
			t.Errorf("listing lacks c/shared/%d/0: %+v", g, l)
		}
	}
}

func testCanceled(t *testing.T, h *harness) {
	h.mustPut("k", []byte("v"))
	ctx, cancel := context.WithCancel(h.ctx)
	cancel()
	if err := h.tg.PutObject(ctx, "k2", []byte("v")); !errors.Is(err, context.Canceled) {
		t.Errorf("PutObject with a canceled context: %v", err)
	}
	if _, err := h.tg.GetObject(ctx, "k"); !errors.Is(err, context.Canceled) {
		t.Errorf("GetObject with a canceled context: %v", err)
	}
	if _, err := h.tg.ListObjects(ctx, ""); !errors.Is(err, context.Canceled) {
		t.Errorf("ListObjects with a canceled context: %v", err)
	}
	h.mustGetMissing("k2")
}

// ----- disks -----

// oddSize is a disk size that is not a multiple of 4096.
const oddSize = 1<<20 + 512

func testDiskCreate(t *testing.T, h *harness) {
	d := h.mustOpenDisk("m/1/d0", oddSize)
	mustSnapshot(t, d, "s")
	checkSnapshot(t, d, "s", make([]byte, oddSize))
	mustClose(t, d)

	if _, err := h.tg.OpenDisk(h.ctx, "m/1/missing", 0); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("OpenDisk(missing, 0) = %v, want ErrNotFound", err)
	}
	if d, err := h.tg.OpenDisk(h.ctx, "m/1/neg", -1); err == nil {
		d.Close()
		t.Fatalf("OpenDisk with a negative size accepted")
	}
	for _, size := range []int64{1, 4096, 4097, 3 << 20} {
		key := fmt.Sprintf("sizes/%d", size)
		d := h.mustOpenDisk(key, size)
		p := bytes.Repeat([]byte{0xAB}, int(min(size, 5000)))
		mustWrite(t, d, p, size-int64(len(p)))
		mustSnapshot(t, d, "s")
		want := make([]byte, size)
		copy(want[size-int64(len(p)):], p)
		checkSnapshot(t, d, "s", want)
		mustClose(t, d)
	}
}

func testDiskReopen(t *testing.T, h *harness) {
	const key = "m/2/d0"
	d := h.mustOpenDisk(key, oddSize)
	mustWrite(t, d, []byte("persist"), 10)
	mustSnapshot(t, d, "s1")
	mustClose(t, d)

	d = h.mustOpenDisk(key, oddSize)
	if d.Size() != oddSize {
		t.Fatalf("reopened Size() = %d", d.Size())
	}
	mustClose(t, d)
	d = h.mustOpenDisk(key, 0)
	if d.Size() != oddSize {
		t.Fatalf("OpenDisk(size 0) Size() = %d, want %d", d.Size(), oddSize)
	}
	want := make([]byte, oddSize)
	copy(want[10:], "persist")
	mustSnapshots(t, d, "s1")
	checkSnapshot(t, d, "s1", want)
	mustClose(t, d)

	if d, err := h.tg.OpenDisk(h.ctx, key, oddSize+4096); err == nil {
		d.Close()
		t.Fatalf("OpenDisk with another size accepted")
	}
	d = h.mustOpenDisk(key, 0) // the failed open changed nothing
	if d.Size() != oddSize {
		t.Fatalf("Size() = %d after a mismatched open", d.Size())
	}
	mustClose(t, d)
}

func testDiskWriteRead(t *testing.T, h *harness) {
	d := h.mustOpenDisk("wr", oddSize)
	defer d.Close()
	rng := newRand(t, 2)
	model := make([]byte, oddSize)
	write := func(off int64, n int) {
		p := randBytes(rng, n)
		mustWrite(t, d, p, off)
		copy(model[off:], p)
	}
	zero := func(off, n int64) {
		mustZero(t, d, off, n)
		clear(model[off : off+n])
	}
	write(0, 1)
	write(1, 7)             // unaligned
	write(4090, 20)         // across a block boundary
	write(8192, 4096)       // one whole block
	write(3*4096-1, 4098)   // one byte into each neighbour
	write(8000, 10000)      // several blocks, unaligned both ends
	write(oddSize-100, 100) // the partial last block
	write(oddSize-600, 600) // across into the partial last block
	write(20<<10, 0)        // nothing
	zero(4000, 200)
	zero(8192, 3*4096)
	zero(oddSize-50, 50)
	zero(100, 0)
	write(9000, 50) // over a zeroed range, in the same batch
	mustSnapshot(t, d, "1")
	checkSnapshot(t, d, "1", model)

	// Unflushed changes, then Flush, then more on top of the same blocks.
	write(4095, 2)
	zero(4096, 1)
	write(4096, 1)
	mustFlush(t, d)
	write(4096, 3)
	mustSnapshot(t, d, "2")
	checkSnapshot(t, d, "2", model)

	// Read back in pieces of many sizes and offsets.
	r := mustOpenSnapshot(t, d, "2")
	defer r.Close()
	for range 200 {
		off := rng.Int64N(oddSize)
		n := 1 + rng.Int64N(min(oddSize-off, 3*4096+7))
		got := make([]byte, n)
		if m, err := r.ReadAt(got, off); m != int(n) || (err != nil && err != io.EOF) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", n, off, m, err)
		}
		if i := firstDiff(got, model[off:off+n]); i >= 0 {
			t.Fatalf("ReadAt(%d bytes at %d): byte %d differs", n, off, i)
		}
	}
}

// testDiskLargeChanges writes and zeroes megabytes at a time, with and without
// snapshots to save into.
func testDiskLargeChanges(t *testing.T, h *harness) {
	const size = 6<<20 + 1000
	d := h.mustOpenDisk("large", size)
	defer d.Close()
	rng := newRand(t, 3)
	model := make([]byte, size)
	p := randBytes(rng, 3<<20+5)
	mustWrite(t, d, p, 4093)
	copy(model[4093:], p)
	mustSnapshot(t, d, "1")
	s1 := slices.Clone(model)
	p = randBytes(rng, 4<<20)
	mustWrite(t, d, p, 1<<20+1)
	copy(model[1<<20+1:], p)
	mustZero(t, d, 2<<20, 2<<20+3)
	clear(model[2<<20 : 4<<20+3])
	mustSnapshot(t, d, "2")
	s2 := slices.Clone(model)
	mustZero(t, d, 0, size)
	clear(model)
	mustSnapshot(t, d, "3")
	checkSnapshot(t, d, "1", s1)
	checkSnapshot(t, d, "2", s2)
	checkSnapshot(t, d, "3", model)
}

func testDiskOutOfRange(t *testing.T, h *harness) {
	const size = 3*4096 + 10
	d := h.mustOpenDisk("oor", size)
	defer d.Close()
	p := []byte{1, 2}
	for _, off := range []int64{-1, size - 1, size, size + 1, 1 << 62} {
		if err := d.WriteAt(p, off); err == nil {
			t.Errorf("WriteAt(2 bytes at %d) of a %d-byte disk accepted", off, size)
		}
	}
	for _, r := range [][2]int64{{-1, 1}, {0, -1}, {size - 10, 11}, {size, 1}, {1, size}, {1 << 62, 1 << 62}} {
		if err := d.ZeroAt(r[0], r[1]); err == nil {
			t.Errorf("ZeroAt(%d, %d) of a %d-byte disk accepted", r[0], r[1], size)
		}
	}
	mustWrite(t, d, p, size-2) // the last two bytes are fine
	mustSnapshot(t, d, "s")
	want := make([]byte, size)
	copy(want[size-2:], p)
	checkSnapshot(t, d, "s", want)
}

func testReadAtEdges(t *testing.T, h *harness) {
	d := h.mustOpenDisk("edges", oddSize)
	defer d.Close()
	mustWrite(t, d, bytes.Repeat([]byte{7}, 4096), oddSize-4096)
	mustSnapshot(t, d, "s")
	r := mustOpenSnapshot(t, d, "s")
	defer r.Close()
	buf := make([]byte, 1000)
	if n, err := r.ReadAt(buf[:0], 5); n != 0 || err != nil {
		t.Errorf("empty ReadAt = %d, %v", n, err)
	}
	if n, err := r.ReadAt(buf[:1], oddSize-1); n != 1 || (err != nil && err != io.EOF) || buf[0] != 7 {
		t.Errorf("ReadAt(last byte) = %d, %v, %d", n, err, buf[0])
	}
	if n, err := r.ReadAt(buf, oddSize-300); n != 300 || err == nil {
		t.Errorf("ReadAt across the end = %d, %v; want 300 and an error (io.EOF)", n, err)
	} else if !bytes.Equal(buf[:300], bytes.Repeat([]byte{7}, 300)) {
		t.Errorf("ReadAt across the end read wrong bytes")
	}
	if n, err := r.ReadAt(buf, oddSize); n != 0 || err == nil {
		t.Errorf("ReadAt at the end = %d, %v; want 0 and an error (io.EOF)", n, err)
	}
	if n, err := r.ReadAt(buf, oddSize+12345); n != 0 || err == nil {
		t.Errorf("ReadAt past the end = %d, %v; want 0 and an error", n, err)
	}
	if _, err := r.ReadAt(buf, -1); err == nil {
		t.Errorf("ReadAt at -1 accepted")
	}
}

func testDeleteDisk(t *testing.T, h *harness) {
	d := h.mustOpenDisk("n", 64<<10)
	mustWrite(t, d, []byte("outer"), 0)
	mustSnapshot(t, d, "s1")
	mustWrite(t, d, []byte("OUTER"), 0)
	mustSnapshot(t, d, "s2")
	mustClose(t, d)
	inner := h.mustOpenDisk("n/x", 8192) // a disk whose key extends another's
	mustWrite(t, inner, []byte("inner"), 100)
	mustSnapshot(t, inner, "i")
	mustClose(t, inner)

	if err := h.tg.DeleteDisk(h.ctx, "n"); err != nil {
		t.Fatalf("DeleteDisk: %v", err)
	}
	if _, err := h.tg.OpenDisk(h.ctx, "n", 0); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("OpenDisk of a deleted disk = %v, want ErrNotFound", err)
	}
	if err := h.tg.DeleteDisk(h.ctx, "n"); err != nil {
		t.Fatalf("DeleteDisk again: %v", err)
	}
	if err := h.tg.DeleteDisk(h.ctx, "never/was"); err != nil {
		t.Fatalf("DeleteDisk of a missing disk: %v", err)
	}
	inner = h.mustOpenDisk("n/x", 0)
	want := make([]byte, 8192)
	copy(want[100:], "inner")
	mustSnapshots(t, inner, "i")
	checkSnapshot(t, inner, "i", want)
	mustClose(t, inner)

	// Re-created with another size: empty, no snapshots.
	d = h.mustOpenDisk("n", 3*4096)
	mustSnapshots(t, d)
	mustSnapshot(t, d, "s1")
	checkSnapshot(t, d, "s1", make([]byte, 3*4096))
	mustClose(t, d)
}

// testSharedDisk opens a disk twice, as the applier and a recovery do: both
// handles share one disk, which cannot be deleted while either is open.
func testSharedDisk(t *testing.T, h *harness) {
	const size = 64 << 10
	w := h.mustOpenDisk("shared", size)
	r := h.mustOpenDisk("shared", 0)
	if r.Size() != size {
		t.Fatalf("second handle: Size() = %d", r.Size())
	}
	mustWrite(t, w, []byte("x"), 0)
	mustSnapshot(t, w, "s1")
	want := make([]byte, size)
	want[0] = 'x'
	checkSnapshot(t, r, "s1", want)
	mustWrite(t, w, []byte("y"), 1)
	got := make([]byte, 2)
	if _, err := r.ReadAt(got, 0); err != nil || string(got) != "xy" {
		t.Fatalf("the other handle reads %q, %v; want the write through the first", got, err)
	}
	if err := h.tg.DeleteDisk(h.ctx, "shared"); !errors.Is(err, replication.ErrDiskOpen) {
		t.Fatalf("DeleteDisk of an open disk = %v, want ErrDiskOpen", err)
	}
	if d, err := h.tg.OpenDisk(h.ctx, "shared", 2*size); err == nil {
		d.Close()
		t.Fatal("OpenDisk of an open disk with another size accepted")
	}
	mustClose(t, w)
	if err := w.WriteAt([]byte("z"), 0); !errors.Is(err, replication.ErrClosed) {
		t.Fatalf("WriteAt on a closed handle = %v, want ErrClosed", err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("second Close of a handle: %v", err)
	}
	// The first Close flushed: the write is the disk's, through the other.
	want[1] = 'y'
	mustSnapshot(t, r, "s2")
	checkSnapshot(t, r, "s2", want)
	if err := h.tg.DeleteDisk(h.ctx, "shared"); !errors.Is(err, replication.ErrDiskOpen) {
		t.Fatalf("DeleteDisk while one handle is open = %v, want ErrDiskOpen", err)
	}
	mustClose(t, r)
	if err := h.tg.DeleteDisk(h.ctx, "shared"); err != nil {
		t.Fatalf("DeleteDisk of the closed disk: %v", err)
	}
	if _, err := h.tg.OpenDisk(h.ctx, "shared", 0); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("OpenDisk of the deleted disk = %v, want ErrNotFound", err)
	}
}

func testDisksAndObjects(t *testing.T, h *harness) {
	h.mustPut("same", []byte("object"))
	d := h.mustOpenDisk("same", 8192)
	mustWrite(t, d, []byte("disk"), 0)
	mustSnapshot(t, d, "s")
	mustClose(t, d)
	if got := h.mustGet("same"); string(got) != "object" {
		t.Fatalf("object = %q", got)
	}
	if l := h.mustList(""); len(l) != 1 || l[0].Key != "same" {
		t.Fatalf("disks show in the object listing: %+v", l)
	}
	h.mustDelete("same")
	d = h.mustOpenDisk("same", 0)
	mustSnapshots(t, d, "s")
	mustClose(t, d)
	if err := h.tg.DeleteDisk(h.ctx, "same"); err != nil {
		t.Fatal(err)
	}
}

// testDisksConcurrent drives several disks from their own goroutines.
func testDisksConcurrent(t *testing.T, h *harness) {
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := fmt.Sprintf("par/%d", g)
			const size = 256 << 10
			d, err := h.tg.OpenDisk(h.ctx, key, size)
			if err != nil {
				t.Errorf("OpenDisk(%s): %v", key, err)
				return
			}
			defer d.Close()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			model := make([]byte, size)
			snaps := map[string][]byte{}
			for i := range 30 {
				off := rng.Int64N(size - 9000)
				p := randBytes(rng, 1+rng.IntN(9000))
				if err := d.WriteAt(p, off); err != nil {
					t.Errorf("WriteAt: %v", err)
					return
				}
				copy(model[off:], p)
				if i%5 == 4 {
					name := fmt.Sprintf("%03d", i)
					if err := d.Flush(h.ctx); err != nil {
						t.Errorf("Flush: %v", err)
						return
					}
					if err := d.Snapshot(h.ctx, name); err != nil {
						t.Errorf("Snapshot: %v", err)
						return
					}
					snaps[name] = slices.Clone(model)
				}
			}
			for name, want := range snaps {
				r, err := d.OpenSnapshot(h.ctx, name)
				if err != nil {
					t.Errorf("OpenSnapshot: %v", err)
					return
				}
				got := make([]byte, size)
				if _, err := r.ReadAt(got, 0); err != nil && err != io.EOF {
					t.Errorf("ReadAt: %v", err)
				} else if i := firstDiff(got, want); i >= 0 {
					t.Errorf("disk %s snapshot %s differs at %d", key, name, i)
				}
				r.Close()
			}
		}()
	}
	wg.Wait()
}

// ----- snapshots -----

func testSnapshotStable(t *testing.T, h *harness) {
	d := h.mustOpenDisk("stable", oddSize)
	defer d.Close()
	a := bytes.Repeat([]byte{'a'}, oddSize)
	mustWrite(t, d, a, 0)
	mustSnapshot(t, d, "1")
	b := slices.Clone(a)
	mustWrite(t, d, []byte("bbbb"), 4094)
	copy(b[4094:], "bbbb")
	mustZero(t, d, oddSize-5000, 5000)
	clear(b[oddSize-5000:])
	mustFlush(t, d)
	checkSnapshot(t, d, "1", a)

	// Snapshot of an existing name is a no-op, whatever changed since.
	if err := d.Snapshot(h.ctx, "1"); err != nil {
		t.Fatalf("Snapshot of an existing name: %v", err)
	}
	checkSnapshot(t, d, "1", a)
	mustSnapshots(t, d, "1")
	mustSnapshot(t, d, "2")
	checkSnapshot(t, d, "2", b)
	checkSnapshot(t, d, "1", a)

	// An empty epoch: two snapshots with nothing written between.
	mustSnapshot(t, d, "3")
	mustWrite(t, d, []byte("c"), 0)
	mustSnapshot(t, d, "4")
	checkSnapshot(t, d, "2", b)
	checkSnapshot(t, d, "3", b)
	b[0] = 'c'
	checkSnapshot(t, d, "4", b)
}

// testSnapshotSmallChanges changes single bytes at the edges of blocks after a
// snapshot: each must reach the next snapshot and leave the older one alone.
func testSnapshotSmallChanges(t *testing.T, h *harness) {
	d := h.mustOpenDisk("small", oddSize)
	defer d.Close()
	model := bytes.Repeat([]byte{0x11}, oddSize)
	mustWrite(t, d, model, 0)
	mustSnapshot(t, d, "000")
	snaps := [][]byte{slices.Clone(model)}
	edges := []int64{0, 1, 4095, 4096, 8191, 8192 + 2047, oddSize - 513, oddSize - 512, oddSize - 1}
	for i, off := range edges {
		mustWrite(t, d, []byte{byte(0x20 + i)}, off)
		model[off] = byte(0x20 + i)
		mustSnapshot(t, d, fmt.Sprintf("%03d", i+1))
		snaps = append(snaps, slices.Clone(model))
	}
	for i, off := range edges {
		mustZero(t, d, off, 1)
		model[off] = 0
		mustSnapshot(t, d, fmt.Sprintf("%03d", len(edges)+i+1))
		snaps = append(snaps, slices.Clone(model))
	}
	// A block rewritten whole, equal but for its last byte.
	p := slices.Clone(model[4096:8192])
	p[4095] ^= 0xFF
	mustWrite(t, d, p, 4096)
	copy(model[4096:], p)
	mustSnapshot(t, d, fmt.Sprintf("%03d", len(snaps)))
	snaps = append(snaps, slices.Clone(model))
	for i, want := range snaps {
		checkSnapshot(t, d, fmt.Sprintf("%03d", i), want)
	}
}

func testSnapshotOrder(t *testing.T, h *harness) {
	d := h.mustOpenDisk("order", 8192)
	defer d.Close()
	mustSnapshot(t, d, "0000000000000010")
	if err := d.Snapshot(h.ctx, "000000000000000f"); !errors.Is(err, replication.ErrSnapshotOrder) {
		t.Fatalf("Snapshot of a name before the newest = %v, want ErrSnapshotOrder", err)
	}
	mustSnapshot(t, d, "0000000000000020")
	if err := d.Snapshot(h.ctx, "0000000000000011"); !errors.Is(err, replication.ErrSnapshotOrder) {
		t.Fatalf("Snapshot of a name between existing ones = %v, want ErrSnapshotOrder", err)
	}
	// Existing names are a no-op, the older one too (an applier redoing a point).
	if err := d.Snapshot(h.ctx, "0000000000000010"); err != nil {
		t.Fatalf("Snapshot of an existing older name: %v", err)
	}
	if err := d.Snapshot(h.ctx, "0000000000000020"); err != nil {
		t.Fatalf("Snapshot of the newest name: %v", err)
	}
	mustSnapshot(t, d, "0000000000000030")
	mustSnapshots(t, d, "0000000000000010", "0000000000000020", "0000000000000030")

	// Lexical, not numeric or by length: "a1" < "a10" < "a9".
	d2 := h.mustOpenDisk("order2", 8192)
	defer d2.Close()
	mustSnapshot(t, d2, "a10")
	if err := d2.Snapshot(h.ctx, "a1"); !errors.Is(err, replication.ErrSnapshotOrder) {
		t.Fatalf("Snapshot(a1) after a10 = %v, want ErrSnapshotOrder", err)
	}
	mustSnapshot(t, d2, "a9")
	mustSnapshots(t, d2, "a10", "a9")
}

func testSnapshotMissing(t *testing.T, h *harness) {
	d := h.mustOpenDisk("missing", 8192)
	defer d.Close()
	if _, err := d.OpenSnapshot(h.ctx, "nope"); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("OpenSnapshot(missing) = %v, want ErrNotFound", err)
	}
	if err := d.DeleteSnapshot(h.ctx, "nope"); err != nil {
		t.Fatalf("DeleteSnapshot(missing) = %v", err)
	}
	mustSnapshots(t, d)
	mustSnapshot(t, d, "a")
	if err := d.DeleteSnapshot(h.ctx, "a"); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	if _, err := d.OpenSnapshot(h.ctx, "a"); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("OpenSnapshot(deleted) = %v, want ErrNotFound", err)
	}
	if err := d.DeleteSnapshot(h.ctx, "a"); err != nil {
		t.Fatalf("DeleteSnapshot again = %v", err)
	}
	mustSnapshots(t, d)
	// Snapshot names are single key elements of at most 200 bytes.
	for _, name := range []string{"", "../x", "a/b", "a b", ".", strings.Repeat("a", replication.MaxSnapshotNameLen+1)} {
		if err := d.Snapshot(h.ctx, name); !errors.Is(err, replication.ErrInvalidKey) {
			t.Errorf("Snapshot(%q) = %v, want ErrInvalidKey", name, err)
		}
		if r, err := d.OpenSnapshot(h.ctx, name); !errors.Is(err, replication.ErrInvalidKey) {
			if err == nil {
				r.Close()
			}
			t.Errorf("OpenSnapshot(%q) = %v, want ErrInvalidKey", name, err)
		}
		if err := d.DeleteSnapshot(h.ctx, name); !errors.Is(err, replication.ErrInvalidKey) {
			t.Errorf("DeleteSnapshot(%q) = %v, want ErrInvalidKey", name, err)
		}
	}
	mustSnapshots(t, d)
}

// changer makes random changes to a disk and its model. Half of them fall in
// a small hot area, so that epochs overlap.
type changer struct {
	t     *testing.T
	rng   *rand.Rand
	d     replication.ReplicaDisk
	model []byte
}

func (c *changer) randRange(maxLen int64) (int64, int64) {
	size := int64(len(c.model))
	var off int64
	switch c.rng.IntN(4) {
	case 0:
		off = c.rng.Int64N(min(size, 64<<10))
	case 1:
		off = c.rng.Int64N(size/4096+1) * 4096 % size
	default:
		off = c.rng.Int64N(size)
	}
	n := 1 + c.rng.Int64N(min(size-off, maxLen))
	if c.rng.IntN(4) == 0 {
		n = min(size-off, (n+4095)/4096*4096)
	}
	return off, n
}

func (c *changer) write(maxLen int64) {
	off, n := c.randRange(maxLen)
	var p []byte
	switch c.rng.IntN(8) {
	case 0:
		p = make([]byte, n) // zeros through WriteAt
	case 1:
		p = slices.Clone(c.model[off : off+n]) // writes what is there already
	default:
		p = randBytes(c.rng, int(n))
	}
	mustWrite(c.t, c.d, p, off)
	copy(c.model[off:], p)
}

func (c *changer) zero(maxLen int64) {
	off, n := c.randRange(maxLen)
	mustZero(c.t, c.d, off, n)
	clear(c.model[off : off+n])
}

// some makes a few changes.
func (c *changer) some() {
	for range 1 + c.rng.IntN(6) {
		if c.rng.IntN(4) == 0 {
			c.zero(40 << 10)
		} else {
			c.write(3*4096 + 100)
		}
	}
}

func testSnapshotDelete(t *testing.T, h *harness) {
	d := h.mustOpenDisk("del", oddSize)
	defer d.Close()
	c := &changer{t: t, rng: newRand(t, 4), d: d, model: make([]byte, oddSize)}
	snaps := map[string][]byte{}
	take := func(name string) {
		c.some()
		mustSnapshot(t, d, name)
		snaps[name] = slices.Clone(c.model)
	}
	checkAll := func(names ...string) {
		t.Helper()
		mustSnapshots(t, d, names...)
		for _, n := range names {
			checkSnapshot(t, d, n, snaps[n])
		}
	}
	del := func(name string) {
		t.Helper()
		if err := d.DeleteSnapshot(h.ctx, name); err != nil {
			t.Fatalf("DeleteSnapshot(%s): %v", name, err)
		}
	}
	for i := 1; i <= 6; i++ {
		take(fmt.Sprintf("s%d", i))
	}
	c.some()
	mustFlush(t, d)
	checkAll("s1", "s2", "s3", "s4", "s5", "s6")
	del("s1") // oldest
	checkAll("s2", "s3", "s4", "s5", "s6")
	del("s4") // middle
	checkAll("s2", "s3", "s5", "s6")
	del("s6") // newest
	checkAll("s2", "s3", "s5")
	c.some() // saved into s5's epoch now
	c.some()
	mustFlush(t, d)
	checkAll("s2", "s3", "s5")
	take("s7")
	checkAll("s2", "s3", "s5", "s7")
	del("s5")
	del("s7")
	checkAll("s2", "s3")
	del("s2")
	checkAll("s3")
	del("s3")
	checkAll()
	take("s8")
	checkAll("s8")
}

// testReaderOutlives keeps readers open while the disk is written, snapshots
// are taken, and their own snapshots are deleted.
func testReaderOutlives(t *testing.T, h *harness) {
	d := h.mustOpenDisk("outlive", oddSize)
	defer d.Close()
	c := &changer{t: t, rng: newRand(t, 5), d: d, model: make([]byte, oddSize)}
	type held struct {
		r    replication.SnapshotReader
		want []byte
	}
	take := func(name string) held {
		c.some()
		mustSnapshot(t, d, name)
		return held{mustOpenSnapshot(t, d, name), slices.Clone(c.model)}
	}
	check := func(hs ...held) {
		t.Helper()
		for i, x := range hs {
			checkReader(t, x.r, x.want, fmt.Sprintf("reader %d", i))
		}
	}
	del := func(name string) {
		t.Helper()
		if err := d.DeleteSnapshot(h.ctx, name); err != nil {
			t.Fatalf("DeleteSnapshot(%s): %v", name, err)
		}
		if _, err := d.OpenSnapshot(h.ctx, name); !errors.Is(err, replication.ErrNotFound) {
			t.Fatalf("OpenSnapshot(%s) after delete = %v", name, err)
		}
	}
	r1, r2, r3 := take("s1"), take("s2"), take("s3")
	r1b := held{mustOpenSnapshot(t, d, "s1"), r1.want}
	c.some()
	mustFlush(t, d)
	check(r1, r1b, r2, r3)

	del("s1") // oldest, two readers open
	mustSnapshots(t, d, "s2", "s3")
	check(r1, r1b, r2, r3)
	c.some()
	mustFlush(t, d)
	check(r1, r1b, r2, r3)
	mustClose(t, r1b.r)
	check(r1, r2, r3)

	del("s3") // newest, reader open; writes now go to the epoch of s2
	c.some()
	mustFlush(t, d)
	check(r1, r2, r3)
	r4 := take("s4")
	c.some()
	mustFlush(t, d)
	check(r1, r2, r3, r4)

	del("s2") // the oldest remaining, between deleted ones
	c.some()
	r5 := take("s5")
	c.some()
	mustFlush(t, d)
	check(r1, r2, r3, r4, r5)
	mustSnapshots(t, d, "s4", "s5")

	mustClose(t, r3.r)
	check(r1, r2, r4, r5)
	mustClose(t, r1.r)
	c.some()
	mustFlush(t, d)
	check(r2, r4, r5)
	mustClose(t, r2.r)
	check(r4, r5)
	checkSnapshot(t, d, "s4", r4.want)
	del("s4")
	check(r4, r5)
	mustClose(t, r4.r)
	mustClose(t, r5.r)
	mustSnapshots(t, d, "s5")
	checkSnapshot(t, d, "s5", r5.want)
	if err := r5.r.Close(); err != nil {
		t.Fatalf("second Close of a reader: %v", err)
	}
}

// testHeldAtClose deletes a snapshot a reader holds, then closes the disk
// under the reader: the reader fails from then on, and the snapshot stays
// deleted, after a reopen of the disk and of the target too.
func testHeldAtClose(t *testing.T, h *harness) {
	const key = "held"
	d := h.mustOpenDisk(key, oddSize)
	c := &changer{t: t, rng: newRand(t, 8), d: d, model: make([]byte, oddSize)}
	snaps := map[string][]byte{}
	for _, name := range []string{"s1", "s2", "s3"} {
		c.some()
		mustSnapshot(t, d, name)
		snaps[name] = slices.Clone(c.model)
	}
	c.some()
	mustFlush(t, d)
	r1 := mustOpenSnapshot(t, d, "s1")
	r2 := mustOpenSnapshot(t, d, "s2")
	for _, name := range []string{"s1", "s2"} {
		if err := d.DeleteSnapshot(h.ctx, name); err != nil {
			t.Fatalf("DeleteSnapshot(%s): %v", name, err)
		}
	}
	checkReader(t, r1, snaps["s1"], "held reader of s1")
	mustClose(t, r2) // s2 goes now, s1 when the disk closes
	mustSnapshots(t, d, "s3")
	mustClose(t, d)
	if _, err := r1.ReadAt(make([]byte, 10), 0); !errors.Is(err, replication.ErrClosed) {
		t.Fatalf("ReadAt of a reader of a closed disk = %v, want ErrClosed", err)
	}
	if r1.Size() != oddSize {
		t.Fatalf("Size() of a reader of a closed disk = %d", r1.Size())
	}
	mustClose(t, r1)
	for _, reopen := range []func(){func() {}, h.reopen} {
		reopen()
		d = h.mustOpenDisk(key, 0)
		mustSnapshots(t, d, "s3")
		checkSnapshot(t, d, "s3", snaps["s3"])
		if _, err := d.OpenSnapshot(h.ctx, "s1"); !errors.Is(err, replication.ErrNotFound) {
			t.Fatalf("OpenSnapshot of a snapshot deleted under its reader = %v, want ErrNotFound", err)
		}
		mustClose(t, d)
	}
}

// testConcurrentReaders reads many snapshots from many goroutines (some
// sharing a reader) while the disk is written, snapshotted and pruned.
func testConcurrentReaders(t *testing.T, h *harness) {
	const size = 2 << 20
	d := h.mustOpenDisk("concurrent", size)
	defer d.Close()
	c := &changer{t: t, rng: newRand(t, 6), d: d, model: make([]byte, size)}
	type pub struct {
		r    replication.SnapshotReader
		want []byte
		name string
	}
	var (
		mu    sync.Mutex
		pubs  []pub
		reads int
	)
	publish := func(name string) {
		mustSnapshot(t, d, name)
		p := pub{mustOpenSnapshot(t, d, name), slices.Clone(c.model), name}
		mu.Lock()
		pubs = append(pubs, p)
		mu.Unlock()
	}
	for range 20 {
		c.write(200 << 10)
	}
	publish("0000")

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 99))
			buf := make([]byte, 300<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				mu.Lock()
				p := pubs[rng.IntN(len(pubs))]
				reads++
				mu.Unlock()
				off := rng.Int64N(size)
				n := 1 + rng.Int64N(min(size-off, int64(len(buf))))
				m, err := p.r.ReadAt(buf[:n], off)
				if m != int(n) || (err != nil && err != io.EOF) {
					t.Errorf("snapshot %s: ReadAt(%d at %d) = %d, %v", p.name, n, off, m, err)
					return
				}
				if i := firstDiff(buf[:n], p.want[off:off+n]); i >= 0 {
					t.Errorf("snapshot %s: ReadAt(%d at %d) differs at byte %d", p.name, n, off, off+int64(i))
					return
				}
			}
		}()
	}
	var live []string
	live = append(live, "0000")
	for i := 1; i <= 150 && !t.Failed(); i++ {
		c.some()
		if i%7 == 0 {
			c.write(256 << 10)
		}
		if i%10 == 0 {
			mustFlush(t, d)
		}
		if i%15 == 0 {
			name := fmt.Sprintf("%04d", i)
			publish(name)
			live = append(live, name)
		}
		if i%40 == 0 && len(live) > 1 {
			k := c.rng.IntN(len(live) - 1)
			if err := d.DeleteSnapshot(h.ctx, live[k]); err != nil {
				t.Errorf("DeleteSnapshot: %v", err)
			}
			live = slices.Delete(live, k, k+1)
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("%d concurrent reads", reads)
	for _, p := range pubs {
		checkReader(t, p.r, p.want, "reader of "+p.name)
		mustClose(t, p.r)
	}
	mustSnapshots(t, d, live...)
}

// testModel applies random changes, snapshots, deletions, reader opens and
// closes, and reopens of the target, and checks every live snapshot and every
// open reader against in-memory copies.
func testModel(t *testing.T, h *harness) {
	for _, seed := range []uint64{11, 12, 13} {
		runModel(t, h, seed, 300)
	}
}

func runModel(t *testing.T, h *harness, seed uint64, steps int) {
	const size = oddSize + 3*4096
	key := fmt.Sprintf("model/%d", seed)
	d := h.mustOpenDisk(key, size)
	c := &changer{t: t, rng: newRand(t, seed), d: d, model: make([]byte, size)}
	rng := c.rng
	live := map[string][]byte{}
	var names []string // live, in order
	type held struct {
		r    replication.SnapshotReader
		want []byte
		name string
	}
	var readers []held
	counter := 0
	checkHeld := func(x held) {
		t.Helper()
		checkReader(t, x.r, x.want, "held reader of "+x.name)
		for range 3 {
			off := rng.Int64N(size)
			n := 1 + rng.Int64N(min(size-off, 20000))
			got := make([]byte, n)
			if m, err := x.r.ReadAt(got, off); m != int(n) || (err != nil && err != io.EOF) {
				t.Fatalf("held reader of %s: ReadAt(%d at %d) = %d, %v", x.name, n, off, m, err)
			}
			if i := firstDiff(got, x.want[off:off+n]); i >= 0 {
				t.Fatalf("held reader of %s: ReadAt(%d at %d) differs at %d", x.name, n, off, off+int64(i))
			}
		}
	}
	verify := func() {
		t.Helper()
		mustSnapshots(t, c.d, names...)
		for _, n := range names {
			checkSnapshot(t, c.d, n, live[n])
		}
		for _, x := range readers {
			checkHeld(x)
		}
	}
	deleteAt := func(i int) {
		t.Helper()
		name := names[i]
		if err := c.d.DeleteSnapshot(h.ctx, name); err != nil {
			t.Fatalf("DeleteSnapshot(%s): %v", name, err)
		}
		names = slices.Delete(names, i, i+1)
		delete(live, name)
	}
	for step := range steps {
		switch x := rng.IntN(100); {
		case x < 35:
			c.write(3*4096 + 100)
		case x < 38:
			c.write(300 << 10)
		case x < 48:
			c.zero(50 << 10)
		case x < 50:
			c.zero(size)
		case x < 58:
			mustFlush(t, c.d)
		case x < 70:
			counter++
			name := fmt.Sprintf("%06d", counter*10)
			mustSnapshot(t, c.d, name)
			live[name] = slices.Clone(c.model)
			names = append(names, name)
		case x < 73:
			if len(names) > 0 {
				if err := c.d.Snapshot(h.ctx, names[rng.IntN(len(names))]); err != nil {
					t.Fatalf("Snapshot of an existing name: %v", err)
				}
			}
		case x < 83:
			if len(names) > 0 {
				switch rng.IntN(3) {
				case 0:
					deleteAt(0)
				case 1:
					deleteAt(len(names) - 1)
				default:
					deleteAt(rng.IntN(len(names)))
				}
			}
		case x < 88:
			if len(names) > 0 && len(readers) < 6 {
				name := names[rng.IntN(len(names))]
				readers = append(readers, held{mustOpenSnapshot(t, c.d, name), live[name], name})
			}
		case x < 92:
			if len(readers) > 0 {
				i := rng.IntN(len(readers))
				checkHeld(readers[i])
				mustClose(t, readers[i].r)
				readers = slices.Delete(readers, i, i+1)
			}
		case x < 94:
			for _, x := range readers {
				checkHeld(x)
				mustClose(t, x.r)
			}
			readers = nil
			mustFlush(t, c.d)
			mustClose(t, c.d)
			h.reopen()
			c.d = h.mustOpenDisk(key, 0)
		default:
			verify()
		}
		if len(names) > 12 {
			deleteAt(rng.IntN(len(names)))
		}
		if step%30 == 29 {
			verify()
		}
	}
	mustFlush(t, c.d)
	verify()
	for _, x := range readers {
		mustClose(t, x.r)
	}
	mustClose(t, c.d)
}

func testPersistence(t *testing.T, h *harness) {
	h.mustPut("vault", []byte("v"))
	h.mustPut("machines/m1/machine", []byte("m"))
	h.mustPut("machines/m1/points/0000000000000001", []byte("p"))
	const key = "machines/m1/disks/0"
	d := h.mustOpenDisk(key, oddSize)
	c := &changer{t: t, rng: newRand(t, 7), d: d, model: make([]byte, oddSize)}
	snaps := map[string][]byte{}
	take := func(name string) {
		c.some()
		mustSnapshot(t, c.d, name)
		snaps[name] = slices.Clone(c.model)
	}
	take("s1")
	take("s2")
	c.some()
	mustSnapshot(t, c.d, "s3")
	snaps["s3"] = slices.Clone(c.model)
	mustClose(t, c.d)

	h.reopen()
	if got := h.mustGet("machines/m1/machine"); string(got) != "m" {
		t.Fatalf("object after reopen = %q", got)
	}
	if l := h.mustList("machines/"); len(l) != 2 {
		t.Fatalf("listing after reopen: %+v", l)
	}
	c.d = h.mustOpenDisk(key, 0)
	if c.d.Size() != oddSize {
		t.Fatalf("Size() after reopen = %d", c.d.Size())
	}
	mustSnapshots(t, c.d, "s1", "s2", "s3")
	for _, n := range []string{"s1", "s2", "s3"} {
		checkSnapshot(t, c.d, n, snaps[n])
	}
	take("s4") // writes after a reopen save into the reopened newest epoch
	if err := c.d.DeleteSnapshot(h.ctx, "s2"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"s1", "s3", "s4"} {
		checkSnapshot(t, c.d, n, snaps[n])
	}
	mustClose(t, c.d)

	h.reopen()
	c.d = h.mustOpenDisk(key, oddSize)
	mustSnapshots(t, c.d, "s1", "s3", "s4")
	for _, n := range []string{"s1", "s3", "s4"} {
		checkSnapshot(t, c.d, n, snaps[n])
	}
	mustClose(t, c.d)
	h.mustDelete("vault")
	h.reopen()
	h.mustGetMissing("vault")
}

// testCurrentRead: ReadAt sees every write, flushed or not, and zeros.
func testCurrentRead(t *testing.T, h *harness) {
	const size = 1<<20 + 512
	d := h.mustOpenDisk("cur", size)
	defer mustClose(t, d)
	model := make([]byte, size)
	write := func(off int, b []byte) {
		mustWrite(t, d, b, int64(off))
		copy(model[off:], b)
	}
	check := func(what string) {
		t.Helper()
		got := make([]byte, size)
		if n, err := d.ReadAt(got, 0); n != size || err != nil {
			t.Fatalf("%s: ReadAt = %d, %v", what, n, err)
		}
		if i := firstDiff(got, model); i >= 0 {
			t.Fatalf("%s: byte %d is %#02x, want %#02x", what, i, got[i], model[i])
		}
	}
	write(4000, bytes.Repeat([]byte{1}, 9000))
	check("unflushed write")
	mustFlush(t, d)
	check("flushed write")
	mustSnapshot(t, d, "a")
	write(size-700, bytes.Repeat([]byte{2}, 700))
	mustZero(t, d, 5000, 3000)
	clear(model[5000:8000])
	check("after a snapshot, write and zero")
	b := make([]byte, 10)
	if _, err := d.ReadAt(b, size-5); err == nil {
		t.Fatal("ReadAt past the end succeeded")
	}
}

// testResize: a disk grows, its new area reads as zero, its snapshots keep
// their contents, and it never shrinks.
func testResize(t *testing.T, h *harness) {
	const size = 1 << 20
	d := h.mustOpenDisk("grow", size)
	defer mustClose(t, d)
	old := bytes.Repeat([]byte{7}, size)
	mustWrite(t, d, old, 0)
	mustFlush(t, d)
	mustSnapshot(t, d, "a")
	if err := d.Resize(h.ctx, size/2); !errors.Is(err, replication.ErrShrink) {
		t.Fatalf("shrink: %v, want ErrShrink", err)
	}
	if err := d.Resize(h.ctx, 3*size); err != nil {
		t.Fatal(err)
	}
	if d.Size() != 3*size {
		t.Fatalf("Size() = %d after growing to %d", d.Size(), 3*size)
	}
	grown := make([]byte, 3*size)
	copy(grown, old)
	mustWrite(t, d, bytes.Repeat([]byte{9}, 4096), 2*size)
	copy(grown[2*size:], bytes.Repeat([]byte{9}, 4096))
	mustWrite(t, d, bytes.Repeat([]byte{8}, 4096), 0)
	copy(grown, bytes.Repeat([]byte{8}, 4096))
	mustFlush(t, d)
	got := make([]byte, 3*size)
	if _, err := d.ReadAt(got, 0); err != nil || firstDiff(got, grown) >= 0 {
		t.Fatalf("grown disk differs from the model (%v)", err)
	}
	// The snapshot holds the old contents; past the old size it reads zero.
	r := mustOpenSnapshot(t, d, "a")
	defer mustClose(t, r)
	snap := make([]byte, size)
	if _, err := r.ReadAt(snap, 0); err != nil && err != io.EOF || firstDiff(snap, old) >= 0 {
		t.Fatalf("snapshot changed by the growth (%v)", err)
	}
	tail := make([]byte, 4096)
	if _, err := r.ReadAt(tail, 2*size); (err != nil && err != io.EOF) || !bytes.Equal(tail, make([]byte, 4096)) {
		t.Fatalf("snapshot past its old size is not zero (%v)", err)
	}
	h.reopen()
	d2 := h.mustOpenDisk("grow", 0)
	defer mustClose(t, d2)
	if d2.Size() != 3*size {
		t.Fatalf("after reopen: Size() = %d", d2.Size())
	}
}

// testClosed: once the target is closed, its objects, disks and snapshot
// readers fail with ErrClosed; closing any of them again is nil.
func testClosed(t *testing.T, h *harness) {
	h.mustPut("o", []byte("x"))
	d := h.mustOpenDisk("c", 8192)
	mustWrite(t, d, []byte("d"), 0)
	mustSnapshot(t, d, "s")
	r := mustOpenSnapshot(t, d, "s")
	if err := h.tg.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	closed := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, replication.ErrClosed) {
			t.Errorf("%s after Close = %v, want ErrClosed", what, err)
		}
	}
	closed("PutObject", h.tg.PutObject(h.ctx, "o", nil))
	_, err := h.tg.GetObject(h.ctx, "o")
	closed("GetObject", err)
	_, err = h.tg.ListObjects(h.ctx, "")
	closed("ListObjects", err)
	closed("DeleteObject", h.tg.DeleteObject(h.ctx, "o"))
	_, err = h.tg.OpenDisk(h.ctx, "c", 0)
	closed("OpenDisk", err)
	closed("DeleteDisk", h.tg.DeleteDisk(h.ctx, "c"))
	closed("WriteAt", d.WriteAt([]byte{1}, 0))
	closed("Flush", d.Flush(h.ctx))
	closed("Snapshot", d.Snapshot(h.ctx, "t"))
	_, err = d.OpenSnapshot(h.ctx, "s")
	closed("OpenSnapshot", err)
	_, err = r.ReadAt(make([]byte, 10), 0)
	closed("ReadAt of a reader", err)
	if r.Size() != 8192 || d.Size() != 8192 {
		t.Errorf("Size() after Close: reader %d, disk %d", r.Size(), d.Size())
	}
	for what, c := range map[string]io.Closer{"reader": r, "disk": d, "target": h.tg} {
		if err := c.Close(); err != nil {
			t.Errorf("Close of a %s after the target's: %v", what, err)
		}
	}
	// What was written before Close is there.
	h.tg = h.open(t, h.dir)
	if got := h.mustGet("o"); string(got) != "x" {
		t.Fatalf("object after reopen = %q", got)
	}
	d = h.mustOpenDisk("c", 0)
	want := make([]byte, 8192)
	want[0] = 'd'
	checkSnapshot(t, d, "s", want)
	mustClose(t, d)
}
