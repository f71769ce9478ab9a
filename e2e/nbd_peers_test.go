//go:build e2e

package e2e

// These tests check the agent's NBD server against the real NBD peers a
// protected guest or an operator uses: qemu (qemu-io, qemu-img), libnbd
// (nbdinfo, nbdcopy), fio's nbd engine, and nbdkit as a server for the Go
// client. A missing tool fails the test: skipping would hide that the
// interoperability was never checked.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/agent/nbd"
)

// nbdPeerPackages says which Debian package brings each tool.
var nbdPeerPackages = map[string]string{
	"qemu-io":  "qemu-utils",
	"qemu-img": "qemu-utils",
	"nbdinfo":  "libnbd-bin",
	"nbdcopy":  "libnbd-bin",
	"fio":      "fio",
	"nbdkit":   "nbdkit",
}

func nbdPeerTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is required for this test but is not installed: install it (apt-get install %s)", name, nbdPeerPackages[name])
	}
	return p
}

// nbdPeerRun runs a tool and returns its standard output, failing the test
// with all output if it exits non-zero.
func nbdPeerRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := contain(exec.CommandContext(ctx, nbdPeerTool(t, name), args...))
	cmd.Dir = t.TempDir() // for whatever the tool leaves behind
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	out := stdout.String()
	t.Logf("%s %s:\n%s", name, strings.Join(args, " "), nbdPeerTruncate(out))
	if s := stderr.String(); s != "" {
		t.Logf("%s stderr:\n%s", name, nbdPeerTruncate(s))
	}
	return out
}

func nbdPeerTruncate(s string) string {
	const limit = 8 << 10
	if len(s) > limit {
		return s[:limit] + "\n[...]"
	}
	return s
}

// nbdPeerDisk is a file-backed export named "disk" served in-process.
type nbdPeerDisk struct {
	path string // backing file
	uri  string // NBD URI of the export
	addr string // address for nbd.Dial
}

