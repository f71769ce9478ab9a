package bootdisk

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestModuleOrder(t *testing.T) {
	dir := t.TempDir()
	dep := "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n" +
		"kernel/drivers/virtio/virtio_ring.ko:\n" +
		"kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n" +
		"kernel/fs/fat/fat.ko:\n" +
		"kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\n" +
		"kernel/fs/nls/nls_iso8859-1.ko:\n" +
		"kernel/sound/unrelated.ko:\n"
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := moduleOrder(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
		"kernel/drivers/block/virtio_blk.ko", "kernel/fs/fat/fat.ko", "kernel/fs/fat/vfat.ko",
		"kernel/fs/nls/nls_iso8859-1.ko",
	}
	if !slices.Equal(got, want) {
		t.Errorf("order %v, want %v", got, want)
	}

	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte("kernel/drivers/block/virtio_blk.ko.xz:\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := moduleOrder(dir); err == nil || !strings.Contains(err.Error(), "compressed") {
		t.Errorf("compressed modules: %v", err)
	}
}

// testArchive is a small newc archive: dev, dev/console, init.
func testArchive(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := &cpioWriter{w: &buf}
	w.dir("dev")
	w.node("dev/console", 0o020600, 5, 1)
	w.file("init", 0o755, []byte("#!/bin/sh\n"))
	w.trailer()
	if w.err != nil {
		t.Fatal(w.err)
	}
	return buf.Bytes()
}

func TestCPIO(t *testing.T) {
	b := testArchive(t)
	if len(b)%4 != 0 || !bytes.HasPrefix(b, []byte("070701")) || !bytes.Contains(b, []byte("TRAILER!!!\x00")) {
		t.Fatalf("archive %q", b)
	}
}
