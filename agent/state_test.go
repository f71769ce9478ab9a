package agent

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/asrdr/asr/replication"
)

// mustStateStore makes a state store of two disks in a new directory.
func mustStateStore(t *testing.T) *stateStore {
	t.Helper()
	st := &state{MachineID: "m1", Name: "vm1", DataAddr: "h:1", LogID: "0123456789abcdef",
		Disks: []diskState{{Index: 0, Name: "a", Size: 1 << 30}, {Index: 3, Name: "b", Size: 1 << 20}}}
	s := newStateStore(t.TempDir(), st)
	if err := s.save(); err != nil {
		t.Fatal(err)
	}
	return s
}

// mustSaved reads the state file back, as the next start would.
func mustSaved(t *testing.T, s *stateStore) *state {
	t.Helper()
	st, err := loadState(s.dir)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// breakSaves makes every save fail (a directory where the state file's
// rename goes; a read-only directory would not stop root), until the
// returned func repairs it.
func breakSaves(t *testing.T, s *stateStore) func() {
	t.Helper()
	path := filepath.Join(s.dir, stateFile)
	os.Remove(path)
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	return func() { os.Remove(path) }
}

func TestStateStoreDiverged(t *testing.T) {
	s := mustStateStore(t)
	if err := s.markDiverged(3, "write failed"); err != nil {
		t.Fatal(err)
	}
	if err := s.markDiverged(3, "another"); err != nil { // the first reason stays
		t.Fatal(err)
	}
	if got := mustSaved(t, s).Disks[1].Diverged; got != "write failed" {
		t.Fatalf("saved divergence %q", got)
	}
	hello := []replication.DiskInfo{{Index: 0}, {Index: 3}}
	s.fillDiverged(hello)
	if hello[0].Diverged != "" || hello[1].Diverged != "write failed" {
		t.Fatalf("hello disks %+v", hello)
	}
	// Told of another reason than the one held now: kept.
	if err := s.clearDiverged([]replication.DiskInfo{{Index: 3, Diverged: "older"}}); err != nil {
		t.Fatal(err)
	}
	if mustSaved(t, s).Disks[1].Diverged == "" {
		t.Fatal("a divergence the server was not told of was cleared")
	}
	if err := s.clearDiverged(hello); err != nil {
		t.Fatal(err)
	}
	if got := mustSaved(t, s).Disks[1]; got.Diverged != "" || got.DivergedRanges != nil {
		t.Fatalf("divergence kept after the server was told: %+v", got)
	}
}

// The acknowledged progress moves each disk's saved cursor forward only;
// an acknowledgement without progress is not worth a save.
func TestStateStoreAcked(t *testing.T) {
	s := mustStateStore(t)
	if err := s.acked(10, nil); err != nil {
		t.Fatal(err)
	}
	if got := mustSaved(t, s).Acked; got != 0 {
		t.Fatalf("an acknowledgement alone was saved (acked %d)", got)
	}
	marks := []progressMark{{seq: 5, disk: 0, cursor: 16 << 20}, {seq: 9, disk: 3, cursor: 1 << 20, done: true}, {seq: 10, disk: 0, cursor: 8 << 20}}
	if err := s.acked(10, marks); err != nil {
		t.Fatal(err)
	}
	st := mustSaved(t, s)
	if st.Acked != 10 || st.Disks[0].Cursor != 16<<20 || st.Disks[0].Done || st.Disks[1].Cursor != 1<<20 || !st.Disks[1].Done {
		t.Fatalf("saved %+v", st)
	}
}

// Entering an overflow that cannot be saved is undone; leaving one stays
// done in memory (the next start then resyncs in full: never wrong).
func TestStateStoreOverflow(t *testing.T) {
	s := mustStateStore(t)
	repair := breakSaves(t, s)
	if err := s.setOverflow(true); err == nil || s.overflowing() {
		t.Fatalf("setOverflow(true) with a failing save = %v, overflowing %v", err, s.overflowing())
	}
	repair()
	if err := s.setOverflow(true); err != nil || !mustSaved(t, s).Overflow {
		t.Fatalf("setOverflow(true) = %v", err)
	}
	repair = breakSaves(t, s)
	if err := s.setOverflow(false); err == nil || s.overflowing() {
		t.Fatalf("setOverflow(false) with a failing save = %v, overflowing %v", err, s.overflowing())
	}
	repair()
}

func TestStateStoreResync(t *testing.T) {
	s := mustStateStore(t)
	job := replication.ResyncJob{ID: 4, Disk: 3, Reason: "operator"}
	if started, err := s.startResync(job); !started || err != nil {
		t.Fatalf("startResync = %v, %v", started, err)
	}
	if started, err := s.startResync(job); started || err != nil {
		t.Fatalf("a resent job started again: %v, %v", started, err)
	}
	got, err := s.updateResync(4, func(x *resyncState) { x.Started, x.StartSeq, x.Cursor = true, 77, 1<<20 })
	if err != nil || got.StartSeq != 77 || !s.resyncCurrent(4) {
		t.Fatalf("updateResync = %+v, %v", got, err)
	}
	if saved := mustSaved(t, s).Resync; saved == nil || saved.Cursor != 1<<20 {
		t.Fatalf("saved job %+v", saved)
	}
	// A copy, not the state itself.
	s.resyncJob().Cursor = 0
	if s.resyncJob().Cursor != 1<<20 {
		t.Fatal("resyncJob returned the state's own job")
	}
	if _, err := s.updateResync(5, func(*resyncState) {}); err != errJobReplaced {
		t.Fatalf("update of another job = %v", err)
	}
	if ended, err := s.endResync(5); ended || err != nil {
		t.Fatalf("endResync of another job = %v, %v", ended, err)
	}
	if ended, err := s.endResync(4); !ended || err != nil || mustSaved(t, s).Resync != nil {
		t.Fatalf("endResync = %v, %v", ended, err)
	}
}

func TestStateStoreNewLog(t *testing.T) {
	s := mustStateStore(t)
	s.startResync(replication.ResyncJob{ID: 1, Disk: 0})
	s.setOverflow(true)
	if err := s.startNewLog(41, map[uint32]bool{3: true}, map[uint32]int64{0: 1 << 30, 3: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	st := mustSaved(t, s)
	if st.Acked != 41 || st.Resync != nil || st.Overflow {
		t.Fatalf("saved %+v", st)
	}
	want := []diskState{{Index: 0, Name: "a", Size: 1 << 30}, {Index: 3, Name: "b", Size: 1 << 20, Cursor: 1 << 20, Done: true}}
	if !reflect.DeepEqual(st.Disks, want) {
		t.Fatalf("disks %+v, want %+v", st.Disks, want)
	}
	if s.machineID() != "m1" || s.logID() != "0123456789abcdef" || s.dataAddr() != "h:1" || s.name() != "vm1" {
		t.Fatal("identity changed")
	}
}
