package server

import (
	"strings"
	"testing"

	"github.com/asrdr/asr/server/api"
)

// A cut's decisions: a member ready is told to hold only once the hold is
// decided, a member holding is told to tag only once the cut is decided;
// a failure releases everyone and stands; a decided cut or release is
// never taken back; a report from another process server than the
// member's, or of a machine not in the cut, is refused.
func TestCutRunDecisions(t *testing.T) {
	t.Parallel()
	c := newCutRun(9, false, map[string]string{"m1": "ps1", "m2": "ps2"})
	if err := c.report("ps2", api.PSCutReport{MachineID: "m1", State: api.PSCutReady}); err == nil || !strings.Contains(err.Error(), "through process server ps1") {
		t.Fatalf("m1 reported by ps2: %v", err)
	}
	if err := c.report("ps1", api.PSCutReport{MachineID: "m3", State: api.PSCutReady}); err == nil || !strings.Contains(err.Error(), "not a member") {
		t.Fatalf("m3 reported: %v", err)
	}
	decided := func(state, want string) {
		t.Helper()
		d, ch := c.decision(state)
		if d.Action != want || (want == "") != (ch != nil) {
			t.Fatalf("%s in phase %s: %+v (waiting: %v), want %q", state, c.phase, d, ch != nil, want)
		}
	}
	c.report("ps1", api.PSCutReport{MachineID: "m1", State: api.PSCutReady})
	if ok, _, _ := c.all(api.PSCutReady); ok {
		t.Fatal("all ready with m2 silent")
	}
	decided(api.PSCutReady, "")
	_, changed := c.decision(api.PSCutReady)
	c.report("ps2", api.PSCutReport{MachineID: "m2", State: api.PSCutReady})
	<-changed // a report wakes the waiters
	if ok, failed, _ := c.all(api.PSCutReady); !ok || failed != "" {
		t.Fatalf("all ready: %v %q", ok, failed)
	}
	c.decide(api.PSCutHold, "")
	decided(api.PSCutReady, api.PSCutHold)
	decided(api.PSCutHeld, "")
	c.report("ps1", api.PSCutReport{MachineID: "m1", State: api.PSCutHeld})
	c.report("ps2", api.PSCutReport{MachineID: "m2", State: api.PSCutHeld})
	c.decide(api.PSCutCut, "")
	decided(api.PSCutHeld, api.PSCutCut)
	decided(api.PSCutReady, api.PSCutRelease) // never held: not in the cut
	c.decide(api.PSCutRelease, "late")
	decided(api.PSCutHeld, api.PSCutCut) // a cut stays decided

	f := newCutRun(10, false, map[string]string{"m1": "ps1", "m2": "ps2"})
	f.report("ps1", api.PSCutReport{MachineID: "m1", State: api.PSCutFailed, Error: "not connected"})
	f.report("ps1", api.PSCutReport{MachineID: "m1", State: api.PSCutReady})
	if _, failed, _ := f.all(api.PSCutReady); !strings.Contains(failed, "m1 on process server ps1: not connected") {
		t.Fatalf("a failure does not stand: %q", failed)
	}
	f.decide(api.PSCutRelease, "m1 failed")
	f.decide(api.PSCutHold, "")
	if d, _ := f.decision(api.PSCutReady); d.Action != api.PSCutRelease || d.Reason != "m1 failed" {
		t.Fatalf("a released cut: %+v", d)
	}
}
