package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"testing"
)

// seqSum gives the SHA-256 of a disk only when it was read once, in
// order, whole: a read out of order, a read again or a short read give
// none (the export is then read again to compare).
func TestSeqSum(t *testing.T) {
	t.Parallel()
	disk := bytes.Repeat([]byte("asr-failback-"), 10000)
	want := sha256.Sum256(disk)
	n := int64(len(disk))
	read := func(ranges ...[2]int64) (string, bool) {
		s := &seqSum{r: bytes.NewReader(disk), h: sha256.New()}
		for _, r := range ranges {
			s.ReadAt(make([]byte, r[1]-r[0]), r[0])
		}
		return s.sum(n)
	}
	if got, ok := read([2]int64{0, 4096}, [2]int64{4096, 70000}, [2]int64{70000, n}); !ok || got != hex.EncodeToString(want[:]) {
		t.Fatalf("in order: %s %v", got, ok)
	}
	for _, rs := range [][][2]int64{
		{{0, 4096}, {70000, n}, {4096, 70000}}, // out of order
		{{0, 4096}, {0, 4096}, {4096, n}},      // a range read again
		{{4096, n}},                            // the start missing
		{{0, 4096}, {4096, 70000}},             // the end missing
	} {
		if got, ok := read(rs...); ok {
			t.Fatalf("reads %v gave a sum %s", rs, got)
		}
	}
}

// memVM is a recoveredVM whose one disk is bytes in memory, its content
// size as the server would say it (size).
type memVM struct {
	data   []byte
	size   int64
	opened int
}

func (v *memVM) name() string   { return "mem" }
func (v *memVM) place() string  { return "memory" }
func (v *memVM) String() string { return vmLabel(v) }
func (v *memVM) disks(context.Context) ([]recoveredDisk, error) {
	return []recoveredDisk{{name: "d0", size: int64(len(v.data))}}, nil
}
func (v *memVM) open(context.Context, recoveredDisk) (io.ReadCloser, int64, error) {
	v.opened++
	return io.NopCloser(bytes.NewReader(v.data)), v.size, nil
}
func (v *memVM) powerOff(context.Context) (bool, error) { return true, nil }
func (v *memVM) powerOn(context.Context) (bool, error)  { return true, nil }
func (v *memVM) close()                                 {}

// flatReader gives a recovered disk to the upload read once, in order,
// opened once at the first read; a read elsewhere, past the disk, or of
// content whose size is not the disk's is an error, never other bytes.
func TestFlatReader(t *testing.T) {
	t.Parallel()
	disk := bytes.Repeat([]byte("recovered-"), 7000)
	n := int64(len(disk))
	ctx := context.Background()
	vm := &memVM{data: disk, size: n}
	r := &flatReader{ctx: ctx, vm: vm, d: recoveredDisk{name: "d0", size: n}}
	var got []byte
	for off := int64(0); off < n; off += 32 << 10 {
		p := make([]byte, min(32<<10, n-off))
		if k, err := r.ReadAt(p, off); err != nil || k != len(p) {
			t.Fatalf("read at %d: %d, %v", off, k, err)
		}
		got = append(got, p...)
	}
	if !bytes.Equal(got, disk) || vm.opened != 1 {
		t.Fatalf("read in order: equal %v, opened %d times", bytes.Equal(got, disk), vm.opened)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		size      int64 // the content's size as the server says it
		off, want int64
	}{
		{"not from the start", n, 512, 512},
		{"past the disk", n, 0, n + 1},
		{"content of another size", n + 512, 0, 512},
	} {
		vm := &memVM{data: disk, size: tc.size}
		r := &flatReader{ctx: ctx, vm: vm, d: recoveredDisk{name: "d0", size: n}}
		if k, err := r.ReadAt(make([]byte, tc.want), tc.off); err == nil || k != 0 {
			t.Errorf("%s: %d bytes, %v", tc.name, k, err)
		}
		if k, err := r.ReadAt(make([]byte, 512), 0); err == nil || k != 0 { // and after it
			t.Errorf("%s, then a read from the start: %d bytes, %v", tc.name, k, err)
		}
		r.Close()
	}
	// Twice the same range: the second is refused.
	r = &flatReader{ctx: ctx, vm: &memVM{data: disk, size: -1}, d: recoveredDisk{name: "d0", size: n}}
	if _, err := r.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ReadAt(make([]byte, 4096), 0); err == nil {
		t.Fatal("a range read again was accepted")
	}
	r.Close()
}
