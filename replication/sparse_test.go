package replication

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// mostlyEmpty is a disk image of size bytes with one 4 KiB block of data
// in each MiB (at a different place in each) and a last partial block.
func mostlyEmpty(size int64) []byte {
	img := make([]byte, size)
	for off := int64(0); off+(1<<20) <= size; off += 1 << 20 {
		at := off + (off>>20%256)*4096
		for i := range 4096 {
			img[at+int64(i)] = byte(i + 1)
		}
	}
	img[size-1] = 0xff
	return img
}

// mustSparse checks that the file at path holds want and that the file
// system allocated little more than its data blocks.
func mustSparse(t *testing.T, path string, want []byte, dataBlocks int64) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: the content differs from the disk", path)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	alloc := st.Blocks * 512
	// The data, plus room for the file system's own extent blocks.
	if limit := dataBlocks*holeBlock + 256<<10; alloc > limit {
		t.Fatalf("%s: %d bytes allocated for a %d-byte image of %d data blocks: want at most %d (holes for zero blocks)",
			path, alloc, len(want), dataBlocks, limit)
	}
}

// A recovered image has holes wherever the disk has all-zero 4 KiB blocks,
// through either writer (from a point's reader, or from the server's
// stream), and its content is the disk's.
func TestRecoveredImagesAreSparse(t *testing.T) {
	const size = 64<<20 + 4096 + 100
	img := mostlyEmpty(size)
	dataBlocks := int64(size>>20) + 1
	dir := t.TempDir()

	path := filepath.Join(dir, "point.img")
	var seen int64
	src := progressReaderAt{r: bytes.NewReader(img), disk: "d", size: size, fn: func(_ string, done, _ int64) { seen = done }}
	n, err := writeImageFile(context.Background(), src, size, path)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(size>>20)*4096 + (size - size/4096*4096); n != want {
		t.Errorf("data written %d, want %d", n, want)
	}
	if seen != size {
		t.Errorf("progress ended at %d of %d", seen, size)
	}
	mustSparse(t, path, img, dataBlocks)

	path = filepath.Join(dir, "stream.img")
	seen = 0
	r := ProgressReader(bytes.NewReader(img), "d", size, func(_ string, done, _ int64) { seen = done })
	if _, err := WriteImageFile(context.Background(), r, size, path); err != nil {
		t.Fatal(err)
	}
	if seen != size {
		t.Errorf("stream progress ended at %d of %d", seen, size)
	}
	mustSparse(t, path, img, dataBlocks)

	// The VHD made of it keeps the holes, its footer at the end.
	vhd, vsize, err := ConvertToVHD(path)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(vhd)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != vsize+VHDFooterSize || !bytes.Equal(b[:size], img) {
		t.Fatalf("VHD: %d bytes (virtual %d), content wrong", len(b), vsize)
	}
	if got, err := CheckVHDFooter(b[vsize:]); err != nil || got != vsize {
		t.Fatalf("VHD footer: size %d, %v; want %d", got, err, vsize)
	}
	mustSparse(t, vhd, b, dataBlocks+1)
}

func TestWriteSparse(t *testing.T) {
	b := make([]byte, 5*holeBlock+10)
	b[holeBlock] = 1       // block 1
	b[2*holeBlock+7] = 2   // block 2: one write with block 1
	b[4*holeBlock+100] = 3 // block 4
	b[5*holeBlock+9] = 4   // the partial tail block
	var w writes
	n, err := writeSparse(&w, b, 1000)
	if err != nil {
		t.Fatal(err)
	}
	want := writes{{1000 + holeBlock, 2 * holeBlock}, {1000 + 4*holeBlock, holeBlock + 10}}
	if n != 3*holeBlock+10 || len(w) != len(want) || w[0] != want[0] || w[1] != want[1] {
		t.Fatalf("writeSparse: %d bytes in %v, want %d in %v", n, w, 3*holeBlock+10, want)
	}
}

type writes [][2]int64

func (w *writes) WriteAt(b []byte, off int64) (int, error) {
	*w = append(*w, [2]int64{off, int64(len(b))})
	return len(b), nil
}
