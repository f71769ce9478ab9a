//go:build e2e

package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// TestE2EProcessServerStatusAndTag: a real `asr server` and a real `asr
// process-server`. A machine switched to the scale-out process server is
// shown by `asr status` as on the built-in one (its process server,
// connected, its RPO, the bytes it sends there); `asr tag` makes a point
// there (a command in the process server's heartbeat reply), listed by
// `asr status` and `asr points`; `asr recover` through the configuration
// server reads the point there, bit-exact; back on the built-in process
// server, that point recovers bit-exact too.
func TestE2EProcessServerStatusAndTag(t *testing.T) {
	t.Parallel()
	c := newClusterArgs(t, "--ps-heartbeat-lost", "3s")
	pass := filepath.Join(c.srvDir, "passphrase")
	d0 := filepath.Join(c.dir, "d0.img")
	makeDisk(t, d0, 32<<20, 11)
	a := c.startAgent("vm1", nil, "d0="+d0)
	c.waitState("vm1", "protected", 3*time.Minute)
	ps1 := startProc(t, "ps1", filepath.Join(c.dir, "ps1.log"), "process-server", "--config", c.url(), "--passphrase-file", pass,
		"--data", filepath.Join(c.dir, "ps1"), "--data-listen", "127.0.0.1:0", "--name", "ps1")
	ps1.waitLog(t, "asr process server running")
	deadline := time.Now().Add(hungAfter)
	for {
		var l []api.ProcessServerInfo
		if err := json.Unmarshal([]byte(c.mustCLI("ps", "list", "--json")), &l); err != nil {
			t.Fatal(err)
		}
		if len(l) == 2 && l[1].State == api.PSHealthy {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ps1 never healthy: %+v", l)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.mustCLI("ps", "switch", "--machine", "vm1", "--to", "ps1")
	before := c.status("vm1").BytesReceived

	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d0"), "-c", "write -P 0x6b 2M 3M", "-c", "write -P 0x19 30M 128k")
	var id string
	for {
		out, err := c.cli("tag", "--machine", "vm1", "--wait", "--timeout", tagTimeout)
		if err == nil {
			lines := strings.Split(strings.TrimSpace(out), "\n")
			id = lines[len(lines)-1]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no point of vm1 on ps1: %v\nps1's log:\n%s", err, ps1.logTail())
		}
		time.Sleep(200 * time.Millisecond)
	}
	st := c.waitStatus("vm1", "the point made on ps1, connected, RPO known, bytes received", func(st machineStatus) bool {
		return st.ProcessServer == "ps1" && st.Connected && st.RPOKnown && st.LastPoint != nil && st.LastPoint.ID == id &&
			st.BytesReceived > before
	})
	if st.State != "protected" {
		t.Fatalf("vm1 on ps1: %+v", st)
	}
	if out := c.mustCLI("status", "--machine", "vm1"); !strings.Contains(out, id) {
		t.Fatalf("asr status does not show the point %s:\n%s", id, out)
	}
	if out := c.mustCLI("points", "--machine", "vm1"); !strings.Contains(out, id) {
		t.Fatalf("asr points lacks %s:\n%s", id, out)
	}
	// Recovered through the configuration server, read by ps1
	// (TestE2EProcessServerPoints does it under fio).
	c.recoverAndCheck("vm1", id, map[string]string{"d0": sha256File(t, d0)})

	// A scrub of it runs on ps1 (a command in its heartbeat's reply).
	var vj api.VerifyJSON
	if err := json.Unmarshal([]byte(c.mustCLI("verify", "--machine", "vm1", "--no-source", "--json")), &vj); err != nil {
		t.Fatal(err)
	}
	if vj.Scrub == nil || len(vj.Scrub.Disks) != 1 || vj.Scrub.Disks[0].Checked <= 0 || vj.Damaged {
		t.Fatalf("asr verify of vm1 on ps1: %+v", vj)
	}
	if b, _ := os.ReadFile(ps1.log); !strings.Contains(string(b), "scrub asked by the configuration server") {
		t.Fatal("ps1 did not run the scrub")
	}
	// A test failover of it brings it back to the built-in process server
	// first (ps1 hands it over, applied whole), then exports the point:
	// equal to the source (no write since).
	r := c.failover("--machine", "vm1", "--test", "--point", id, "--to", "nbd")
	if !strings.Contains(r.out, "vm1: to the built-in process server") {
		t.Fatalf("the test failover of a machine on ps1 did not bring it back first:\n%s", r.out)
	}
	if got, want := nbdCopySum(t, exportURIs(t, r)["d0"]), sha256File(t, d0); got != want {
		t.Fatalf("the export of point %s: %s, the source %s", id, got, want)
	}
	c.mustCLI("failover", "--machine", "vm1", "--cleanup")
	if st := c.status("vm1"); st.ProcessServer != "" && st.ProcessServer != "builtin" {
		t.Fatalf("after the failover vm1 is on %q", st.ProcessServer)
	}
	// On the built-in process server: the point made on ps1 recovers
	// bit-exact.
	c.recoverAndCheck("vm1", id, map[string]string{"d0": sha256File(t, d0)})
}
