package vcsim

import (
	"context"
	"slices"
	"sync"
	"testing"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// published records each device list the simulator hands its property
// collectors (the value of a config.hardware.device change, which a
// WaitForUpdatesEx response carries and marshals outside any lock), with
// a copy of its elements as they were then.
type published struct {
	mu    sync.Mutex
	lists [][2][]types.BaseVirtualDevice // the list, its elements then
}

func (p *published) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "TestRecorder", Value: "devices"}
}

func (p *published) PutObject(*simulator.Context, mo.Reference) {}

func (p *published) RemoveObject(*simulator.Context, types.ManagedObjectReference) {}

func (p *published) UpdateObject(_ *simulator.Context, _ mo.Reference, changes []types.PropertyChange) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, ch := range changes {
		if ch.Name != "config.hardware.device" {
			continue
		}
		if a, ok := ch.Val.(*types.ArrayOfVirtualDevice); ok {
			p.lists = append(p.lists, [2][]types.BaseVirtualDevice{a.VirtualDevice, slices.Clone(a.VirtualDevice)})
		}
	}
}

// changed says which published lists no longer hold what they held when
// they were published.
func (p *published) changed() (n, of int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.lists {
		if !slices.Equal(l[0], l[1]) {
			n++
		}
	}
	return n, len(p.lists)
}

// TestPublishedDeviceListsStay: the simulator's VM tasks that change
// devices (a device added, one removed, the VM destroyed) must not change
// a device list that was already handed to the property collector, which
// a watcher's response (discovery's WaitForUpdatesEx) may be marshalling
// at that moment. Without detachDevices (see Start), the removal and the destruction
// shift the elements of the list the previous change published: this test
// fails (and go test -race reports the race), as did the server's
// failback tests under load.
func TestPublishedDeviceListsStay(t *testing.T) {
	sim, err := Start("user", "pass")
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	rec := new(published)
	sim.Model.Service.Context.Map.AddHandler(rec)
	ctx := context.Background()
	c, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	vm, err := sim.CreateVM(ctx, c, VMSpec{Name: "watched", Disks: []int64{1 << 20, 1 << 20}})
	if err != nil {
		t.Fatal(err)
	}

	devices, err := vm.Device(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ide, err := devices.FindIDEController("")
	if err != nil {
		t.Fatal(err)
	}
	cdrom, err := devices.CreateCdrom(ide)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.AddDevice(ctx, cdrom); err != nil {
		t.Fatal(err)
	}
	if got, err := vm.Device(ctx); err != nil || len(got) != len(devices)+1 {
		t.Fatalf("after adding a CD-ROM: %d devices (%v), want %d", len(got), err, len(devices)+1)
	}

	disks := devices.SelectByType((*types.VirtualDisk)(nil))
	if err := vm.RemoveDevice(ctx, true, disks[0]); err != nil {
		t.Fatal(err)
	}
	if got, err := vm.Device(ctx); err != nil || len(got) != len(devices) {
		t.Fatalf("after removing a disk: %d devices (%v), want %d", len(got), err, len(devices))
	}

	task, err := vm.Destroy(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Wait(ctx); err != nil {
		t.Fatal(err)
	}

	n, of := rec.changed()
	if of < 3 { // created, CD-ROM added, disk removed (and the destruction)
		t.Fatalf("the simulator published %d device lists, want at least 3", of)
	}
	if n != 0 {
		t.Fatalf("%d of the %d device lists the simulator published were changed afterwards", n, of)
	}
}
