//go:build e2e

package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestE2EFailbackThawedWhileShipping: a planned failover to NBD is
// reprotected; the original agent is killed (kill -9) and started again
// with the freeze gone from its state file (its state lost: it comes back
// thawed), and its guest writes the original disk (fio through its NBD
// splitter). fio into the export then makes the shipper's writes refused:
// the server freezes the agent again, compares the original disk again
// from the start and sends what differs; failback ends with the original
// disk equal to the export (SHA-256), a failback-thawed event recorded.
func TestE2EFailbackThawedWhileShipping(t *testing.T) {
	t.Parallel()
	fc := startFailbackCase(t)
	c := fc.c
	fc.fio(fc.export, "failed-over", 2<<20)
	if out := c.mustCLI("reprotect", "--machine", "m"); !strings.Contains(out, "reprotected:") {
		t.Fatalf("reprotect:\n%s", out)
	}
	// Where the failed-over machine writes nothing more: only the
	// compare finds it.
	fc.thawOriginal()
	fc.fio(fc.export, "reprotected", 1<<20)
	deadline := time.Now().Add(hungAfter)
	for {
		fs := c.liveFailovers()
		if len(fs) == 1 && fs[0].Failback != nil && fs[0].Failback.Checksum != nil {
			ck := fs[0].Failback.Checksum
			if ck.Thawed == 1 && ck.State == "done" && ck.Differ >= 1<<20 && fs[0].Failback.Pending == 0 {
				t.Logf("compared again after the thaw: %+v", *ck)
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the original agent was not frozen again and compared: %+v", fs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	found := false
	for _, e := range c.events("m") {
		found = found || e.Kind == "failback-thawed" && e.Severity == "warning" && strings.Contains(e.Message, "machine m ")
	}
	if !found {
		t.Fatalf("no failback-thawed event: %+v", c.events("m"))
	}
	want := nbdCopySum(t, fc.export)
	out := c.mustCLI("failback", "--machine", "m")
	t.Logf("failback:\n%s", out)
	fc.checkFailedBack(out, want)
	fc.checkForward()
}

// thawState removes the freeze from a stopped agent's state file, as a
// lost or replaced state would.
func thawState(t *testing.T, dir string) {
	t.Helper()
	p := filepath.Join(dir, "state.json")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var st map[string]any
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	if st["failover"] == nil {
		t.Fatalf("the agent's state %s records no freeze: %s", p, b)
	}
	delete(st, "failover")
	if b, err = json.Marshal(st); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// thawOriginal kills -9 machine m's original agent and starts it again
// with the freeze gone from its state file (its state lost: it comes
// back thawed); its guest then writes 1 MiB at 30 MiB of the original
// disk through its splitter (accepted: the agent is not frozen).
//
// The server is paused (SIGSTOP) from before the kill until the write is
// done: once it hears from the thawed agent it freezes it again (a
// refused write of the reverse stream, or the policy pass reading its
// status), and a guest write after that is refused, as it must be. In
// a CI run it did so before qemu-io's write arrived. Paused, the server
// finds the thaw only after the guest wrote, every run; the agent serves
// its guest without its server.
func (fc *failbackCase) thawOriginal() {
	c := fc.c
	a := c.agents["m"]
	c.server.pause()
	a.proc.kill()
	thawState(c.t, a.state)
	c.startAgent("m", nil)
	fc.qemuWrite(a.uri("d"), 0xab, 30<<20, 1<<20)
	c.server.resume()
}
