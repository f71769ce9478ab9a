package web

import (
	"flag"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

var update = flag.Bool("update", false, "rewrite the testdata/*.golden files with the current output")

const (
	kib = int64(1) << 10
	mib = kib << 10
	gib = mib << 10
)

// Machines in each state the console shows, against testNow.
var (
	initialMachine = api.Machine{
		ID: "5f2c9a41-7d3e-4b8a-9c11-0e6f2d7a3b90", Name: "web-01", Connected: true, AgentVersion: "0.4.0",
		LastSeen: testNow.Add(-2 * time.Second), State: api.StateInitial, Progress: 0.42,
		BytesReceived: 42 * gib, CacheBytes: 96 * mib,
		Disks: []api.Disk{
			{Index: 0, Name: "system", Size: 20 * gib, State: api.StateProtected, Progress: 1},
			{Index: 1, Name: "data", Size: 80 * gib, State: api.StateInitial, Progress: 0.275},
		},
	}
	protectedMachine = api.Machine{
		ID: "a1b2c3d4-0000-4000-8000-000000000001", Name: "sql-prod", Connected: true, AgentVersion: "0.4.0",
		LastSeen: testNow, State: api.StateProtected, Progress: 1,
		RPO: 800 * time.Millisecond, RPOKnown: true,
		LastPoint:  &api.Point{ID: "000000000000a3f1", Time: testNow.Add(-3*time.Minute - 12*time.Second), Kind: api.PointApp},
		PointCount: 1234, BytesReceived: 150 * gib, CacheBytes: 0,
		LastScrub: testNow.Add(-26 * time.Hour), ScrubResult: "no damage (644245094400 bytes of the replica and 1073741824 bytes held by points checked)",
		Disks: []api.Disk{
			{Index: 0, Name: "os", Size: 60 * gib, State: api.StateProtected, Progress: 1},
			{Index: 1, Name: "sqldata", Size: 500 * gib, State: api.StateProtected, Progress: 1},
			{Index: 2, Name: "sqllog", Size: 64 * gib, State: api.StateProtected, Progress: 1},
		},
	}
	resyncMachine = api.Machine{
		ID: "c0ffee00-1111-4222-8333-444455556666", Name: "files-02", Connected: true, AgentVersion: "0.3.9",
		LastSeen: testNow, State: api.StateResync, Progress: 1,
		Reason: "the agent's spool overflowed while disconnected: changes were lost",
		RPO:    42 * time.Minute, RPOKnown: true,
		LastPoint:  &api.Point{ID: "0000000000000051", Time: testNow.Add(-45 * time.Minute), Kind: api.PointCrash},
		PointCount: 81, BytesReceived: 1536 * mib, CacheBytes: 3 * gib / 2,
		Disks: []api.Disk{
			{Index: 0, Name: "sda", Size: 32 * gib, State: api.StateProtected, Progress: 1},
			{Index: 1, Name: "sdb", Size: 2048 * gib, State: api.StateResync, Progress: 1,
				Reason: "the agent's spool overflowed while disconnected: changes were lost",
				Resync: &api.Resync{State: api.ResyncScheduled, Reason: "the agent's spool overflowed while disconnected: changes were lost",
					Scheduled: testNow.Add(3*time.Hour + 10*time.Minute)}},
			{Index: 2, Name: "sdc", Size: 100 * gib, State: api.StateResync, Progress: 1, Reason: "disk grew from 50 GiB to 100 GiB",
				Resync: &api.Resync{State: api.ResyncRunning, Reason: "disk grew from 50 GiB to 100 GiB", Manual: true,
					Total: 100 * gib, Compared: 45 * gib, Sent: 12 * mib}},
			{Index: 3, Name: "sdd", Size: 10 * gib, State: api.StateResync, Progress: 1, Reason: "operator request",
				Resync: &api.Resync{State: api.ResyncFailed, Reason: "operator request", Attempts: 5,
					LastError: "read /dev/sdd at 4096: input/output error"}},
		},
	}
	disconnectedMachine = api.Machine{
		ID: "deadbeef-2222-4333-8444-555566667777", Name: "app-03", Connected: false, AgentVersion: "0.4.0",
		LastSeen: testNow.Add(-2*time.Hour - 10*time.Minute), State: api.StateProtected, Progress: 1,
		LastPoint:  &api.Point{ID: "00000000000003e8", Time: testNow.Add(-2*time.Hour - 11*time.Minute), Kind: api.PointCrash},
		PointCount: 1000, BytesReceived: 75 * gib, CacheBytes: 512,
		Error:     "agent connection lost: read tcp 10.0.0.5:9443: connection reset by peer",
		LastScrub: testNow.Add(-3 * time.Hour), ScrubDamage: true,
		ScrubResult: "1 damaged blocks in the replica (being resynced from the source), 1 damaged blocks in 1 recovery points; 42949672960 bytes checked",
		Disks:       []api.Disk{{Index: 0, Name: "disk0", Size: 40 * gib, State: api.StateProtected, Progress: 1}},
	}
	unprotectedMachine = api.Machine{
		ID: "0123456789abcdef0123456789abcdef", Name: "old-erp", AgentVersion: "0.4.0",
		LastSeen: testNow.Add(-26 * time.Hour), State: api.StateUnprotected, Progress: 1,
		Reason:      "replication disabled; the replica and its recovery points are kept on the target",
		Unprotected: true, UnprotectedAt: testNow.Add(-25 * time.Hour),
		LastPoint:  &api.Point{ID: "0000000000000a00", Time: testNow.Add(-25*time.Hour - time.Minute), Kind: api.PointCrash},
		PointCount: 12, BytesReceived: 10 * gib,
		Error: "machine old-erp is unprotected (replication disabled at 2026-11-25T09:00:00Z): its agent is refused",
		Disks: []api.Disk{{Index: 0, Name: "disk0", Size: 40 * gib, State: api.StateProtected, Progress: 1}},
	}
	neverSeenMachine = api.Machine{
		ID: "77", Name: "new-vm", State: api.StateInitial,
	}
)

func testMachines() []api.Machine {
	return []api.Machine{initialMachine, protectedMachine, resyncMachine, disconnectedMachine, neverSeenMachine}
}

// TestRenderMachines compares the machines fragment, as the console serves
// it, with testdata/fragment_*.golden. Run with -update to rewrite them.
func TestRenderMachines(t *testing.T) {
	for _, tt := range []struct {
		name     string
		machines []api.Machine
	}{
		{"empty", nil},
		{"initial", []api.Machine{initialMachine}},
		{"protected", []api.Machine{protectedMachine}},
		{"resync", []api.Machine{resyncMachine}},
		{"disconnected", []api.Machine{disconnectedMachine, neverSeenMachine}},
		{"unprotected", []api.Machine{unprotectedMachine}},
		{"all", testMachines()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(tt.machines...)
			h := newTestHandler(t, b)
			id, _ := mustLogin(t, h, b)
			r := withSession(httptest.NewRequest("GET", "/fragments/machines", nil), id)
			r.Header.Set("HX-Request", "true")
			w := serve(h, r)
			if w.Code != http.StatusOK {
				t.Fatalf("status %d", w.Code)
			}
			checkGolden(t, "fragment_"+tt.name, w.Body.String())
		})
	}
}

