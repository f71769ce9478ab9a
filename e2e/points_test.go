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

// TestE2EPolicyGroupTimeCLI drives the operator CLI against real processes:
// a policy created and assigned (its schedule reaches the running agents),
// an invalid policy refused, a replication group cut and recovered whole,
// and a recovery to an instant, through the server and from the target.
func TestE2EPolicyGroupTimeCLI(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	var disks []string
	for _, name := range []string{"vm1", "vm2"} {
		disk := filepath.Join(c.dir, name+".img")
		makeDisk(t, disk, 32<<20, uint64(len(name)+len(disks)))
		disks = append(disks, disk)
		c.startAgent(name, nil, "d="+disk)
		c.waitState(name, "protected", time.Minute)
	}

	// Policies.
	if _, err := c.cli("policy", "create", "bad", "--retention", "100h"); err == nil || !strings.Contains(err.Error(), "retention") {
		t.Fatalf("a policy over the retention limit: %v", err)
	}
	c.mustCLI("policy", "create", "fast", "--crash-interval", "5s", "--app-frequency", "0")
	list := c.mustCLI("policy", "list")
	for _, want := range []string{"default", "default-failback", "fast", "fast-failback"} {
		if !strings.Contains(list, want) {
			t.Fatalf("policy list lacks %s:\n%s", want, list)
		}
	}
	c.mustCLI("policy", "assign", "--machine", "vm1", "--policy", "fast")
	deadline := time.Now().Add(hungAfter) // a hung agent, not a slow one
	for {
		var ps []struct{ ID, Kind string }
		json.Unmarshal([]byte(c.mustCLI("points", "--machine", "vm1", "--json")), &ps)
		if len(ps) >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no scheduled points 3 min after assigning a 5 s policy: %v", ps)
		}
		time.Sleep(500 * time.Millisecond)
	}

	// A replication group.
	for _, m := range []string{"vm1", "vm2"} {
		c.mustCLI("group", "set", "--machine", m, "--group", "web")
	}
	out := c.mustCLI("tag", "--group", "web", "--wait", "--timeout", tagTimeout)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	gid := lines[len(lines)-1]
	sums := map[string]string{"vm1": sha256File(t, disks[0]), "vm2": sha256File(t, disks[1])}
	gdir := filepath.Join(c.dir, "group")
	c.mustCLI("recover", "--group", "web", "--point", gid, "--out", gdir)
	for m, sum := range sums {
		if got := sha256File(t, filepath.Join(gdir, m, "d.img")); got != sum {
			t.Fatalf("group point %s: %s differs from its source", gid, m)
		}
	}
	if !strings.Contains(c.mustCLI("points", "--group", "web"), gid) {
		t.Fatal("the group point is not listed")
	}

	// An instant: after the group point, before a later write.
	at := time.Now().UTC()
	time.Sleep(50 * time.Millisecond)
	a := c.agents["vm2"]
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x77 1M 1M")
	c.mustCLI("tag", "--group", "web", "--wait", "--timeout", tagTimeout) // the write is on the target
	tdir := filepath.Join(c.dir, "time")
	c.mustCLI("recover", "--machine", "vm2", "--time", at.Format(time.RFC3339Nano), "--out", tdir)
	if got := sha256File(t, filepath.Join(tdir, "d.img")); got != sums["vm2"] {
		t.Fatal("recovery to an instant before a write holds the write (or misses an earlier one)")
	}

	// The site is gone.
	for _, m := range []string{"vm1", "vm2"} {
		c.agents[m].stop()
	}
	c.server.stop()
	pass := filepath.Join(c.dir, "pass")
	b, _ := os.ReadFile(filepath.Join(c.srvDir, "passphrase"))
	os.WriteFile(pass, b, 0o600)
	target := "file://" + filepath.Join(c.srvDir, "target")
	odir := filepath.Join(c.dir, "offline-time")
	if _, err := runAsr("recover", "--machine", "vm2", "--time", at.Format(time.RFC3339Nano), "--out", odir,
		"--target", target, "--passphrase-file", pass); err != nil {
		t.Fatal(err)
	}
	if got := sha256File(t, filepath.Join(odir, "d.img")); got != sums["vm2"] {
		t.Fatal("offline recovery to an instant differs")
	}
	ogdir := filepath.Join(c.dir, "offline-group")
	if _, err := runAsr("recover", "--group", "web", "--point", gid, "--out", ogdir, "--target", target, "--passphrase-file", pass); err != nil {
		t.Fatal(err)
	}
	for m, sum := range sums {
		if got := sha256File(t, filepath.Join(ogdir, m, "d.img")); got != sum {
			t.Fatalf("offline group recovery: %s differs", m)
		}
	}
}
