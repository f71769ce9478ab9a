//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
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
	c := newClusterArgs(t, "--ps-heartbeat-lost", "3s")
	d0 := filepath.Join(c.dir, "d0.img")
	makeDisk(t, d0, 32<<20, 1)
	a := c.startAgent("vm1", nil, "d0="+d0)
	pass := filepath.Join(c.srvDir, "passphrase")

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

	start := func(name string) *proc {
		p := startProc(t, name, filepath.Join(c.dir, name+".log"), "process-server", "--config", c.url(), "--passphrase-file", pass,
			"--data", filepath.Join(c.dir, name), "--data-listen", "127.0.0.1:0", "--name", name)
		p.waitLog(t, "asr process server running")
		return p
	}
	ps1, ps2 := start("ps1"), start("ps2")
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

	// kill -9: no heartbeat, a critical alert.
	ps2.kill()
	deadline = time.Now().Add(hungAfter)
	for {
		var as []api.Alert
		if err := json.Unmarshal([]byte(c.mustCLI("alerts", "--json")), &as); err != nil {
			t.Fatal(err)
		}
		found := false
		for _, a := range as {
			found = found || a.Kind == api.AlertPSHeartbeat && a.Severity == api.SeverityCritical && strings.Contains(a.Message, "ps2")
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
	c := newCluster(t)
	pass := filepath.Join(c.srvDir, "passphrase")
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
	startPS := func(name string) {
		p := startProc(t, name, filepath.Join(c.dir, name+".log"), "process-server", "--config", c.url(), "--passphrase-file", pass,
			"--data", filepath.Join(c.dir, name), "--data-listen", "127.0.0.1:0", "--name", name)
		p.waitLog(t, "asr process server running")
		procs[name] = p
	}
	startPS("ps1")
	startPS("ps2")
	received := func(name string) int64 {
		t.Helper()
		var l []api.ProcessServerInfo
		if err := json.Unmarshal([]byte(c.mustCLI("ps", "list", "--json")), &l); err != nil {
			t.Fatal(err)
		}
		for _, p := range l {
			if p.Name == name {
				return p.Figures.RawBytes
			}
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
	nbdPeerTool(t, "fio")
	stop := make(chan struct{})
	var bg background
	for i, vm := range []string{"vm1", "vm2"} {
		uri := agents[vm].uri("d0")
		bg.run(func() error {
			for round := 0; ; round++ {
				select {
				case <-stop:
					return nil
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
				out, err := runTool(ctx, t, "fio", "--name=w", "--ioengine=nbd", "--uri="+uri, "--rw=randwrite",
					"--bs=4k", "--iodepth=4", "--size=4M", "--offset="+fmt.Sprint((round%6)*4)+"M", "--verify=crc32c", "--verify_fatal=1",
					"--verify_state_save=0", fmt.Sprintf("--randseed=%d", 100*i+round))
				cancel()
				if err != nil {
					return fmt.Errorf("fio on %s: %v\n%s", vm, err, out)
				}
			}
		})
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
// process server a machine is on, under fio: its heartbeat stops, the
// machine moves to the built-in process server by itself and its agent
// follows; what the dead one acknowledged and did not apply is a sequence
// gap, resynced (asr resync --wait), never lost silently: the latest point
// recovers bit-exact.
func TestE2EProcessServerAutoSwitch(t *testing.T) {
	c := newClusterArgs(t, "--auto-switch", "--ps-heartbeat-lost", "3s")
	pass := filepath.Join(c.srvDir, "passphrase")
	disk := filepath.Join(c.dir, "vm1.img")
	makeDisk(t, disk, 32<<20, 7)
	a := c.startAgent("vm1", nil, "d0="+disk)
	c.waitState("vm1", "protected", 3*time.Minute)
	ps1 := startProc(t, "ps1", filepath.Join(c.dir, "ps1.log"), "process-server", "--config", c.url(), "--passphrase-file", pass,
		"--data", filepath.Join(c.dir, "ps1"), "--data-listen", "127.0.0.1:0", "--name", "ps1")
	ps1.waitLog(t, "asr process server running")
	ps := func() api.ProcessServerInfo {
		t.Helper()
		var l []api.ProcessServerInfo
		if err := json.Unmarshal([]byte(c.mustCLI("ps", "list", "--json")), &l); err != nil {
			t.Fatal(err)
		}
		for _, p := range l {
			if p.Name == "ps1" {
				return p
			}
		}
		return api.ProcessServerInfo{}
	}
	deadline := time.Now().Add(hungAfter)
	for ps().State != api.PSHealthy {
		if time.Now().After(deadline) {
			t.Fatal("ps1 never healthy")
		}
		time.Sleep(100 * time.Millisecond)
	}

	nbdPeerTool(t, "fio")
	stop := make(chan struct{})
	var bg background
	bg.run(func() error {
		for round := 0; ; round++ {
			select {
			case <-stop:
				return nil
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
			out, err := runTool(ctx, t, "fio", "--name=w", "--ioengine=nbd", "--uri="+a.uri("d0"), "--rw=randwrite",
				"--bs=4k", "--iodepth=4", "--size=4M", "--offset="+fmt.Sprint((round%6)*4)+"M", "--verify=crc32c", "--verify_fatal=1",
				"--verify_state_save=0", fmt.Sprintf("--randseed=%d", 7+round))
			cancel()
			if err != nil {
				return fmt.Errorf("fio: %v\n%s", err, out)
			}
		}
	})
	c.mustCLI("ps", "switch", "--machine", "vm1", "--to", "ps1")
	deadline = time.Now().Add(hungAfter)
	for ps().Figures.RawBytes == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no data reached ps1")
		}
		time.Sleep(100 * time.Millisecond)
	}
	ps1.kill()
	// Moved by itself: ps1 serves nothing any more.
	deadline = time.Now().Add(hungAfter)
	for {
		p := ps()
		if p.State == api.PSNoHeartbeat && p.Machines == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("vm1 never left the dead ps1: %+v", p)
		}
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	if err := bg.wait(); err != nil {
		t.Fatal(err)
	}
	// The built-in process server has it (the agent followed): a resync
	// makes the replica equal to the source whatever ps1 took with it.
	c.mustCLI("resync", "--machine", "vm1", "--wait")
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d0": sha256File(t, disk)})
	if out := c.mustCLI("events", "--machine", "vm1"); !strings.Contains(out, "switched automatically from process server ps1") {
		t.Fatalf("no event of the automatic switch:\n%s", out)
	}
}
