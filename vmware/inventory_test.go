package vmware

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/vmware/govmomi/vim25/types"
)

func moref(kind, id string) types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: kind, Value: id}
}

func enter(obj types.ManagedObjectReference, props map[string]any) types.ObjectUpdate {
	u := types.ObjectUpdate{Kind: types.ObjectUpdateKindEnter, Obj: obj}
	for k, v := range props {
		u.ChangeSet = append(u.ChangeSet, types.PropertyChange{Name: k, Op: types.PropertyChangeOpAssign, Val: v})
	}
	return u
}

func mustApply(t *testing.T, inv *inventory, u types.ObjectUpdate) bool {
	t.Helper()
	again, err := inv.apply(u)
	if err != nil {
		t.Fatal(err)
	}
	return again
}

func TestInventoryApply(t *testing.T) {
	inv := newInventory()
	host := moref("HostSystem", "host-1")
	cluster := moref("ClusterComputeResource", "domain-c1")
	vm := moref("VirtualMachine", "vm-1")
	mustApply(t, inv, enter(cluster, map[string]any{"name": "C1"}))
	mustApply(t, inv, enter(host, map[string]any{"name": "esx1", "parent": cluster}))
	mustApply(t, inv, enter(moref("Folder", "group-v1"), map[string]any{"name": "vm"}))
	if mustApply(t, inv, enter(vm, map[string]any{
		"name": "web", "runtime.host": host, "parent": moref("Folder", "group-v1"),
		"config.uuid": "ABCD-EF", "runtime.powerState": types.VirtualMachinePowerStatePoweredOn,
		"guest.ipAddress": "10.0.0.5", "guest.net": types.ArrayOfGuestNicInfo{GuestNicInfo: []types.GuestNicInfo{
			{IpAddress: []string{"10.0.0.5", "fe80::1"}}, {IpAddress: []string{"192.168.1.2"}},
		}},
	})) {
		t.Fatal("an enter asked for a refetch")
	}
	v := inv.vms("vc")[0]
	if v.Name != "web" || v.Host != "esx1" || v.Cluster != "C1" || v.Folder != "vm" || v.BIOSUUID != "abcd-ef" ||
		v.PowerState != "poweredOn" || !slices.Equal(v.IPs, []string{"10.0.0.5", "fe80::1", "192.168.1.2"}) {
		t.Fatalf("vm %+v", v)
	}

	// A modify of whole properties applies in place; a remove forgets.
	modify := types.ObjectUpdate{Kind: types.ObjectUpdateKindModify, Obj: vm, ChangeSet: []types.PropertyChange{
		{Name: "name", Op: types.PropertyChangeOpAssign, Val: "web2"},
		{Name: "guest.ipAddress", Op: types.PropertyChangeOpRemove},
		{Name: "guest.net", Op: types.PropertyChangeOpIndirectRemove},
	}}
	if mustApply(t, inv, modify) {
		t.Fatal("a whole-property modify asked for a refetch")
	}
	if v := inv.vms("vc")[0]; v.Name != "web2" || v.IPs != nil {
		t.Fatalf("after the modify: %+v", v)
	}

	// A change below a watched property, or an array add, needs the
	// object read whole; so does a modify of an object never entered.
	for _, c := range []types.PropertyChange{
		{Name: "config.hardware.device[2000]", Op: types.PropertyChangeOpAssign},
		{Name: "config.hardware.device", Op: types.PropertyChangeOpAdd},
	} {
		if !mustApply(t, inv, types.ObjectUpdate{Kind: types.ObjectUpdateKindModify, Obj: vm, ChangeSet: []types.PropertyChange{c}}) {
			t.Errorf("%s %s: no refetch", c.Op, c.Name)
		}
	}
	if !mustApply(t, inv, types.ObjectUpdate{Kind: types.ObjectUpdateKindModify, Obj: moref("VirtualMachine", "vm-2")}) {
		t.Error("a modify of an unknown object: no refetch")
	}

	// A host without a cluster: the VM has none.
	mustApply(t, inv, types.ObjectUpdate{Kind: types.ObjectUpdateKindModify, Obj: host, ChangeSet: []types.PropertyChange{
		{Name: "parent", Op: types.PropertyChangeOpAssign, Val: moref("ComputeResource", "domain-s1")},
	}})
	if v := byRef(inv.vms("vc"), "vm-1"); v.Cluster != "" || v.Host != "esx1" {
		t.Fatalf("standalone host: %+v", v)
	}
	mustApply(t, inv, types.ObjectUpdate{Kind: types.ObjectUpdateKindLeave, Obj: vm})
	if byRef(inv.vms("vc"), "vm-1") != nil {
		t.Fatal("a leave left the VM")
	}
}

