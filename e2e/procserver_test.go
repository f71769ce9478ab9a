//go:build e2e

package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// processServer is GET /api/v1/process-server as `asr status
// --process-server --json` prints it.
type processServer struct {
	BacklogBytes int64   `json:"backlog_bytes"`
	UploadRate   float64 `json:"upload_rate"`
	Compression  float64 `json:"compression"`
	CacheFree    float64 `json:"cache_free"`
	CacheState   string  `json:"cache_state"`
}

// waitBacklog waits until the process server's backlog satisfies ok (a
// state that holds once reached; the timeout only ends a hung run).
func (c *cluster) waitBacklog(what string, ok func(int64) bool) processServer {
	c.t.Helper()
	deadline := time.Now().Add(hungAfter)
	for {
		ps := c.processServer()
		if ok(ps.BacklogBytes) {
			return ps
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("process server %+v; waited for: %s\n%s", ps, what, c.server.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *cluster) processServer() processServer {
	c.t.Helper()
	var ps processServer
	if err := json.Unmarshal([]byte(c.mustCLI("status", "--process-server", "--json")), &ps); err != nil {
		c.t.Fatal(err)
	}
	return ps
}

// mountTmpfs mounts a file system of the given size (e.g. "256m") at dir.
func mountTmpfs(t *testing.T, dir, size string) {
	t.Helper()
	os.MkdirAll(dir, 0o700)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount a small file system (needs root): %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
}

// fillFSTo writes a filler file at path until the file system has about
// leave bytes free.
func fillFSTo(t *testing.T, path string, leave uint64) {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(filepath.Dir(path), &st); err != nil {
		t.Fatal(err)
	}
	free := st.Bavail * uint64(st.Bsize)
	if free <= leave {
		t.Fatalf("only %d bytes free, want to leave %d", free, leave)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for n := (free - leave) >> 20; n > 0; n-- {
		if _, err := f.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
}

// TestE2ECacheDiskCritical: the process server's cache disk is under 25%
// free and the target takes nothing (so nothing drains): the console and
// API show it critical, an event says so, the cache stops taking data at
// 64 MiB (the agent spools the rest) instead of filling its disk, and once
// there is room again everything drains and the replica is bit-exact.
func TestE2ECacheDiskCritical(t *testing.T) {
	t.Parallel()
	c := &cluster{t: t, dir: t.TempDir(), agents: map[string]*agentProc{}}
	c.srvDir = filepath.Join(c.dir, "srv")
	tgt := filepath.Join(c.dir, "target")
	mountTmpfs(t, c.srvDir, "512m")
	mountTmpfs(t, tgt, "1500m")
	c.listen = "127.0.0.1:" + freePort(t)
	c.dataPort = freePort(t)
	c.serverArgs = []string{"--target", "file://" + tgt}
	c.startServer()
	disk := filepath.Join(c.dir, "d.img")
	makeRandomDisk(t, disk, 256<<20, 31)
	a := c.startAgent("vm1", []string{"--spool-max", "512MiB"}, "d="+disk)
	c.waitState("vm1", "protected", 2*time.Minute)
	if ps := c.processServer(); ps.CacheState != "ok" || ps.Compression <= 0 {
		t.Fatalf("before: %+v", ps)
	}

	fillFS(t, filepath.Join(tgt, "filler"))                 // nothing drains
	fillFSTo(t, filepath.Join(c.srvDir, "filler"), 100<<20) // under 20% of 512 MiB free
	// The disk is sampled every second; the deadline only ends a hung run.
	deadline := time.Now().Add(hungAfter)
	for c.processServer().CacheState != "critical" {
		if time.Now().After(deadline) {
			t.Fatalf("cache disk not critical: %+v", c.processServer())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if ev := c.mustCLI("events"); !strings.Contains(ev, "cache-critical") {
		t.Fatalf("no cache-critical event:\n%s", ev)
	}
	// 160 MiB of incompressible writes: more than the cache disk holds.
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -s "+randomFile(t, c.dir, 160<<20, 32)+" 32M 160M")
	// The cache takes data up to its 64 MiB (nothing drains: the target is
	// full) and then stops reading; a state that holds.
	c.waitBacklog("the cache filled up to its limit on a critical disk", func(n int64) bool { return n > 64<<20 })
	// A broken limit would let the backlog grow on from there: give it a
	// moment to show. (A working one holds it however long this takes.)
	time.Sleep(2 * time.Second)
	ps := c.processServer()
	if ps.BacklogBytes > 80<<20 || ps.CacheState != "critical" {
		t.Fatalf("the cache took %d bytes on a critical disk (state %s)", ps.BacklogBytes, ps.CacheState)
	}
	t.Logf("critical: the cache holds %d bytes; the agent spools the rest", ps.BacklogBytes)

	os.Remove(filepath.Join(c.srvDir, "filler"))
	os.Remove(filepath.Join(tgt, "filler"))
	deadline = time.Now().Add(hungAfter)
	for {
		ps := c.processServer()
		st := c.status("vm1")
		if ps.CacheState == "ok" && ps.BacklogBytes == 0 && st.State == "protected" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("did not drain: %+v %+v", ps, st)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if ev := c.mustCLI("events"); !strings.Contains(ev, "cache-ok") {
		t.Fatalf("no event when the cache disk had room again:\n%s", ev)
	}
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
}

// randomFile makes a file of size incompressible bytes in dir.
func randomFile(t *testing.T, dir string, size int64, seed uint64) string {
	t.Helper()
	path := filepath.Join(dir, "random.bin")
	makeRandomDisk(t, path, size, seed)
	return path
}
