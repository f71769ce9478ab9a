package bootdisk

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"io"
	"os"
	"os/exec"
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

func TestCPIO(t *testing.T) {
	var buf bytes.Buffer
	w := &cpioWriter{w: &buf}
	w.dir("dev")
	w.node("dev/console", 0o020600, 5, 1)
	w.file("init", 0o755, []byte("#!/bin/sh\n"))
	w.trailer()
	if w.err != nil {
		t.Fatal(w.err)
	}
	b := buf.Bytes()
	if len(b)%4 != 0 || !bytes.HasPrefix(b, []byte("070701")) || !bytes.Contains(b, []byte("TRAILER!!!\x00")) {
		t.Fatalf("archive %q", b)
	}
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("no cpio to list the archive")
	}
	cmd := exec.Command("cpio", "-t")
	cmd.Stdin = bytes.NewReader(b)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio -t: %v", err)
	}
	if got := strings.Fields(string(out)); !slices.Equal(got, []string{"dev", "dev/console", "init"}) {
		t.Errorf("cpio lists %v", got)
	}
}

// TestMake builds a real image and checks its MBR, its files and the
// initramfs inside, without booting it (the e2e tests in server/drill do).
func TestMake(t *testing.T) {
	for _, tool := range []string{"mformat", "mcopy", "syslinux"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	if ks, _ := filepath.Glob("/boot/vmlinuz-*"); len(ks) == 0 {
		t.Skip("no kernel in /boot")
	}
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := Make(img, 40, Options{Marker: "m-123", CorruptKernel: true}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 40<<20 || b[510] != 0x55 || b[511] != 0xAA || b[446] != 0x80 ||
		binary.LittleEndian.Uint32(b[454:]) != PartitionOffset/512 {
		t.Fatalf("bad MBR or size %d", len(b))
	}
	if m, err := ReadFile(img, MarkerFile); err != nil || string(m) != "m-123\n" {
		t.Errorf("marker %q %v", m, err)
	}
	cfg, err := ReadFile(img, "syslinux.cfg")
	if err != nil || !strings.Contains(string(cfg), "console=ttyS0") {
		t.Errorf("syslinux.cfg %q %v", cfg, err)
	}
	kernel, err := ReadFile(img, "vmlinuz")
	if err != nil {
		t.Fatal(err)
	}
	var o Options
	if err := o.defaults(); err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(o.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	if len(kernel) != len(orig) || bytes.Equal(kernel, orig) || !bytes.Equal(kernel[:4096], orig[:4096]) {
		t.Errorf("kernel not corrupted in the middle only")
	}
	gz, err := ReadFile(img, "initrd.gz")
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	cpio, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"init\x00", "bin/busybox\x00", "virtio_blk.ko\x00", "vfat.ko\x00", "ASR-DRILL-BOOTED"} {
		if !bytes.Contains(cpio, []byte(want)) {
			t.Errorf("initramfs lacks %q", want)
		}
	}
}
