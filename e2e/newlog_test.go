//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// pointIDs lists a machine's recovery points.
func (c *cluster) pointIDs(machine string) []string {
	c.t.Helper()
	var ps []struct{ ID string }
	if err := json.Unmarshal([]byte(c.mustCLI("points", "--machine", machine, "--json")), &ps); err != nil {
		c.t.Fatal(err)
	}
	var ids []string
	for _, p := range ps {
		ids = append(ids, p.ID)
	}
	return ids
}

// diffBytes counts the bytes in which two files differ.
func diffBytes(t *testing.T, a, b string) int64 {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	n := int64(max(len(x), len(y)) - min(len(x), len(y)))
	for i := range min(len(x), len(y)) {
		if x[i] != y[i] {
			n++
		}
	}
	return n
}

// TestE2EReregisteredAgentNewLog (issue 8, item 4): a machine is
// re-registered, as the documented path for an agent that lost its state,
// while its old agent still runs. The old agent is shut out at once (its
// connection closed, its reconnection refused), the fresh agent's log is
// taken as a new one (never joined to the old one by sequence number), the
// machine needs a resync and offers no point until it is done, and the
// resync, a checksum compare, sends only what differs (blocks the old log
// never carried, and the fresh agent's writes, if any, from before its
// new log started). The recovered point is the disk, byte for byte, with
// the fresh agent's 30 writes.
func TestE2EReregisteredAgentNewLog(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	const size = 64 << 20
	makeRandomDisk(t, disk, size, 31)
	a1 := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", 2*time.Minute)
	nbdPeerRun(t, "qemu-io", "-f", "raw", a1.uri("d"), "-c", "write -P 0x61 0 64k", "-c", "write -P 0x62 1M 64k")
	c.tag("vm1")
	c.tag("vm1")
	before := c.pointIDs("vm1")
	// Changes the old log never carried (the lost state's spool had them).
	var behind []int64
	for i := range int64(8) {
		behind = append(behind, i*(size/8)+12288)
	}
	writeBehind(t, disk, behind...)

	// A fresh agent (another state directory) with the same name and disk
	// registers while the old one runs. First the registration alone (the
	// agent stops at once, its disk not found): nothing of the fresh agent
	// connects yet.
	fresh := &agentProc{name: "vm1", state: filepath.Join(c.dir, "vm1-fresh"), sock: filepath.Join(c.dir, "vm1-fresh.sock")}
	fresh.args = []string{"agent", "--server", c.url(), "--passphrase-file", filepath.Join(c.srvDir, "passphrase"),
		"--state", fresh.state, "--name", "vm1", "--nbd", "unix:" + fresh.sock, "--crash-interval", "1h"}
	registerOnly := append(slices.Clone(fresh.args), "--disk", "d="+filepath.Join(c.dir, "missing.img"))
	if _, err := runAsr(registerOnly...); err == nil || !strings.Contains(err.Error(), "missing.img") {
		t.Fatalf("register the fresh agent: %v", err)
	}
	// The old agent is shut out at once: its connection was closed by the
	// registration, and it cannot connect again.
	if st := c.status("vm1"); st.Connected {
		t.Errorf("the old agent is still connected after the re-registration: it can go on shipping and making points")
	}
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(a1.logTail(), "certificate superseded") {
		if time.Now().After(deadline) {
			t.Errorf("the old agent was not refused after the re-registration:\n%s", a1.logTail())
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	fresh.args = append(fresh.args, "--disk", "d="+disk)
	c.agents["vm1-fresh"] = fresh
	c.startAgent("vm1-fresh", nil)

	// The fresh agent's writes, through its own export.
	args := []string{"-f", "raw", fresh.uri("d")}
	for i := range 30 {
		args = append(args, "-c", fmt.Sprintf("write -P 0x%02x %d 64k", 0x70+i, int64(i)*(2<<20)+(512<<10)))
	}
	nbdPeerRun(t, "qemu-io", args...)

	// The fresh agent's log is a new one: the disk needs a resync, and
	// there is no point before it.
	deadline = time.Now().Add(2 * time.Minute)
	resync := false
	for !resync {
		st := c.status("vm1")
		resync = st.State == "resync" && strings.Contains(st.Reason, "new log")
		if !resync && time.Now().After(deadline) {
			t.Errorf("machine vm1 is %s (%q) after the re-registration: no resync was raised for the fresh agent's log", st.State, st.Reason)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if resync {
		if out, err := c.cli("tag", "--machine", "vm1", "--wait"); err == nil || !strings.Contains(err.Error(), "resync") {
			t.Fatalf("a point before the resync: %s %v", out, err)
		}
		if got := c.pointIDs("vm1"); !slices.Equal(got, before) {
			t.Fatalf("points %v, before the re-registration %v: a point was made before the resync", got, before)
		}
		c.mustCLI("resync", "--machine", "vm1", "--wait")
		c.waitState("vm1", "protected", 2*time.Minute)
		compared, sent := c.resyncDone(t, "vm1")
		if compared != size || sent < 8*4096 || sent > 8*4096+30*(64<<10) {
			t.Fatalf("the resync compared %d bytes and sent %d: want the whole disk compared, and sent the 8 blocks changed behind the log and at most the 30 writes", compared, sent)
		}
		t.Logf("resync after the re-registration: compared %d bytes, sent %d", compared, sent)
	}
	id := c.tag("vm1")
	out := filepath.Join(c.dir, "recovered")
	c.mustCLI("recover", "--machine", "vm1", "--point", id, "--out", out)
	if n := diffBytes(t, filepath.Join(out, "d.img"), disk); n != 0 {
		t.Fatalf("the recovered point %s differs from the disk in %d bytes", id, n)
	}
	// Only differences travelled from the fresh agent, not the disk.
	var st struct {
		BytesSent int64 `json:"bytes_sent"`
	}
	if b, err := os.ReadFile(filepath.Join(fresh.state, "stats.json")); err == nil {
		json.Unmarshal(b, &st)
	}
	if st.BytesSent == 0 || st.BytesSent > size/8 {
		t.Fatalf("the fresh agent sent %d bytes for a %d-byte disk of which it changed 30 x 64 KiB", st.BytesSent, size)
	}
	t.Logf("fresh agent sent %d bytes on the wire", st.BytesSent)
}
