//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestE2EReplicateRecoverBitExact: registration, initial replication while
// qemu-io and fio write through the splitter, then at quiesced moments a
// point is tagged and the sources' sha256 recorded; every point recovered
// later (through the server, and from the target alone with the server gone)
// has exactly those bytes.
func TestE2EReplicateRecoverBitExact(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	replicateRecoverBitExact(t, c, "file://"+filepath.Join(c.srvDir, "target"))
}

// TestE2EAzureReplicateRecoverBitExact: the same with the replicas and the
// catalog in Azure Blob Storage (a real Azurite).
func TestE2EAzureReplicateRecoverBitExact(t *testing.T) {
	t.Parallel()
	c, _, target := azureCluster(t)
	replicateRecoverBitExact(t, c, target)
}

func replicateRecoverBitExact(t *testing.T, c *cluster, target string) {
	d0, d1 := filepath.Join(c.dir, "d0.img"), filepath.Join(c.dir, "d1.img")
	makeDisk(t, d0, 96<<20, 1)
	makeDisk(t, d1, 64<<20, 2)
	a := c.startAgent("vm1", nil, "d0="+d0, "d1="+d1)

	// Writes during the initial copy.
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d0"),
		"-c", "write -P 0x5a 1M 4M", "-c", "write -z 40M 2M", "-c", "aio_write -P 0x11 90M 64k", "-c", "aio_flush",
		"-c", "discard 20M 1M", "-c", "write -P 0x7e 95M 512")
	fio := func(disk string, size string, seed int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
		defer cancel()
		out, err := runTool(ctx, t, "fio", "--name=w", "--ioengine=nbd", "--uri="+a.uri(disk), "--rw=randwrite",
			"--bs=4k", "--iodepth=8", "--size="+size, "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
			fmt.Sprintf("--randseed=%d", seed), "--output-format=json")
		if err != nil {
			t.Fatalf("fio on %s: %v\n%s", disk, err, out)
		}
		var res struct {
			Jobs []struct {
				Error int `json:"error"`
			} `json:"jobs"`
		}
		if i := strings.Index(out, "{"); i >= 0 {
			json.Unmarshal([]byte(out[i:]), &res)
		}
		if len(res.Jobs) == 0 || res.Jobs[0].Error != 0 {
			t.Fatalf("fio on %s reported errors:\n%s", disk, out)
		}
	}
	fio("d1", "16M", 1)
	// nbdinfo sees each export at its size; nbdcopy writes a file in.
	info := nbdPeerRun(t, "nbdinfo", "--json", a.uri("d1"))
	if !strings.Contains(info, fmt.Sprintf(`"export-size": %d`, 64<<20)) {
		t.Fatalf("nbdinfo of d1:\n%s", info)
	}
	src := filepath.Join(c.dir, "copy-in.img")
	makeDisk(t, src, 8<<20, 77)
	nbdPeerRun(t, "nbdcopy", src, a.uri("d1"))
	c.waitState("vm1", "protected", 3*time.Minute)

	type point struct {
		id   string
		sums map[string]string
	}
	var points []point
	for round := 0; round < 3; round++ {
		nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d0"),
			"-c", fmt.Sprintf("write -P 0x%02x %dM 3M", 0x20+round, 10+round*7),
			"-c", fmt.Sprintf("write -P 0x%02x %dk 4k", 0x40+round, 1000+round*333))
		fio("d1", "8M", 10+round)
		id := c.tag("vm1")
		points = append(points, point{id, map[string]string{"d0": sha256File(t, d0), "d1": sha256File(t, d1)}})
	}
	fio("d1", "8M", 99) // later writes must not leak into the points
	for _, p := range points {
		c.recoverAndCheck("vm1", p.id, p.sums)
	}
	// The newest point holds those writes too. A point tagged now, with
	// nothing written after it: the policy's scheduled crash-consistent
	// points (every 5 minutes, which a loaded run reaches) may come before
	// or after it, and "latest" must hold the same bytes either way.
	last := point{c.tag("vm1"), map[string]string{"d0": sha256File(t, d0), "d1": sha256File(t, d1)}}
	// The points as listed.
	var listed []struct{ ID, Time, Kind string }
	if err := json.Unmarshal([]byte(c.mustCLI("points", "--machine", "vm1", "--json")), &listed); err != nil || len(listed) < 3 {
		t.Fatalf("points --json: %v %v", listed, err)
	}
	for _, l := range listed {
		if _, err := time.Parse(time.RFC3339, l.Time); err != nil || l.Kind != "crash" || l.ID == "" {
			t.Fatalf("listed point %+v", l)
		}
	}

	// The on-premises site is gone: only the target and the passphrase.
	a.stop()
	c.server.stop()
	pass := filepath.Join(c.dir, "pass-copy")
	b, _ := os.ReadFile(filepath.Join(c.srvDir, "passphrase"))
	os.WriteFile(pass, b, 0o600)
	out, err := c.asr("points", "--machine", "vm1", "--target", target, "--passphrase-file", pass, "--json")
	if err != nil || !strings.Contains(out, points[2].id) {
		t.Fatalf("offline points: %v\n%s", err, out)
	}
	for _, p := range points {
		c.recoverAndCheck("vm1", p.id, p.sums, "--target", target, "--passphrase-file", pass)
	}
	c.recoverAndCheck("vm1", "latest", last.sums, "--target", target, "--passphrase-file", pass)
	// A wrong passphrase opens nothing.
	os.WriteFile(pass, []byte("wrong"), 0o600)
	if _, err := c.asr("points", "--machine", "vm1", "--target", target, "--passphrase-file", pass); err == nil ||
		!strings.Contains(err.Error(), "wrong vault passphrase") {
		t.Fatalf("wrong passphrase: %v", err)
	}
}

