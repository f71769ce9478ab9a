//go:build e2e

package e2e

import (
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
// push install); stopping the demo stops the pushed agent too.
func TestE2EDemoShowsTheWholeFlow(t *testing.T) {
	dir := t.TempDir()
	listen := "127.0.0.1:" + freePort(t)
	logPath := filepath.Join(dir, "demo.log")
	demo := startProc(t, "demo", logPath, "demo", "--data", filepath.Join(dir, "demo"), "--listen", listen, "--disk-size", "32MiB", "--machines", "1")
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
	m := regexp.MustCompile(`go run \. (protect [^\n]*\\\n[^\n]*\\\n[^\n]*--skip-uuid-check)`).FindStringSubmatch(string(b))
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
	demo.stop()
	deadline := time.Now().Add(hungAfter)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("the pushed agent (pid %d) outlived the demo", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
