package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// copyAgentState copies an agent's state directory (identity,
// certificate, log), as the replica carries it into the recovered VM.
func copyAgentState(t *testing.T, from, to string) {
	t.Helper()
	if err := os.CopyFS(to, os.DirFS(from)); err != nil {
		t.Fatal(err)
	}
}

// TestFailbackRecoveredAgent: after a committed failover to vSphere, an
// agent with the original's identity and state but the recovered VM's
// BIOS UUID, whose disks are the recovered VM's flat files, is taken as
// the reverse source, never as the original: the original agent stays
// connected and the machine's BIOS UUID unchanged; a third with an
// unknown BIOS UUID is refused, saying why. Reprotect compares first and
// then the recovered agent's writes reach the original disks as they
// happen; failback drains its stream and ends equal.
func TestFailbackRecoveredAgent(t *testing.T) {
	t.Parallel()
	vr := startVSphereRig(t)
	r := vr.rig
	ctx := context.Background()
	recUUID := strings.ToLower(vr.rec.UUID(ctx))
	if recUUID == "" || recUUID == vr.cfg.BIOSUUID {
		t.Fatalf("recovered VM's UUID %q", recUUID)
	}
	rc, states := vr.recoveredAgentConfig(recUUID, "recovered", "clone")
	recState, cloneState := states[0], states[1]

	clone := vr.cfg
	clone.StateDir, clone.NBD = cloneState, "unix:"+filepath.Join(r.dir, "clone.sock")
	clone.BIOSUUID = "4211aaaa-0000-4000-8000-000000000099"
	clone.Disks = []agent.DiskSpec{{Name: "d0", Path: filepath.Join(r.dir, "clone0.img")}, {Name: "d1", Path: filepath.Join(r.dir, "clone1.img")}}
	mustDisk(t, clone.Disks[0].Path, 8<<20, 1)
	mustDisk(t, clone.Disks[1].Path, 16<<20, 2)
	ca := startAgent(t, clone)
	waitFor(t, "the clone refused", func() bool {
		return strings.Contains(r.machine("app01").Error, "reports BIOS UUID 4211aaaa-0000-4000-8000-000000000099")
	})
	ca.close()
	if m := r.machine("app01"); m.BIOSUUID != vr.cfg.BIOSUUID || m.ReverseSource != nil {
		t.Fatalf("after the clone: BIOS UUID %q, reverse source %+v", m.BIOSUUID, m.ReverseSource)
	}

	recAgent := startAgent(t, rc)
	waitFor(t, "the recovered agent taken as the reverse source", func() bool {
		m := r.machine("app01")
		return m.ReverseSource != nil && m.ReverseSource.Connected
	})
	m := r.machine("app01")
	if m.BIOSUUID != vr.cfg.BIOSUUID || !m.Connected || m.ReverseSource.BIOSUUID != recUUID || m.ReverseSource.VM != "app01-recovered" || m.ReverseSource.Live {
		t.Fatalf("machine %+v, reverse source %+v", m, m.ReverseSource)
	}

	// Writes through the recovered agent before reprotect are dropped
	// by the held stream (the compare finds them, so they are sent once),
	// those after are shipped.
	vr.writeVia(rc.NBD, "d0", 4)
	waitFor(t, "the writes before reprotect dropped by the held stream", func() bool {
		m := r.machine("app01")
		return m.ReverseSource != nil && m.ReverseSource.Dropped == 4*65536
	})
	j := r.mustJob(r.client.Reprotect(ctx, "app01"))
	if !strings.Contains(strings.Join(j.Output, "\n"), "path: the asr agent in VM app01-recovered") {
		t.Fatalf("reprotect output %q", j.Output)
	}
	if m := r.machine("app01"); m.ReverseSource == nil || !m.ReverseSource.Live {
		t.Fatalf("after reprotect: reverse source %+v", m.ReverseSource)
	}
	vr.writeVia(rc.NBD, "d1", 6)
	vr.writeVia(rc.NBD, "d0", 3)
	waitFor(t, "the recovered agent's writes on the original", func() bool {
		return fileSHA(t, vr.disks["d0"]) == fileSHA(t, vr.flats["d0"]) && fileSHA(t, vr.disks["d1"]) == fileSHA(t, vr.flats["d1"])
	})
	// The reverse direction's RPO and points come from the agent's
	// status: nothing pending once its writes are on the original.
	waitFor(t, "the reverse RPO known, nothing pending, a reverse point", func() bool {
		m := r.machine("app01")
		if m.Reverse == nil || !m.Reverse.RPOKnown || !m.Reverse.FirstPassDone || m.Reverse.Pending != 0 || m.Reverse.Policy != "default-failback" {
			return false
		}
		var evs []api.EventJSON
		if err := r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=app01", nil, &evs); err != nil {
			t.Fatal(err)
		}
		return slices.ContainsFunc(evs, func(e api.EventJSON) bool { return e.Kind == "reverse-point" })
	})
	// Each write once: those before reprotect by its compare, those
	// after by the stream (before, the stream sent the first 4 again).
	if s := r.machine("app01").ReverseSource.Sent; s != 9*65536 {
		t.Fatalf("the recovered agent's stream sent %d bytes for %d written after reprotect (%d before it, sent by the compare)", s, 9*65536, 4*65536)
	}

	// A server restart keeps the stream's figures (the record): the
	// bytes sent, and the last record acknowledged, so the agent is not
	// asked for what its spool keeps past the floor again.
	sent := r.machine("app01").ReverseSource.Sent
	// A server restart: the record says the path is the agent, so its
	// next connection is live at once. Then the original agent gone:
	// the recovered agent's writes wait, the reverse RPO grows past the
	// failback policy's threshold and the alert is raised; the original
	// back, they drain and it clears.
	vr.stop()
	vr.tune = func(c *server.Config) { c.PolicyEvery, c.AlertClear = 20*time.Millisecond, 200*time.Millisecond }
	vr.start()
	if err := r.client.Do(ctx, http.MethodPatch, "/api/v1/policies/default-failback", api.PolicyJSON{RPOThreshold: "1s"}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the recovered agent live again after the restart, nothing pending", func() bool {
		m := r.machine("app01")
		return m.ReverseSource != nil && m.ReverseSource.Connected && m.ReverseSource.Live && m.Connected &&
			m.Reverse != nil && m.Reverse.RPOKnown && m.Reverse.Pending == 0
	})
	if s := r.machine("app01").ReverseSource.Sent; s != sent {
		t.Fatalf("after a restart the stream counts %d bytes sent, %d before it (the spool sent again, or the count lost)", s, sent)
	}
	if fos, err := r.client.Failovers(ctx, false); err != nil || len(fos) != 1 || fos[0].Failback == nil || fos[0].Failback.Sent < sent {
		t.Fatalf("failovers after the restart: %+v %v (want the stream's %d bytes counted)", fos, err, sent)
	}
	vr.ra.close()
	vr.writeVia(rc.NBD, "d1", 3)
	al := r.waitAlert(api.AlertReverseRPO, "app01", "")
	if !strings.Contains(al.Message, "reverse direction") || !strings.Contains(al.Action, "recovered VM app01-recovered") {
		t.Fatalf("reverse RPO alert %+v", al)
	}
	// The alert may have been raised a moment before the writes the RPO
	// is now measured from (a loaded run read 326 ms just after it): the
	// status is waited for, not read once. With the original agent gone
	// the RPO only grows.
	waitFor(t, "the reverse RPO past the threshold with the original agent gone", func() bool {
		rv := r.machine("app01").Reverse
		return rv != nil && rv.RPOKnown && rv.RPO > time.Second
	})
	vr.ra = startAgent(t, vr.cfg)
	r.waitResolved(al.ID)
	waitFor(t, "the writes made with the original agent gone on the original", func() bool {
		return fileSHA(t, vr.disks["d1"]) == fileSHA(t, vr.flats["d1"])
	})

	// Failback freezes the recovered agent before the power-off: with
	// the original agent away its last writes wait, the guest's writes
	// are refused (EPERM); a cancel thaws it.
	vr.ra.close()
	vr.writeVia(rc.NBD, "d0", 2)
	j, err := r.client.Failback(ctx, "app01")
	if err != nil {
		t.Fatal(err)
	}
	const freezeStep = "app01: freeze and drain the recovered agent"
	fos, err := r.client.Failovers(ctx, false)
	if err != nil || len(fos) != 1 {
		t.Fatalf("failovers %+v %v", fos, err)
	}
	fid := fos[0].ID
	// Its statuses wait behind its writes (the original agent away):
	// the freeze is seen in its state file.
	waitFor(t, "the recovered agent frozen, its drain waiting", func() bool {
		jj, err := r.client.Job(ctx, j.ID)
		if err != nil || !jj.Cancellable || frozenUnder(t, recState) != fid {
			return false
		}
		// Saved, then refused: a write in between is taken (and shipped).
		return slices.Contains(stepNames(jj), freezeStep+"=running") && writeRefused(t, rc.NBD, "d1")
	})
	if _, err := r.client.CancelJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	if j = r.runJob(j, nil); j.State == api.JobSucceeded || !slices.Contains(stepNames(j), "app01: thaw the recovered agent=done") || slices.Contains(stepNames(j), "app01: stop the recovered VM=done") {
		t.Fatalf("a cancelled failback: %s, steps %v", j.State, stepNames(j))
	}
	waitFor(t, "the recovered agent thawed", func() bool { return frozenUnder(t, recState) == "" && !writeRefused(t, rc.NBD, "d1") })
	vr.writeVia(rc.NBD, "d1", 2)
	vr.ra = startAgent(t, vr.cfg)
	waitFor(t, "the writes made with the original agent gone on the original, the agent seen thawed", func() bool {
		m := r.machine("app01")
		return fileSHA(t, vr.disks["d0"]) == fileSHA(t, vr.flats["d0"]) && fileSHA(t, vr.disks["d1"]) == fileSHA(t, vr.flats["d1"]) &&
			m.ReverseSource != nil && m.ReverseSource.Connected && !m.ReverseSource.Frozen
	})

	// Failback: frozen and drained before the power-off, so its pass
	// over the stopped VM's disks sends nothing.
	vr.writeVia(rc.NBD, "d0", 2)
	j = r.mustJob(r.client.Failback(ctx, "app01"))
	out := strings.Join(j.Output, "\n")
	if !strings.Contains(out, "the last pass over the stopped VM's disks sent 0 bytes (its agent was frozen and drained before the power-off)") {
		t.Fatalf("failback output %q, steps %v", j.Output, stepNames(j))
	}
	if got := stepNames(j); !slices.Contains(got, freezeStep+"=done") || slices.Index(got, freezeStep+"=done") > slices.Index(got, "app01: stop the recovered VM=done") {
		t.Fatalf("failback steps %v", got)
	}
	mustRefuseWrite(t, rc.NBD, "d0")
	if frozenUnder(t, recState) != fid {
		t.Fatal("the recovered agent is not frozen under the failover after failback")
	}
	recAgent.close()
	for _, d := range []string{"d0", "d1"} {
		if a, b := fileSHA(t, vr.disks[d]), fileSHA(t, vr.flats[d]); a != b {
			t.Fatalf("disk %s: original %s, recovered %s", d, a, b)
		}
	}
	if m := r.machine("app01"); m.Direction != "failed-back" || m.ReverseSource != nil {
		t.Fatalf("after failback: direction %q, reverse source %+v", m.Direction, m.ReverseSource)
	}
}

