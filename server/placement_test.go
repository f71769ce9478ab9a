package server_test

import (
	"context"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// Automatic placement (asr server --placement auto): a new machine goes to
// the least loaded healthy process server. vm1 registers first: the
// built-in one and ps1 are alike, the built-in one is chosen; vm2 then
// goes to ps1 (the built-in one serves vm1), with an event saying so, and
// its agent's records reach ps1. An unknown placement is refused at start.
func TestPlacementAuto(t *testing.T) {
	// Not parallel: it runs scale-out process servers, whose heartbeats
	// and commands have deadlines (PSHeartbeatLost, psCommandWait) that
	// the package's other tests run beside it made them overrun.
	if _, err := server.Open(context.Background(), server.Config{DataDir: t.TempDir(), Placement: "random"}); err == nil || !strings.Contains(err.Error(), "placement") {
		t.Fatalf("an unknown placement: %v", err)
	}
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.Placement = server.PlacementAuto }}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	r.runPS(ctx, "ps1")

	d1 := filepath.Join(dir, "d1.img")
	mustDisk(t, d1, 4<<20, 1)
	startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d1}))
	r.waitProtected("vm1")
	d2 := filepath.Join(dir, "d2.img")
	mustDisk(t, d2, 4<<20, 2)
	startAgent(t, r.agentConfig("vm2", agent.DiskSpec{Name: "d0", Path: d2}))
	for {
		l, err := r.client.ProcessServers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var ps1, builtin api.ProcessServerInfo
		for _, p := range l {
			switch p.Name {
			case "ps1":
				ps1 = p
			case api.BuiltinProcessServer:
				builtin = p
			}
		}
		if ps1.Machines == 1 && ps1.Figures.RawBytes > 0 {
			if builtin.Machines != 1 {
				t.Fatalf("the built-in process server has %d machines, want vm1 alone", builtin.Machines)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("vm2 was not placed on ps1: %+v", l)
		case <-time.After(20 * time.Millisecond):
		}
	}
	var evs []api.EventJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=vm2", nil, &evs); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range evs {
		found = found || e.Kind == "process-server-placement" && strings.Contains(e.Message, "placed on process server ps1")
	}
	if !found {
		t.Fatalf("no placement event for vm2: %+v", evs)
	}
}