// TestE2EWrongPassphrase: the agent exits non-zero with a clear message and
// nothing is registered.
func TestE2EWrongPassphrase(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeDisk(t, disk, 4<<20, 1)
	bad := filepath.Join(c.dir, "bad")
	os.WriteFile(bad, []byte("guess\n"), 0o600)
	out, err := runAsr("agent", "--server", c.url(), "--passphrase-file", bad, "--state", filepath.Join(c.dir, "st"),
		"--name", "vm1", "--disk", "d="+disk, "--nbd", "unix:"+filepath.Join(c.dir, "s.sock"))
	if err == nil || !strings.Contains(err.Error(), "wrong vault passphrase") {
		t.Fatalf("agent with a wrong passphrase: err=%v out=%s", err, out)
	}
	if s := c.mustCLI("status"); strings.Contains(s, "vm1") {
		t.Fatalf("a machine was registered:\n%s", s)
	}
}

// TestE2EInitialDecodedOnce: the initial copy of a mixed disk through the
// real binary; the process server's applier takes the records its
// connection's reader decoded and checked (the hand-off: each frame
// decoded once) instead of decoding the cached segments again, and the
// first point recovers bit-exact. The server logs how many frames it took
// (hits) and decoded again (misses) when it stops, and how many segments
// it applied from the hand-off alone, their files never read (whole: the
// initial copy's, before the first point).
func TestE2EInitialDecodedOnce(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeDisk(t, disk, 48<<20, 3)
	c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", 3*time.Minute)
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	c.server.stop()
	b, err := os.ReadFile(c.server.log)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`took from the reader's decode.* hits=(\d+) misses=(\d+)`).FindSubmatch(b)
	if m == nil {
		t.Fatal("the server did not log its hand-off's hits and misses when it stopped")
	}
	hits, _ := strconv.Atoi(string(m[1]))
	misses, _ := strconv.Atoi(string(m[2]))
	if hits == 0 {
		t.Fatalf("no frame of the initial copy was taken from the reader's decode (%d decoded again from the cache)", misses)
	}
	w := regexp.MustCompile(`took from the reader's decode.* whole=(\d+)`).FindSubmatch(b)
	if w == nil || string(w[1]) == "0" {
		t.Fatalf("no segment of the initial copy applied without reading its file: %q", w)
	}
	t.Logf("frames taken from the reader's decode: %d; decoded again from the cache: %d; segments applied without reading their file: %s", hits, misses, w[1])
}

// TestE2EKillAgentDuringInitial: kill -9 of the agent halfway through the
// initial copy; after a restart the copy resumes (the server received less
// than 1.2 x the disk size in all) and the latest point equals the source.
func TestE2EKillAgentDuringInitial(t *testing.T) {
	t.Parallel()
	c, gate := gatedCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	const size = 96 << 20
	makeRandomDisk(t, disk, size, 5)
	// The gate lets 40% of the disk (incompressible) through, then holds:
	// the kill lands mid-copy however fast or slow the copy runs.
	gate.allow(size * 2 / 5)
	a := c.startAgent("vm1", nil, "d="+disk)
	st := c.waitStatus("vm1", "the server applied 30% of the copy", func(st machineStatus) bool { return st.copying(0.3) })
	a.kill()
	t.Logf("killed the agent at %.0f%% (applied on the server; %d bytes let through)", st.Progress*100, gate.sent())
	gate.release()
	c.startAgent("vm1", nil)
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x33 7M 1M")
	c.waitState("vm1", "protected", 3*time.Minute)
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	st = c.status("vm1")
	if limit := int64(size) * 6 / 5; st.BytesReceived >= limit {
		t.Fatalf("server received %d bytes for a %d-byte disk: the copy restarted instead of resuming", st.BytesReceived, size)
	}
	t.Logf("bytes received: %d for a %d-byte disk (%.2fx)", st.BytesReceived, size, float64(st.BytesReceived)/size)
}

