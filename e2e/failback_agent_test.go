//go:build e2e

package e2e

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// startRecoveredAgent starts, in vc's recovered VM, the asr agent of
// the original installation: a real `asr agent` with a copy of the
// original agent's state (copied with that agent stopped, so that its
// files are whole, as the replica carries them), its disk the recovered
// VM's flat file, its BIOS UUID the recovered VM's; and waits until the
// server takes it as the reverse source.
func startRecoveredAgent(t *testing.T, vc *vsphereFailbackCase) *agentProc {
	t.Helper()
	c := vc.c
	rec := c.waitVM("guest01-recovered", "in the inventory with its BIOS UUID", func(vm api.VM) bool {
		return vm.BIOSUUID != "" && vm.BIOSUUID != guestUUID
	})
	orig := c.agents["m"]
	orig.stop()
	recState := filepath.Join(c.dir, "recovered-state")
	if err := os.CopyFS(recState, os.DirFS(orig.state)); err != nil {
		t.Fatal(err)
	}
	c.startAgent("m", nil)
	sock := filepath.Join(c.dir, "recovered.sock")
	c.agents["recovered"] = &agentProc{name: "recovered", state: recState, sock: sock,
		args: []string{"agent", "--server", c.url(), "--passphrase-file", filepath.Join(c.srvDir, "passphrase"),
			"--state", recState, "--name", "m", "--nbd", "unix:" + sock, "--crash-interval", "1h",
			"--disk", "d=" + vc.flat, "--bios-uuid", rec.BIOSUUID}}
	ra := c.startAgent("recovered", nil)
	st := c.waitStatus("m", "the recovered VM's agent taken as the reverse source", func(st machineStatus) bool {
		return st.ReverseSource != nil && st.ReverseSource.Connected && st.Connected
	})
	if st.BIOSUUID != guestUUID || st.ReverseSource.BIOSUUID != rec.BIOSUUID || st.ReverseSource.VM != "guest01-recovered" || st.ReverseSource.Live {
		t.Fatalf("machine m: BIOS UUID %s, reverse source %+v", st.BIOSUUID, st.ReverseSource)
	}
	return ra
}

