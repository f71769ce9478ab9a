package agent

import (
	"os"
	"path/filepath"
	"testing"
)

// An overflow that cannot be recorded in the state file is not entered:
// the maps would be lost with the agent, unknown to its next start, and the
// disks diverge silently. The guest's writes wait for spool room instead.
func TestOverflowNeedsItsStateSaved(t *testing.T) {
	a := mustCloseAgent(t, Config{})
	d := a.disks[0]
	o := &overflow{a: a}
	a.over, d.over = o, o
	// A directory where state.json goes: the save's rename fails.
	if err := os.Mkdir(filepath.Join(a.cfg.StateDir, stateFile), 0o700); err != nil {
		t.Fatal(err)
	}
	if o.enter(d) || o.active.Load() || a.st.Overflow {
		t.Fatalf("entered an overflow that is not on disk: active %v, state %v", o.active.Load(), a.st.Overflow)
	}
	os.Remove(filepath.Join(a.cfg.StateDir, stateFile))
	if !o.enter(d) || !o.active.Load() {
		t.Fatal("the overflow was not entered once the state could be saved")
	}
	st, err := loadState(a.cfg.StateDir)
	if err != nil || !st.Overflow {
		t.Fatalf("saved state %+v, %v: want the overflow recorded", st, err)
	}
}
