//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// TestE2EProcessServers: a real `asr server` and two real `asr
// process-server` processes on the same local target, beside an agent
// replicating through the built-in process server. A wrong passphrase is
// refused with a clear error and registers nothing; both process servers
// register, send heartbeats with their figures (`asr ps list --json`),
// hold the shared target open while the built-in process server goes on
// writing its machine's replica under that machine's lease (a point made
// meanwhile recovers bit-exact); kill -9 of one raises the critical
// ps-heartbeat alert; `asr ps remove` stops the other (its next heartbeat
// is refused). Switches are TestE2EProcessServerSwitch's.
func TestE2EProcessServers(t *testing.T) {
	t.Parallel()
	c := newClusterArgs(t, "--ps-heartbeat-lost", "3s")
	d0 := filepath.Join(c.dir, "d0.img")
	makeDisk(t, d0, 32<<20, 1)
	a := c.startAgent("vm1", nil, "d0="+d0)

	// A wrong passphrase: refused, clear error, nothing registered.
	bad := filepath.Join(c.dir, "bad-pass")
	os.WriteFile(bad, []byte("not-the-passphrase\n"), 0o600)
	_, err := runAsr("process-server", "--config", c.url(), "--passphrase-file", bad, "--data", filepath.Join(c.dir, "psx"),
		"--data-listen", "127.0.0.1:0", "--name", "psx")
	if err == nil || !strings.Contains(err.Error(), "wrong vault passphrase") {
		t.Fatalf("process server with a wrong passphrase: %v", err)
	}
	list := func() []api.ProcessServerInfo {
		t.Helper()
		var l []api.ProcessServerInfo
		if err := json.Unmarshal([]byte(c.mustCLI("ps", "list", "--json")), &l); err != nil {
			t.Fatal(err)
		}
		return l
	}
	if l := list(); len(l) != 1 || l[0].Name != api.BuiltinProcessServer {
		t.Fatalf("after the refused registration: %+v", l)
	}

	ps1, ps2 := c.startPS("ps1"), c.startPS("ps2")
	deadline := time.Now().Add(hungAfter)
	for {
		healthy := 0
		l := list()
		for _, p := range l {
			if !p.Builtin && p.State == api.PSHealthy && p.Figures.MemoryTotal > 0 && p.Figures.CacheState != "" &&
				strings.Contains(p.Figures.Target, filepath.Join(c.srvDir, "target")) {
				healthy++
			}
		}
		if healthy == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("process servers never both healthy: %+v", l)
		}
		time.Sleep(100 * time.Millisecond)
	}
	out := c.mustCLI("ps", "list")
	for _, want := range []string{"NAME", "builtin", "ps1", "ps2", "healthy"} {
		if !strings.Contains(out, want) {
			t.Fatalf("asr ps list lacks %q:\n%s", want, out)
		}
	}

	// The built-in process server writes vm1's replica while the two
	// others hold the target open: a point recovers bit-exact.
	c.waitState("vm1", "protected", 3*time.Minute)
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d0"), "-c", "write -P 0x5a 1M 4M", "-c", "write -P 0x33 20M 64k")
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d0": sha256File(t, d0)})

	// kill -9: no heartbeat, a critical alert (raised after the kill, and
	// active: one from before it would prove nothing).
	killed := time.Now()
	ps2.kill()
	deadline = time.Now().Add(hungAfter)
	for {
		var as []api.Alert
		if err := json.Unmarshal([]byte(c.mustCLI("alerts", "--json")), &as); err != nil {
			t.Fatal(err)
		}
		found := false
		for _, a := range as {
			found = found || a.Kind == api.AlertPSHeartbeat && a.Severity == api.SeverityCritical && strings.Contains(a.Message, "ps2") &&
				a.State == api.AlertActive && !a.Raised.Before(killed)
		}
		if found {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ps-heartbeat alert for ps2: %+v", as)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, p := range list() {
		if p.Name == "ps2" && p.State != api.PSNoHeartbeat {
			t.Fatalf("ps2 after kill -9: %+v", p)
		}
	}

	// Removed: ps1's next heartbeat is refused and it exits non-zero.
	c.mustCLI("ps", "remove", "ps1")
	select {
	case <-ps1.done:
	case <-time.After(hungAfter):
		t.Fatal("ps1 kept running after its removal")
	}
	if ps1.err == nil || !strings.Contains(ps1.logTail(), "not registered") {
		t.Fatalf("ps1 after its removal: %v\n%s", ps1.err, ps1.logTail())
	}
	if _, err := c.cli("ps", "remove", "builtin"); err == nil {
		t.Fatal("the built-in process server was removed")
	}
}

