package server_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// simDatastore is the simulator's first local datastore and the directory
// behind it.
func simDatastore(t *testing.T, gc *govmomi.Client) (string, string) {
	t.Helper()
	ctx := context.Background()
	f := find.NewFinder(gc.Client, true)
	dc, err := f.DefaultDatacenter(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f.SetDatacenter(dc)
	ds, err := f.Datastore(ctx, "LocalDS_0")
	if err != nil {
		t.Fatal(err)
	}
	var mds mo.Datastore
	if err := ds.Properties(ctx, ds.Reference(), []string{"summary"}, &mds); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(mds.Summary.Url); err != nil || !fi.IsDir() {
		t.Fatalf("datastore url %q is not a local directory: %v", mds.Summary.Url, err)
	}
	return "LocalDS_0", mds.Summary.Url
}

func fileSHA(t *testing.T, path string) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return [32]byte(h.Sum(nil))
}

func powerState(t *testing.T, vm *object.VirtualMachine) types.VirtualMachinePowerState {
	t.Helper()
	st, err := vm.PowerState(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// addSim registers a simulator as vCenter vc1 and returns a client of it.
func (r *rig) addSim(sim *vcsim.Sim) *govmomi.Client {
	r.t.Helper()
	ctx := context.Background()
	if _, err := r.client.AddVCenter(ctx, api.AddVCenterRequest{Name: "vc1", URL: sim.URL, User: sim.User, Password: simPassword, Thumbprint: sim.Thumbprint}); err != nil {
		r.t.Fatal(err)
	}
	gc, err := sim.Client(ctx)
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { gc.Logout(context.Background()) })
	return gc
}

// checkAlternate checks an alternate-location failback: the job's
// output, the new VM in the simulator (powered on, one disk per export),
// its flat files equal the exports' final state, the failover ended to
// the new VM, the exports gone and the forward reprotect refused with
// what to do instead.
func (fr *failbackRig) checkAlternate(j api.Job, gc *govmomi.Client, dsDir, name string, want map[string][32]byte) {
	fr.t.Helper()
	fr.checkAlternateOf("vm1", "vm1: stop the failed-over machine", j, gc, dsDir, name, want)
	u, err := url.Parse(fr.exports["d0"])
	if err != nil {
		fr.t.Fatal(err)
	}
	if c, err := nbd.Dial(context.Background(), u.Host, strings.TrimPrefix(u.Path, "/")); err == nil {
		c.Close()
		fr.t.Fatal("the export is still served after the failback")
	}
}

// checkAlternateOf is checkAlternate for machine m, whose failed-over
// machine's stop is the job's step stop, without the exports' check.
func (fr *failbackRig) checkAlternateOf(m, stop string, j api.Job, gc *govmomi.Client, dsDir, name string, want map[string][32]byte) {
	t := fr.t
	t.Helper()
	ctx := context.Background()
	if len(j.Output) < 2 || !strings.HasPrefix(j.Output[0], "failed back to a new VM: vc1/"+name+" (vm-") ||
		!strings.Contains(j.Output[1], "has no asr agent") || !strings.Contains(j.Output[1], "asr protect --vm "+name) {
		t.Fatalf("alternate failback output %q", j.Output)
	}
	var steps []string
	for _, s := range j.Steps {
		steps = append(steps, s.Name+"="+s.State)
	}
	for _, s := range []string{stop + "=done", m + ": create VM in vc1=done", m + ": verify=done", m + ": end the failover=done", m + ": power on=done"} {
		if !slices.Contains(steps, s) {
			t.Fatalf("steps %v lack %s", steps, s)
		}
	}
	vm, err := vcsim.FindVM(ctx, gc, name)
	if err != nil {
		t.Fatalf("the new VM: %v", err)
	}
	var mvm mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"config.hardware", "runtime.powerState"}, &mvm); err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, d := range mvm.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok {
			files = append(files, disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).FileName)
		}
	}
	slices.Sort(files)
	if mvm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn ||
		!slices.Equal(files, []string{"[LocalDS_0] " + name + "/d0.vmdk", "[LocalDS_0] " + name + "/d1.vmdk"}) {
		t.Fatalf("the new VM: %s, disks %v", mvm.Runtime.PowerState, files)
	}
	for d, sum := range want {
		if got := fileSHA(t, filepath.Join(dsDir, name, d+"-flat.vmdk")); got != sum {
			t.Fatalf("disk %s: the flat file in the datastore differs from the failed-over disk's final state", d)
		}
	}
	all, err := fr.client.Failovers(ctx, true)
	if err != nil || len(all) == 0 || all[0].State != "ended" || all[0].Failback == nil ||
		all[0].Failback.State != "failed-back" || all[0].Failback.VM != "vc1/"+name || all[0].Failback.Compared != (8+16)<<20 {
		t.Fatalf("the failover after the failback: %+v %v", all, err)
	}
	if fos, _ := fr.client.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers after failback: %+v", fos)
	}
	if mm := fr.machine(m); mm.Direction != "failed-back" {
		t.Fatalf("after the failback: direction %q", mm.Direction)
	}
	_, err = fr.client.Reprotect(ctx, m)
	if statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), "asr protect --vm "+name) {
		t.Fatalf("forward reprotect after an alternate failback: %v", err)
	}
}

