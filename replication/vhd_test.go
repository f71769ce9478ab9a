package replication_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

func TestVHDFooter(t *testing.T) {
	for _, size := range []int64{1, 1 << 20, 1<<20 + 1, 5<<30 + 512} {
		if v := replication.VHDSize(size); v%replication.VHDAlign != 0 || v < size || v-size >= replication.VHDAlign {
			t.Fatalf("VHDSize(%d) = %d", size, v)
		}
	}
	f := replication.VHDFooter(6<<20, time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC))
	if len(f) != 512 || string(f[:8]) != "conectix" || binary.BigEndian.Uint32(f[60:]) != 2 {
		t.Fatalf("footer: %x", f[:64])
	}
	if ts := binary.BigEndian.Uint32(f[24:]); ts != 848966400 { // seconds from 2000-01-01
		t.Fatalf("timestamp %d", ts)
	}
	if n, err := replication.CheckVHDFooter(f); err != nil || n != 6<<20 {
		t.Fatalf("check: %d, %v", n, err)
	}
	f[100] ^= 1
	if _, err := replication.CheckVHDFooter(f); !errors.Is(err, replication.ErrCorrupt) {
		t.Fatalf("a changed footer passes: %v", err)
	}
}

func TestConvertToVHD(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "d0.img")
	data := bytes.Repeat([]byte{0xab}, 3<<20+4096)
	os.WriteFile(img, data, 0o644)
	path, vsize, err := replication.ConvertToVHD(img)
	if err != nil || path != filepath.Join(dir, "d0.vhd") || vsize != 4<<20 {
		t.Fatalf("convert: %s %d %v", path, vsize, err)
	}
	b, _ := os.ReadFile(path)
	if int64(len(b)) != vsize+512 || !bytes.Equal(b[:len(data)], data) || !replication.IsZero(b[len(data):vsize]) {
		t.Fatalf("VHD of %d bytes does not hold the image and zeros", len(b))
	}
	if n, err := replication.CheckVHDFooter(b[vsize:]); err != nil || n != vsize {
		t.Fatalf("footer: %d, %v", n, err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatal("the raw image is still there")
	}
}