// TestRenderPages compares whole pages with testdata/page_*.golden.
func TestRenderPages(t *testing.T) {
	b := newFakeBackend(protectedMachine)
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b) // session-1, csrf-1

	checkPage := func(name string, r *http.Request, status int) {
		t.Helper()
		w := serve(h, r)
		if w.Code != status {
			t.Fatalf("%s: status %d, want %d", name, w.Code, status)
		}
		checkGolden(t, "page_"+name, w.Body.String())
	}
	checkPage("login", httptest.NewRequest("GET", "/login", nil), http.StatusOK)
	checkPage("machines", withSession(httptest.NewRequest("GET", "/machines", nil), id), http.StatusOK)
	checkPage("settings", withSession(httptest.NewRequest("GET", "/settings", nil), id), http.StatusOK)

	b.machines = []api.Machine{resyncMachine}
	checkPage("resync", withSession(httptest.NewRequest("GET", "/machines/"+resyncMachine.ID+"/resync", nil), id), http.StatusOK)
	checkPage("resync_disk", withSession(httptest.NewRequest("GET", "/machines/"+resyncMachine.ID+"/resync?disk=sdd", nil), id), http.StatusOK)
}

// assetVersion matches the content hashes in static URLs, so that editing
// the stylesheet does not change every golden page.
var assetVersion = regexp.MustCompile(`\?v=[0-9a-f]{12}`)

// checkGolden compares got with testdata/name.golden, or writes it there
// with -update. Tags go one per line so that a diff shows what changed.
func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	got = assetVersion.ReplaceAllString(got, "?v=HASH")
	got = strings.ReplaceAll(got, "><", ">\n<") + "\n"
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from the output; run go test -update and review the diff.\n--- got:\n%s", path, got)
	}
}
