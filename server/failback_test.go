package server_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// failbackRig is a protected machine with two disks, failed over (planned)
// to the server's NBD exports and committed.
type failbackRig struct {
	*rig
	cfg     agent.Config
	ra      *runningAgent
	disks   map[string]string // name -> the original disk file
	exports map[string]string // name -> export URI
	written int64             // bytes written into the exports since the failover
	rnd     *rand.Rand
}

func startFailbackRig(t *testing.T) *failbackRig {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	fr := &failbackRig{rig: r, disks: map[string]string{}, rnd: rand.New(rand.NewPCG(7, 7))}
	var specs []agent.DiskSpec
	for i, name := range []string{"d0", "d1"} {
		p := filepath.Join(dir, name+".img")
		mustDisk(t, p, int64(8+8*i)<<20, uint64(31+i))
		fr.disks[name] = p
		specs = append(specs, agent.DiskSpec{Name: name, Path: p})
	}
	fr.cfg = r.agentConfig("vm1", specs...)
	fr.ra = startAgent(t, fr.cfg)
	r.waitProtected("vm1")
	src, err := nbd.Dial(ctx, fr.cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.WriteAt(bytes.Repeat([]byte{3}, 200000), 12345); err != nil {
		t.Fatal(err)
	}
	src.Close()
	j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Planned: true, To: api.ToNBD}))
	fr.exports = exportsOf(t, j)
	r.mustJob(r.client.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "vm1"}))
	if m := r.machine("vm1"); m.Unprotected || m.Direction != "failed-over" {
		t.Fatalf("after the commit of a planned failover: unprotected %v, direction %q", m.Unprotected, m.Direction)
	}
	return fr
}

// write writes n random 64 KiB blocks into an export (aligned, so the
// bytes the failback sends can be compared with them) and flushes.
func (fr *failbackRig) write(disk string, n int) {
	fr.t.Helper()
	c := dialExport(fr.t, fr.exports[disk])
	defer c.Close()
	blocks := c.Size() / 65536
	buf := make([]byte, 65536)
	for range n {
		for i := range buf {
			buf[i] = byte(fr.rnd.IntN(256))
		}
		if err := c.WriteAt(buf, fr.rnd.Int64N(blocks)*65536); err != nil {
			fr.t.Fatal(err)
		}
		fr.written += int64(len(buf))
	}
	if err := c.Flush(); err != nil {
		fr.t.Fatal(err)
	}
}

// restart restarts the server; the exports' port changes.
func (fr *failbackRig) restart() {
	fr.t.Helper()
	fr.stop()
	fr.start()
	fos, err := fr.client.Failovers(context.Background(), false)
	if err != nil || len(fos) != 1 {
		fr.t.Fatalf("failovers after a restart: %+v %v", fos, err)
	}
	for _, e := range fos[0].Exports {
		fr.exports[e.Disk] = e.URI
	}
}

// sums returns the exports' SHA-256, by disk.
func (fr *failbackRig) sums() map[string][32]byte {
	fr.t.Helper()
	out := map[string][32]byte{}
	for d, uri := range fr.exports {
		c := dialExport(fr.t, uri)
		out[d] = exportSum(fr.t, c)
		c.Close()
	}
	return out
}

// checkFailedBack fails back and checks the original disks against want
// and the bytes sent against what was written.
func (fr *failbackRig) checkFailedBack(want map[string][32]byte) {
	t := fr.t
	t.Helper()
	ctx := context.Background()
	j := fr.mustJob(fr.client.Failback(ctx, "vm1"))
	var sent, compared int64
	if len(j.Output) != 1 {
		t.Fatalf("failback output %q", j.Output)
	}
	if _, err := fmt.Sscanf(j.Output[0], "failed back: %d bytes sent, %d bytes compared", &sent, &compared); err != nil {
		t.Fatalf("failback output %q: %v", j.Output[0], err)
	}
	all, err := fr.client.Failovers(ctx, true)
	if err != nil || len(all) == 0 || all[0].Failback == nil || all[0].Failback.State != "failed-back" ||
		all[0].Failback.Sent != sent || all[0].Failback.Compared != compared {
		t.Fatalf("the failover after failback: %+v %v", all, err)
	}
	for d, p := range fr.disks {
		if fileSum(t, p) != want[d] {
			t.Fatalf("disk %s: the original differs from the failed-over disk's final state", d)
		}
	}
	if sent < fr.written/4 || sent > 2*fr.written {
		t.Fatalf("%d bytes sent for %d written after the failover", sent, fr.written)
	}
	if compared != (8+16)<<20 {
		t.Fatalf("%d bytes compared, want both disks whole", compared)
	}
	t.Logf("failback: %d bytes written after the failover, %d sent, %d compared", fr.written, sent, compared)
	if m := fr.machine("vm1"); m.Direction != "failed-back" {
		t.Fatalf("after failback: direction %q", m.Direction)
	}
	if fos, _ := fr.client.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers after failback: %+v", fos)
	}
}

