package server_test

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// vsphereRig is a machine linked to a simulated VM, failed over
// (unplanned) to a VM in the same simulator and committed.
type vsphereRig struct {
	*failbackRig
	src, rec *object.VirtualMachine
	flats    map[string]string // disk -> the recovered VM's flat file
	recWrote int64             // bytes written into the recovered VM's disks
}

func startVSphereRig(t *testing.T) *vsphereRig {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	sim := startSim(t)
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	gc := r.addSim(sim)
	ds, dsDir := simDatastore(t, gc)
	const uuid = "4211aaaa-bbbb-4ccc-8ddd-eeeeffff0014"
	src, err := sim.CreateVM(ctx, gc, vcsim.VMSpec{Name: "app01", BIOSUUID: uuid, CPUs: 1, MemoryMiB: 512, Disks: []int64{8 << 20, 16 << 20}, PowerOn: true})
	if err != nil {
		t.Fatal(err)
	}
	fr := &failbackRig{rig: r, disks: map[string]string{}, rnd: rand.New(rand.NewPCG(14, 14))}
	var specs []agent.DiskSpec
	for i, name := range []string{"d0", "d1"} {
		p := filepath.Join(dir, name+".img")
		mustDisk(t, p, int64(8+8*i)<<20, uint64(71+i))
		fr.disks[name] = p
		specs = append(specs, agent.DiskSpec{Name: name, Path: p})
	}
	fr.cfg = r.agentConfig("app01", specs...)
	fr.cfg.BIOSUUID = uuid
	fr.ra = startAgent(t, fr.cfg)
	r.waitProtected("app01")
	waitFor(t, "the machine linked to its VM", func() bool { return r.machine("app01").VM != nil })
	fr.writeSource("d0", 3)
	p, err := r.client.Tag(ctx, "app01", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	// After the point: on the original, never in the failed-over state.
	fr.writeSource("d0", 5)
	j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "app01", Point: p.ID, To: api.ToVSphere,
		VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: ds}}))
	if len(j.Output) != 1 || !strings.HasPrefix(j.Output[0], "app01 vc1/app01-recovered ") {
		t.Fatalf("failover output %q", j.Output)
	}
	r.mustJob(r.client.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "app01"}))
	if m := r.machine("app01"); m.Unprotected || m.Direction != "failed-over" {
		t.Fatalf("after the commit of a failover to vSphere: unprotected %v, direction %q", m.Unprotected, m.Direction)
	}
	rec, err := vcsim.FindVM(ctx, gc, "app01-recovered")
	if err != nil {
		t.Fatal(err)
	}
	vr := &vsphereRig{failbackRig: fr, src: src, rec: rec, flats: map[string]string{}}
	for _, d := range []string{"d0", "d1"} {
		vr.flats[d] = filepath.Join(dsDir, "app01-recovered", d+"-flat.vmdk")
	}
	return vr
}