func TestInventoryObjectBound(t *testing.T) {
	inv := newInventory()
	for i := range maxObjects {
		inv.objs[fmt.Sprint(i)] = &invObject{}
	}
	if _, err := inv.apply(enter(moref("VirtualMachine", "vm-x"), nil)); err == nil {
		t.Fatal("an enter past maxObjects was accepted")
	}
	if _, err := inv.apply(types.ObjectUpdate{Kind: types.ObjectUpdateKindModify, Obj: moref("VirtualMachine", "vm-y")}); err == nil {
		t.Fatal("a modify adding an object past maxObjects was accepted")
	}
	// An object already held may enter again.
	if _, err := inv.apply(enter(moref("VirtualMachine", "7"), nil)); err != nil {
		t.Fatal(err)
	}
}

func scsi(key int32, label string) *types.ParaVirtualSCSIController {
	c := new(types.ParaVirtualSCSIController)
	c.Key = key
	c.DeviceInfo = &types.Description{Label: label}
	return c
}

func vdisk(key, ctl, unit int32, path string) *types.VirtualDisk {
	d := &types.VirtualDisk{CapacityInKB: 1024}
	d.Key, d.ControllerKey, d.UnitNumber = key, ctl, &unit
	d.DeviceInfo = &types.Description{Label: fmt.Sprintf("Hard disk %d", key)}
	if path != "" {
		d.Backing = &types.VirtualDiskFlatVer2BackingInfo{VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: path}}
	} else {
		d.Backing = &types.VirtualDiskRawDiskVer2BackingInfo{DescriptorFileName: ""} // not a file backing
	}
	return d
}

func TestDisks(t *testing.T) {
	devs := []types.BaseVirtualDevice{
		vdisk(2001, 1000, 1, "[ds 2] vm/vm_1.vmdk"),
		scsi(1000, "SCSI controller 0"),
		vdisk(2000, 1000, 0, "[ds1] vm/vm.vmdk"),
		vdisk(2002, 1001, 0, ""), // a raw device: no file, no datastore
	}
	got := disks(devs)
	want := []Disk{
		{Key: 2000, Label: "Hard disk 2000", CapacityBytes: 1 << 20, Path: "[ds1] vm/vm.vmdk", Datastore: "ds1", Controller: "SCSI controller 0", ControllerKey: 1000, Unit: 0, ControllerType: "pvscsi"},
		{Key: 2001, Label: "Hard disk 2001", CapacityBytes: 1 << 20, Path: "[ds 2] vm/vm_1.vmdk", Datastore: "ds 2", Controller: "SCSI controller 0", ControllerKey: 1000, Unit: 1, ControllerType: "pvscsi"},
		{Key: 2002, Label: "Hard disk 2002", CapacityBytes: 1 << 20, ControllerKey: 1001, Unit: 0},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("disks\n%+v\nwant\n%+v", got, want)
	}

	// Only the first maxDevices devices are read.
	many := []types.BaseVirtualDevice{scsi(1000, "SCSI controller 0")}
	for i := range maxDevices + 10 {
		many = append(many, vdisk(int32(2000+i), 1000, 0, "[ds] x.vmdk"))
	}
	if n := len(disks(many)); n != maxDevices-1 {
		t.Fatalf("%d disks read, want %d", n, maxDevices-1)
	}
}

