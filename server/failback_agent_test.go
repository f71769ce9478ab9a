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
	// The state as the replica carries it (taken with the original agent
	// stopped, so that its files are whole).
	vr.ra.close()
	recState := filepath.Join(r.dir, "recovered-state")
	copyAgentState(t, vr.cfg.StateDir, recState)
	cloneState := filepath.Join(r.dir, "clone-state")
	copyAgentState(t, vr.cfg.StateDir, cloneState)
	vr.ra = startAgent(t, vr.cfg)
	waitFor(t, "the original agent connected", func() bool { return r.machine("app01").Connected })

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

	rc := vr.cfg
	rc.StateDir, rc.NBD, rc.BIOSUUID = recState, "unix:"+filepath.Join(r.dir, "recovered.sock"), recUUID
	rc.Disks = []agent.DiskSpec{{Name: "d0", Path: vr.flats["d0"]}, {Name: "d1", Path: vr.flats["d1"]}}
	recAgent := startAgent(t, rc)
	waitFor(t, "the recovered agent taken as the reverse source", func() bool {
		m := r.machine("app01")
		return m.ReverseSource != nil && m.ReverseSource.Connected
	})
	m := r.machine("app01")
	if m.BIOSUUID != vr.cfg.BIOSUUID || !m.Connected || m.ReverseSource.BIOSUUID != recUUID || m.ReverseSource.VM != "app01-recovered" || m.ReverseSource.Live {
		t.Fatalf("machine %+v, reverse source %+v", m, m.ReverseSource)
	}

	// Writes through the recovered agent before reprotect are held (the
	// compare finds them), those after are shipped.
	vr.writeVia(rc.NBD, "d0", 4)
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
	if s := r.machine("app01").ReverseSource.Sent; s < 9*65536 || s > 2*13*65536 {
		t.Fatalf("the recovered agent's stream sent %d bytes for %d written", s, 13*65536)
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
	if rv := r.machine("app01").Reverse; rv == nil || rv.RPO <= time.Second {
		t.Fatalf("reverse status with the original agent gone: %+v", rv)
	}
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