// TestE2EKillServerDuringInitial: kill -9 of the server in the middle of
// the initial copy, with acknowledged base data in its cache; after the
// restart the copy goes on (not from zero) and the first point recovers
// bit-exact. The target keeps no segment of the log before that point:
// the initial copy is stored once, as the replica (issue 13).
func TestE2EKillServerDuringInitial(t *testing.T) {
	t.Parallel()
	c, gate := gatedCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	const size = 96 << 20
	makeRandomDisk(t, disk, size, 7)
	gate.allow(size * 2 / 5)
	a := c.startAgent("vm1", nil, "d="+disk)
	st := c.waitStatus("vm1", "the server applied 30% of the copy", func(st machineStatus) bool { return st.copying(0.3) })
	c.server.kill()
	t.Logf("killed the server at %.0f%% of the copy applied (%d bytes let through)", st.Progress*100, gate.sent())
	gate.release()
	c.startServer()
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x44 9M 1M")
	c.waitState("vm1", "protected", 3*time.Minute)
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	if sent := gate.sent(); sent >= size*6/5 {
		t.Fatalf("the agent sent %d bytes for a %d-byte disk: the copy restarted instead of resuming", sent, size)
	}
	var pointSeq uint64
	if _, err := fmt.Sscan(id, &pointSeq); err != nil {
		t.Fatalf("point id %q: %v", id, err)
	}
	segs, err := filepath.Glob(filepath.Join(c.srvDir, "target", "objects", "machines", "*", "segments", "*.seg"))
	if err != nil {
		t.Fatal(err)
	}
	for _, sg := range segs {
		var first, last uint64
		if _, err := fmt.Sscanf(filepath.Base(sg), "%016x-%016x.", &first, &last); err != nil {
			t.Fatalf("segment name %s: %v", sg, err)
		}
		if last < pointSeq {
			t.Fatalf("segment %s, wholly before the first point (seq %d), is kept on the target", filepath.Base(sg), pointSeq)
		}
	}
}

// TestE2EKillDuringDelta: kill -9 of the agent, then of the server, while
// fio writes through the splitter; after restarts the latest point equals
// the source and nothing was sent again from zero.
func TestE2EKillDuringDelta(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	const size = 128 << 20
	makeRandomDisk(t, disk, size, 6)
	a := c.startAgent("vm1", nil, "d="+disk)
	initial := c.waitState("vm1", "protected", 3*time.Minute).BytesReceived
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute) // fio runs 4 s at a time
	defer cancel()
	written := int64(0)
	fioRun := func(ctx context.Context, seconds int, seed int) *background {
		var bg background
		bg.run(func() error {
			_, err := runTool(ctx, t, "fio", "--name=w", "--ioengine=nbd", "--uri="+a.uri("d"), "--rw=randwrite",
				"--bs=4k", "--iodepth=4", "--size=64M", "--time_based", fmt.Sprintf("--runtime=%d", seconds),
				"--rate=8m", fmt.Sprintf("--randseed=%d", seed))
			return err
		})
		written += int64(seconds) * 8 << 20
		return &bg
	}

	// Agent killed under load: fio loses its NBD server and hangs in
	// libnbd, so it is stopped too (as the guest's I/O would be).
	fctx, stopFio := context.WithCancel(ctx)
	bg := fioRun(fctx, 4, 1)
	c.waitReceived("vm1", initial+1<<20) // fio's writes are flowing
	a.kill()
	stopFio()
	bg.wait()
	c.startAgent("vm1", nil)
	// Server killed under load: the agent spools and resends from the last ack.
	from := c.status("vm1").BytesReceived
	bg = fioRun(ctx, 4, 2)
	c.waitReceived("vm1", from+1<<20)
	c.server.kill()
	time.Sleep(500 * time.Millisecond)
	c.startServer()
	if err := bg.wait(); err != nil {
		t.Fatalf("fio failed while only the server was killed: %v", err)
	}
	c.waitState("vm1", "protected", time.Minute)
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	// After the initial copy only the churn (and what was resent after
	// the kills) travels; a copy restarted from zero would add the whole
	// (incompressible) disk again.
	delta := c.status("vm1").BytesReceived - initial
	if limit := written*6/5 + 16<<20; delta >= limit {
		t.Fatalf("server received %d bytes after the initial copy for %d bytes of writes", delta, written)
	}
	t.Logf("bytes received: %d for the initial copy of %d bytes, %d since for %d bytes of writes", initial, size, delta, written)
}

