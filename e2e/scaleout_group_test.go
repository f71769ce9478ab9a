//go:build e2e

package e2e

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// TestE2EGroupAcrossProcessServers: a replication group of two machines,
// vm1 on the built-in process server and vm2 on a real `asr
// process-server`, both under fio. `asr tag --group` makes a group point
// across the two process servers: one cut id, recorded on the group point
// and on each member's point (`asr points --point`), under fio and again
// once fio stopped; the latter, recovered with `asr recover --group` (vm2
// brought back to the built-in process server first: recovery reads the
// replica there), equals each source disk bit for bit.
func TestE2EGroupAcrossProcessServers(t *testing.T) {
	t.Parallel()
	c := newClusterArgs(t, "--ps-heartbeat-lost", "3s")
	vms := []string{"vm1", "vm2"}
	disks := map[string]string{}
	agents := map[string]*agentProc{}
	for i, vm := range vms {
		disks[vm] = filepath.Join(c.dir, vm+".img")
		makeDisk(t, disks[vm], 24<<20, uint64(60+i))
		agents[vm] = c.startAgent(vm, nil, "d0="+disks[vm])
	}
	for _, vm := range vms {
		c.waitState(vm, "protected", 3*time.Minute)
		c.mustCLI("group", "set", "--machine", vm, "--group", "rg")
	}
	c.startPS("ps1")
	c.waitPS("ps1 healthy", func(l map[string]api.ProcessServerInfo) bool { return l["ps1"].State == api.PSHealthy })

	stopFio := fioOn(t, vms, agents, 500)
	c.switchTo("vm2", "ps1")

	// groupPoint takes a group point with the CLI and checks that its
	// cut is on each member's point. A cut may be abandoned (a member did
	// not hold in time on this loaded machine: nothing is tagged, no group
	// point is recorded); it is asked again.
	groupPoint := func() api.GroupPointJSON {
		t.Helper()
		deadline := time.Now().Add(hungAfter)
		var gid string
		for {
			out, err := c.cli("tag", "--group", "rg", "--wait", "--timeout", tagTimeout)
			if err == nil {
				lines := strings.Split(strings.TrimSpace(out), "\n")
				gid = lines[len(lines)-1]
				break
			}
			if !strings.Contains(err.Error(), "abandoned") || time.Now().After(deadline) {
				t.Fatalf("asr tag --group rg: %v\n%s", err, out)
			}
			t.Logf("group cut abandoned, asked again: %v", err)
		}
		var gps []api.GroupPointJSON
		if err := json.Unmarshal([]byte(c.mustCLI("points", "--group", "rg", "--json")), &gps); err != nil {
			t.Fatal(err)
		}
		var gp api.GroupPointJSON
		for _, g := range gps {
			if g.ID == gid {
				gp = g
			}
		}
		if gp.ID == "" || gp.Cut == "" || len(gp.Members) != 2 {
			t.Fatalf("group point %s: %+v in %+v", gid, gp, gps)
		}
		for vm, pid := range gp.Members {
			var ps []api.PointJSON
			if err := json.Unmarshal([]byte(c.mustCLI("points", "--machine", vm, "--point", pid, "--json")), &ps); err != nil {
				t.Fatal(err)
			}
			if len(ps) != 1 || ps[0].ID != pid || ps[0].Cut != gp.Cut {
				t.Fatalf("group point %s (cut %s): %s's point %s is %+v", gp.ID, gp.Cut, vm, pid, ps)
			}
		}
		t.Logf("group point %s: cut %s, members %v", gp.ID, gp.Cut, gp.Members)
		return gp
	}
	groupPoint() // under fio
	if err := stopFio(); err != nil {
		t.Fatal(err)
	}
	gp := groupPoint()
	c.mustCLI("ps", "switch", "--machine", "vm2", "--to", "builtin")
	out := filepath.Join(c.dir, "group")
	c.mustCLI("recover", "--group", "rg", "--point", gp.ID, "--out", out)
	for _, vm := range vms {
		if got, want := sha256File(t, filepath.Join(out, vm, "d0.img")), sha256File(t, disks[vm]); got != want {
			t.Fatalf("group point %s: %s recovered %s, its source %s", gp.ID, vm, got, want)
		}
	}
}