// writeRecovered writes n random 64 KiB blocks into a disk of the
// recovered VM, as its guest would (the simulator's datastore is a
// directory).
func (vr *vsphereRig) writeRecovered(disk string, n int) {
	t := vr.t
	t.Helper()
	f, err := os.OpenFile(vr.flats[disk], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	for range n {
		for i := range buf {
			buf[i] = byte(vr.rnd.IntN(256))
		}
		if _, err := f.WriteAt(buf, vr.rnd.Int64N(fi.Size()/65536)*65536); err != nil {
			t.Fatal(err)
		}
		vr.recWrote += int64(len(buf))
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func stepNames(j api.Job) []string {
	var out []string
	for _, s := range j.Steps {
		out = append(out, s.Name+"="+s.State)
	}
	return out
}

// The cycle of an unplanned failover to vSphere: the recovered VM's disks
// written before and after reprotect; reprotect freezes the original and
// sends only the blocks that differ (far below the disks' size); failback
// powers the recovered VM off, sends what changed since, verifies the
// original disks equal the recovered VM's flat files, powers the original
// VM on; forward protection resumes and a new point recovers bit-exact.
func TestFailbackFromVSphere(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	vr := startVSphereRig(t)
	const total = (8 + 16) << 20
	if _, err := vr.client.Failback(ctx, "app01"); statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), "not reprotected") {
		t.Fatalf("failback before reprotect: %v", err)
	}
	vr.writeRecovered("d0", 6)
	vr.writeRecovered("d1", 9)
	j := vr.mustJob(vr.client.Reprotect(ctx, "app01"))
	var compared, differ, sent int64
	if len(j.Output) != 2 {
		t.Fatalf("reprotect output %q", j.Output)
	}
	if _, err := fmt.Sscanf(j.Output[0], "reprotected: %d bytes compared, %d differ, %d bytes sent to the original disks", &compared, &differ, &sent); err != nil {
		t.Fatalf("reprotect output %q: %v", j.Output[0], err)
	}
	// The differences: the recovered VM's writes and the original's after
	// the point (8 blocks of 64 KiB).
	if compared != total || sent != differ || sent < vr.recWrote/2 || sent > vr.recWrote+8*65536 {
		t.Fatalf("reprotect: %d compared, %d differ, %d sent, for %d bytes written into the recovered VM", compared, differ, sent, vr.recWrote)
	}
	steps := stepNames(j)
	for _, s := range []string{"app01: freeze the original=done", "app01: find VM app01-recovered=done", "app01: compare and send=done"} {
		if !slices.Contains(steps, s) {
			t.Fatalf("reprotect steps %v lack %s", steps, s)
		}
	}
	if m := vr.machine("app01"); m.Direction != "reprotected" {
		t.Fatalf("after reprotect: direction %q", m.Direction)
	}
	if _, err := vr.client.Reprotect(ctx, "app01"); statusOf(err) != http.StatusConflict {
		t.Fatalf("a second reprotect: %v", err)
	}
	// The original is frozen: its guest writes are refused.
	c, err := nbd.Dial(ctx, vr.cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("a write to the original after reprotect was accepted")
	}
	c.Close()
	// The recovered VM runs on.
	before := vr.recWrote
	vr.writeRecovered("d1", 5)
	// The original VM is off (its site was down).
	if t1, err := vr.src.PowerOff(ctx); err != nil || t1.Wait(ctx) != nil {
		t.Fatalf("power off the original VM: %v", err)
	}
	j = vr.mustJob(vr.client.Failback(ctx, "app01"))
	steps = stepNames(j)
	for _, s := range []string{"app01: stop the recovered VM=done", "app01: send the last changes=done", "app01: verify=done", "app01: power on=done", "app01: power on VM=done", "app01: end the failover=done"} {
		if !slices.Contains(steps, s) {
			t.Fatalf("failback steps %v lack %s", steps, s)
		}
	}
	var fbSent, fbCompared int64
	if len(j.Output) != 2 || !strings.Contains(j.Output[1], "app01-recovered stays powered off") {
		t.Fatalf("failback output %q", j.Output)
	}
	if _, err := fmt.Sscanf(j.Output[0], "failed back: %d bytes sent, %d bytes compared", &fbSent, &fbCompared); err != nil {
		t.Fatalf("failback output %q: %v", j.Output[0], err)
	}
	last := vr.recWrote - before
	if fbCompared != total || fbSent-sent <= 0 || fbSent-sent > last {
		t.Fatalf("failback: %d sent in all (%d at reprotect), %d compared, for %d bytes written since reprotect", fbSent, sent, fbCompared, last)
	}
	if powerState(t, vr.rec) != types.VirtualMachinePowerStatePoweredOff || powerState(t, vr.src) != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("after failback: the recovered VM %s, the original %s", powerState(t, vr.rec), powerState(t, vr.src))
	}
	for d, p := range vr.disks {
		if fileSHA(t, p) != fileSHA(t, vr.flats[d]) {
			t.Fatalf("disk %s: the original differs from the recovered VM's final state", d)
		}
	}
	all, err := vr.client.Failovers(ctx, true)
	if err != nil || len(all) == 0 || all[0].State != "ended" || all[0].Failback == nil || all[0].Failback.State != "failed-back" ||
		all[0].Failback.Sent != fbSent || all[0].Failback.Compared != total {
		t.Fatalf("the failover after failback: %+v %v", all, err)
	}
	if m := vr.machine("app01"); m.Direction != "failed-back" {
		t.Fatalf("after failback: direction %q", m.Direction)
	}
	vr.checkForwardOf("app01")
}

// A failback cancelled (or failing) before its switch powers the
// recovered VM on again and leaves the machine reprotected; a server
// restart keeps it reprotected; failback then completes.
func TestFailbackFromVSphereCancelled(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	vr := startVSphereRig(t)
	vr.writeRecovered("d0", 4)
	vr.mustJob(vr.client.Reprotect(ctx, "app01"))
	// The original agent away: failback waits in its pass, cancellable.
	vr.ra.close()
	j, err := vr.client.Failback(ctx, "app01")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the failback waiting for the original agent", func() bool {
		jj, err := vr.client.Job(ctx, j.ID)
		if err != nil {
			return false
		}
		for _, s := range jj.Steps {
			if s.Name == "app01: send the last changes" && s.State == "running" && strings.Contains(s.Detail, "waiting for the original agent") && jj.Cancellable {
				return true
			}
		}
		return false
	})
	if powerState(t, vr.rec) != types.VirtualMachinePowerStatePoweredOff {
		t.Fatal("the recovered VM runs during the failback's pass")
	}
	if _, err := vr.client.CancelJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	if j = vr.runJob(j, nil); j.State == api.JobSucceeded || !slices.Contains(stepNames(j), "app01: power the recovered VM on again=done") {
		t.Fatalf("a cancelled failback: %s, steps %v", j.State, stepNames(j))
	}
	if powerState(t, vr.rec) != types.VirtualMachinePowerStatePoweredOn {
		t.Fatal("the recovered VM is not running again after the cancel")
	}
	if m := vr.machine("app01"); m.Direction != "reprotected" {
		t.Fatalf("after a cancelled failback: direction %q", m.Direction)
	}
	vr.restartAgain()
	vr.ra = startAgent(t, vr.cfg)
	vr.writeRecovered("d1", 3)
	vr.mustJob(vr.client.Failback(ctx, "app01"))
	for d, p := range vr.disks {
		if fileSHA(t, p) != fileSHA(t, vr.flats[d]) {
			t.Fatalf("disk %s: the original differs from the recovered VM's final state", d)
		}
	}
	if m := vr.machine("app01"); m.Direction != "failed-back" {
		t.Fatalf("after failback: direction %q", m.Direction)
	}
}