// TestE2EProcessServerSwitch: a real `asr server`, two real `asr
// process-server` and two agents under fio writes. vm1 goes to ps1 and
// vm2 to ps2, then vm1 moves from ps1 to ps2 mid-stream (`asr ps switch`),
// and both come back to the built-in process server; each switch is seen
// by the data arriving at the new process server. A process server with a
// machine cannot be removed. ps2 is killed (kill -9) with both machines on
// it and started again: it takes them back. At the end each machine's latest point
// recovers bit-exact: no write acknowledged to fio is lost, whichever
// process server received it.
func TestE2EProcessServerSwitch(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disks := map[string]string{}
	agents := map[string]*agentProc{}
	for i, vm := range []string{"vm1", "vm2"} {
		disks[vm] = filepath.Join(c.dir, vm+".img")
		makeDisk(t, disks[vm], 32<<20, uint64(i+1))
		agents[vm] = c.startAgent(vm, nil, "d0="+disks[vm])
	}
	for vm := range disks {
		c.waitState(vm, "protected", 3*time.Minute)
	}
	procs := map[string]*proc{}
	startPS := func(name string) { procs[name] = c.startPS(name) }
	startPS("ps1")
	startPS("ps2")
	received := func(name string) int64 {
		t.Helper()
		if p, ok := c.psInfo(name); ok {
			return p.Figures.RawBytes
		}
		return -1
	}
	deadline := time.Now().Add(hungAfter)
	for received("ps1") < 0 || received("ps2") < 0 {
		if time.Now().After(deadline) {
			t.Fatal("process servers never listed")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// fio on both machines until stopped: each run writes and verifies.
	stop := make(chan struct{})
	var bg background
	for i, vm := range []string{"vm1", "vm2"} {
		fioRounds(t, &bg, stop, vm, agents[vm].uri("d0"), 100*i)
	}
	switchTo := func(vm, to string) {
		t.Helper()
		before := received(to)
		c.mustCLI("ps", "switch", "--machine", vm, "--to", to)
		deadline := time.Now().Add(hungAfter)
		for received(to) <= before {
			if time.Now().After(deadline) {
				t.Fatalf("no data reached %s after switching %s to it", to, vm)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	switchTo("vm1", "ps1")
	switchTo("vm2", "ps2")
	switchTo("vm1", "ps2") // mid-stream, from one scale-out process server to another
	if _, err := c.cli("ps", "remove", "ps2"); err == nil || !strings.Contains(err.Error(), "serves 2 machines") {
		t.Fatalf("removing ps2 while it serves vm1 and vm2: %v", err)
	}
	// kill -9 of ps2 with both machines on it, under fio: the agents keep
	// spooling; started again (on another data port: the agents ask the
	// configuration server), it recovers its cache and takes them back.
	procs["ps2"].kill()
	os.Remove(filepath.Join(c.dir, "ps2.log"))
	startPS("ps2")
	deadline = time.Now().Add(hungAfter)
	for received("ps2") <= 0 {
		if time.Now().After(deadline) {
			t.Fatal("no data reached ps2 after its restart")
		}
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	if err := bg.wait(); err != nil {
		t.Fatal(err)
	}
	// Both on ps2: moved back together.
	if out := c.mustCLI("ps", "switch", "--from", "ps2", "--to", "builtin"); !strings.Contains(out, "2 machines moved") {
		t.Fatalf("asr ps switch --from ps2: %s", out)
	}
	// Back on the built-in process server: a point (asked again until the
	// agent is connected there) holds every write.
	for _, vm := range []string{"vm1", "vm2"} {
		deadline := time.Now().Add(hungAfter)
		var id string
		for {
			out, err := c.cli("tag", "--machine", vm, "--wait", "--timeout", tagTimeout)
			if err == nil {
				lines := strings.Split(strings.TrimSpace(out), "\n")
				id = lines[len(lines)-1]
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no point of %s after switching back: %v", vm, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
		c.recoverAndCheck(vm, id, map[string]string{"d0": sha256File(t, disks[vm])})
	}
	c.mustCLI("ps", "remove", "ps2")
}

// TestE2EProcessServerAutoSwitch: with --auto-switch, kill -9 of the
// process server two machines are on, under fio: its heartbeat stops, and
// the machines move by themselves to the healthy process servers, spread
// by churn: with the built-in one and ps2 both idle, one to each (never to
// the silent ps1); their agents follow. What the dead one acknowledged and
// did not apply is a sequence gap, resynced (asr resync --wait) where each
// machine now is, never lost silently: each machine's latest point, the
// one on ps2 made there, recovers bit-exact.
func TestE2EProcessServerAutoSwitch(t *testing.T) {
	t.Parallel()
	c := newClusterArgs(t, "--auto-switch", "--ps-heartbeat-lost", "3s")
	vms := []string{"vm1", "vm2"}
	disks := map[string]string{}
	agents := map[string]*agentProc{}
	for i, vm := range vms {
		disks[vm] = filepath.Join(c.dir, vm+".img")
		makeDisk(t, disks[vm], 24<<20, uint64(7+i))
		agents[vm] = c.startAgent(vm, nil, "d0="+disks[vm])
	}
	for _, vm := range vms {
		c.waitState(vm, "protected", 3*time.Minute)
	}
	ps1 := c.startPS("ps1")
	c.startPS("ps2")
	c.waitPS("ps1 and ps2 healthy", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps1"].State == api.PSHealthy && l["ps2"].State == api.PSHealthy
	})

	stopFio := fioOn(t, vms, agents, 700)
	c.switchTo("vm1", "ps1")
	c.switchTo("vm2", "ps1")
	// The built-in process server serves nothing now and its upload
	// window (10 s) has emptied: it and ps2 are equally idle.
	c.waitPS("the built-in process server and ps2 idle", func(l map[string]api.ProcessServerInfo) bool {
		b, p2 := l[api.BuiltinProcessServer], l["ps2"]
		return l["ps1"].Machines == 2 && b.Machines == 0 && b.Figures.UploadRate == 0 && p2.Machines == 0 && p2.Figures.UploadRate == 0
	})
	ps1.kill()
	c.waitPS("vm1 and vm2 moved off the silent ps1 by themselves", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps1"].State == api.PSNoHeartbeat && l["ps1"].Machines == 0
	})
	// Spread: one to each (the first to the built-in one, listed first;
	// then ps2, which has fewer machines and less churn).
	on := map[string]string{}
	for _, vm := range vms {
		out := c.mustCLI("events", "--machine", vm)
		switch {
		case strings.Contains(out, "switched automatically from process server ps1") && strings.Contains(out, "to process server ps2;"):
			on[vm] = "ps2"
		case strings.Contains(out, "switched automatically from process server ps1") && strings.Contains(out, "to the built-in one;"):
			on[vm] = api.BuiltinProcessServer
		default:
			t.Fatalf("no event of %s's automatic switch:\n%s", vm, out)
		}
	}
	if on["vm1"] == on["vm2"] {
		t.Fatalf("both machines of ps1 went to %s: not spread", on["vm1"])
	}
	if l := c.psList(); l["ps2"].Machines != 1 {
		t.Fatalf("ps2 serves %d machines, want 1: %+v", l["ps2"].Machines, l)
	}
	for _, vm := range vms {
		waitConnected(t, c.psLog(on[vm]), vm, 0)
	}
	if err := stopFio(); err != nil {
		t.Fatal(err)
	}
	// Where each machine now is, a resync makes the replica equal to the
	// source whatever ps1 took with it; the latest point (made on ps2 for
	// the machine there) holds every write. A machine on a scale-out
	// process server is recovered through the server once back on the
	// built-in one (handed over: nothing lost).
	for _, vm := range vms {
		c.mustCLI("resync", "--machine", vm, "--wait")
		id := c.tag(vm)
		if on[vm] == "ps2" {
			c.mustCLI("ps", "switch", "--machine", vm, "--to", "builtin")
		}
		c.recoverAndCheck(vm, id, map[string]string{"d0": sha256File(t, disks[vm])})
	}
}

// TestE2EScaleOutFourAgents: the scenario whole, with real
// processes: a configuration server, two `asr process-server` and four
// agents, each under fio writes (verified by fio as it goes). The machines
// are spread over the three process servers, then two move mid-stream (one
// between the scale-out ones, one from the built-in one). ps1 is killed
// (kill -9) with two machines: a switch away from it is refused (its cache
// may hold acknowledged changes); started again it recovers its cache and
// takes its agents back, and `asr ps switch --from ps1` then moves its
// machines with nothing lost (no resync: the hand-over applied the cache);
// ps1 is then removed. The configuration server is restarted with
// --auto-switch and ps2 killed with the two other machines: they move by
// themselves to the only healthy process server left, the built-in one
// (never to the removed ps1), and the gap ps2's cache took with it is
// resynced. With fio
// stopped, every machine's latest point recovers bit-exact against its
// source disk: no write acknowledged to fio is lost, whichever process
// server received it and whatever happened to that one.
func TestE2EScaleOutFourAgents(t *testing.T) {
	t.Parallel()
	c := newClusterArgs(t, "--ps-heartbeat-lost", "3s")
	vms := []string{"vm1", "vm2", "vm3", "vm4"}
	disks := map[string]string{}
	agents := map[string]*agentProc{}
	for i, vm := range vms {
		disks[vm] = filepath.Join(c.dir, vm+".img")
		makeDisk(t, disks[vm], 24<<20, uint64(40+i))
		agents[vm] = c.startAgent(vm, nil, "d0="+disks[vm])
	}
	for _, vm := range vms {
		c.waitState(vm, "protected", 3*time.Minute)
	}
	procs := map[string]*proc{"ps1": c.startPS("ps1"), "ps2": c.startPS("ps2")}
	c.waitPS("ps1 and ps2 healthy", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps1"].State == api.PSHealthy && l["ps2"].State == api.PSHealthy
	})

	// fio on the four machines until stopped (rate-limited: four guests,
	// three process servers and fio share this machine's cores).
	stopFio := fioOn(t, vms, agents, 1000)
	// Spread: vm1 and vm2 on ps1, vm3 on ps2, vm4 on the built-in one.
	c.switchTo("vm1", "ps1")
	c.switchTo("vm2", "ps1")
	c.switchTo("vm3", "ps2")
	// Two switches mid-stream: vm2 from one scale-out process server to
	// the other, vm4 from the built-in one to ps1.
	c.switchTo("vm2", "ps2")
	c.switchTo("vm4", "ps1")
	c.waitPS("ps1: vm1, vm4; ps2: vm2, vm3; the built-in one: none open", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps1"].Machines == 2 && l["ps2"].Machines == 2 && l[api.BuiltinProcessServer].Machines == 0
	})

	// kill -9 of ps1 mid-stream, with vm1 and vm4 on it.
	procs["ps1"].kill()
	c.waitPS("ps1 without a heartbeat", func(l map[string]api.ProcessServerInfo) bool { return l["ps1"].State == api.PSNoHeartbeat })
	// Refused: its cache may hold acknowledged changes not applied yet.
	if out, err := c.cli("ps", "switch", "--from", "ps1", "--to", "ps2"); err == nil || !strings.Contains(err.Error(), "sends no heartbeat") {
		t.Fatalf("asr ps switch --from a killed ps1: %v\n%s", err, out)
	}
	if l := c.psList(); l["ps1"].Machines != 2 || l["ps2"].Machines != 2 {
		t.Fatalf("the refused switch moved machines: %+v", l)
	}
	// Started again: it recovers its cache and its agents come back (each
	// reconnects: one more "agent connected" in its log)...
	before := map[string]int{"vm1": connections(t, c.psLog("ps1"), "vm1"), "vm4": connections(t, c.psLog("ps1"), "vm4")}
	procs["ps1"] = c.startPS("ps1")
	for _, vm := range []string{"vm1", "vm4"} {
		waitConnected(t, c.psLog("ps1"), vm, before[vm])
	}
	// ... and hands them over whole: they go to the built-in one.
	before = map[string]int{"vm1": connections(t, c.psLog(api.BuiltinProcessServer), "vm1"), "vm4": connections(t, c.psLog(api.BuiltinProcessServer), "vm4")}
	if out := c.mustCLI("ps", "switch", "--from", "ps1", "--to", "builtin"); !strings.Contains(out, "2 machines moved") {
		t.Fatalf("asr ps switch --from ps1 after its restart: %s", out)
	}
	for _, vm := range []string{"vm1", "vm4"} {
		waitConnected(t, c.psLog(api.BuiltinProcessServer), vm, before[vm])
	}

	// ps1, which serves nothing now, is removed: the automatic switch
	// below has only the built-in one to choose.
	c.mustCLI("ps", "remove", "ps1")
	// --auto-switch (the configuration server restarted with it; the
	// process servers and the agents wait for it), then kill -9 of ps2
	// with vm2 and vm3 on it, mid-stream.
	c.server.stop()
	c.serverArgs = append(c.serverArgs, "--auto-switch")
	c.startServer()
	c.waitPS("ps2 heard from by the restarted configuration server", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps2"].State == api.PSHealthy && l["ps2"].Machines == 2
	})
	before = map[string]int{"vm2": connections(t, c.psLog(api.BuiltinProcessServer), "vm2"), "vm3": connections(t, c.psLog(api.BuiltinProcessServer), "vm3")}
	procs["ps2"].kill()
	c.waitPS("vm2 and vm3 moved off the silent ps2 by themselves", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps2"].State == api.PSNoHeartbeat && l["ps2"].Machines == 0
	})
	for _, vm := range []string{"vm2", "vm3"} {
		waitConnected(t, c.psLog(api.BuiltinProcessServer), vm, before[vm])
		if out := c.mustCLI("events", "--machine", vm); !strings.Contains(out, "switched automatically from process server ps2") {
			t.Fatalf("no event of %s's automatic switch:\n%s", vm, out)
		}
	}

	// fio stops (every run verified what it wrote); what ps2's cache took
	// with it is resynced; each machine's latest point holds every write.
	if err := stopFio(); err != nil {
		t.Fatal(err)
	}
	for _, vm := range []string{"vm2", "vm3"} {
		t.Logf("%s after the automatic switch: %s", vm, c.status(vm).State)
		c.mustCLI("resync", "--machine", vm, "--wait")
	}
	for name, p := range c.psList() {
		t.Logf("process server %s: %s, %d record bytes received since its start", name, p.State, p.Figures.RawBytes)
	}
	for _, vm := range vms {
		id := c.tag(vm)
		c.recoverAndCheck(vm, id, map[string]string{"d0": sha256File(t, disks[vm])})
	}
	// The machines handed over by the restarted ps1 needed no resync.
	for _, vm := range []string{"vm1", "vm4"} {
		for _, d := range c.status(vm).Disks {
			if d.Resync != nil {
				t.Fatalf("%s, handed over by ps1 after its restart, has a resync: %+v", vm, *d.Resync)
			}
		}
	}
}

// startPS starts a scale-out process server (`asr process-server`) named
// name, registered with the cluster's configuration server, with extra
// arguments, and waits until it runs. Its log is c.psLog(name), appended
// to across restarts.
func (c *cluster) startPS(name string, extra ...string) *proc {
	c.t.Helper()
	args := append([]string{"process-server", "--config", c.url(), "--passphrase-file", filepath.Join(c.srvDir, "passphrase"),
		"--data", filepath.Join(c.dir, name), "--data-listen", "127.0.0.1:0", "--name", name}, extra...)
	p := startProcEnv(c.t, name, c.psLog(name), c.env, asrBin, args...)
	p.waitLog(c.t, "asr process server running")
	return p
}

// psLog is the log of a process server (the built-in one's: the
// configuration server's).
func (c *cluster) psLog(name string) string {
	if name == api.BuiltinProcessServer {
		return filepath.Join(c.dir, "server.log")
	}
	return filepath.Join(c.dir, name+".log")
}

// psList is `asr ps list --json`, by name.
func (c *cluster) psList() map[string]api.ProcessServerInfo {
	c.t.Helper()
	var l []api.ProcessServerInfo
	if err := json.Unmarshal([]byte(c.mustCLI("ps", "list", "--json")), &l); err != nil {
		c.t.Fatal(err)
	}
	m := make(map[string]api.ProcessServerInfo, len(l))
	for _, p := range l {
		m[p.Name] = p
	}
	return m
}

// psInfo is one process server of `asr ps list --json`.
func (c *cluster) psInfo(name string) (api.ProcessServerInfo, bool) {
	c.t.Helper()
	p, ok := c.psList()[name]
	return p, ok
}

// waitPS waits until `asr ps list` satisfies ok (a state that holds once
// reached).
func (c *cluster) waitPS(what string, ok func(map[string]api.ProcessServerInfo) bool) {
	c.t.Helper()
	deadline := time.Now().Add(hungAfter)
	for {
		l := c.psList()
		if ok(l) {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("process servers %+v; waited for: %s", l, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// switchTo moves a machine to process server to (`asr ps switch`) and
// waits until its agent has connected there and records reached it.
func (c *cluster) switchTo(vm, to string) {
	c.t.Helper()
	n := connections(c.t, c.psLog(to), vm)
	p, _ := c.psInfo(to)
	if out := c.mustCLI("ps", "switch", "--machine", vm, "--to", to); !strings.Contains(out, "served by process server "+to) {
		c.t.Fatalf("asr ps switch --machine %s --to %s: %s", vm, to, out)
	}
	waitConnected(c.t, c.psLog(to), vm, n)
	c.waitPS(fmt.Sprintf("records reaching %s after %s's switch", to, vm), func(l map[string]api.ProcessServerInfo) bool {
		return l[to].Figures.RawBytes > p.Figures.RawBytes
	})
}

// connections counts the connections of a machine's agent a process
// server has accepted, from its log.
func connections(t *testing.T, log, vm string) int {
	t.Helper()
	b, err := os.ReadFile(log)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, `msg="agent connected"`) && strings.Contains(l, " name="+vm+" ") {
			n++
		}
	}
	return n
}

// waitConnected waits until a process server has accepted more than n
// connections of a machine's agent.
func waitConnected(t *testing.T, log, vm string, n int) {
	t.Helper()
	deadline := time.Now().Add(hungAfter)
	for connections(t, log, vm) <= n {
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(log)
			t.Fatalf("%s's agent never connected again (%d connections) to the process server logging to %s:\n%s", vm, n, log, b[max(0, len(b)-6000):])
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// fioRounds runs fio on an NBD URI in the background until stop is
// closed: rounds of 4 MiB of random 4 KiB writes (each round at another
// offset, seeded seed+round), each verified by fio as it goes.
// fioOn runs fioRounds at 2 MiB/s on each machine's d0 (seeds seedStep,
// 2*seedStep, ...) until the returned stop is called, or the test ends;
// stop waits for every run and returns the first error (called again, the
// same).
func fioOn(t *testing.T, vms []string, agents map[string]*agentProc, seedStep int) (stop func() error) {
	t.Helper()
	ch := make(chan struct{})
	var bg background
	for i, vm := range vms {
		fioRounds(t, &bg, ch, vm, agents[vm].uri("d0"), seedStep*(i+1), "--rate=2m")
	}
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() { close(ch); err = bg.wait() })
		return err
	}
	t.Cleanup(func() { stop() })
	return stop
}

func fioRounds(t *testing.T, bg *background, stop <-chan struct{}, vm, uri string, seed int, extra ...string) {
	t.Helper()
	nbdPeerTool(t, "fio")
	bg.run(func() error {
		for round := 0; ; round++ {
			select {
			case <-stop:
				return nil
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
			args := append([]string{"--name=w", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
				"--bs=4k", "--iodepth=4", "--size=4M", "--offset=" + fmt.Sprint((round%6)*4) + "M", "--verify=crc32c", "--verify_fatal=1",
				"--verify_state_save=0", fmt.Sprintf("--randseed=%d", seed+round)}, extra...)
			out, err := runTool(ctx, t, "fio", args...)
			cancel()
			if err != nil {
				return fmt.Errorf("fio on %s: %v\n%s", vm, err, out)
			}
		}
	})
}