// recoveredAgentConfig stops the original agent, copies its state as the
// replica carries it (taken with the agent stopped, so that its files
// are whole) into a directory per name, starts it again, and returns the
// copies and the config of the recovered VM's agent (BIOS UUID uuid)
// with the first: the recovered VM's flat files as its disks.
func (vr *vsphereRig) recoveredAgentConfig(uuid string, names ...string) (agent.Config, []string) {
	t := vr.t
	t.Helper()
	vr.ra.close()
	var states []string
	for _, n := range names {
		states = append(states, filepath.Join(vr.dir, n+"-state"))
		copyAgentState(t, vr.cfg.StateDir, states[len(states)-1])
	}
	vr.ra = startAgent(t, vr.cfg)
	waitFor(t, "the original agent connected", func() bool { return vr.machine("app01").Connected })
	rc := vr.cfg
	rc.StateDir, rc.NBD, rc.BIOSUUID = states[0], "unix:"+filepath.Join(vr.dir, names[0]+".sock"), uuid
	rc.Disks = []agent.DiskSpec{{Name: "d0", Path: vr.flats["d0"]}, {Name: "d1", Path: vr.flats["d1"]}}
	return rc, states
}

// An original agent found thawed while the recovered VM's agent streams
// its writes (by hand, its frozen state lost), whose guest wrote the
// original meanwhile: at the first refused write the stream is held,
// the original frozen again, the recovered disks compared again (a
// reprotect job) and the stream resumed, a failback-thawed event
// raised; the original equal to the recovered disks without a failback.
// Thawed again with nothing sent, the policy engine's pass finds it the
// same way. Failback then ends bit-exact. (Before, the refused writes
// were sent again and refused again until failback's pass.)
func TestFailbackRecoveredAgentThawed(t *testing.T) {
	t.Parallel()
	vr := startVSphereRig(t)
	r := vr.rig
	ctx := context.Background()
	rc, _ := vr.recoveredAgentConfig(strings.ToLower(vr.rec.UUID(ctx)), "recovered")
	recAgent := startAgent(t, rc)
	defer recAgent.close()
	waitFor(t, "the recovered agent connected", func() bool {
		m := r.machine("app01")
		return m.ReverseSource != nil && m.ReverseSource.Connected
	})
	r.mustJob(r.client.Reprotect(ctx, "app01"))
	vr.writeVia(rc.NBD, "d1", 2)
	equal := func() bool {
		return fileSHA(t, vr.disks["d0"]) == fileSHA(t, vr.flats["d0"]) && fileSHA(t, vr.disks["d1"]) == fileSHA(t, vr.flats["d1"])
	}
	waitFor(t, "the stream live, its writes on the original", func() bool {
		m := r.machine("app01")
		return m.ReverseSource != nil && m.ReverseSource.Live && equal()
	})
	reprotects := func() int {
		js, err := r.client.Jobs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, j := range js {
			if j.Kind == "reprotect" && j.Subject == "app01" && j.State == api.JobSucceeded {
				n++
			}
		}
		return n
	}
	if n := reprotects(); n != 1 {
		t.Fatalf("%d reprotect jobs succeeded, want 1", n)
	}
	thawedEvents := func() []string {
		evs, err := vr.srv.DB().Events(ctx, "", 200)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range evs {
			if e.Kind == "failback-thawed" {
				out = append(out, e.Message)
			}
		}
		return out
	}
	// A server restart whose policy engine's pass never comes again
	// (the thaw is found by the refused write alone): the stream live
	// again at once (the record).
	vr.stop()
	vr.tune = func(c *server.Config) { c.NBDListen, c.PolicyEvery = "127.0.0.1:0", time.Hour }
	vr.start()
	waitFor(t, "the stream live after the restart", func() bool {
		m := r.machine("app01")
		return m.Connected && m.ReverseSource != nil && m.ReverseSource.Connected && m.ReverseSource.Live
	})

	// Thawed, the original guest writes; then a write through the
	// recovered agent is refused: compared again at once.
	vr.thawOriginal("d0", 65536*2)
	vr.writeVia(rc.NBD, "d1", 3)
	waitFor(t, "the compare begun again after the refused write, the stream live again, the original equal", func() bool {
		m := r.machine("app01")
		return reprotects() == 2 && m.ReverseSource != nil && m.ReverseSource.Live && equal()
	})
	if evs := thawedEvents(); len(evs) != 1 || !strings.Contains(evs[0], "refused by the agent") || !strings.Contains(evs[0], "app01-recovered") {
		t.Fatalf("failback-thawed events %q, want one of the refused write", evs)
	}
	vr.writeVia(rc.NBD, "d0", 2)
	waitFor(t, "the stream's writes after it on the original", equal)

	// Thawed again with nothing sent: found by the policy engine's pass
	// (a restart with it every 20 ms; the record says the stream is
	// live from the floor the compare set). The thaw and the original
	// guest's write come first, while no pass runs (a restart with it
	// every hour): a pass between them freezes the original again, as
	// it should, and the write is refused (EPERM), which a loaded
	// machine's delay once made happen.
	vr.stop()
	vr.tune = func(c *server.Config) { c.NBDListen, c.PolicyEvery = "127.0.0.1:0", time.Hour }
	vr.start()
	waitFor(t, "the stream live after the restart", func() bool {
		m := r.machine("app01")
		return m.Connected && m.ReverseSource != nil && m.ReverseSource.Connected && m.ReverseSource.Live && equal()
	})
	vr.thawOriginal("d1", 65536*7)
	vr.stop()
	vr.tune = func(c *server.Config) { c.NBDListen, c.PolicyEvery = "127.0.0.1:0", 20*time.Millisecond }
	vr.start()
	waitFor(t, "the thaw found with nothing sent, compared again, the original equal", func() bool {
		m := r.machine("app01")
		return reprotects() == 3 && m.ReverseSource != nil && m.ReverseSource.Live && equal()
	})
	if evs := thawedEvents(); len(evs) != 2 || !slices.ContainsFunc(evs, func(e string) bool { return strings.Contains(e, "found with nothing to send") }) {
		t.Fatalf("failback-thawed events %q, want a second one of the thaw found with nothing sent", evs)
	}
	vr.writeVia(rc.NBD, "d1", 2)
	waitFor(t, "the stream's writes after it on the original", equal)

	j := r.mustJob(r.client.Failback(ctx, "app01"))
	if !strings.Contains(strings.Join(j.Output, "\n"), "the last pass over the stopped VM's disks sent 0 bytes") {
		t.Fatalf("failback output %q, steps %v", j.Output, stepNames(j))
	}
	if !equal() {
		t.Fatal("after failback the original differs from the recovered disks")
	}
}

// mustRefuseWrite checks that a write through an agent's NBD splitter is
// refused (EPERM: the agent is frozen).
func mustRefuseWrite(t *testing.T, addr, disk string) {
	t.Helper()
	if !writeRefused(t, addr, disk) {
		t.Fatal("a write through the frozen recovered agent was taken, want EPERM")
	}
}

// writeRefused writes 4 KiB of zeros at the start of an agent's NBD
// disk: true if refused with EPERM, false if taken.
func writeRefused(t *testing.T, addr, disk string) bool {
	t.Helper()
	c, err := nbd.Dial(context.Background(), addr, disk)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.WriteAt(make([]byte, 4096), 0)
	if err != nil && !errors.Is(err, nbd.EPERM) {
		t.Fatalf("a write through the recovered agent: %v", err)
	}
	return err != nil
}

// frozenUnder is the failover an agent's state file says it is frozen
// under ("" if none).
func frozenUnder(t *testing.T, stateDir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(stateDir, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Failover string `json:"failover"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st.Failover
}