// TestDiskControllers reads each controller kind and its bus number:
// what a failover recreates.
func TestDiskControllers(t *testing.T) {
	bus := func(c types.BaseVirtualController, key, n int32) types.BaseVirtualDevice {
		c.GetVirtualController().Key, c.GetVirtualController().BusNumber = key, n
		return c.(types.BaseVirtualDevice)
	}
	devs := []types.BaseVirtualDevice{
		bus(new(types.ParaVirtualSCSIController), 1000, 0),
		bus(new(types.VirtualLsiLogicController), 1001, 1),
		bus(new(types.VirtualLsiLogicSASController), 1002, 2),
		bus(new(types.VirtualBusLogicController), 1003, 3),
		bus(new(types.VirtualNVMEController), 31000, 1),
		bus(new(types.VirtualAHCIController), 15000, 0),
		bus(new(types.VirtualIDEController), 201, 1),
	}
	want := map[int32]struct {
		kind string
		bus  int32
	}{1000: {"pvscsi", 0}, 1001: {"lsilogic", 1}, 1002: {"lsilogic-sas", 2}, 1003: {"buslogic", 3},
		31000: {"nvme", 1}, 15000: {"sata", 0}, 201: {"ide", 1}}
	for i, d := range slices.Clone(devs) {
		devs = append(devs, vdisk(int32(2000+i), d.GetVirtualDevice().Key, 0, "[ds] x.vmdk"))
	}
	got := disks(devs)
	if len(got) != len(want) {
		t.Fatalf("%d disks, want %d", len(got), len(want))
	}
	for _, d := range got {
		if w := want[d.ControllerKey]; d.ControllerType != w.kind || d.ControllerBus != w.bus {
			t.Errorf("disk on controller %d: %q bus %d, want %q bus %d", d.ControllerKey, d.ControllerType, d.ControllerBus, w.kind, w.bus)
		}
	}
}

func TestNICs(t *testing.T) {
	inv := newInventory()
	mustApply(t, inv, enter(moref("Network", "network-7"), map[string]any{"name": "VM Network"}))
	mustApply(t, inv, enter(moref("DistributedVirtualPortgroup", "dvportgroup-9"), map[string]any{"name": "DPG-prod"}))
	netRef := moref("Network", "network-7")
	card := func(d types.BaseVirtualDevice, key int32, mac string, b types.BaseVirtualDeviceBackingInfo) types.BaseVirtualDevice {
		e := d.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
		e.Key, e.MacAddress, e.Backing = key, mac, b
		return d
	}
	devs := types.ArrayOfVirtualDevice{VirtualDevice: []types.BaseVirtualDevice{
		card(new(types.VirtualE1000e), 4002, "00:50:56:00:00:03", &types.VirtualEthernetCardDistributedVirtualPortBackingInfo{
			Port: types.DistributedVirtualSwitchPortConnection{PortgroupKey: "dvportgroup-9"}}),
		card(new(types.VirtualVmxnet3), 4000, "00:50:56:00:00:01", &types.VirtualEthernetCardNetworkBackingInfo{
			VirtualDeviceDeviceBackingInfo: types.VirtualDeviceDeviceBackingInfo{DeviceName: "VM Network"}, Network: &netRef}),
		card(new(types.VirtualE1000), 4001, "00:50:56:00:00:02", &types.VirtualEthernetCardNetworkBackingInfo{
			VirtualDeviceDeviceBackingInfo: types.VirtualDeviceDeviceBackingInfo{DeviceName: "not-in-view"}}),
		card(new(types.VirtualVmxnet3Vrdma), 4003, "", nil),
		scsi(1000, "SCSI controller 0"),
	}}
	mustApply(t, inv, enter(moref("VirtualMachine", "vm-1"), map[string]any{"name": "web", "config.hardware.device": devs, "config.firmware": "efi",
		"config.guestId": "rhel9_64Guest", "config.guestFullName": "Red Hat Enterprise Linux 9 (64-bit)"}))
	v := inv.vms("vc")[0]
	want := []NIC{
		{Key: 4000, Type: "vmxnet3", Network: "VM Network", MAC: "00:50:56:00:00:01"},
		{Key: 4001, Type: "e1000", Network: "not-in-view", MAC: "00:50:56:00:00:02"},
		{Key: 4002, Type: "e1000e", Network: "DPG-prod", MAC: "00:50:56:00:00:03"},
		{Key: 4003, Type: "vmxnet3vrdma"},
	}
	if !slices.Equal(v.NICs, want) || v.Firmware != "efi" || v.GuestID != "rhel9_64Guest" {
		t.Fatalf("nics %+v firmware %q\nwant %+v efi", v.NICs, v.Firmware, want)
	}
}