// restartAgain restarts the server (a failover to vSphere has no exports).
func (vr *vsphereRig) restartAgain() {
	vr.t.Helper()
	vr.stop()
	vr.start()
	if m := vr.machine("app01"); m.Direction != "reprotected" {
		vr.t.Fatalf("after a restart: direction %q", m.Direction)
	}
}

// checkForwardOf is checkForward for a machine other than vm1.
func (fr *failbackRig) checkForwardOf(name string) {
	t := fr.t
	t.Helper()
	ctx := context.Background()
	src, err := nbd.Dial(ctx, fr.cfg.NBD, "d1")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.WriteAt(make([]byte, 100000), 4<<20); err != nil {
		t.Fatalf("a write to the failed-back machine: %v", err)
	}
	if err := src.Flush(); err != nil {
		t.Fatal(err)
	}
	src.Close()
	j := fr.mustJob(fr.client.Reprotect(ctx, name))
	var compared, sent int64
	if len(j.Output) != 1 {
		t.Fatalf("forward reprotect output %q", j.Output)
	}
	if _, err := fmt.Sscanf(j.Output[0], "protected again: %d bytes compared, %d sent", &compared, &sent); err != nil || compared != (8+16)<<20 || sent <= 0 || sent >= compared {
		t.Fatalf("forward reprotect output %q (%v): want both disks compared, only the differences sent", j.Output[0], err)
	}
	fr.waitProtected(name)
	if m := fr.machine(name); m.Direction != "" {
		t.Fatalf("after the forward reprotect: direction %q", m.Direction)
	}
	p, err := fr.client.Tag(ctx, name, false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	fr.recover(name, p.ID, out)
	for d, path := range fr.disks {
		if fileSum(t, filepath.Join(out, d+".img")) != fileSum(t, path) {
			t.Fatalf("disk %s: the point after the forward reprotect differs from the source", d)
		}
	}
}

// A server stop right after a vSphere failback's switch: the next start
// finishes it (thaw, the original VM powered on, the failover ended).
func TestFailbackFromVSphereFinishedAfterARestartPastTheSwitch(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	vr := startVSphereRig(t)
	vr.writeRecovered("d1", 7)
	vr.mustJob(vr.client.Reprotect(ctx, "app01"))
	vr.writeRecovered("d0", 3)
	if t1, err := vr.src.PowerOff(ctx); err != nil || t1.Wait(ctx) != nil {
		t.Fatalf("power off the original VM: %v", err)
	}
	switched := make(chan struct{})
	server.SetFailbackSwitchHook(vr.srv, func(ctx context.Context) {
		close(switched)
		<-ctx.Done()
	})
	if _, err := vr.client.Failback(ctx, "app01"); err != nil {
		t.Fatal(err)
	}
	<-switched
	vr.stop()
	vr.start()
	waitFor(t, "the failback finished after the restart", func() bool {
		return vr.machine("app01").Direction == "failed-back"
	})
	for d, p := range vr.disks {
		if fileSHA(t, p) != fileSHA(t, vr.flats[d]) {
			t.Fatalf("disk %s: the original differs from the recovered VM's final state", d)
		}
	}
	if powerState(t, vr.rec) != types.VirtualMachinePowerStatePoweredOff || powerState(t, vr.src) != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("after failback: the recovered VM %s, the original %s", powerState(t, vr.rec), powerState(t, vr.src))
	}
	if fos, _ := vr.client.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers: %+v", fos)
	}
	vr.checkForwardOf("app01")
}

// An original agent thawed after reprotect (by hand, or its frozen state
// lost), whose guest writes the original meanwhile, is found by
// failback's pass (a refusal): frozen again, the pass run again from the
// start, and the original ends equal to the recovered VM's disks.
// (Before, the failback failed, saying to run reprotect again.)
func TestFailbackFromVSphereThawed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	vr := startVSphereRig(t)
	vr.writeRecovered("d0", 4)
	vr.mustJob(vr.client.Reprotect(ctx, "app01"))
	vr.thawOriginal("d1", 65536*5)
	vr.writeRecovered("d1", 3)
	j := vr.mustJob(vr.client.Failback(ctx, "app01"))
	steps := stepNames(j)
	for _, s := range []string{"app01: freeze the original=done", "app01: send the last changes=done", "app01: verify=done", "app01: end the failover=done"} {
		if !slices.Contains(steps, s) {
			t.Fatalf("failback steps %v lack %s", steps, s)
		}
	}
	for d, p := range vr.disks {
		if fileSHA(t, p) != fileSHA(t, vr.flats[d]) {
			t.Fatalf("disk %s: the original differs from the recovered VM's final state", d)
		}
	}
	vr.mustThawedEvent("app01")
}