// TestE2ECompressionWhereTold: an agent run with --compress=false sends its
// changes plain (its frames on the wire as large as its records) and the
// process server compresses them before its cache; an agent by default
// sends its initial copy in S2 (the server's Welcome lists it) and its
// changes in zstd; with --compression s2 its changes go in S2 too. Every
// machine's point is recovered bit-exact.
func TestE2ECompressionWhereTold(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	type run struct {
		name    string
		extra   []string
		changes string // the codec of the changes' frames: "", "zstd" or "s2"
	}
	type stats struct {
		RawSent    int64 `json:"raw_sent"`
		BytesSent  int64 `json:"bytes_sent"`
		Frames     int64 `json:"frames"`
		FramesZstd int64 `json:"frames_zstd"`
		FramesS2   int64 `json:"frames_s2"`
	}
	for _, r := range []run{{"plain", []string{"--compress=false"}, ""}, {"auto", nil, "zstd"}, {"s2", []string{"--compression", "s2"}, "s2"}} {
		// 8 MiB of text-like data for the initial copy, the rest zeros.
		disk := filepath.Join(c.dir, r.name+".img")
		text := bytes.Repeat([]byte("the replica of disk block 42 journal recovery point\n"), 8<<20/52+1)[:8<<20]
		if err := os.WriteFile(disk, text, 0o644); err != nil || os.Truncate(disk, 32<<20) != nil {
			t.Fatal("make the disk:", err)
		}
		a := c.startAgent(r.name, r.extra, "d0="+disk)
		c.waitState(r.name, "protected", 3*time.Minute)
		read := func(min int64) stats {
			var st stats
			deadline := time.Now().Add(hungAfter) // rewritten every second
			for st.RawSent < min {
				if time.Now().After(deadline) {
					t.Fatalf("%s: the agent's stats say %+v", r.name, st)
				}
				if b, err := os.ReadFile(filepath.Join(a.state, "stats.json")); err == nil {
					json.Unmarshal(b, &st)
				}
				time.Sleep(50 * time.Millisecond)
			}
			return st
		}
		copied := read(8 << 20)
		wantS2 := r.name != "plain" // the copy, by default and with s2
		if got := copied.FramesS2 > 0 && copied.FramesZstd == 0; got != wantS2 || (!wantS2 && copied.FramesS2+copied.FramesZstd != 0) {
			t.Fatalf("%s: the initial copy sent %+v: want S2 frames only %v", r.name, copied, wantS2)
		}
		// Highly compressible changes: 8 MiB of one byte.
		nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d0"), "-c", "write -P 0x33 4M 8M", "-c", "flush")
		id := c.tag(r.name)
		c.recoverAndCheck(r.name, id, map[string]string{"d0": sha256File(t, disk)})
		st := read(copied.RawSent + 8<<20)
		sent, raw := st.BytesSent-copied.BytesSent, st.RawSent-copied.RawSent
		if compressed := sent < raw/2; compressed != (r.changes != "") {
			t.Fatalf("%s: %d frame bytes for %d record bytes of changes sent: compressed on the agent %v, want %v", r.name, sent, raw, compressed, r.changes != "")
		}
		zstd, s2 := st.FramesZstd-copied.FramesZstd, st.FramesS2-copied.FramesS2
		if ok := map[string]bool{"": zstd+s2 == 0, "zstd": zstd > 0 && s2 == 0, "s2": s2 > 0 && zstd == 0}[r.changes]; !ok {
			t.Fatalf("%s: the changes went as %d zstd and %d S2 frames: want %q", r.name, zstd, s2, r.changes)
		}
		// The server's ratio is of what it cached: compressed either way.
		var ps struct {
			Compression float64 `json:"compression"`
		}
		if err := json.Unmarshal([]byte(c.mustCLI("status", "--process-server", "--json")), &ps); err != nil || ps.Compression < 2 {
			t.Fatalf("%s: the process server's compression %.2f (%v): want the cache compressed", r.name, ps.Compression, err)
		}
		a.stop()
	}
}
