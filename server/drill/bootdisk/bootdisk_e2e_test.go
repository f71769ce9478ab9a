//go:build e2e

package bootdisk

// The tests that need the peers a boot disk is made with (mtools,
// syslinux, the cloud kernel, cpio): make test installs them; missing, a
// test fails.

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

// TestCPIOListed: cpio itself lists the archive's entries.
func TestCPIOListed(t *testing.T) {
	b := testArchive(t)
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Fatal("cpio is not installed: run scripts/install-peers.sh (make peers)")
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
			t.Fatalf("%s is not installed: run scripts/install-peers.sh (make peers)", tool)
		}
	}
	if ks, _ := filepath.Glob("/boot/vmlinuz-*"); len(ks) == 0 {
		t.Fatal("no kernel in /boot: install linux-image-cloud-amd64 (make peers)")
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
