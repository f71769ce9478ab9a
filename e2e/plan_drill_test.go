//go:build e2e

package e2e

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/drill/bootdisk"
)

// TestE2EPlanScheduledDrill: a plan with a drill schedule is drilled by
// the server on its own (a test failover to QEMU of every member, booted
// in an isolated namespace until the console shows the marker, then
// cleaned up), and the result is reported as an event naming the plan.
func TestE2EPlanScheduledDrill(t *testing.T) {
	t.Parallel()
	c := newClusterArgs(t, "--drill-check-every", "1s")
	disk := filepath.Join(c.dir, "boot.img")
	if err := bootdisk.Make(disk, 48, bootdisk.Options{Marker: "scheduled drill", Hostname: "web01"}); err != nil {
		t.Fatal(err)
	}
	c.startAgent("web01", nil, "boot="+disk)
	c.waitState("web01", "protected", hungAfter)
	c.tag("web01")
	c.mustCLI("plan", "create", "weekly", "--group", "1=web01", "--drill-every", "168h",
		"--boot-check", bootdisk.BootedMarker+" web01", "--boot-timeout", "10m")
	var passed string
	deadline := time.Now().Add(15 * time.Minute) // a hung drill, not a slow TCG boot
	for passed == "" {
		var es []struct{ Kind, Message string }
		json.Unmarshal([]byte(c.mustCLI("events", "--json")), &es)
		for _, e := range es {
			if e.Kind == "drill-failed" {
				t.Fatalf("the scheduled drill failed: %s", e.Message)
			}
			if e.Kind == "drill-passed" && strings.Contains(e.Message, "plan weekly") {
				passed = e.Message
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no drill event")
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Log(passed)
	var p api.Plan
	if err := json.Unmarshal([]byte(c.mustCLI("plan", "show", "weekly", "--json")), &p); err != nil || p.LastDrill.IsZero() {
		t.Fatalf("plan after its drill: %+v %v", p, err)
	}
	var fos []api.Failover
	if err := json.Unmarshal([]byte(c.mustCLI("failover", "--list", "--json")), &fos); err != nil || len(fos) != 0 {
		t.Fatalf("the drill left failovers: %+v %v", fos, err)
	}
	// The drill's job is listed with its RTO.
	var js []api.Job
	json.Unmarshal([]byte(c.mustCLI("jobs", "--json")), &js)
	if len(js) == 0 || js[0].Kind != "plan-drill" || js[0].State != api.JobSucceeded || js[0].RTO <= 0 {
		t.Fatalf("jobs: %+v", js)
	}
}
