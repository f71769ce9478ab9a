//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// resyncRow is a row of GET /machines/{m}/resync as the CLI prints it.
func (c *cluster) resyncDone(t *testing.T, machine string) (compared, sent int64) {
	t.Helper()
	out := c.mustCLI("events", "--machine", machine, "--json")
	var es []struct{ Kind, Message string }
	json.Unmarshal([]byte(out), &es)
	for _, e := range es { // newest first
		if e.Kind == "resync-done" {
			i := strings.Index(e.Message, "compared")
			fmt.Sscanf(e.Message[i:], "compared %d bytes, sent %d", &compared, &sent)
			return
		}
	}
	t.Fatalf("no resync-done event for %s:\n%s", machine, out)
	return
}

// waitReason waits until the machine needs a resync for a reason
// containing want.
func (c *cluster) waitReason(t *testing.T, machine, want string) machineStatus {
	t.Helper()
	deadline := time.Now().Add(hungAfter)
	for {
		st := c.status(machine)
		if st.State == "resync" && strings.Contains(st.Reason, want) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("machine %s: %+v, want a resync for %q\n%s", machine, st, want, c.server.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// writeBehind changes blocks of a disk file directly, behind the
// splitter's back (what a lost log leaves: the disk differs from the
// replica).
func writeBehind(t *testing.T, disk string, offs ...int64) {
	t.Helper()
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i, off := range offs {
		b := []byte(strings.Repeat(fmt.Sprintf("behind %d ", i), 512))[:4096]
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

// forcedShutdown crashes machine name: its agent is killed, writes at offs
// reach the disk but not the replication log, and the agent starts again
// after a reboot (another boot id in its state).
func (c *cluster) forcedShutdown(t *testing.T, a *agentProc, name, disk string, offs ...int64) *agentProc {
	t.Helper()
	a.kill()
	state := filepath.Join(a.state, "state.json")
	b, err := os.ReadFile(state)
	if err != nil {
		t.Fatal(err)
	}
	var st map[string]any
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	st["boot_id"] = "00000000-0000-0000-0000-000000000000"
	b, _ = json.Marshal(st)
	if err := os.WriteFile(state, b, 0o600); err != nil {
		t.Fatal(err)
	}
	writeBehind(t, disk, offs...)
	return c.startAgent(name, nil)
}

// guestWritesThenCrash makes writes as a guest whose machine goes down
// right after them: qemu-io in write-back mode (no FUA) killed after its
// writes, so it never flushes them. (A guest's flush makes its writes
// durable: the activity log then forgets their extents, and a crash after
// it puts nothing at risk.)
func guestWritesThenCrash(t *testing.T, uri string, writes ...string) {
	t.Helper()
	args := []string{"-f", "raw", "-t", "writeback", uri}
	for _, w := range writes {
		args = append(args, "-c", w)
	}
	args = append(args, "-c", "sigraise 9")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := contain(exec.CommandContext(ctx, nbdPeerTool(t, "qemu-io"), args...)).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL || strings.Count(string(out), "wrote ") != len(writes) {
		t.Fatalf("qemu-io %s: %v (want its writes done, then killed)\n%s", strings.Join(args, " "), err, out)
	}
}

// TestE2EResyncForcedShutdown: the machine goes down hard (the agent is
// killed and its machine comes back with another boot id); the extents in
// the activity log are resynced, and only they.
func TestE2EResyncForcedShutdown(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	const size = 256 << 20
	makeRandomDisk(t, disk, size, 21)
	a := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", 2*time.Minute)
	// Writes in two extents (the activity log names them), then the crash.
	guestWritesThenCrash(t, a.uri("d"), "write -P 0x31 8M 64k", "write -P 0x32 100M 64k")
	// The blocks changed behind the splitter lie in those extents but outside
	// the last write, which the restarted agent logs again anyway.
	c.forcedShutdown(t, a, "vm1", disk, 8<<20+128<<10, 100<<20+256<<10)
	c.waitReason(t, "vm1", "forced shutdown")
	c.mustCLI("resync", "--machine", "vm1", "--wait")
	c.waitState("vm1", "protected", time.Minute)
	compared, sent := c.resyncDone(t, "vm1")
	if compared == 0 || compared > 4*(4<<20) || sent < 8192 || sent > 256<<10 {
		t.Fatalf("compared %d bytes and sent %d: want only the activity log's extents compared and the changed blocks sent", compared, sent)
	}
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	t.Logf("forced shutdown: compared %d bytes of a %d-byte disk, sent %d", compared, size, sent)
}

// pendingChanges protects a 64 MiB disk with its replica on a small file
// system, fills that file system and writes 12 MiB through the splitter:
// the changes stay in the process server's cache, acknowledged (the agent
// drops them) and not applied. It returns the target's directory.
func pendingChanges(t *testing.T, seed uint64) (*cluster, string, string, *agentProc) {
	c := &cluster{t: t, dir: t.TempDir(), agents: map[string]*agentProc{}}
	c.srvDir = filepath.Join(c.dir, "srv")
	tgt := filepath.Join(c.dir, "target")
	os.MkdirAll(tgt, 0o700)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", tgt).CombinedOutput(); err != nil {
		t.Fatalf("mount a small file system for the target (needs root): %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", tgt).Run() })
	c.listen = "127.0.0.1:" + freePort(t)
	c.dataPort = freePort(t)
	c.serverArgs = []string{"--target", "file://" + tgt}
	c.startServer()
	disk := filepath.Join(c.dir, "d.img")
	makeRandomDisk(t, disk, 64<<20, seed)
	a := c.startAgent("vm1", []string{"--spool-max", "16MiB"}, "d="+disk)
	c.waitState("vm1", "protected", time.Minute)
	// A point first: from it on the changes are kept on the target as
	// any-point segments, which a full file system refuses (before the
	// first point nothing is kept, and the replica's blocks, all written
	// by the initial copy, take new data in place).
	c.tag("vm1")
	fillFS(t, filepath.Join(tgt, "filler"))
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x41 1M 6M", "-c", "write -P 0x42 20M 6M")
	// Every change is acknowledged (the agent drops them) and in a sealed
	// cache segment.
	last := a.freshStats(t).NextSeq - 1
	a.waitStats(t, fmt.Sprintf("changes up to %d acknowledged", last), func(st agentStats) bool { return st.Acked >= last })
	c.waitSealed(t, last)
	return c, tgt, disk, a
}

// agentStats is the part of an agent's STATE/stats.json the tests read.
type agentStats struct {
	Acked   uint64 `json:"acked"`    // the server holds every change up to it
	NextSeq uint64 `json:"next_seq"` // of the next change the agent logs
}

func (a *agentProc) readStats() (agentStats, bool) {
	var st agentStats
	b, err := os.ReadFile(filepath.Join(a.state, "stats.json"))
	return st, err == nil && json.Unmarshal(b, &st) == nil
}

// waitStats waits until the agent's figures satisfy ok.
func (a *agentProc) waitStats(t *testing.T, what string, ok func(agentStats) bool) agentStats {
	t.Helper()
	deadline := time.Now().Add(hungAfter) // a hung agent, not a slow one
	for {
		if st, read := a.readStats(); read && ok(st) {
			return st
		}
		if a.exited() {
			t.Fatalf("agent %s exited: %v\n%s", a.name, a.err, a.logTail())
		}
		if time.Now().After(deadline) {
			st, _ := a.readStats()
			t.Fatalf("agent %s: %+v; waited for: %s", a.name, st, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// freshStats returns the agent's figures as computed after the call
// began. The agent rewrites stats.json every second, one save after the
// other (each atomic): of the files that appear after it is removed, the
// second was computed after the first had appeared, that is after the
// call began.
func (a *agentProc) freshStats(t *testing.T) agentStats {
	t.Helper()
	var st agentStats
	for range 2 {
		os.Remove(filepath.Join(a.state, "stats.json"))
		st = a.waitStats(t, "stats.json written again", func(agentStats) bool { return true })
	}
	return st
}

// waitSealed waits until the server's cache holds a sealed segment that
// ends at seq or later.
func (c *cluster) waitSealed(t *testing.T, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(hungAfter) // a hung server, not a slow one
	for {
		segs, _ := filepath.Glob(filepath.Join(c.srvDir, "cache", "*", "*.seg"))
		for _, s := range segs {
			if _, last, ok := replication.ParseSegmentName(filepath.Base(s)); ok && last >= seq {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no sealed cache segment reaches seq %d: %v\n%s", seq, segs, c.server.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestE2EResyncComparesAfterTheLog: the log holds changes the replica has
// not applied yet (the target was full) and the disk no longer has them
// (put back behind the splitter, as a machine that lost its last writes
// would have it). An operator's resync must compare with the replica those
// changes make, not the one before: else the blocks look equal, are not
// sent, and the changes applied afterwards leave the replica wrong.
func TestE2EResyncComparesAfterTheLog(t *testing.T) {
	t.Parallel()
	c, tgt, disk, _ := pendingChanges(t, 28)
	// The disk's first 7 MiB as makeRandomDisk made them.
	orig := make([]byte, 7<<20)
	rand.NewChaCha8([32]byte{28}).Read(orig)
	orig = orig[1<<20:]
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(orig, 1<<20)
	f.Close()
	c.mustCLI("resync", "--machine", "vm1")
	// The compare must wait for the log, which cannot be applied while the
	// target is full: it stays waiting until the test has seen it wait.
	c.server.waitLog(t, "resync compare waits until the replica has applied the log")
	os.Remove(filepath.Join(tgt, "filler"))
	c.mustCLI("resync", "--machine", "vm1", "--wait")
	c.waitState("vm1", "protected", time.Minute)
	compared, sent := c.resyncDone(t, "vm1")
	if compared != 64<<20 || sent < 6<<20 || sent > 7<<20 {
		t.Fatalf("compared %d bytes and sent %d: want the 6 MiB put back sent", compared, sent)
	}
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
}

// cachedChanges protects a 64 MiB disk with its replica on a small file
// system, fills that file system so that 12 MiB of changes stay in the
// process server's cache (acknowledged: the agent drops them), then kills
// the server and frees the target. The cache holds the only copy.
func cachedChanges(t *testing.T, seed uint64) (*cluster, string) {
	c, tgt, disk, _ := pendingChanges(t, seed)
	c.server.kill()
	segs, _ := filepath.Glob(filepath.Join(c.srvDir, "cache", "*", "*.seg"))
	if len(segs) == 0 {
		t.Fatal("no cached segment: the test would not test anything")
	}
	os.Remove(filepath.Join(tgt, "filler"))
	return c, disk
}

// TestE2EResyncCorruptSegment: a cached segment is damaged before it was
// applied (its checksum no longer matches). It is not applied, the disk is
// marked, and the resync sends what differs.
func TestE2EResyncCorruptSegment(t *testing.T) {
	t.Parallel()
	c, disk := cachedChanges(t, 25)
	segs, _ := filepath.Glob(filepath.Join(c.srvDir, "cache", "*", "*.seg"))
	slices.Sort(segs)
	f, err := os.OpenFile(segs[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	b := make([]byte, 1)
	f.ReadAt(b, fi.Size()/2)
	b[0] ^= 0x40
	f.WriteAt(b, fi.Size()/2)
	f.Close()
	c.startServer()
	c.waitReason(t, "vm1", "failed verification")
	c.mustCLI("resync", "--machine", "vm1", "--wait")
	c.waitState("vm1", "protected", time.Minute)
	compared, sent := c.resyncDone(t, "vm1")
	if compared != 64<<20 || sent == 0 || sent > 13<<20 {
		t.Fatalf("compared %d bytes and sent %d, for at most 12 MiB of changes in a corrupt segment", compared, sent)
	}
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	t.Logf("corrupt segment %s: compared %d bytes, sent %d", filepath.Base(segs[0]), compared, sent)
}

// TestE2EResyncDiskGrown: the disk grows while the agent is stopped; the
// replica grows and only the new area's data travels.
func TestE2EResyncDiskGrown(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeRandomDisk(t, disk, 32<<20, 26)
	a := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", time.Minute)
	a.stop()
	if err := os.Truncate(disk, 48<<20); err != nil {
		t.Fatal(err)
	}
	const grown = 600000 // bytes of data in the new area; the rest is zeros
	f, _ := os.OpenFile(disk, os.O_RDWR, 0)
	f.WriteAt([]byte(strings.Repeat("grown ", grown/6)), 40<<20)
	f.Close()
	c.startAgent("vm1", nil)
	c.waitReason(t, "vm1", "grew")
	c.mustCLI("resync", "--machine", "vm1", "--wait")
	c.waitState("vm1", "protected", time.Minute)
	compared, sent := c.resyncDone(t, "vm1")
	if compared != 16<<20 || sent < grown || sent > grown+2*4096 {
		t.Fatalf("compared %d bytes and sent %d; want the 16 MiB new area compared and its %d bytes of data sent", compared, sent, grown)
	}
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
}

// TestE2EResyncSpoolOverflow: the server is away, the guest writes more
// than the spool holds; no write stalls (the agent falls back to a
// changed-block map) and when the server is back, the marked blocks, and
// only they, are resent.
func TestE2EResyncSpoolOverflow(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeRandomDisk(t, disk, 64<<20, 27)
	a := c.startAgent("vm1", []string{"--spool-max", "16MiB"}, "d="+disk)
	c.waitState("vm1", "protected", time.Minute)
	c.server.kill()
	// 24 MiB of writes into a 16 MiB spool. nbdPeerRun fails the test if
	// qemu-io does not finish (a stalled guest).
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x51 0 8M", "-c", "write -P 0x52 8M 8M",
		"-c", "write -P 0x53 16M 8M")
	c.startServer()
	deadline := time.Now().Add(hungAfter)
	var marked int64 = -1
	for marked < 0 {
		var es []struct{ Kind, Message string }
		json.Unmarshal([]byte(c.mustCLI("events", "--machine", "vm1", "--json")), &es)
		for _, e := range es {
			if e.Kind == "spool-overflow-resynced" {
				fmt.Sscanf(e.Message[strings.Index(e.Message, "(")+1:], "%d blocks marked", &marked)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no spool-overflow-resynced event\n%s", a.logTail())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if marked <= 0 || marked*4096 > 24<<20 {
		t.Fatalf("%d blocks marked during the overflow, for 24 MiB of writes", marked)
	}
	c.waitState("vm1", "protected", time.Minute)
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	t.Logf("spool overflow: %d blocks of 4 KiB marked and resent, of 24 MiB written", marked)
}

// TestE2EResyncSequenceGap: changes the server acknowledged are lost from
// its cache before they were applied (the target was full, then the cache
// was lost); the agent no longer has them either. The gap marks the disk;
// the resync sends what differs.
func TestE2EResyncSequenceGap(t *testing.T) {
	t.Parallel()
	c, disk := cachedChanges(t, 22)
	const size = 64 << 20
	// The cache is lost with the server.
	segs, _ := filepath.Glob(filepath.Join(c.srvDir, "cache", "*", "*.seg"))
	for _, s := range segs {
		os.Remove(s)
	}
	c.startServer()
	c.waitReason(t, "vm1", "sequence gap")
	c.mustCLI("resync", "--machine", "vm1", "--wait")
	c.waitState("vm1", "protected", time.Minute)
	compared, sent := c.resyncDone(t, "vm1")
	if compared != size || sent < 6<<20 || sent > 13<<20 {
		t.Fatalf("compared %d bytes and sent %d for 12 MiB of lost changes on a %d-byte disk", compared, sent, size)
	}
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	t.Logf("sequence gap: compared %d bytes, sent %d for 12 MiB of lost changes", compared, sent)
}

// TestE2EResyncUnderWritesAndKill: a resync while fio writes through the
// splitter, with the agent killed past half of the compare: it resumes
// where it was (the bytes compared stay under 1.5 x the disk; starting over
// would pass it) and ends bit-exact.
func TestE2EResyncUnderWritesAndKill(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	const size = 256 << 20
	makeRandomDisk(t, disk, size, 23)
	// The compare is paced (--resync-rate), a batch (64 MiB) at a time.
	a := c.startAgent("vm1", []string{"--resync-rate", "64MiB"}, "d="+disk)
	c.waitState("vm1", "protected", 3*time.Minute)
	var offs []int64
	for i := int64(0); i < 100; i++ {
		offs = append(offs, i*(size/100)+12288)
	}
	writeBehind(t, disk, offs...)
	fio := background{}
	// fio whose NBD server is killed hangs in libnbd (or retries without
	// end), so it is stopped with the agent, as the guest's I/O would be.
	fctx, stopFio := context.WithTimeout(t.Context(), 2*time.Minute)
	defer stopFio()
	fio.run(func() error {
		_, err := runTool(fctx, t, "fio", "--name=w", "--ioengine=nbd", "--uri="+a.uri("d"), "--rw=randwrite",
			"--bs=4k", "--iodepth=4", fmt.Sprintf("--size=%d", size), "--time_based", "--runtime=6", "--rate=4m")
		return err
	})
	c.mustCLI("resync", "--machine", "vm1")
	// Kill the agent past half of the compare, before its end. The agent
	// runs in short slices and its saved position is read while it is
	// stopped, so the kill lands exactly where the test saw it, however
	// loaded the machine.
	var seen bool
	deadline := time.Now().Add(hungAfter) // a hung agent, not a slow one
	for {
		a.pause()
		rs := agentResync(t, a)
		if rs != nil && rs.Compared >= size/2 && rs.Cursor < size {
			t.Logf("killing the agent with %d of %d bytes compared", rs.Compared, int64(size))
			break
		}
		if rs == nil && seen {
			t.Fatalf("the resync ended before the test saw it past half: a slice of 50 ms ran for two 64 MiB batches (2 s)\n%s", a.logTail())
		}
		seen = seen || rs != nil
		if time.Now().After(deadline) {
			t.Fatalf("the resync did not start or progress: %+v\n%s", rs, a.logTail())
		}
		a.resume()
		time.Sleep(50 * time.Millisecond) // the slice the agent runs for
	}
	a.kill()
	stopFio()
	fio.wait() // fio loses its server: an error is expected
	a = c.startAgent("vm1", nil)
	deadline = time.Now().Add(hungAfter)
	for !strings.Contains(c.mustCLI("events", "--machine", "vm1"), "resync-done") || c.status("vm1").State != "protected" {
		if time.Now().After(deadline) {
			t.Fatalf("resync did not finish after the restart: %+v\n%s", c.status("vm1"), a.logTail())
		}
		time.Sleep(200 * time.Millisecond)
	}
	compared, sent := c.resyncDone(t, "vm1")
	if compared >= size*3/2 {
		t.Fatalf("compared %d bytes of a %d-byte disk: the resync started over instead of resuming", compared, size)
	}
	if sent < 100*4096 {
		t.Fatalf("sent %d bytes: the 100 blocks changed behind the splitter are not all there", sent)
	}
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	t.Logf("resync under writes, killed and resumed: compared %d bytes of %d, sent %d", compared, int64(size), sent)
}

// agentResyncState is the part of the agent's saved resync the tests read.
type agentResyncState struct {
	Cursor   int64 `json:"cursor"`
	Compared int64 `json:"compared"`
}

// agentResync reads the resync in progress from an agent's saved state
// (nil: none). Read it while the agent is paused.
func agentResync(t *testing.T, a *agentProc) *agentResyncState {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(a.state, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Resync *agentResyncState `json:"resync"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("agent state: %v", err)
	}
	return st.Resync
}

// TestE2EDiskShrinkRefused: a protected disk that shrank is a clear error.
func TestE2EDiskShrinkRefused(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeDisk(t, disk, 16<<20, 24)
	a := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", time.Minute)
	a.stop()
	os.Truncate(disk, 8<<20)
	out, err := runAsr(a.args...)
	if err == nil || !strings.Contains(err.Error(), "shrank") {
		t.Fatalf("agent with a shrunk disk: err=%v out=%s", err, out)
	}
}

// TestE2EMemoryLogKill: an agent with a memory log (--memory-log) keeps
// its changes not yet acknowledged in memory, so a kill -9 under writes
// loses them; the restarted agent names the activity log's extents for a
// resync (no new point until it is done), and after it the replica is the
// source's content, bit-exact. A change the activity log failed to name,
// or one the restarted agent numbered as a record the server holds, would
// show in the recovered image.
func TestE2EMemoryLogKill(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	const size = 128 << 20
	makeRandomDisk(t, disk, size, 31)
	a := c.startAgent("vm1", []string{"--memory-log", "8MiB"}, "d="+disk)
	initial := c.waitState("vm1", "protected", 3*time.Minute).BytesReceived
	fctx, stopFio := context.WithTimeout(t.Context(), 2*time.Minute)
	defer stopFio()
	var fio background
	fio.run(func() error {
		_, err := runTool(fctx, t, "fio", "--name=w", "--ioengine=nbd", "--uri="+a.uri("d"), "--rw=randwrite",
			"--bs=4k", "--iodepth=4", "--size=64M", "--time_based", "--runtime=20", "--rate=8m", "--randseed=7")
		return err
	})
	c.waitReceived("vm1", initial+2<<20) // fio's writes are flowing
	a.kill()
	stopFio()
	fio.wait() // fio loses its server: an error is expected
	a = c.startAgent("vm1", nil)
	c.waitReason(t, "vm1", "memory log")
	// Writes after the restart are logged once the server's numbering is
	// known, and reach the replica.
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x44 100M 64k", "-c", "flush")
	c.mustCLI("resync", "--machine", "vm1", "--wait")
	c.waitState("vm1", "protected", time.Minute)
	compared, sent := c.resyncDone(t, "vm1")
	if compared == 0 || compared > 64<<20+8<<20 {
		t.Fatalf("compared %d bytes: want the activity log's extents (fio wrote in the first 64 MiB), not the whole %d-byte disk", compared, int64(size))
	}
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
	t.Logf("kill -9 with the memory log: compared %d bytes of a %d-byte disk, sent %d", compared, int64(size), sent)
}
