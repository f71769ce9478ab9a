package server_test

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// simPassword is distinctive, so finding it anywhere is a leak.
const simPassword = "Vc-S3cret-Pw-9117"

func startSim(t *testing.T) *vcsim.Sim {
	t.Helper()
	sim, err := vcsim.Start("administrator@vsphere.local", simPassword)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sim.Close)
	return sim
}

// vmsWhere waits until the inventory satisfies cond.
func (r *rig) vmsWhere(what string, cond func([]api.VM) bool) []api.VM {
	r.t.Helper()
	deadline := time.Now().Add(hung)
	var vms []api.VM
	for time.Now().Before(deadline) {
		var err error
		if vms, err = r.client.VMs(context.Background(), ""); err == nil && cond(vms) {
			return vms
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.t.Fatalf("inventory never showed %s: %+v", what, vms)
	return nil
}

func vmNamed(vms []api.VM, name string) *api.VM {
	for i := range vms {
		if vms[i].Name == name {
			return &vms[i]
		}
	}
	return nil
}

func statusOf(err error) int {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae.Status
	}
	return 0
}

// TestVCenterRegisterDiscoverLink registers the simulator as a vCenter
// (thumbprint shown, then pinned; a wrong one and a wrong password
// refused), sees its inventory with every field, links a machine to its VM
// by BIOS UUID, flags clones and unmatched machines, follows a rename, and
// keeps the VMs, stale, through an outage; the password is in no answer,
// log line or database page.
func TestVCenterRegisterDiscoverLink(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	sim := startSim(t)
	dir := t.TempDir()
	logs := &syncBuffer{}
	r := &rig{t: t, dir: dir, log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	r.opened = func(s *server.Server) {
		server.SetDiscoveryTiming(s, 50*time.Millisecond, 200*time.Millisecond, time.Second)
	}
	r.start()
	c := r.client
	req := api.AddVCenterRequest{Name: "vc1", URL: sim.URL, User: sim.User, Password: simPassword}

	// No thumbprint: refused, with the certificate's to confirm.
	_, err := c.AddVCenter(ctx, req)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != http.StatusPreconditionRequired || ae.Body.Thumbprint != sim.Thumbprint {
		t.Fatalf("add without a thumbprint = %v, want 428 with thumbprint %s", err, sim.Thumbprint)
	}
	// A wrong thumbprint: refused as a changed certificate.
	bad := req
	bad.Thumbprint = strings.Repeat("AB:", 31) + "AB"
	if _, err := c.AddVCenter(ctx, bad); statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), "changed") {
		t.Fatalf("add with a wrong thumbprint = %v, want 409 certificate changed", err)
	}
	// A wrong password: refused, without echoing it.
	wrong := req
	wrong.Thumbprint, wrong.Password = sim.Thumbprint, "not-"+simPassword
	if _, err := c.AddVCenter(ctx, wrong); statusOf(err) != http.StatusBadRequest || strings.Contains(err.Error(), simPassword) {
		t.Fatalf("add with a wrong password = %v, want 400 without the password", err)
	}
	if vs, _ := c.VCenters(ctx); len(vs) != 0 {
		t.Fatalf("refused registrations left %+v", vs)
	}
	// The pinned thumbprint, in another accepted form.
	req.Thumbprint = "sha256:" + strings.ToLower(strings.ReplaceAll(sim.Thumbprint, ":", ""))
	v, err := c.AddVCenter(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if v.Thumbprint != sim.Thumbprint {
		t.Fatalf("pinned %q, want %q", v.Thumbprint, sim.Thumbprint)
	}
	if _, err := c.AddVCenter(ctx, req); statusOf(err) != http.StatusConflict {
		t.Fatalf("second add = %v, want 409", err)
	}

	// Discovery: every field of the simulator's VMs.
	vms := r.vmsWhere("the simulator's VMs", func(vms []api.VM) bool { return len(vms) >= 4 })
	for _, vm := range vms {
		if vm.VCenter != "vc1" || vm.Ref == "" || vm.BIOSUUID == "" || vm.InstanceUUID == "" || vm.PowerState == "" ||
			vm.GuestOS == "" || vm.CPUs == 0 || vm.MemoryMiB == 0 || len(vm.Disks) == 0 || vm.Host == "" ||
			vm.Folder == "" || vm.ResourcePool == "" || len(vm.Datastores) == 0 || len(vm.Networks) == 0 || vm.Machine != "" || vm.Stale {
			t.Errorf("VM with a field missing: %+v", vm)
		}
		for _, d := range vm.Disks {
			if d.CapacityBytes <= 0 || d.Path == "" || d.Datastore == "" || d.Controller == "" {
				t.Errorf("VM %s: disk with a field missing: %+v", vm.Name, d)
			}
		}
	}
	clustered := 0
	for _, vm := range vms {
		if vm.Cluster != "" {
			clustered++
		}
	}
	if clustered == 0 {
		t.Errorf("no VM reports its cluster: %+v", vms)
	}

	// A machine whose agent reports a VM's BIOS UUID is linked to it.
	target := vms[0]
	disk := filepath.Join(dir, "d0.img")
	mustDisk(t, disk, 4<<20, 1)
	cfg := r.agentConfig("web01", agent.DiskSpec{Name: "d0", Path: disk})
	cfg.BIOSUUID = strings.ToUpper(target.BIOSUUID)
	startAgent(t, cfg)
	// And one whose UUID is no VM's is flagged, not guessed.
	disk2 := filepath.Join(dir, "d1.img")
	mustDisk(t, disk2, 4<<20, 2)
	cfg2 := r.agentConfig("stray", agent.DiskSpec{Name: "d0", Path: disk2})
	cfg2.BIOSUUID = "00000000-0000-4000-8000-000000000001"
	startAgent(t, cfg2)
	r.waitProtected("web01")
	r.waitProtected("stray")
	waitMachine := func(name, what string, cond func(api.Machine) bool) api.Machine {
		t.Helper()
		deadline := time.Now().Add(hung)
		for time.Now().Before(deadline) {
			if m := r.machine(name); cond(m) {
				return m
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("machine %s never %s: %+v", name, what, r.machine(name))
		return api.Machine{}
	}
	m := waitMachine("web01", "linked", func(m api.Machine) bool { return m.VM != nil })
	if m.VM.Name != target.Name || m.VM.Host != target.Host || m.BIOSUUID != target.BIOSUUID || m.LinkProblem != "" {
		t.Fatalf("web01 linked to %+v (problem %q), want VM %s on %s", m.VM, m.LinkProblem, target.Name, target.Host)
	}
	if s := waitMachine("stray", "flagged", func(m api.Machine) bool { return m.LinkProblem != "" }); s.LinkProblem != api.LinkNoVM || s.VM != nil {
		t.Fatalf("stray: %+v", s)
	}
	vms = r.vmsWhere("web01 protecting "+target.Name, func(vms []api.VM) bool {
		vm := vmNamed(vms, target.Name)
		return vm != nil && vm.Machine == "web01"
	})

	// Live updates: a rename is seen.
	gc, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := vcsim.FindVM(ctx, gc, target.Name)
	if err != nil {
		t.Fatal(err)
	}
	task, err := obj.Rename(ctx, "web01-renamed")
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	r.vmsWhere("the rename", func(vms []api.VM) bool {
		vm := vmNamed(vms, "web01-renamed")
		return vm != nil && vm.Machine == "web01"
	})
	waitMachine("web01", "shown with its VM's new name", func(m api.Machine) bool { return m.VM != nil && m.VM.Name == "web01-renamed" })

	// A clone keeping the UUID: neither VM is linked, both are flagged.
	other := vms[1]
	if other.Name == target.Name {
		other = vms[2]
	}
	obj2, err := vcsim.FindVM(ctx, gc, other.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := vcsim.SetUUID(ctx, obj2, target.BIOSUUID); err != nil {
		t.Fatal(err)
	}
	m = waitMachine("web01", "flagged as cloned", func(m api.Machine) bool { return m.LinkProblem == api.LinkDuplicate })
	if m.VM != nil {
		t.Fatalf("a machine was linked to one of two clones: %+v", m.VM)
	}
	vms = r.vmsWhere("the duplicates flagged", func(vms []api.VM) bool {
		a, b := vmNamed(vms, "web01-renamed"), vmNamed(vms, other.Name)
		return a != nil && b != nil && a.Duplicate && b.Duplicate && a.Machine == "" && b.Machine == ""
	})
	gc.Logout(ctx)

	// An outage: the vCenter is shown disconnected, its VMs kept as stale.
	sim.Stop()
	r.vmsWhere("the VMs stale", func(got []api.VM) bool {
		for _, vm := range got {
			if !vm.Stale {
				return false
			}
		}
		return len(got) == len(vms)
	})
	if vs, _ := c.VCenters(ctx); len(vs) != 1 || vs[0].Connected || vs[0].LastError == "" || vs[0].VMs != len(vms) {
		t.Fatalf("vCenter during the outage: %+v", vs)
	}
	// It comes back: current again, after a server restart too (the
	// sealed password opens).
	sim.Restart()
	r.stop()
	r.start()
	c = r.client
	r.vmsWhere("the VMs current again", func(got []api.VM) bool {
		for _, vm := range got {
			if vm.Stale {
				return false
			}
		}
		return len(got) == len(vms)
	})
	vs, err := c.VCenters(ctx)
	if err != nil || len(vs) != 1 || !vs[0].Connected || vs[0].About == "" {
		t.Fatalf("vCenter after the outage: %+v, %v", vs, err)
	}

	// The password: not in any answer, log line or the database file.
	for _, p := range []string{"/api/v1/vcenters", "/api/v1/vms", "/api/v1/machines"} {
		b, err := c.Get(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), simPassword) {
			t.Fatalf("%s shows the vCenter password", p)
		}
	}
	if strings.Contains(logs.String(), simPassword) {
		t.Fatal("the server logged the vCenter password")
	}
	r.stop()
	for _, f := range []string{server.DatabaseFile, server.DatabaseFile + "-wal"} {
		b, _ := os.ReadFile(filepath.Join(dir, "srv", f))
		if strings.Contains(string(b), simPassword) {
			t.Fatalf("%s holds the vCenter password in clear", f)
		}
	}
	r.start()
	if err := r.client.RemoveVCenter(ctx, "vc1"); err != nil {
		t.Fatal(err)
	}
	if vms, _ := r.client.VMs(ctx, ""); len(vms) != 0 {
		t.Fatalf("removing the vCenter left its VMs: %d", len(vms))
	}
	if m := r.machine("web01"); m.VM != nil || m.LinkProblem != "" {
		t.Fatalf("with no vCenter, a machine shows a link: %+v", m)
	}
}
