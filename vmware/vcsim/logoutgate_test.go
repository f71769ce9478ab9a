package vcsim

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/types"
)

// pending is how many WaitForUpdates calls the gate counts now.
func (g *logoutGate) pending() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, m := range g.waits {
		for _, c := range m {
			n += c
		}
	}
	return n
}

// A session's Logout ends that session's long poll and waits until it has
// returned (the simulator deadlocks when the two overlap: logoutgate.go);
// another session's Logout neither ends it nor waits for it.
func TestLogoutWaitsForItsSessionsPoll(t *testing.T) {
	sim, err := Start("user", "pass")
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	ctx := context.Background()
	c1, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Session 1's poll: a filter on the root folder's name, its first
	// answer (the whole state) taken, then a poll that finds nothing to
	// report and waits its MaxWaitSeconds.
	pc := c1.ServiceContent.PropertyCollector
	_, err = methods.CreateFilter(ctx, c1, &types.CreateFilter{This: pc, Spec: types.PropertyFilterSpec{
		ObjectSet: []types.ObjectSpec{{Obj: c1.ServiceContent.RootFolder}},
		PropSet:   []types.PropertySpec{{Type: "Folder", PathSet: []string{"name"}}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	first, err := methods.WaitForUpdatesEx(ctx, c1, &types.WaitForUpdatesEx{This: pc})
	if err != nil || first.Returnval == nil {
		t.Fatalf("first poll: %v %+v", err, first)
	}
	const maxWait = 600 // seconds: a poll that ends before is one the gate ended
	wait := int32(maxWait)
	polled := make(chan error, 1)
	go func() {
		_, err := methods.WaitForUpdatesEx(ctx, c1, &types.WaitForUpdatesEx{This: pc, Version: first.Returnval.Version,
			Options: &types.WaitOptions{MaxWaitSeconds: &wait}})
		polled <- err
	}()
	deadline := time.Now().Add(time.Minute) // a hung simulator, not a pace
	for sim.gate.pending() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the poll never reached the simulator")
		}
		time.Sleep(time.Millisecond)
	}
	// Another session logs out at once.
	if err := c2.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	if sim.gate.pending() == 0 {
		t.Fatalf("session 2's Logout ended session 1's poll, or returned only after it (%d s)", maxWait)
	}
	// Session 1's Logout returns after its poll did.
	if err := c1.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-polled:
		// Ended by the gate's CancelWaitForUpdates, long before its
		// MaxWaitSeconds: RequestCanceled.
		if err == nil || !strings.Contains(err.Error(), "RequestCanceled") && !strings.Contains(err.Error(), "canceled") {
			t.Fatalf("the poll ended with %v: want it cancelled by the Logout", err)
		}
	default:
		t.Fatal("session 1's Logout returned while its own poll still ran in the simulator")
	}
}