// checkForward reprotects forward, then a write and a new point recover
// bit-exact.
func (fr *failbackRig) checkForward() {
	t := fr.t
	t.Helper()
	ctx := context.Background()
	// The original machine runs again: its writes are accepted.
	src, err := nbd.Dial(ctx, fr.cfg.NBD, "d1")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.WriteAt(bytes.Repeat([]byte{9}, 100000), 4<<20); err != nil {
		t.Fatalf("a write to the failed-back machine: %v", err)
	}
	if err := src.Flush(); err != nil {
		t.Fatal(err)
	}
	src.Close()
	j := fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	t.Logf("forward reprotect: %q", j.Output)
	var compared, sent int64
	if len(j.Output) != 1 {
		t.Fatalf("forward reprotect output %q", j.Output)
	}
	if _, err := fmt.Sscanf(j.Output[0], "protected again: %d bytes compared, %d sent", &compared, &sent); err != nil || compared != (8+16)<<20 || sent <= 0 || sent >= compared {
		t.Fatalf("forward reprotect output %q (%v): want both disks compared, only the differences sent", j.Output[0], err)
	}
	fr.waitProtected("vm1")
	if m := fr.machine("vm1"); m.Direction != "" {
		t.Fatalf("after the forward reprotect: direction %q", m.Direction)
	}
	p, err := fr.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	fr.recover("vm1", p.ID, out)
	for d, path := range fr.disks {
		if fileSum(t, filepath.Join(out, d+".img")) != fileSum(t, path) {
			t.Fatalf("disk %s: the point after the forward reprotect differs from the source", d)
		}
	}
	if _, err := fr.client.Reprotect(ctx, "vm1"); err == nil {
		t.Fatal("a second forward reprotect was accepted")
	}
}

// The full cycle on local disks: planned failover to NBD, writes into the
// exports, reprotect, more writes (shipped as they come), failback: the
// original disk files equal the exports' final state, the bytes sent stay
// within twice the bytes written; forward protection resumes with a
// checksum resync and a new point recovers bit-exact.
func TestFailbackFullCycle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	// Refused before a reprotect.
	if _, err := fr.client.Failback(ctx, "vm1"); err == nil || !strings.Contains(err.Error(), "reprotect") {
		t.Fatalf("failback before reprotect: %v", err)
	}
	fr.write("d0", 20)
	fr.write("d1", 30)
	j := fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	if len(j.Output) != 1 || !strings.HasPrefix(j.Output[0], "reprotected") {
		t.Fatalf("reprotect output %q", j.Output)
	}
	if m := fr.machine("vm1"); m.Direction != "reprotected" {
		t.Fatalf("after reprotect: direction %q", m.Direction)
	}
	if _, err := fr.client.Reprotect(ctx, "vm1"); err == nil {
		t.Fatal("a second reprotect was accepted")
	}
	// An operator's resync would compare a source failback is writing.
	if err := fr.client.Do(ctx, "POST", "/api/v1/machines/vm1/resync", nil, nil); err == nil {
		t.Fatal("a resync of a reprotected machine was accepted")
	}
	fr.write("d0", 10)
	fr.write("d1", 5)
	waitFor(t, "the new writes on the original disks", func() bool {
		fos, err := fr.client.Failovers(ctx, false)
		return err == nil && len(fos) == 1 && fos[0].Failback != nil && fos[0].Failback.State == "reprotected" &&
			fos[0].Failback.Pending == 0 && fos[0].Failback.Sent > 0
	})
	// The original machine is still frozen.
	src, err := nbd.Dial(ctx, fr.cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.WriteAt([]byte{1}, 0); !errors.Is(err, nbd.EPERM) {
		t.Fatalf("a write to the frozen original: %v", err)
	}
	src.Close()
	want := fr.sums()
	fr.checkFailedBack(want)
	fr.checkForward()
}