func TestDatastoreOfPath(t *testing.T) {
	for in, want := range map[string]string{
		"[datastore1] vm/vm.vmdk": "datastore1",
		"[my ds] a b/c.vmdk":      "my ds",
		"[] x.vmdk":               "",
		"/vmfs/volumes/x.vmdk":    "",
		"[unterminated x.vmdk":    "",
		"":                        "",
	} {
		if got := datastoreOfPath(in); got != want {
			t.Errorf("datastoreOfPath(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestIPsBound(t *testing.T) {
	var nics []types.GuestNicInfo
	for i := range 2 * maxIPs {
		nics = append(nics, types.GuestNicInfo{
			IpAddress: []string{fmt.Sprintf("10.0.%d.1", i)},
			IpConfig:  &types.NetIpConfigInfo{IpAddress: []types.NetIpConfigInfoIpAddress{{IpAddress: fmt.Sprintf("10.0.%d.1", i)}}},
		})
	}
	got := ips("10.0.5.1", types.ArrayOfGuestNicInfo{GuestNicInfo: nics})
	if len(got) != maxIPs || got[0] != "10.0.5.1" || got[1] != "10.0.0.1" || slices.Contains(got[1:], "10.0.5.1") {
		t.Fatalf("ips %v", got)
	}
	if got := ips(nil, nil); got != nil {
		t.Fatalf("no tools: %v", got)
	}
}

func TestNames(t *testing.T) {
	inv := newInventory()
	mustApply(t, inv, enter(moref("Datastore", "ds-2"), map[string]any{"name": "b"}))
	mustApply(t, inv, enter(moref("Datastore", "ds-1"), map[string]any{"name": "a"}))
	got := inv.names(types.ArrayOfManagedObjectReference{ManagedObjectReference: []types.ManagedObjectReference{
		moref("Datastore", "ds-2"), moref("Datastore", "ds-9"), moref("Datastore", "ds-1"), moref("Datastore", "ds-2"),
	}})
	if !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("names %v", got)
	}
	if got := inv.names(nil); got == nil || len(got) != 0 {
		t.Fatalf("no refs: %#v (want an empty list for JSON)", got)
	}
}

// TestRefetch reads objects whole from the simulator, as the watcher does
// for changes it cannot apply property by property (the simulator itself
// always reports whole properties, so the watcher never needs it there).
func TestRefetch(t *testing.T) {
	s := mustSim(t)
	ctx := ctxT(t)
	c, err := Connect(ctx, s.ep)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Logout(ctx)
	_, f := mustClient(t, s.ep)
	vm, err := f.VirtualMachine(ctx, "DC0_H0_VM0")
	if err != nil {
		t.Fatal(err)
	}
	inv := newInventory()
	if !mustApply(t, inv, types.ObjectUpdate{Kind: types.ObjectUpdateKindModify, Obj: vm.Reference(), ChangeSet: []types.PropertyChange{
		{Name: "config.hardware.device[204]", Op: types.PropertyChangeOpAssign},
	}}) {
		t.Fatal("no refetch asked")
	}
	w := &Watcher{log: slog.New(slog.DiscardHandler)}
	if err := w.refetch(ctx, c, inv, []types.ManagedObjectReference{vm.Reference()}); err != nil {
		t.Fatal(err)
	}
	v := byRef(inv.vms("vc"), vm.Reference().Value)
	if v == nil || v.Name != "DC0_H0_VM0" || len(v.Disks) != 1 || v.CPUs == 0 || !strings.HasPrefix(v.Disks[0].Path, "[LocalDS_0]") {
		t.Fatalf("refetched %+v", v)
	}
	// An object gone meanwhile is no error: its leave update follows.
	gone := moref("VirtualMachine", "vm-999999")
	mustApply(t, inv, types.ObjectUpdate{Kind: types.ObjectUpdateKindModify, Obj: gone})
	if err := w.refetch(ctx, c, inv, []types.ManagedObjectReference{gone}); err != nil {
		t.Fatalf("refetch of a deleted object: %v", err)
	}
}