// An alternate-location failback of a reprotected machine: refused
// requests change nothing (the exports stay writable); then a new VM is
// made in the simulator whose flat files equal the exports' final state,
// powered on once verified; the original disks are not written after the
// failback, the original agent stays frozen.
func TestFailbackAlternateReprotected(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	sim := startSim(t)
	gc := fr.addSim(sim)
	ds, dsDir := simDatastore(t, gc)
	fr.write("d0", 12)
	fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	fr.write("d1", 9)

	alt := func(vt *api.VSphereTarget, name string) api.FailbackRequest {
		return api.FailbackRequest{Alternate: true, VSphere: vt, VMName: name}
	}
	if _, err := sim.CreateVM(ctx, gc, vcsim.VMSpec{Name: "taken", Disks: []int64{1 << 20}}); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		req    api.FailbackRequest
		status int
		want   string
	}{
		{alt(nil, ""), 400, "--vcenter"},
		{alt(&api.VSphereTarget{VCenter: "vc1"}, ""), 400, "--datastore"},
		{alt(&api.VSphereTarget{VCenter: "nope", Datastore: ds}, ""), 404, "nope"},
		{alt(&api.VSphereTarget{VCenter: "vc1", Datastore: "nope"}, ""), 400, "nope"},
		{alt(&api.VSphereTarget{VCenter: "vc1", Datastore: ds, Host: "nope"}, ""), 400, "nope"},
		{alt(&api.VSphereTarget{VCenter: "vc1", Datastore: ds}, "taken"), 400, "taken"},
		{alt(&api.VSphereTarget{VCenter: "vc1", Datastore: ds}, "bad/name"), 400, "bad/name"},
		{api.FailbackRequest{VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: ds}}, 400, "--alternate"},
	} {
		_, err := fr.client.FailbackTo(ctx, "vm1", tt.req)
		if statusOf(err) != tt.status || !strings.Contains(err.Error(), tt.want) {
			t.Fatalf("failback %+v: %v, want %d with %q", tt.req, err, tt.status, tt.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dsDir, "vm1-failback")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused request made the VM's folder: %v", err)
	}
	fr.write("d0", 3) // still writable: nothing was stopped
	if m := fr.machine("vm1"); m.Direction != "reprotected" {
		t.Fatalf("after refused requests: direction %q", m.Direction)
	}
	want := fr.sums()
	before := map[string][32]byte{}
	waitFor(t, "the writes on the original disks", func() bool {
		fos, err := fr.client.Failovers(ctx, false)
		return err == nil && len(fos) == 1 && fos[0].Failback != nil && fos[0].Failback.Pending == 0
	})
	for d, p := range fr.disks {
		before[d] = fileSum(t, p)
	}

	j := fr.mustJob(fr.client.FailbackTo(ctx, "vm1", alt(&api.VSphereTarget{VCenter: "vc1", Datastore: ds}, "")))
	t.Logf("alternate failback: %q", j.Output)
	fr.checkAlternate(j, gc, dsDir, "vm1-failback", want)
	if len(j.Output) != 3 || !strings.Contains(j.Output[2], "stays frozen") {
		t.Fatalf("a planned failover's original agent: output %q", j.Output)
	}
	for d, p := range fr.disks {
		if fileSum(t, p) != before[d] {
			t.Fatalf("disk %s: the original was written by an alternate-location failback", d)
		}
	}
	src, err := nbd.Dial(ctx, fr.cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.WriteAt([]byte{1}, 0); !errors.Is(err, nbd.EPERM) {
		t.Fatalf("a write to the original after an alternate failback: %v (want it still frozen)", err)
	}
}

// An alternate-location failback of a committed failover that was never
// reprotected, named, with a second failback refused while it runs.
func TestFailbackAlternateCommitted(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	sim := startSim(t)
	gc := fr.addSim(sim)
	ds, dsDir := simDatastore(t, gc)
	fr.write("d0", 7)
	fr.write("d1", 4)
	want := fr.sums()
	j, err := fr.client.FailbackTo(ctx, "vm1", api.FailbackRequest{Alternate: true, VMName: "db 01", VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: ds}})
	if err != nil {
		t.Fatal(err)
	}
	// One failback at a time, whichever location (or, if the first has
	// ended already, none: nothing is left to fail back).
	if _, err := fr.client.FailbackTo(ctx, "vm1", api.FailbackRequest{Alternate: true, VMName: "db 02", VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: ds}}); statusOf(err) != http.StatusConflict {
		t.Fatalf("a second failback while one runs: %v", err)
	}
	if _, err := fr.client.Failback(ctx, "vm1"); statusOf(err) != http.StatusConflict {
		t.Fatalf("an original-location failback while an alternate one runs: %v", err)
	}
	j = fr.mustJob(j, nil)
	fr.checkAlternate(j, gc, dsDir, "db 01", want)
}

