package vcsim

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
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
	// Session 1's Logout returns after its poll did, in the simulator:
	// the gate counts a call until its handler has returned. (The poll's
	// answer may reach this client after the Logout's: that is the HTTP
	// client's order, not the simulator's.)
	if err := c1.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	if n := sim.gate.pending(); n != 0 {
		t.Fatalf("session 1's Logout returned while %d poll(s) still ran in the simulator", n)
	}
	// Ended by the gate's CancelWaitForUpdates, long before its
	// MaxWaitSeconds: RequestCanceled.
	select {
	case err := <-polled:
		if err == nil || !strings.Contains(err.Error(), "RequestCanceled") && !strings.Contains(err.Error(), "canceled") {
			t.Fatalf("the poll ended with %v: want it cancelled by the Logout", err)
		}
	case <-time.After(maxWait / 2 * time.Second): // a hung client, not a pace
		t.Fatal("the poll's answer never came")
	}
}

// The gate lets a Logout through only after its session's poll has
// returned, even when the poll does not end at the cancel (a fake
// simulator here: the real one ends it at once, so only this shows the
// wait itself).
func TestLogoutGateWaitsForAPollThatIgnoresTheCancel(t *testing.T) {
	var mu sync.Mutex
	var order []string
	note := func(s string) {
		mu.Lock()
		defer mu.Unlock()
		order = append(order, s)
	}
	cancelled := make(chan struct{})
	release := make(chan struct{})
	logoutIn := make(chan struct{})
	next := func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		switch {
		case bytes.Contains(body, []byte("<CancelWaitForUpdates")):
			note("cancel " + thisRE.FindStringSubmatch(string(body))[1])
			close(cancelled)
		case bytes.Contains(body, []byte("<WaitForUpdates")):
			<-release
			note("poll returned")
		case bytes.Contains(body, []byte("<Logout")):
			note("logout")
			close(logoutIn)
		}
	}
	g := newLogoutGate()
	h := g.wrap(next)
	call := func(body string) {
		r := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(body))
		r.AddCookie(&http.Cookie{Name: "vmware_soap_session", Value: "s1"})
		h(httptest.NewRecorder(), r)
	}
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		call(`<Envelope><Body><WaitForUpdatesEx><_this type="PropertyCollector">pc-7</_this></WaitForUpdatesEx></Body></Envelope>`)
	}()
	for g.pending() == 0 {
		time.Sleep(time.Millisecond)
	}
	loggedOut := make(chan struct{})
	go func() {
		defer close(loggedOut)
		call(`<Envelope><Body><Logout><_this type="SessionManager">SessionManager</_this></Logout></Body></Envelope>`)
	}()
	<-cancelled
	select {
	case <-logoutIn:
		t.Fatal("the Logout reached the simulator while its session's poll still ran")
	case <-time.After(200 * time.Millisecond): // long enough to see a gate that does not wait
	}
	close(release)
	<-polled
	<-loggedOut
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"cancel pc-7", "poll returned", "logout"}; !slices.Equal(order, want) {
		t.Fatalf("order %q, want %q", order, want)
	}
}