// A failback survives a server restart and an agent restart while the
// changes go back: the shipping resumes from the saved maps and nothing
// is lost.
func TestFailbackResumesAfterRestarts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	fr.write("d0", 16)
	fr.write("d1", 16)
	fr.ra.close() // the original agent goes away: nothing can be sent
	j, err := fr.client.Reprotect(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	// Wait until the reprotect is recorded (its first pass waits for the agent).
	waitFor(t, "the reprotect's first pass", func() bool {
		return fr.machine("vm1").Direction == "reprotected"
	})
	_ = j
	fr.restart()
	if m := fr.machine("vm1"); m.Direction != "reprotected" {
		t.Fatalf("after a restart: direction %q", m.Direction)
	}
	fr.write("d0", 8) // written while the agent is away, after the restart
	fr.ra = startAgent(t, fr.cfg)
	fr.write("d1", 8)
	want := fr.sums()
	// And the server stops once more while the agent is back.
	fr.restart()
	fr.checkFailedBack(want)
	fr.checkForward()
}

// Bad requests are refused with a reason and change nothing.
func TestFailbackRefusals(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	if _, err := fr.client.Failback(ctx, "nosuch"); err == nil {
		t.Fatal("failback of an unknown machine accepted")
	}
	if _, err := fr.client.Reprotect(ctx, "nosuch"); err == nil {
		t.Fatal("reprotect of an unknown machine accepted")
	}
	fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	if err := fr.client.Do(ctx, "POST", "/api/v1/machines/vm1/unprotect", map[string]any{}, nil); err == nil || !strings.Contains(err.Error(), "failback") {
		t.Fatalf("unprotect while failback writes the original: %v", err)
	}
	if m := fr.machine("vm1"); m.Direction != "reprotected" || m.Unprotected {
		t.Fatalf("after refusals: %+v", m)
	}
	// The console shows its buttons from the failover's record.
	fs, err := fr.client.Failovers(ctx, false)
	if err != nil || len(fs) != 1 || !fs[0].Planned || fs[0].Failback == nil || fs[0].Failback.State != "reprotected" {
		t.Fatalf("failovers: %+v, %v", fs, err)
	}
}

// A failback is cancellable until its switch: cancelled while its drain
// waits for the agent, it leaves the failed-over machine running (its
// exports writable) and the machine reprotected; run again once the agent
// is back, it completes.
func TestFailbackCancel(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	fr.write("d0", 4)
	fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	fr.ra.close() // the drain below cannot end
	fr.write("d1", 4)
	j, err := fr.client.Failback(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the failback's drain", func() bool {
		jj, err := fr.client.Job(ctx, j.ID)
		if err != nil {
			return false
		}
		for _, s := range jj.Steps {
			if strings.HasSuffix(s.Name, ": drain") && s.State == "running" && jj.Cancellable {
				return true
			}
		}
		return false
	})
	// A second failback, or a reprotect, while it runs is refused (a
	// second click in the console).
	if _, err := fr.client.Failback(ctx, "vm1"); err == nil || !strings.Contains(err.Error(), "job "+j.ID) {
		t.Fatalf("a second failback while one runs: %v", err)
	}
	if _, err := fr.client.Reprotect(ctx, "vm1"); err == nil || !strings.Contains(err.Error(), "running") {
		t.Fatalf("a reprotect while a failback runs: %v", err)
	}
	if _, err := fr.client.CancelJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	if j = fr.runJob(j, nil); j.State == api.JobSucceeded {
		t.Fatalf("a cancelled failback succeeded: %+v", j)
	}
	if m := fr.machine("vm1"); m.Direction != "reprotected" {
		t.Fatalf("after a cancelled failback: direction %q", m.Direction)
	}
	fr.write("d0", 2) // the failed-over machine runs on
	fr.ra = startAgent(t, fr.cfg)
	want := fr.sums()
	fr.checkFailedBack(want)
}