// An original-location failback of a machine linked to a vCenter VM
// powers the VM on through the vCenter at the switch (the planned
// failover shut it down); with the vCenter down, the failback completes
// and the job says the VM must be powered on by hand.
func TestFailbackPowersOnTheLinkedVM(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	sim := startSim(t)
	r := startServer(t, dir)
	gc := r.addSim(sim)
	const uuid = "4211aaaa-bbbb-4ccc-8ddd-eeeeffff0002"
	vm, err := sim.CreateVM(ctx, gc, vcsim.VMSpec{Name: "app02", BIOSUUID: uuid, Disks: []int64{4 << 20}, PowerOn: true})
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "d0.img")
	mustDisk(t, disk, 4<<20, 41)
	cfg := r.agentConfig("app02", agent.DiskSpec{Name: "d0", Path: disk})
	cfg.BIOSUUID = uuid
	startAgent(t, cfg)
	r.waitProtected("app02")
	waitFor(t, "the machine linked to its VM", func() bool { return r.machine("app02").VM != nil })

	cycle := func(vcenterUp bool) api.Job {
		t.Helper()
		j := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "app02", Planned: true, To: api.ToNBD}))
		if st := powerState(t, vm); st != types.VirtualMachinePowerStatePoweredOff {
			t.Fatalf("the VM after a planned failover: %s", st)
		}
		uri := exportsOf(t, j)["d0"]
		r.mustJob(r.client.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "app02"}))
		c := dialExport(t, uri)
		if err := c.WriteAt(bytes.Repeat([]byte{7}, 65536), 1<<20); err != nil {
			t.Fatal(err)
		}
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
		want := exportSum(t, c)
		c.Close()
		r.mustJob(r.client.Reprotect(ctx, "app02"))
		if !vcenterUp {
			sim.Stop()
		}
		j = r.mustJob(r.client.Failback(ctx, "app02"))
		if fileSum(t, disk) != want {
			t.Fatal("the original disk differs from the failed-over disk")
		}
		return j
	}
	stepOf := func(j api.Job, name string) api.JobStep {
		for _, s := range j.Steps {
			if s.Name == name {
				return s
			}
		}
		t.Fatalf("job %s has no step %q: %+v", j.ID, name, j.Steps)
		return api.JobStep{}
	}

	j := cycle(true)
	if s := stepOf(j, "app02: power on VM"); s.State != "done" || s.Detail != "powered on" {
		t.Fatalf("power-on step %+v", s)
	}
	if st := powerState(t, vm); st != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("the VM after failback: %s", st)
	}
	if len(j.Output) != 1 {
		t.Fatalf("output %q", j.Output)
	}
	// The power-on comes after the thaw: steps in order.
	var names []string
	for _, s := range j.Steps {
		names = append(names, s.Name)
	}
	if i, k := slices.Index(names, "app02: power on"), slices.Index(names, "app02: power on VM"); i < 0 || k < i {
		t.Fatalf("steps %v: the VM's power-on must follow the thaw", names)
	}
	r.mustJob(r.client.Reprotect(ctx, "app02"))
	r.waitProtected("app02")

	// Again with the vCenter down at the switch.
	j = cycle(false)
	s := stepOf(j, "app02: power on VM")
	if s.State != "failed" || !strings.Contains(s.Detail, "power it on in vCenter") {
		t.Fatalf("power-on step with the vCenter down: %+v", s)
	}
	if len(j.Output) != 2 || !strings.Contains(j.Output[1], "could not be powered on") {
		t.Fatalf("output %q", j.Output)
	}
	if m := r.machine("app02"); m.Direction != "failed-back" {
		t.Fatalf("direction %q", m.Direction)
	}
	var evs []api.EventJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=app02", nil, &evs); err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(evs, func(e api.EventJSON) bool { return e.Kind == "failback-power-on" }) {
		t.Fatalf("no failback-power-on event: %+v", evs)
	}
}

