//go:build e2e

package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// TestE2EDemoShowsTheWholeFlow runs `asr demo` as a newcomer does: its
// vCenter (the simulator) lists the demo guests linked to their machines
// and spare VMs not protected; the protect command the demo prints
// enables replication of a spare VM through the demo's SSH guest (a real
// push install); stopping the demo stops the pushed agent too. Its
// --crash-interval is its policy's (points every 5 s, not the default
// policy's 5 min), and a restarted demo whose data port moved is
// reconnected to by its agents.
func TestE2EDemoShowsTheWholeFlow(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	listen := "127.0.0.1:" + freePort(t)
	logPath := filepath.Join(dir, "demo.log")
	demoArgs := []string{"demo", "--data", filepath.Join(dir, "demo"), "--listen", listen, "--disk-size", "32MiB", "--machines", "1", "--crash-interval", "5s"}
	demo := startProc(t, "demo", logPath, demoArgs...)
	defer func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("demo output:\n%s", b)
		}
	}()
	demo.waitLog(t, "Press Ctrl-C to stop.")
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`\S+ (protect [^\n]*\\\n[^\n]*\\\n[^\n]*--skip-uuid-check)`).FindStringSubmatch(string(b))
	if m == nil {
		t.Fatalf("the demo prints no protect command:\n%s", b)
	}
	args := strings.Fields(strings.ReplaceAll(m[1], "\\\n", " "))
	srvDir := filepath.Join(dir, "demo", "server")
	cli := func(a ...string) (string, error) {
		return runAsr(append(a, "--data", srvDir, "--server", "https://"+listen)...)
	}
	c := &cluster{t: t, dir: dir, srvDir: srvDir, listen: listen}
	c.waitVM("demo-vm1", "linked to its machine", func(vm api.VM) bool { return vm.Machine == "demo-vm1" })
	c.waitVM("demo-spare1", "discovered, not protected", func(vm api.VM) bool { return vm.Machine == "" })

	out, err := cli(args...)
	if err != nil || !strings.Contains(out, "succeeded") {
		t.Fatalf("the demo's protect command: %v\n%s", err, out)
	}
	c.waitVM("demo-spare1", "protected", func(vm api.VM) bool { return vm.Machine == "demo-spare1" })
	pidFile := filepath.Join(dir, "demo", "guests", "demo-spare1", "opt-asr", "agent.pid")
	pb, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(pb)))
	t.Cleanup(func() { killPidFile(pidFile) })
	if !alive(pid) {
		t.Fatalf("the pushed agent (pid %d) does not run", pid)
	}

	// The demo's --crash-interval is the policy the agents get.
	out, err = cli("policy", "show", "default", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var pol api.PolicyJSON
	if err := json.Unmarshal([]byte(out), &pol); err != nil || pol.CrashInterval != "5s" {
		t.Fatalf("the demo's policy: %+v (%v), want crash_interval 5s", pol, err)
	}
	// points lists demo-vm1's points; nil while the demo's server does
	// not answer (it is starting).
	points := func() []api.PointJSON {
		out, err := cli("points", "--machine", "demo-vm1", "--json")
		if err != nil {
			return nil
		}
		var ps []api.PointJSON
		if err := json.Unmarshal([]byte(out), &ps); err != nil {
			t.Fatal(err)
		}
		return ps
	}
	waitPoints := func(what string, ok func([]api.PointJSON) bool) []api.PointJSON {
		t.Helper()
		deadline := time.Now().Add(hungAfter)
		for {
			ps := points()
			if ok(ps) {
				return ps
			}
			if time.Now().After(deadline) {
				t.Fatalf("demo-vm1: %s: points %+v", what, ps)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	ps := waitPoints("three scheduled points", func(ps []api.PointJSON) bool { return len(ps) >= 3 })
	t1, _ := time.Parse(time.RFC3339Nano, ps[len(ps)-2].Time)
	t2, _ := time.Parse(time.RFC3339Nano, ps[len(ps)-1].Time)
	if gap := t2.Sub(t1); gap <= 0 || gap > time.Minute {
		t.Fatalf("scheduled points %s apart, want about 5 s (the demo's --crash-interval): %+v", gap, ps)
	}

	demo.stop()
	deadline := time.Now().Add(hungAfter)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("the pushed agent (pid %d) outlived the demo", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Restarted, on another data port (the saved one forgotten): its
	// agents find the server again and points go on.
	if err := os.Remove(filepath.Join(dir, "demo", "data-listen")); err != nil {
		t.Fatal(err)
	}
	last := ps
	demo = startProc(t, "demo", logPath, demoArgs...)
	defer demo.stop()
	waitPoints("a point after the restart", func(ps []api.PointJSON) bool {
		return len(ps) > 0 && ps[len(ps)-1].ID != last[len(last)-1].ID
	})
}