// nbdPeerServe serves a zero-filled file of the given size as export
// "disk", on a unix socket or, with tcp set, on a 127.0.0.1 port.
func nbdPeerServe(t *testing.T, size int64, tcp bool) nbdPeerDisk {
	t.Helper()
	dir := t.TempDir()
	if len(dir) > 80 { // keep the socket path within sun_path
		var err error
		if dir, err = os.MkdirTemp("", "nbdpeer"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	path := filepath.Join(dir, "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	backend, err := nbd.NewFileBackend(f)
	if err != nil {
		t.Fatal(err)
	}

	var d nbdPeerDisk
	d.path = path
	if tcp {
		d.addr = "127.0.0.1:0"
	} else {
		sock := filepath.Join(dir, "nbd.sock")
		d.addr = "unix:" + sock
		d.uri = "nbd+unix:///disk?socket=" + sock
	}
	l, err := nbd.Listen(d.addr)
	if err != nil {
		t.Fatal(err)
	}
	if tcp {
		d.addr = l.Addr().String()
		d.uri = "nbd://" + d.addr + "/disk"
	}

	srv := &nbd.Server{
		Lookup: func(name string) (nbd.Backend, bool) {
			if name == "disk" {
				return backend, true
			}
			return nil, false
		},
		List:   func() []string { return []string{"disk"} },
		Logger: slog.New(slog.NewTextHandler(nbdPeerLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("nbd Serve: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("nbd Serve did not stop")
		}
	})
	return d
}

// nbdPeerLogWriter sends server logs to the test log.
type nbdPeerLogWriter struct{ t *testing.T }

func (w nbdPeerLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func nbdPeerSHA256(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func nbdPeerReadFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func nbdPeerExpectBytes(t *testing.T, file []byte, off, n int, want byte) {
	t.Helper()
	for i := off; i < off+n; i++ {
		if file[i] != want {
			t.Fatalf("backing file byte %d = %#x, want %#x", i, file[i], want)
		}
	}
}

func TestNBDPeerNbdinfo(t *testing.T) {
	t.Parallel()
	const size = 48 << 20
	for _, tcp := range []bool{false, true} {
		t.Run(fmt.Sprintf("tcp=%v", tcp), func(t *testing.T) {
			d := nbdPeerServe(t, size, tcp)
			out := nbdPeerRun(t, "nbdinfo", "--json", d.uri)
			var info struct {
				Exports []struct {
					Name          string `json:"export-name"`
					Size          int64  `json:"export-size"`
					CanFlush      bool   `json:"can_flush"`
					CanFUA        bool   `json:"can_fua"`
					CanTrim       bool   `json:"can_trim"`
					CanZero       bool   `json:"can_zero"`
					CanMultiConn  bool   `json:"can_multi_conn"`
					IsReadOnly    bool   `json:"is_read_only"`
					BlockSizeMin  int64  `json:"block_size_minimum"`
					BlockSizePref int64  `json:"block_size_preferred"`
					BlockSizeMax  int64  `json:"block_size_maximum"`
				} `json:"exports"`
			}
			if err := json.Unmarshal([]byte(out), &info); err != nil {
				t.Fatalf("nbdinfo output: %v\n%s", err, out)
			}
			if len(info.Exports) != 1 {
				t.Fatalf("nbdinfo found %d exports:\n%s", len(info.Exports), out)
			}
			e := info.Exports[0]
			if e.Size != size {
				t.Fatalf("nbdinfo export-size = %d, want %d\n%s", e.Size, size, out)
			}
			if !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.CanMultiConn || e.IsReadOnly {
				t.Errorf("nbdinfo capabilities wrong:\n%s", out)
			}
			if e.BlockSizeMin != 1 || e.BlockSizePref != 4096 || e.BlockSizeMax != 32<<20 {
				t.Errorf("nbdinfo block sizes %d/%d/%d, want 1/4096/%d", e.BlockSizeMin, e.BlockSizePref, e.BlockSizeMax, 32<<20)
			}

			// NBD_OPT_LIST, then NBD_OPT_INFO for each listed export.
			list := nbdPeerRun(t, "nbdinfo", "--list", "--json", d.uri)
			if !strings.Contains(list, `"export-name": "disk"`) {
				t.Errorf("nbdinfo --list does not show the export:\n%s", list)
			}
		})
	}
}

func TestNBDPeerQemuIO(t *testing.T) {
	t.Parallel()
	const size = 16 << 20
	d := nbdPeerServe(t, size, false)
	out := nbdPeerRun(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 0 1M",
		"-c", "write -f -P 0xcd 1M 64k", // FUA
		"-c", "write -P 0x11 3M 1M",
		"-c", "write -z 3M 512k", // NBD_CMD_WRITE_ZEROES
		"-c", "write -P 0x5a 4097 3", // unaligned
		"-c", "aio_write -P 0x77 8M 256k",
		"-c", "aio_write -P 0x78 9M 256k",
		"-c", "aio_flush",
		"-c", "discard 12M 1M",
		"-c", "flush",
		"-c", "read -P 0xab 0 4097",
		"-c", "read -P 0x5a 4097 3",
		"-c", "read -P 0xab 4100 1044476",
		"-c", "read -P 0xcd 1M 64k",
		"-c", "read -P 0 3M 512k",
		"-c", "read -P 0x11 3584k 512k",
		"-c", "read -P 0x77 8M 256k",
		"-c", "read -P 0x78 9M 256k",
		d.uri)
	for _, bad := range []string{"failed", "error", "Error", "mismatch"} {
		if strings.Contains(out, bad) {
			t.Fatalf("qemu-io reported %q:\n%s", bad, out)
		}
	}

	file := nbdPeerReadFile(t, d.path)
	nbdPeerExpectBytes(t, file, 0, 4097, 0xab)
	nbdPeerExpectBytes(t, file, 4097, 3, 0x5a)
	nbdPeerExpectBytes(t, file, 4100, 1<<20-4100, 0xab)
	nbdPeerExpectBytes(t, file, 1<<20, 64<<10, 0xcd)
	nbdPeerExpectBytes(t, file, 3<<20, 512<<10, 0)
	nbdPeerExpectBytes(t, file, 3<<20+512<<10, 512<<10, 0x11)
	nbdPeerExpectBytes(t, file, 8<<20, 256<<10, 0x77)
	nbdPeerExpectBytes(t, file, 9<<20, 256<<10, 0x78)

	info := nbdPeerRun(t, "qemu-img", "info", "--output=json", d.uri)
	var img struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(info), &img); err != nil || img.VirtualSize != size {
		t.Fatalf("qemu-img info virtual-size = %d (%v):\n%s", img.VirtualSize, err, info)
	}
	nbdPeerRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", d.path, d.uri)
}

func TestNBDPeerQemuIOTCP(t *testing.T) {
	t.Parallel()
	d := nbdPeerServe(t, 4<<20, true)
	out := nbdPeerRun(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0x42 512k 1M", "-c", "read -P 0x42 512k 1M", d.uri)
	if strings.Contains(out, "failed") || strings.Contains(out, "mismatch") {
		t.Fatalf("qemu-io over TCP:\n%s", out)
	}
	nbdPeerExpectBytes(t, nbdPeerReadFile(t, d.path), 512<<10, 1<<20, 0x42)
}

func TestNBDPeerNbdcopy(t *testing.T) {
	t.Parallel()
	const size = 32 << 20
	d := nbdPeerServe(t, size, false)

	// Random data with an all-zero stretch, which nbdcopy may send as
	// NBD_CMD_WRITE_ZEROES instead of data. Fill the export first so the
	// zeroes have something to overwrite.
	src := filepath.Join(t.TempDir(), "src.img")
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	clear(data[8<<20 : 12<<20])
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := nbd.Dial(context.Background(), d.addr, "disk")
	if err != nil {
		t.Fatal(err)
	}
	junk := bytes.Repeat([]byte{0xff}, size)
	if err := c.WriteAt(junk, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	nbdPeerRun(t, "nbdcopy", src, d.uri)
	if got, want := nbdPeerSHA256(t, d.path), nbdPeerSHA256(t, src); got != want {
		t.Fatalf("backing file sha256 %s, source %s", got, want)
	}

	// And back out again, over several connections.
	dst := filepath.Join(t.TempDir(), "dst.img")
	nbdPeerRun(t, "nbdcopy", "--connections=4", d.uri, dst)
	if got, want := nbdPeerSHA256(t, dst), nbdPeerSHA256(t, src); got != want {
		t.Fatalf("copied-out sha256 %s, source %s", got, want)
	}
}

func TestNBDPeerFio(t *testing.T) {
	t.Parallel()
	d := nbdPeerServe(t, 64<<20, false)
	out := nbdPeerRun(t, "fio", "--thread",
		"--name=randwrite-verify",
		"--ioengine=nbd",
		"--uri="+d.uri,
		"--rw=randwrite",
		"--bs=4k",
		"--iodepth=8",
		"--size=64M",
		"--verify=crc32c",
		"--verify_fatal=1",
		"--verify_state_save=0",
		"--output-format=json",
	)
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
		} `json:"jobs"`
	}
	// fio may print notes before the JSON document.
	start := strings.Index(out, "{")
	if start < 0 {
		t.Fatalf("fio printed no JSON:\n%s", out)
	}
	if err := json.Unmarshal([]byte(out[start:]), &res); err != nil {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	if len(res.Jobs) != 1 {
		t.Fatalf("fio ran %d jobs:\n%s", len(res.Jobs), out)
	}
	j := res.Jobs[0]
	if j.Error != 0 {
		t.Fatalf("fio job error %d:\n%s", j.Error, out)
	}
	if j.Write.IOBytes != 64<<20 {
		t.Fatalf("fio wrote %d bytes, want %d", j.Write.IOBytes, 64<<20)
	}
	if j.Read.IOBytes != 64<<20 {
		t.Fatalf("fio verified %d bytes, want %d", j.Read.IOBytes, 64<<20)
	}
}

// TestNBDPeerClientAgainstNbdkit checks the Go client against a server it
// was not written with.
func TestNBDPeerClientAgainstNbdkit(t *testing.T) {
	t.Parallel()
	nbdkit := nbdPeerTool(t, "nbdkit")
	sock := filepath.Join(t.TempDir(), "kit.sock")
	ctx, cancel := context.WithCancel(context.Background())
	cmd := contain(exec.CommandContext(ctx, nbdkit, "--foreground", "--unix", sock, "--exportname", "disk", "memory", "size=8M"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
	})
	deadline := time.Now().Add(hungAfter)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdkit did not start: %v\n%s", err, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}

	c, err := nbd.Dial(ctx, "unix:"+sock, "disk")
	if err != nil {
		t.Fatalf("Dial nbdkit: %v\n%s", err, stderr.String())
	}
	defer c.Close()
	if c.Size() != 8<<20 {
		t.Fatalf("size %d", c.Size())
	}
	p := bytes.Repeat([]byte("nbdkit"), 100000)
	if err := c.WriteAtFUA(p, 12345); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteZeroes(12345+1000, 2000); err != nil {
		t.Fatal(err)
	}
	clear(p[1000:3000])
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if err := c.ReadAt(got, 12345); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, p) {
		t.Fatal("read back from nbdkit differs")
	}
	if err := c.ReadAt(make([]byte, 2), 8<<20-1); err == nil {
		t.Fatal("nbdkit accepted a read past the end")
	}
}
