package vmware

import (
	"context"
	"fmt"
	"io"
	"sort"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// What the failback of a failover to vSphere does with the VM the
// failover made (server/failback_vsphere.go): find its disks' flat files,
// read them through vCenter's /folder endpoint, and power it off (the
// recovered machine stopped) or on again (a failback cancelled).

// RecoveredDisk is one disk of a VM: its descriptor's datastore path
// ("[datastore1] VM/disk0.vmdk"), the datastore it is on and its size.
type RecoveredDisk struct {
	Descriptor string
	Datastore  types.ManagedObjectReference
	Size       int64
}

// RecoveredDisks returns the flat-backed disks of the VM ref in the order
// of their controller and unit (the order FailoverToVSphere attached
// them when they have no place of the source's, and the source's device
// order otherwise). ErrNotFound: no VM has the ref. A disk that is not a
// flat VMDK (a snapshot's delta, a raw mapping) is an error: its flat
// file is not the disk's content.
func RecoveredDisks(ctx context.Context, c *govmomi.Client, ref string) ([]RecoveredDisk, error) {
	vm := object.NewVirtualMachine(c.Client, types.ManagedObjectReference{Type: "VirtualMachine", Value: ref})
	var mvm mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"config.hardware.device"}, &mvm); err != nil {
		if fault.Is(err, &types.ManagedObjectNotFound{}) {
			return nil, fmt.Errorf("VM %s: %w", ref, ErrNotFound)
		}
		return nil, fmt.Errorf("VM %s: %w", ref, err)
	}
	if mvm.Config == nil {
		return nil, fmt.Errorf("VM %s: no configuration", ref)
	}
	type placed struct {
		d          RecoveredDisk
		ctrl, unit int32
	}
	var out []placed
	for _, dev := range mvm.Config.Hardware.Device {
		vd, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok || b.Parent != nil || b.Datastore == nil {
			return nil, fmt.Errorf("VM %s: disk %d is not a flat VMDK without snapshots (%T): its content is not one file", ref, vd.Key, vd.Backing)
		}
		p := placed{d: RecoveredDisk{Descriptor: b.FileName, Datastore: *b.Datastore, Size: vd.CapacityInBytes}, ctrl: vd.ControllerKey}
		if vd.UnitNumber != nil {
			p.unit = *vd.UnitNumber
		}
		out = append(out, p)
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].ctrl != out[j].ctrl {
			return out[i].ctrl < out[j].ctrl
		}
		return out[i].unit < out[j].unit
	})
	disks := make([]RecoveredDisk, len(out))
	for i, p := range out {
		disks[i] = p.d
	}
	return disks, nil
}

// OpenFlat opens the flat extent of disk d for reading, in order, through
// vCenter's /folder endpoint; it returns the reader and the file's size
// (-1 if the server did not say).
func OpenFlat(ctx context.Context, c *govmomi.Client, d RecoveredDisk) (io.ReadCloser, int64, error) {
	ds := object.NewDatastore(c.Client, d.Datastore)
	if err := ds.FindInventoryPath(ctx); err != nil {
		return nil, 0, fmt.Errorf("datastore of %s: %w", d.Descriptor, err)
	}
	var p object.DatastorePath
	if !p.FromString(d.Descriptor) || p.Path == "" {
		return nil, 0, fmt.Errorf("unreadable datastore path %q", d.Descriptor)
	}
	flat := FlatPath(p.Path)
	rc, size, err := ds.Download(ctx, flat, &soap.DefaultDownload)
	if err != nil {
		return nil, 0, fmt.Errorf("read %s: %w", ds.Path(flat), err)
	}
	return rc, size, nil
}

// PowerOff powers a VM off (a hard stop, as vCenter's Power Off) and
// waits until it is off. It returns false, and does nothing, when the VM
// is off already; ErrNotFound when no VM has the ref.
func PowerOff(ctx context.Context, c *govmomi.Client, ref string) (bool, error) {
	return setPower(ctx, c, ref, false)
}
