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

// groupRig is a rig whose scale-out process servers beat every second
// (PSHeartbeatLost 3 s): a cut's command reaches them within a second.
func groupRig(t *testing.T, dir string) *rig {
	r := &rig{t: t, dir: dir, log: quietLogger()}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.tune = func(c *server.Config) { c.PSHeartbeatLost = 3 * time.Second }
	r.start()
	return r
}

// A replication group whose members sit on three process servers (the
// built-in one, ps1 and ps2, each a real process server in this process):
// every group point is one consistent cut across them (a write is in it
// only if every earlier write, on whichever machine, is too), and every
// member's point records the group point's cut.
func TestGroupCutsAcrossProcessServers(t *testing.T) {
	// Not parallel: it runs scale-out process servers, whose heartbeats
	// and commands have deadlines (PSHeartbeatLost, psCommandWait) that
	// the package's other tests run beside it made them overrun.
	dir := t.TempDir()
	r := groupRig(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	r.runPS(ctx, "ps1")
	r.runPS(ctx, "ps2")
	// Three cuts: one takes a heartbeat interval (a second here) to reach
	// the scale-out process servers, and the writer runs out of blocks
	// (196,608 writes) after about four on an idle machine.
	checkGroupCuts(t, r, dir, map[string]string{"vm1": "ps1", "vm2": "ps2"}, 3)
}

// A member that cannot take part fails the whole cut: with the agent of
// the member on ps1 stopped, the group point is refused with the reason,
// and no group point is recorded; the member on the built-in process
// server is released (a write to it completes, and a later cut, once the
// agent is back, makes a group point).
func TestGroupCutAcrossProcessServersFailsWhole(t *testing.T) {
	// Not parallel: it runs scale-out process servers, whose heartbeats
	// and commands have deadlines (PSHeartbeatLost, psCommandWait) that
	// the package's other tests run beside it made them overrun.
	dir := t.TempDir()
	r := groupRig(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	r.runPS(ctx, "ps1")
	cfgs := map[string]agent.Config{}
	agents := map[string]*runningAgent{}
	for i, name := range []string{"vm0", "vm1"} {
		d := filepath.Join(dir, name+".img")
		mustDisk(t, d, 8<<20, uint64(i+1))
		cfgs[name] = r.agentConfig(name, agent.DiskSpec{Name: "d", Path: d})
		agents[name] = startAgent(t, cfgs[name])
		r.waitProtected(name)
		if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/"+name+"/group", api.GroupRequest{Group: "g"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.client.SwitchProcessServer(ctx, "vm1", "ps1"); err != nil {
		t.Fatal(err)
	}
	r.waitConnected("vm1")
	var gp api.GroupPointJSON
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/groups/g/points", api.TagRequest{}, &gp); err != nil {
		t.Fatalf("a cut with both members connected: %v", err)
	}
	agents["vm1"].close()
	r.waitDisconnected("vm1")
	err := r.client.Do(ctx, http.MethodPost, "/api/v1/groups/g/points", api.TagRequest{}, &api.GroupPointJSON{})
	if err == nil || !strings.Contains(err.Error(), "not connected") || !strings.Contains(err.Error(), "ps1") {
		t.Fatalf("a cut with vm1's agent stopped: %v", err)
	}
	var gps []api.GroupPointJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/groups/g/points", nil, &gps); err != nil {
		t.Fatal(err)
	}
	if len(gps) != 1 || gps[0].ID != gp.ID {
		t.Fatalf("group points after the failed cut: %+v, want only %s", gps, gp.ID)
	}
	startAgent(t, cfgs["vm1"])
	r.waitConnected("vm1")
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/groups/g/points", api.TagRequest{}, &gp); err != nil || gp.Cut == "" || len(gp.Members) != 2 {
		t.Fatalf("a cut once vm1 is back: %+v, %v", gp, err)
	}
}

// waitConnected waits until a machine's agent is connected to its
// process server, whichever it is.
func (r *rig) waitConnected(name string) {
	r.t.Helper()
	r.waitMachine(name, "connected", func(m api.Machine) bool { return m.Connected })
}

// waitDisconnected waits until a machine's agent is not connected.
func (r *rig) waitDisconnected(name string) {
	r.t.Helper()
	r.waitMachine(name, "disconnected", func(m api.Machine) bool { return !m.Connected })
}

func (r *rig) waitMachine(name, what string, ok func(api.Machine) bool) {
	r.t.Helper()
	deadline := time.Now().Add(hung)
	for time.Now().Before(deadline) {
		if ok(r.machine(name)) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.t.Fatalf("machine %s never %s: %+v", name, what, r.machine(name))
}
