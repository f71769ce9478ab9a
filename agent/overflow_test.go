package agent

import (
	"bytes"
	"context"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// mustOverflow makes the overflow of one disk, with its state store.
func mustOverflow(t *testing.T, size int64) (*overflow, *Disk, *stateStore) {
	t.Helper()
	d, sp, dir := mustTestDisk(t, size)
	st := newStateStore(dir, &state{MachineID: "m1", Disks: []diskState{{Index: 0, Name: "d"}}})
	o := newOverflow(context.Background(), slog.Default(), sp, diskSet{d}, st, &eventQueue{})
	d.over, d.changes = o, newChangeMap(size)
	t.Cleanup(o.Close)
	return o, d, st
}

// An overflow that cannot be recorded in the state file is not entered:
// the maps would be lost with the agent, unknown to its next start, and the
// disks diverge silently. The guest's writes wait for spool room instead.
func TestOverflowNeedsItsStateSaved(t *testing.T) {
	o, d, st := mustOverflow(t, 1<<20)
	// A directory where state.json goes: the save's rename fails.
	if err := os.Mkdir(filepath.Join(st.dir, stateFile), 0o700); err != nil {
		t.Fatal(err)
	}
	if o.enter(d) || o.active.Load() || st.overflowing() {
		t.Fatalf("entered an overflow that is not on disk: active %v, state %v", o.active.Load(), st.overflowing())
	}
	os.Remove(filepath.Join(st.dir, stateFile))
	if !o.enter(d) || !o.active.Load() {
		t.Fatal("the overflow was not entered once the state could be saved")
	}
	saved, err := loadState(st.dir)
	if err != nil || !saved.Overflow {
		t.Fatalf("saved state %+v, %v: want the overflow recorded", saved, err)
	}
}

// TestOverflowCatchesUp: with the spool full, guest writes go on (tracked
// in the changed-block map, after the overflow's start record); once the
// spool drains, the loop resends the marked blocks as they are now and
// logs the done record. The replica plus the log is then the disk.
func TestOverflowCatchesUp(t *testing.T) {
	const size = 8 << 20
	dir := t.TempDir()
	path := filepath.Join(dir, "d.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(path, size)
	sp, _, err := spool.Open(filepath.Join(dir, "spool"), spool.Options{MaxBytes: 1 << 20}, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sp.Close() })
	d, err := openDisk(context.Background(), 0, "d", path, sp, &latency{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	st := newStateStore(dir, &state{MachineID: "m1", Disks: []diskState{{Index: 0, Name: "d"}}})
	events := &eventQueue{}
	o := newOverflow(context.Background(), slog.New(slog.DiscardHandler), sp, diskSet{d}, st, events)
	d.over, d.changes = o, newChangeMap(size)
	o.start()
	defer o.Close()

	rng := rand.New(rand.NewPCG(5, 5))
	write := func() {
		t.Helper()
		b := make([]byte, 4096*(1+rng.IntN(4)))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		if err := d.WriteAt(b, int64(rng.IntN(size/4096-4))*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	for !o.active.Load() {
		write()
	}
	for range 100 { // tracked, not logged
		write()
	}
	if !st.overflowing() || o.marked.Load() == 0 {
		t.Fatalf("overflow not recorded: state %v, %d blocks marked", st.overflowing(), o.marked.Load())
	}
	// A server from here on: it applies what the spool ships to its
	// replica and acknowledges it, and the spool drains.
	replica := make([]byte, size)
	rd, err := sp.NewReader(sp.First())
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var logged []replication.Record
	ship := func() {
		t.Helper()
		for {
			buf, first, n, err := rd.Next(context.Background(), nil, 4<<20, 0)
			if err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				return
			}
			recs, err := replication.DecodeRecords(buf, first, n)
			if err != nil {
				t.Fatal(err)
			}
			applyRecords(replica, recs)
			logged = append(logged, recs...)
			if err := sp.Ack(first + uint64(n) - 1); err != nil {
				t.Fatal(err)
			}
		}
	}
	ship()
	if last := logged[len(logged)-1]; last.Kind != replication.KindResync || last.Flags&replication.FlagDone != 0 {
		t.Fatalf("last record before the catch-up %+v: want the overflow's start", last)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		o.mu.Lock()
		began := o.began
		o.mu.Unlock()
		if !began && !st.overflowing() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the overflow did not end")
		}
		time.Sleep(time.Millisecond)
		ship()
	}
	ship()
	if last := logged[len(logged)-1]; last.Kind != replication.KindResync || last.Flags&replication.FlagDone == 0 {
		t.Fatalf("last record %+v: want the overflow's done record", last)
	}
	disk, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(replica, disk) {
		t.Fatal("the replica plus the log is not the disk after the catch-up")
	}
	if !d.changes.empty() {
		t.Fatal("blocks still marked")
	}
	ev := events.take()
	if len(ev) != 2 || ev[0].Kind != "spool-overflow" || ev[1].Kind != "spool-overflow-resynced" {
		t.Fatalf("events %+v", ev)
	}
}