// An alternate-location failback cancelled once its copy is verified
// (the last moment it can be) removes the new VM and its folder and lets
// the failed-over machine run on: its exports writable, its changes
// still going back to the original; the next failback completes.
func TestFailbackAlternateCancelled(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	sim := startSim(t)
	gc := fr.addSim(sim)
	ds, dsDir := simDatastore(t, gc)
	fr.write("d0", 5)
	fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	var once sync.Once
	server.SetAlternateVerifiedHook(fr.srv, func(jctx context.Context, id string) {
		once.Do(func() {
			if err := fr.srv.CancelJob(ctx, id); err != nil {
				t.Errorf("cancel the failback once verified: %v", err)
				return
			}
			<-jctx.Done()
		})
	})
	req := api.FailbackRequest{Alternate: true, VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: ds}}
	j := fr.runJob(fr.client.FailbackTo(ctx, "vm1", req))
	if j.State != api.JobCancelled {
		t.Fatalf("the cancelled failback: %s %s (steps %+v)", j.State, j.Error, j.Steps)
	}
	if _, err := vcsim.FindVM(ctx, gc, "vm1-failback"); err == nil {
		t.Fatal("a cancelled failback left its VM")
	}
	if _, err := os.Stat(filepath.Join(dsDir, "vm1-failback")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a cancelled failback left its folder: %v", err)
	}
	if m := fr.machine("vm1"); m.Direction != "reprotected" {
		t.Fatalf("after a cancelled failback: direction %q", m.Direction)
	}
	fr.write("d1", 6) // the failed-over machine runs on
	waitFor(t, "the new writes on the original disks", func() bool {
		fos, err := fr.client.Failovers(ctx, false)
		return err == nil && len(fos) == 1 && fos[0].Failback != nil && fos[0].Failback.Pending == 0
	})
	for d, p := range fr.disks {
		c := dialExport(t, fr.exports[d])
		if exportSum(t, c) != fileSum(t, p) {
			t.Fatalf("disk %s: the original does not hold the writes made after the cancel", d)
		}
		c.Close()
	}
	want := fr.sums()
	j = fr.mustJob(fr.client.FailbackTo(ctx, "vm1", req))
	fr.checkAlternate(j, gc, dsDir, "vm1-failback", want)
}
