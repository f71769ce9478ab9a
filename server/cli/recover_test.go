package cli

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server"
)

// asr recover through the server writes a mostly empty disk as a sparse
// image equal to the disk; a second recovery into the same --out is
// refused (the image untouched) unless --force.
func TestRecoverSparseAndRefusesToOverwrite(t *testing.T) {
	srv, conn := startServer(t)
	with := func(args ...string) []string { return append(args, conn...) }
	dir := t.TempDir()
	const size = 32 << 20
	img := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 { // a 4 KiB block of data per MiB
		copy(img[off+off>>20*4096:], bytes.Repeat([]byte("data"), 1024))
	}
	disk := filepath.Join(dir, "d0.img")
	if err := os.WriteFile(disk, img, 0o600); err != nil {
		t.Fatal(err)
	}
	agent.Version, server.Version = "test", "test"
	a, err := agent.New(context.Background(), agent.Config{Server: srv.URL(), PassphraseFile: filepath.Join(conn[3], server.PassphraseFile),
		StateDir: filepath.Join(dir, "agent"), Name: "vm1", Disks: []agent.DiskSpec{{Name: "d0", Path: disk}},
		NBD: "unix:" + filepath.Join(dir, "vm1.sock"), CrashInterval: time.Hour, SpoolMax: 16 << 20,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; a.Close() })
	mustRun(t, with("tag", "--machine", "vm1", "--wait")...)

	out := filepath.Join(dir, "out")
	mustRun(t, with("recover", "--machine", "vm1", "--out", out)...)
	path := filepath.Join(out, "d0.img")
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, img) {
		t.Fatal("the recovered image differs from the disk")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if alloc := st.Blocks * 512; alloc > size/8 {
		t.Fatalf("%d bytes allocated for a %d-byte image with %d bytes of data: want holes", alloc, size, size>>20*4096)
	}

	// Again: refused, nothing changed.
	if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustFail(t, path+" exists", with("recover", "--machine", "vm1", "--out", out)...)
	mustFail(t, path+" exists", with("recover", "--machine", "vm1", "--out", out, "--format", "vhd")...)
	if b, _ := os.ReadFile(path); string(b) != "keep me" {
		t.Fatalf("a refused recovery changed the image: %d bytes", len(b))
	}
	if ents, _ := os.ReadDir(out); len(ents) != 1 {
		t.Fatalf("a refused recovery left files: %v", ents)
	}
	r := runCLI(t, with("recover", "--machine", "vm1", "--out", out, "--force")...)
	if r.code != 0 {
		t.Fatalf("recover --force: exit %d: %s", r.code, r.stderr)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, img) {
		t.Fatal("recover --force did not replace the image")
	}
	if strings.ContainsAny(r.stderr, "\r\033") {
		t.Errorf("a progress bar off a terminal: %q", r.stderr)
	}
}

// The check every recovery path runs first (through the server, from the
// target, a group's members): an image it would write that exists is
// refused, unless --force; a VHD recovery also minds the .vhd.
func TestRefuseOverwrite(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "d1.vhd"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		disks  []string
		format string
		force  bool
		want   string
	}{
		{[]string{"d0", "d1"}, "raw", false, ""},
		{[]string{"d0", "d1"}, "vhd", false, "d1.vhd exists"},
		{[]string{"d0", "d1"}, "vhd", true, ""},
		{[]string{"d0"}, "vhd", false, ""},
	} {
		err := refuseOverwrite(dir, tc.disks, tc.format, tc.force)
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("refuseOverwrite(%v, %s, force %v) = %v, want %q", tc.disks, tc.format, tc.force, err, tc.want)
		}
	}
	// A missing --out is no image at all.
	if err := refuseOverwrite(filepath.Join(dir, "none"), []string{"d0"}, "raw", false); err != nil {
		t.Error(err)
	}
}