// TestE2EFailbackFromVSphereRecoveredAgent: a failover to vSphere (the
// simulator) committed; in the recovered VM the asr agent of the
// original installation starts (a real `asr agent` with a copy of the
// original agent's state, its disk the recovered VM's flat file in the
// simulator's datastore directory, its BIOS UUID the recovered VM's
// config.uuid): the server takes it as the reverse source, never as
// the original. fio writes through its NBD write-splitter; reprotect
// compares first, then its writes reach the original disk as they
// happen (the original equal to the flat file before failback, the
// reverse RPO known); failback drains it: the original disk's SHA-256
// equals the recovered disk's final content, bytes sent within 2x of
// bytes written after the failover; forward protection resumes.
func TestE2EFailbackFromVSphereRecoveredAgent(t *testing.T) {
	t.Parallel()
	vc := startVSphereFailbackCase(t)
	fc, c, flat := vc.failbackCase, vc.c, vc.flat
	ra := startRecoveredAgent(t, vc)
	fc.fio(ra.uri("d"), "recovered", 3<<20)
	// Held until reprotect: dropped by the server (its compare reads
	// them), not sent twice.
	c.waitStatus("m", "the writes before reprotect dropped by the held stream", func(st machineStatus) bool {
		return st.ReverseSource != nil && st.ReverseSource.Dropped == 3<<20
	})

	out := c.mustCLI("reprotect", "--machine", "m")
	if !strings.Contains(out, "path: the asr agent in VM guest01-recovered") || reprotectedRE.FindStringSubmatch(out) == nil {
		t.Fatalf("reprotect:\n%s", out)
	}
	fc.fio(ra.uri("d"), "recovered-after-reprotect", 2<<20)
	c.waitStatus("m", "the recovered agent's writes on the original, the reverse RPO known", func(st machineStatus) bool {
		return st.ReverseSource != nil && st.ReverseSource.Live && st.ReverseSource.OldestPending.IsZero() &&
			st.Reverse != nil && st.Reverse.RPOKnown && st.Reverse.Pending == 0
	})
	if _, ok := c.reverseRPOMetric(t, "m"); !ok {
		t.Fatal("no asr_machine_reverse_rpo_seconds while the recovered agent's stream is live")
	}
	deadline := time.Now().Add(hungAfter)
	for !slices.ContainsFunc(c.events("m"), func(e api.EventJSON) bool { return e.Kind == "reverse-point" }) {
		if time.Now().After(deadline) {
			t.Fatal("no reverse point recorded while the original disk was drained")
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Shipped as they happen: equal before failback.
	deadline = time.Now().Add(hungAfter)
	for sha256File(t, fc.disk) != sha256File(t, flat) {
		if time.Now().After(deadline) {
			t.Fatalf("the original disk never equal to the recovered VM's before failback")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// A graceful restart of the server keeps the stream's figures: the
	// bytes it sent, and its last record acknowledged (the agent is not
	// asked for its spool past the floor again).
	sent := c.status("m").ReverseSource.Sent
	c.server.stop()
	c.startServer()
	c.waitStatus("m", "the recovered agent live again after the restart, nothing pending", func(st machineStatus) bool {
		return st.ReverseSource != nil && st.ReverseSource.Connected && st.ReverseSource.Live &&
			st.Reverse != nil && st.Reverse.RPOKnown && st.Reverse.Pending == 0
	})
	if got := c.status("m").ReverseSource.Sent; got != sent {
		t.Fatalf("the stream sent %d bytes before the restart, %d after it", sent, got)
	}
	// Each write once: those before reprotect by its compare.
	if sent != 2<<20 {
		t.Fatalf("the stream sent %d bytes for %d written through the agent after reprotect", sent, 2<<20)
	}
	t.Logf("the recovered agent's stream: %d bytes sent for %d written through it after reprotect (kept across the restart)", sent, int64(2<<20))

	// Failback freezes the recovered agent and drains its stream before
	// the power-off: the last pass sends nothing.
	fc.fio(ra.uri("d"), "recovered-before-failback", 1<<20)
	out = c.mustCLI("failback", "--machine", "m")
	for _, s := range []string{"m: freeze and drain the recovered agent", "m: stop the recovered VM", "m: verify", "m: end the failover",
		"the last pass over the stopped VM's disks sent 0 bytes (its agent was frozen and drained before the power-off)"} {
		if !strings.Contains(out, s) {
			t.Fatalf("failback output lacks %q:\n%s", s, out)
		}
	}
	fc.checkFailedBack(out, sha256File(t, flat))
	// The recovered agent stays frozen (the simulator's power-off does
	// not stop its process): fio's writes through its splitter refused.
	ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
	defer cancel()
	fout, err := runTool(ctx, t, "fio", "--name=frozen", "--ioengine=nbd", "--uri="+ra.uri("d"), "--rw=randwrite", "--bs=64k",
		"--iodepth=1", "--size=32M", "--io_size=65536")
	if err == nil || !strings.Contains(fout, "not permitted") {
		t.Fatalf("fio through the frozen recovered agent: %v\n%s", err, fout)
	}
	if st := c.status("m"); st.ReverseSource != nil || st.BIOSUUID != guestUUID {
		t.Fatalf("after failback: reverse source %+v, BIOS UUID %s", st.ReverseSource, st.BIOSUUID)
	}
	if _, ok := c.reverseRPOMetric(t, "m"); ok {
		t.Fatal("asr_machine_reverse_rpo_seconds still present after failback")
	}
	ra.stop()
	fc.checkForward()
}

// TestE2EFailbackFromVSphereRecoveredAgentThawed: the recovered VM's
// agent streams its writes after reprotect; the original agent is
// killed (kill -9) and started again with the freeze gone from its state
// file (its state lost: it comes back thawed), and its guest writes the
// original disk (qemu-io through its NBD splitter), and fio writes
// through the recovered agent. The server finds the thaw (the stream's
// write refused, or the policy pass reading the agent's status, which
// comes first is timing), freezes the original again, compares the
// recovered VM's disk again (a reprotect job) and resumes the stream, a
// failback-thawed event recorded: the original equal to the flat file before failback;
// failback ends bit-exact, forward protection resumes.
func TestE2EFailbackFromVSphereRecoveredAgentThawed(t *testing.T) {
	t.Parallel()
	vc := startVSphereFailbackCase(t)
	fc, c, flat := vc.failbackCase, vc.c, vc.flat
	ra := startRecoveredAgent(t, vc)
	if out := c.mustCLI("reprotect", "--machine", "m"); !strings.Contains(out, "path: the asr agent in VM guest01-recovered") {
		t.Fatalf("reprotect:\n%s", out)
	}
	fc.thawOriginal()
	fc.fio(ra.uri("d"), "recovered-after-thaw", 1<<20)
	deadline := time.Now().Add(hungAfter)
	for {
		st := c.status("m")
		if st.ReverseSource != nil && st.ReverseSource.Live && st.ReverseSource.OldestPending.IsZero() &&
			sha256File(t, fc.disk) == sha256File(t, flat) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the original disk never equal to the recovered VM's after the thaw: reverse source %+v", st.ReverseSource)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Which of the server's two detectors finds the thaw first is timing:
	// the stream's write refused by the original agent, or the policy
	// pass (every 5 s) reading the restarted agent's status while the
	// stream has nothing to send. Both freeze the original again and
	// compare again; server/failback_agent_test.go pins each one alone.
	i := slices.IndexFunc(c.events("m"), func(e api.EventJSON) bool {
		return e.Kind == "failback-thawed" && e.Severity == "warning" &&
			(strings.Contains(e.Message, "refused by the agent") || strings.Contains(e.Message, "found with nothing to send"))
	})
	if i < 0 {
		t.Fatalf("no failback-thawed event: %+v", c.events("m"))
	}
	t.Logf("the thaw found: %s", c.events("m")[i].Message)
	fc.fio(ra.uri("d"), "recovered-before-failback", 1<<20)
	out := c.mustCLI("failback", "--machine", "m")
	if !strings.Contains(out, "the last pass over the stopped VM's disks sent 0 bytes") {
		t.Fatalf("failback:\n%s", out)
	}
	fc.checkFailedBack(out, sha256File(t, flat))
	ra.stop()
	fc.checkForward()
}

// TestE2EFailbackFromVSphereRecoveredAgentKilled: the same path with
// kills. Reprotected through the recovered VM's agent; the original
// agent held by SIGSTOP while fio writes through the recovered agent (its
// writes wait, unacknowledged, in its spool); kill -9 of the server,
// restarted: the stream is live again at once; kill -9 of the recovered
// agent, restarted (its log repaired; after a hard stop its writes are
// held until failback's pass); the original resumed; failback: the
// original disk equals the recovered disk's final content, nothing
// lost.
func TestE2EFailbackFromVSphereRecoveredAgentKilled(t *testing.T) {
	t.Parallel()
	vc := startVSphereFailbackCase(t)
	fc, c, flat := vc.failbackCase, vc.c, vc.flat
	ra, _ := fc.killedWhileReverseStreaming(startRecoveredAgent(t, vc), "guest01-recovered")
	want := sha256File(t, flat)
	if got := sha256File(t, fc.disk); got != want {
		t.Fatalf("original disk sha256 %s, the recovered disk's %s", got, want)
	}
	if st := c.status("m"); st.Direction != "failed-back" || st.ReverseSource != nil {
		t.Fatalf("after failback: direction %q, reverse source %+v", st.Direction, st.ReverseSource)
	}
	ra.stop()
	fc.checkForward()
}

// killedWhileReverseStreaming reprotects machine m through the agent ra
// in its recovered VM vm, then, with the original agent stopped (SIGSTOP)
// and writes through ra pending, kills -9 the server and then ra, each
// started again, writes through the new ra, resumes the original agent
// and fails back. It returns the new ra and failback's output.
func (fc *failbackCase) killedWhileReverseStreaming(ra *agentProc, vm string) (*agentProc, string) {
	c, t := fc.c, fc.c.t
	t.Helper()
	out := c.mustCLI("reprotect", "--machine", "m")
	if !strings.Contains(out, "path: the asr agent in VM "+vm) {
		t.Fatalf("reprotect:\n%s", out)
	}
	orig := c.agents["m"]
	orig.proc.pause()
	fc.fio(ra.uri("d"), "recovered-held", 2<<20)
	c.waitStatus("m", "the recovered agent's writes pending", func(st machineStatus) bool {
		return st.ReverseSource != nil && !st.ReverseSource.OldestPending.IsZero()
	})
	c.server.kill()
	c.startServer()
	c.waitStatus("m", "the recovered agent live again after the server's restart", func(st machineStatus) bool {
		return st.ReverseSource != nil && st.ReverseSource.Connected && st.ReverseSource.Live
	})
	ra.proc.kill()
	ra = c.startAgent("recovered", nil)
	c.waitStatus("m", "the recovered agent connected again", func(st machineStatus) bool {
		return st.ReverseSource != nil && st.ReverseSource.Connected
	})
	fc.fio(ra.uri("d"), "recovered-after-kill", 1<<20)
	orig.proc.resume()
	out, err := c.cli("failback", "--machine", "m")
	if err != nil {
		t.Fatalf("failback after the kills: %v\n%s", err, out)
	}
	t.Logf("failback after the kills:\n%s", out)
	return ra, out
}
