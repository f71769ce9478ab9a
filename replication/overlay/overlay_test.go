package overlay

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"testing"
)

func mustOpen(t *testing.T, dir string, base []byte) *Overlay {
	t.Helper()
	o, err := Open(dir, "disk0", bytes.NewReader(base), int64(len(base)))
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func mustRead(t *testing.T, o *Overlay) []byte {
	t.Helper()
	got := make([]byte, o.Size())
	if err := o.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}

// TestOverlayModel drives random writes, zeroes and reads of all sizes and
// alignments against a plain byte slice, then reopens the overlay after a
// flush: it must read the same, and the base must never change.
func TestOverlayModel(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, size := range []int64{5*BlockSize + 1234, BlockSize, 3 * BlockSize} {
		dir := t.TempDir()
		base := make([]byte, size)
		for i := range base {
			base[i] = byte(r.IntN(256))
		}
		orig := bytes.Clone(base)
		model := bytes.Clone(base)
		o := mustOpen(t, dir, base)
		for range 300 {
			off := r.Int64N(size)
			n := r.Int64N(min(size-off, 3*BlockSize)) + 1
			switch r.IntN(4) {
			case 0, 1:
				p := make([]byte, n)
				for i := range p {
					p[i] = byte(r.IntN(256))
				}
				if err := o.WriteAt(p, off, r.IntN(10) == 0); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], p)
			case 2:
				if err := o.WriteZeroes(off, n, false); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+n])
			case 3:
				got := make([]byte, n)
				if err := o.ReadAt(got, off); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, model[off:off+n]) {
					t.Fatalf("size %d: read %d+%d differs from the model", size, off, n)
				}
			}
		}
		if !bytes.Equal(mustRead(t, o), model) {
			t.Fatalf("size %d: contents differ from the model", size)
		}
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(base, orig) {
			t.Fatal("the base changed")
		}
		o = mustOpen(t, dir, base)
		if !bytes.Equal(mustRead(t, o), model) {
			t.Fatalf("size %d: reopened contents differ from the model", size)
		}
		var blocks int64
		o.Blocks(func(off int64) error {
			blocks++
			if !o.marked(off / BlockSize) {
				t.Errorf("Blocks listed unwritten block %d", off/BlockSize)
			}
			return nil
		})
		if blocks != o.Written() || blocks == 0 {
			t.Fatalf("Blocks listed %d, Written %d", blocks, o.Written())
		}
		o.Close()
	}
}

// TestOverlayUntouchedReadsBase: an overlay nobody wrote reads as its base
// and costs no data on disk.
func TestOverlayUntouchedReadsBase(t *testing.T) {
	dir := t.TempDir()
	base := bytes.Repeat([]byte("asr!"), 4*BlockSize/4)
	o := mustOpen(t, dir, base)
	if !bytes.Equal(mustRead(t, o), base) || o.Written() != 0 {
		t.Fatal("an untouched overlay must read as its base")
	}
	o.Close()
}

// TestOverlayFlushedSurvivesCrash: what was flushed is there after a crash
// (files reopened without Close); the bitmap only names flushed blocks.
func TestOverlayFlushedSurvivesCrash(t *testing.T) {
	dir := t.TempDir()
	base := make([]byte, 8*BlockSize)
	o := mustOpen(t, dir, base)
	a := bytes.Repeat([]byte{0xaa}, BlockSize)
	if err := o.WriteAt(a, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := o.Flush(); err != nil {
		t.Fatal(err)
	}
	// Crash: the second write is never flushed, the files are dropped.
	if err := o.WriteAt(a, 4*BlockSize, false); err != nil {
		t.Fatal(err)
	}
	o.data.Close()
	o.mapf.Close()
	o2 := mustOpen(t, dir, base)
	defer o2.Close()
	got := mustRead(t, o2)
	if !bytes.Equal(got[:BlockSize], a) {
		t.Fatal("a flushed write was lost")
	}
	if !o2.marked(0) || o2.marked(4) {
		t.Fatalf("bitmap after the crash: block 0 %v, block 4 %v (want true, false)", o2.marked(0), o2.marked(4))
	}
}

func TestOverlayRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	base := make([]byte, 2*BlockSize)
	o := mustOpen(t, dir, base)
	if err := o.WriteAt([]byte{1}, 2*BlockSize, false); err == nil {
		t.Fatal("a write past the end was accepted")
	}
	if err := o.ReadAt(make([]byte, 2), 2*BlockSize-1); err == nil {
		t.Fatal("a read past the end was accepted")
	}
	o.Close()
	// Another size, or a damaged header, is refused.
	if _, err := Open(dir, "disk0", bytes.NewReader(base), BlockSize); !errors.Is(err, ErrFormat) {
		t.Fatalf("reopen with another size: %v", err)
	}
	_, mp := Paths(dir, "disk0")
	f, _ := os.OpenFile(mp, os.O_RDWR, 0)
	f.WriteAt([]byte{0xff}, 17)
	f.Close()
	if _, err := Open(dir, "disk0", bytes.NewReader(base), int64(len(base))); !errors.Is(err, ErrFormat) {
		t.Fatalf("reopen with a damaged header: %v", err)
	}
	if _, err := Open(dir, "big", bytes.NewReader(nil), maxSize+1); err == nil {
		t.Fatal("a disk over 64 TiB was accepted")
	}
}

// TestOverlayOpenIsConstant: a 1 TiB overlay opens without writing 1 TiB.
func TestOverlayOpenIsConstant(t *testing.T) {
	dir := t.TempDir()
	o, err := Open(dir, "big", zeroReader{}, 1<<40)
	if err != nil {
		t.Fatal(err)
	}
	if err := o.WriteAt([]byte("hello"), 1<<39, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	if err := o.ReadAt(got, 1<<39); err != nil || string(got) != "hello" {
		t.Fatalf("read back %q, %v", got, err)
	}
	o.Close()
	var st os.FileInfo
	dp, _ := Paths(dir, "big")
	if st, err = os.Stat(dp); err != nil || st.Size() != 1<<40 {
		t.Fatalf("data file: %v %v", st, err)
	}
}

type zeroReader struct{}

func (zeroReader) ReadAt(p []byte, off int64) (int, error) { clear(p); return len(p), nil }

func BenchmarkOpen1TiB(b *testing.B) {
	for b.Loop() {
		dir := b.TempDir()
		o, err := Open(dir, "big", zeroReader{}, 1<<40)
		if err != nil {
			b.Fatal(err)
		}
		o.Close()
	}
}
