package vmware

import (
	"fmt"
	"reflect"
	"testing"

	"github.com/vmware/govmomi/vim25/types"
)

// benchUpdates is the enter updates of an inventory of n VMs as a
// WaitForUpdatesEx would bring them: clusters of 8 hosts and 250 VMs,
// one datastore, one network, one folder; each VM with a SCSI
// controller, a 40 GiB disk, a NIC, an IP address and every watched
// property.
func benchUpdates(n int) []types.ObjectUpdate {
	var us []types.ObjectUpdate
	folder := moref("Folder", "group-v3")
	ds := moref("Datastore", "datastore-1")
	network := moref("Network", "network-1")
	us = append(us, enter(folder, map[string]any{"name": "vm"}),
		enter(ds, map[string]any{"name": "LocalDS_0"}),
		enter(network, map[string]any{"name": "VM Network"}))
	clusters := max(1, n/250)
	var hosts []types.ManagedObjectReference
	for c := range clusters {
		cl := moref("ClusterComputeResource", fmt.Sprintf("domain-c%d", c))
		us = append(us, enter(cl, map[string]any{"name": fmt.Sprintf("DC0_C%d", c)}))
		for h := range 8 {
			host := moref("HostSystem", fmt.Sprintf("host-%d-%d", c, h))
			hosts = append(hosts, host)
			us = append(us, enter(host, map[string]any{"name": fmt.Sprintf("DC0_C%d_H%d", c, h), "parent": cl}))
		}
	}
	for i := range n {
		unit := int32(0)
		devs := types.ArrayOfVirtualDevice{VirtualDevice: []types.BaseVirtualDevice{
			&types.ParaVirtualSCSIController{VirtualSCSIController: types.VirtualSCSIController{VirtualController: types.VirtualController{
				VirtualDevice: types.VirtualDevice{Key: 1000, DeviceInfo: &types.Description{Label: "SCSI controller 0"}}}}},
			&types.VirtualDisk{VirtualDevice: types.VirtualDevice{Key: 2000, ControllerKey: 1000, UnitNumber: &unit,
				DeviceInfo: &types.Description{Label: "Hard disk 1"},
				Backing: &types.VirtualDiskFlatVer2BackingInfo{VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{
					FileName: fmt.Sprintf("[LocalDS_0] vm%d/vm%d.vmdk", i, i)}}},
				CapacityInBytes: 40 << 30},
			&types.VirtualVmxnet3{VirtualVmxnet: types.VirtualVmxnet{VirtualEthernetCard: types.VirtualEthernetCard{
				VirtualDevice: types.VirtualDevice{Key: 4000, DeviceInfo: &types.Description{Label: "Network adapter 1"}}}}},
		}}
		us = append(us, enter(moref("VirtualMachine", fmt.Sprintf("vm-%d", i)), map[string]any{
			"name": fmt.Sprintf("vm%05d", i), "parent": folder, "resourcePool": moref("ResourcePool", "resgroup-1"),
			"datastore":   types.ArrayOfManagedObjectReference{ManagedObjectReference: []types.ManagedObjectReference{ds}},
			"network":     types.ArrayOfManagedObjectReference{ManagedObjectReference: []types.ManagedObjectReference{network}},
			"config.uuid": fmt.Sprintf("4231%04x-0000-0000-0000-%012x", i, i), "config.instanceUuid": fmt.Sprintf("5031%04x-0000-0000-0000-%012x", i, i),
			"config.guestFullName": "Other Linux (64-bit)", "config.guestId": "otherLinux64Guest", "config.template": false,
			"config.hardware.numCPU": int32(2), "config.hardware.memoryMB": int32(4096), "config.hardware.device": devs,
			"runtime.powerState": types.VirtualMachinePowerStatePoweredOn, "runtime.host": hosts[i%len(hosts)],
			"guest.ipAddress": fmt.Sprintf("10.%d.%d.%d", i>>16, (i>>8)&255, i&255), "guest.hostName": fmt.Sprintf("vm%05d.example", i),
			changeVersion: "2026-12-06T00:00:00.000000Z",
		}))
	}
	return us
}

// BenchmarkInventoryInitial is the watcher's model work for a first
// read of the inventory (no network, no XML): every enter applied, then
// the VM list built.
func BenchmarkInventoryInitial(b *testing.B) {
	for _, n := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			us := benchUpdates(n)
			b.ReportAllocs()
			for b.Loop() {
				inv := newInventory()
				for _, u := range us {
					if _, err := inv.apply(u); err != nil {
						b.Fatal(err)
					}
				}
				if len(inv.vms("vc")) != n {
					b.Fatal("VMs missing")
				}
			}
		})
	}
}

// BenchmarkInventoryRename is the watcher's model work for one change
// (a VM renamed): the modify applied, the whole VM list rebuilt and
// compared with the last one, as Watcher.publish does after each batch.
func BenchmarkInventoryRename(b *testing.B) {
	for _, n := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			inv := newInventory()
			for _, u := range benchUpdates(n) {
				if _, err := inv.apply(u); err != nil {
					b.Fatal(err)
				}
			}
			last := inv.vms("vc")
			vm := moref("VirtualMachine", fmt.Sprintf("vm-%d", n/2))
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				i++
				again, err := inv.apply(types.ObjectUpdate{Kind: types.ObjectUpdateKindModify, Obj: vm, ChangeSet: []types.PropertyChange{
					{Name: "name", Op: types.PropertyChangeOpAssign, Val: fmt.Sprintf("renamed-%d", i)},
				}})
				if err != nil || again {
					b.Fatal(err, again)
				}
				vms := inv.vms("vc")
				if reflect.DeepEqual(last, vms) {
					b.Fatal("no change")
				}
				last = vms
			}
		})
	}
}