// startUnplannedRig is failbackRig's machine failed over unplanned to
// NBD at a point after which its source went on writing (before the
// failover and after its commit: the agent runs on, not frozen). Those
// writes are counted in written: failback must undo them.
func startUnplannedRig(t *testing.T) *failbackRig {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	fr := &failbackRig{rig: r, disks: map[string]string{}, rnd: rand.New(rand.NewPCG(9, 9))}
	var specs []agent.DiskSpec
	for i, name := range []string{"d0", "d1"} {
		p := filepath.Join(dir, name+".img")
		mustDisk(t, p, int64(8+8*i)<<20, uint64(51+i))
		fr.disks[name] = p
		specs = append(specs, agent.DiskSpec{Name: name, Path: p})
	}
	fr.cfg = r.agentConfig("vm1", specs...)
	fr.ra = startAgent(t, fr.cfg)
	r.waitProtected("vm1")
	fr.writeSource("d0", 3)
	p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	atPoint := map[string][32]byte{}
	for d, path := range fr.disks {
		atPoint[d] = fileSum(t, path)
	}
	fr.written = 0
	// After the point: written on the original, replicated or not, never
	// in the failed-over state.
	fr.writeSource("d0", 6)
	fr.writeSource("d1", 4)
	j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", To: api.ToNBD, Point: p.ID}))
	fr.exports = exportsOf(t, j)
	if got := fr.sums(); got["d0"] != atPoint["d0"] || got["d1"] != atPoint["d1"] {
		t.Fatal("the exports are not the point's state")
	}
	if fs, err := r.client.Failovers(ctx, false); err != nil || len(fs) != 1 || fs[0].Planned {
		t.Fatalf("an unplanned failover listed as %+v, %v", fs, err)
	}
	r.mustJob(r.client.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "vm1"}))
	if m := r.machine("vm1"); m.Unprotected || m.Direction != "failed-over" {
		t.Fatalf("after the commit of an unplanned failover to NBD: unprotected %v, direction %q", m.Unprotected, m.Direction)
	}
	fr.writeSource("d1", 3) // the source runs on after the commit too
	return fr
}

// writeSource writes n random 64 KiB blocks into the original machine's
// disk, through its agent.
func (fr *failbackRig) writeSource(disk string, n int) {
	fr.t.Helper()
	fr.writeVia(fr.cfg.NBD, disk, n)
}

// writeVia writes n random 64 KiB blocks into a disk through the agent
// serving NBD at addr.
func (fr *failbackRig) writeVia(addr, disk string, n int) {
	fr.t.Helper()
	c, err := nbd.Dial(context.Background(), addr, disk)
	if err != nil {
		fr.t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 65536)
	blocks := c.Size() / 65536
	for range n {
		for i := range buf {
			buf[i] = byte(fr.rnd.IntN(256))
		}
		if err := c.WriteAt(buf, fr.rnd.Int64N(blocks)*65536); err != nil {
			fr.t.Fatalf("a write to the original: %v", err)
		}
		fr.written += int64(len(buf))
	}
	if err := c.Flush(); err != nil {
		fr.t.Fatal(err)
	}
}

// checksum returns the live failover's checksum compare (nil: none).
func (fr *failbackRig) checksum() *api.FailbackChecksum {
	fr.t.Helper()
	fos, err := fr.client.Failovers(context.Background(), false)
	if err != nil || len(fos) != 1 || fos[0].Failback == nil {
		fr.t.Fatalf("failovers: %+v %v", fos, err)
	}
	return fos[0].Failback.Checksum
}

