package agent

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
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