// The full cycle after an unplanned failover to NBD: the original disks
// hold writes after the point (before the failover and after its
// commit), the exports get writes; reprotect freezes the original agent,
// compares the disks by block sums and sends only what differs; failback
// makes the original equal to the failed-over state (bytes sent far
// below the disks' size: no full copy); forward protection resumes and a
// new point recovers bit-exact.
func TestFailbackUnplannedFullCycle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startUnplannedRig(t)
	fr.write("d0", 10)
	fr.write("d1", 12)
	j := fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	var compared, differ, sent int64
	if len(j.Output) != 1 {
		t.Fatalf("reprotect output %q", j.Output)
	}
	if _, err := fmt.Sscanf(j.Output[0], "reprotected: %d bytes compared, %d differ, %d bytes sent to the original disks", &compared, &differ, &sent); err != nil {
		t.Fatalf("reprotect output %q: %v", j.Output[0], err)
	}
	const total = (8 + 16) << 20
	if compared != total || differ <= 0 || differ > fr.written || sent <= 0 || sent > 2*fr.written {
		t.Fatalf("reprotect: %d compared, %d differ, %d sent, for %d bytes written on both sides", compared, differ, sent, fr.written)
	}
	names := map[string]bool{}
	for _, st := range j.Steps {
		names[st.Name] = true
	}
	if !names["vm1: freeze the original"] || !names["vm1: compare"] || !names["vm1: first pass"] {
		t.Fatalf("reprotect steps %+v", j.Steps)
	}
	if c := fr.checksum(); c == nil || c.State != "done" || c.Compared != total || c.Total != total || c.Differ != differ {
		t.Fatalf("the failover's checksum compare: %+v", c)
	}
	// The original is frozen now: its guest writes are refused.
	src, err := nbd.Dial(ctx, fr.cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.WriteAt([]byte{1}, 0); !errors.Is(err, nbd.EPERM) {
		t.Fatalf("a write to the original after reprotect: %v", err)
	}
	src.Close()
	fr.write("d1", 5)
	want := fr.sums()
	fr.checkFailedBack(want)
	fb := fr.failback()
	if fb.Sent > total/4 {
		t.Fatalf("%d bytes sent for %d-byte disks: a full copy", fb.Sent, total)
	}
	if c := fb.Checksum; c == nil || c.State != "done" || c.Total != total || c.Compared != total || c.Differ != differ {
		t.Fatalf("the ended failover's checksum compare: %+v", c)
	}
	fr.checkForward()
}

// failback returns the (ended) failover's failback figures.
func (fr *failbackRig) failback() *api.FailbackStatus {
	fr.t.Helper()
	all, err := fr.client.Failovers(context.Background(), true)
	if err != nil || len(all) == 0 || all[0].Failback == nil {
		fr.t.Fatalf("failovers: %+v %v", all, err)
	}
	return all[0].Failback
}

// With the original agent away, the reprotect of an unplanned failover
// waits for it, says so, and may be cancelled (the failover is as it
// was); a failback is refused meanwhile; run again, it waits through a
// server restart (the compare resumes by itself), and a reprotect run
// after the restart follows it until the agent is back and the changes
// are on the original disks.
func TestFailbackUnplannedWaitsForTheAgent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startUnplannedRig(t)
	fr.write("d0", 4)
	fr.ra.close()
	waiting := func(j api.Job) bool {
		jj, err := fr.client.Job(ctx, j.ID)
		if err != nil {
			return false
		}
		for _, s := range jj.Steps {
			if s.Name == "vm1: freeze the original" && s.State == "running" &&
				strings.Contains(s.Detail, "waits for the original agent of machine vm1") && jj.Cancellable {
				return true
			}
		}
		return false
	}
	j, err := fr.client.Reprotect(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the reprotect waiting for the agent", func() bool { return waiting(j) })
	// Refused: the reprotect's job runs (and without it, the compare is
	// not done).
	if _, err := fr.client.Failback(ctx, "vm1"); err == nil || !strings.Contains(err.Error(), "job is running") {
		t.Fatalf("failback before the compare: %v", err)
	}
	if c := fr.checksum(); c == nil || c.State != "waiting-for-agent" {
		t.Fatalf("the checksum compare while the agent is away: %+v", c)
	}
	if _, err := fr.client.CancelJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	if j = fr.runJob(j, nil); j.State == api.JobSucceeded {
		t.Fatalf("a cancelled reprotect succeeded: %+v", j)
	}
	if m := fr.machine("vm1"); m.Direction != "failed-over" {
		t.Fatalf("after a cancelled reprotect: direction %q", m.Direction)
	}
	j, err = fr.client.Reprotect(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the reprotect waiting for the agent", func() bool { return waiting(j) })
	fr.restart()
	if m := fr.machine("vm1"); m.Direction != "reprotected" {
		t.Fatalf("after a restart: direction %q", m.Direction)
	}
	fr.write("d1", 4)
	// Run again, reprotect follows the wait the restart resumed.
	j, err = fr.client.Reprotect(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the second reprotect waiting for the agent", func() bool { return waiting(j) })
	fr.ra = startAgent(t, fr.cfg)
	if j = fr.runJob(j, nil); j.State != api.JobSucceeded || len(j.Output) != 1 || !strings.HasPrefix(j.Output[0], "reprotected: 25165824 bytes compared") {
		t.Fatalf("reprotect once the agent is back: %+v", j)
	}
	if _, err := fr.client.Reprotect(ctx, "vm1"); err == nil {
		t.Fatal("a reprotect after the compare was accepted")
	}
	if fos, err := fr.client.Failovers(ctx, false); err != nil || len(fos) != 1 || fos[0].Failback == nil || fos[0].Failback.Checksum == nil ||
		fos[0].Failback.Checksum.State != "done" || fos[0].Failback.Pending != 0 {
		t.Fatalf("after the reprotect: %+v %v", fos, err)
	}
	want := fr.sums()
	fr.checkFailedBack(want)
	fr.checkForward()
}

// The compare's progress survives a server stop in its middle: the disk
// compared before the stop is not compared again, and the blocks it
// found different are still sent (the original ends equal to the
// failed-over state).
func TestFailbackUnplannedCompareResumes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startUnplannedRig(t)
	fr.write("d0", 6)
	fr.write("d1", 6)
	stopped := make(chan struct{})
	var once sync.Once
	id := fr.machine("vm1").ID
	setCompareHook(t, id, func(ctx context.Context, disk string, off int64) {
		if disk == "d1" {
			once.Do(func() { close(stopped) })
			<-ctx.Done() // held until the server stops
		}
	})
	if _, err := fr.client.Reprotect(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	<-stopped
	fr.stop()
	var mu sync.Mutex
	asked := map[string]bool{} // a batch retried (the agent reconnecting) counts once
	setCompareHook(t, id, func(ctx context.Context, disk string, off int64) {
		mu.Lock()
		asked[fmt.Sprintf("%s@%d", disk, off)] = true
		mu.Unlock()
	})
	fr.restart2()
	waitFor(t, "the compare after the restart", func() bool {
		c := fr.checksum()
		return c != nil && c.State == "done" && fr.checksumPending() == 0
	})
	mu.Lock()
	if len(asked) != 1 || !asked["d1@0"] {
		t.Fatalf("the compare after the restart asked for %v, want d1 only (d0 was done before the stop)", asked)
	}
	mu.Unlock()
	want := fr.sums()
	fr.checkFailedBack(want)
}

// setCompareHook sets the hook a machine's checksum compares call before
// each batch (see server.SetFailbackCompareHook) until the test ends.
func setCompareHook(t *testing.T, machineID string, hook func(ctx context.Context, disk string, off int64)) {
	t.Helper()
	server.SetFailbackCompareHook(machineID, hook)
	t.Cleanup(func() { server.SetFailbackCompareHook(machineID, nil) })
}

// restart2 starts a stopped server again (restart after a stop of its own).
func (fr *failbackRig) restart2() {
	fr.t.Helper()
	fr.start()
	fos, err := fr.client.Failovers(context.Background(), false)
	if err != nil || len(fos) != 1 {
		fr.t.Fatalf("failovers after a restart: %+v %v", fos, err)
	}
	for _, e := range fos[0].Exports {
		fr.exports[e.Disk] = e.URI
	}
}

func (fr *failbackRig) checksumPending() int64 {
	fos, err := fr.client.Failovers(context.Background(), false)
	if err != nil || len(fos) != 1 || fos[0].Failback == nil {
		return -1
	}
	return fos[0].Failback.Pending
}

// A server that stops after a failback's switch (the record says
// failing-back) finishes it at its next start: the original is thawed,
// the failover ended, nothing lost.
func TestFailbackFinishedAfterARestartPastTheSwitch(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	fr.write("d0", 6)
	fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	fr.write("d1", 6)
	want := fr.sums()
	switched := make(chan struct{})
	server.SetFailbackSwitchHook(fr.srv, func(ctx context.Context) {
		close(switched)
		<-ctx.Done()
	})
	if _, err := fr.client.Failback(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	<-switched
	fr.stop()
	fr.start()
	waitFor(t, "the failback finished after the restart", func() bool {
		return fr.machine("vm1").Direction == "failed-back"
	})
	for d, p := range fr.disks {
		if fileSum(t, p) != want[d] {
			t.Fatalf("disk %s: the original differs from the failed-over disk's final state", d)
		}
	}
	if fos, _ := fr.client.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers: %+v", fos)
	}
	fr.checkForward()
}

// The source of a committed unplanned failover stays registered for
// failback, but no RPO or heartbeat alert is raised for it (it is
// usually gone), while a protected machine whose agent went away at the
// same time is alerted.
func TestFailbackUnplannedSourceNotAlerted(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startUnplannedRig(t)
	d := filepath.Join(fr.dir, "other.img")
	mustDisk(t, d, 1<<20, 77)
	other := startAgent(t, fr.agentConfig("vm2", agent.DiskSpec{Name: "d", Path: d}))
	fr.waitProtected("vm2")
	if _, err := fr.client.Tag(ctx, "vm2", false, time.Minute); err != nil {
		t.Fatal(err)
	}
	fr.ra.close()
	other.close()
	fr.tune = func(c *server.Config) {
		c.NBDListen = "127.0.0.1:0"
		c.PolicyEvery, c.HeartbeatLost, c.AlertClear = 20*time.Millisecond, 500*time.Millisecond, 100*time.Millisecond
	}
	fr.restart()
	if err := fr.client.Do(ctx, http.MethodPatch, "/api/v1/policies/default", api.PolicyJSON{RPOThreshold: "1s"}, nil); err != nil {
		t.Fatal(err)
	}
	fr.waitAlert(api.AlertHeartbeat, "vm2", "")
	fr.waitAlert(api.AlertRPO, "vm2", "")
	fr.waitPasses(2)
	as, err := fr.client.Alerts(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range as {
		if a.Machine == "vm1" {
			t.Fatalf("an alert on the failed-over source: %+v", a)
		}
	}
}

// An original agent thawed in the middle of the compare (by hand, say)
// is frozen again and its disks compared again from the start: a write it
// took meanwhile, on a disk compared already, is overwritten too.
func TestFailbackUnplannedThawedInCompare(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startUnplannedRig(t)
	fr.write("d0", 4)
	fos, err := fr.client.Failovers(ctx, false)
	if err != nil || len(fos) != 1 {
		t.Fatalf("failovers: %+v %v", fos, err)
	}
	thawed := make(chan error, 1)
	var once sync.Once
	setCompareHook(t, fos[0].MachineID, func(hctx context.Context, disk string, off int64) {
		if disk != "d1" {
			return
		}
		once.Do(func() {
			err := fr.srv.ProcessServerForTest().Thaw(hctx, fos[0].MachineID, fos[0].ID)
			if err == nil { // the original takes a write, on d0, compared already
				var c *nbd.Client
				if c, err = nbd.Dial(hctx, fr.cfg.NBD, "d0"); err == nil {
					if err = c.WriteAt(bytes.Repeat([]byte{0xee}, 65536), 65536*7); err == nil {
						err = c.Flush()
					}
					c.Close()
				}
			}
			thawed <- err
		})
	})
	j := fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	if err := <-thawed; err != nil {
		t.Fatalf("thaw and write the original: %v", err)
	}
	fr.written += 65536
	t.Logf("reprotect: %q", j.Output)
	if c := fr.checksum(); c == nil || c.State != "done" || c.Compared != (8+16)<<20 {
		t.Fatalf("the checksum compare: %+v", c)
	}
	want := fr.sums()
	fr.checkFailedBack(want)
}

// thawOriginal thaws the original agent under its failover, as an
// operator (or an agent whose frozen state was lost) would, and writes a
// block of 0xee at off of its disk through its NBD splitter: the guest
// writing the original disks while thawed.
func (fr *failbackRig) thawOriginal(disk string, off int64) {
	t := fr.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	fos, err := fr.client.Failovers(ctx, false)
	if err != nil || len(fos) != 1 {
		t.Fatalf("failovers: %+v %v", fos, err)
	}
	if err := fr.srv.ProcessServerForTest().Thaw(ctx, fos[0].MachineID, fos[0].ID); err != nil {
		t.Fatalf("thaw the original: %v", err)
	}
	c, err := nbd.Dial(ctx, fr.cfg.NBD, disk)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteAt(bytes.Repeat([]byte{0xee}, 65536), off); err != nil {
		t.Fatalf("a guest write to the thawed original: %v", err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	fr.written += 65536
}

// mustThawedEvent checks a failback-thawed warning event names machine.
func (fr *failbackRig) mustThawedEvent(machine string) {
	fr.t.Helper()
	evs, err := fr.srv.DB().Events(context.Background(), "", 200)
	if err != nil {
		fr.t.Fatal(err)
	}
	for _, e := range evs {
		if e.Kind == "failback-thawed" && e.Severity == "warning" && strings.Contains(e.Message, "machine "+machine+" ") {
			return
		}
	}
	fr.t.Fatalf("no failback-thawed event for %s in %+v", machine, evs)
}

// An original agent thawed while a planned failover's changes are
// shipped back (by hand, or its frozen state lost), whose guest writes
// the original disks meanwhile, is frozen again at the shipper's next
// refused write and its disks compared again from the start: the guest's
// write, on a block the failed-over machine never wrote, is overwritten
// too, and failback ends with the originals equal to the failed-over
// state. (Before, the shipper retried the refused writes forever.)
func TestFailbackThawedWhileShipping(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	fr.write("d0", 4)
	fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	if c := fr.checksum(); c != nil {
		t.Fatalf("a planned failover's reprotect compared: %+v", c)
	}
	fr.thawOriginal("d1", 65536*9)
	fr.write("d0", 4) // the shipper's next writes are refused
	waitFor(t, "the original frozen again, compared and the changes sent", func() bool {
		c := fr.checksum()
		return c != nil && c.Thawed == 1 && c.State == "done" && fr.checksumPending() == 0
	})
	if c := fr.checksum(); c.Compared != (8+16)<<20 || c.Differ < 65536 {
		t.Fatalf("the compare after the thaw: %+v", c)
	}
	fr.mustThawedEvent("vm1")
	want := fr.sums()
	fr.checkFailedBack(want)
}

// The same at failback: an original agent thawed once the changes are
// drained (nothing left to ship) is found by the verify, frozen again,
// compared, the differences sent, and the verify passes.
func TestFailbackThawedBeforeVerify(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	fr.write("d1", 4)
	fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	fr.thawOriginal("d0", 65536*3)
	want := fr.sums()
	fr.checkFailedBack(want)
	fr.mustThawedEvent("vm1")
	all, err := fr.client.Failovers(ctx, true)
	if err != nil || len(all) == 0 || all[0].Failback == nil || all[0].Failback.Checksum == nil || all[0].Failback.Checksum.Thawed != 1 {
		t.Fatalf("the failover after failback: %+v %v", all, err)
	}
}

// The compare begun again after a thaw survives a server stop in its
// middle: the record (thawed, the compare's progress) makes the restarted
// server go on with it before shipping, and failback ends equal.
func TestFailbackThawedCompareResumes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	fr.write("d0", 4)
	fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	stopped := make(chan struct{})
	var once sync.Once
	id := fr.machine("vm1").ID
	setCompareHook(t, id, func(ctx context.Context, disk string, off int64) {
		if disk == "d1" {
			once.Do(func() { close(stopped) })
			<-ctx.Done() // held until the server stops
		}
	})
	fr.thawOriginal("d1", 65536*9)
	fr.write("d0", 4) // the shipper's next writes are refused
	<-stopped
	fr.stop()
	server.SetFailbackCompareHook(id, nil)
	fr.restart2()
	waitFor(t, "the compare after the restart", func() bool {
		c := fr.checksum()
		return c != nil && c.Thawed == 1 && c.State == "done" && fr.checksumPending() == 0
	})
	want := fr.sums()
	fr.checkFailedBack(want)
}
