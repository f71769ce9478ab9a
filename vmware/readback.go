package vmware

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// What a caller does with a VM after FailoverToVSphere made it: check the
// request before anything is stopped for it, read the disks back to
// verify them, and power the VM on once verified (the alternate-location
// failback, server/failback_alt.go); power on an existing VM (the
// original-location failback's switch).

// CheckFailover checks a failover request as FailoverToVSphere does first
// (names, sizes, layout, then the data center, datastore, placement,
// networks and that no VM or folder has the name) and makes nothing.
// Errors are *FailoverError (step "validate"); errors.Is finds
// ErrInvalidFailover, ErrNotFound and ErrExists.
func CheckFailover(ctx context.Context, c *govmomi.Client, spec FailoverSpec, disks []FailoverDisk) error {
	fail := func(err error) error { return &FailoverError{VM: spec.VMName, Step: "validate", Err: err} }
	layout, err := checkFailover(spec, disks)
	if err != nil {
		return fail(err)
	}
	f := &failover{c: c, spec: spec, disks: layout}
	if err := f.resolve(ctx); err != nil {
		return fail(err)
	}
	return nil
}

// FileSum is a file's SHA-256 as read back from a datastore.
type FileSum struct {
	Path   string // its datastore path, "[datastore1] VM/disk0-flat.vmdk"
	SHA256 string // hex
	Size   int64  // the bytes read
}

// FlatPath is the datastore path of the flat extent of a descriptor
// FailoverToVSphere wrote ("[ds] VM/d.vmdk" -> "[ds] VM/d-flat.vmdk").
func FlatPath(descriptor string) string {
	return strings.TrimSuffix(descriptor, ".vmdk") + "-flat.vmdk"
}

// SumFlatExtents reads back the flat extent of each disk of a VM that
// FailoverToVSphere made (res), through vCenter's /folder endpoint as it
// was uploaded, and returns their SHA-256 in res.Disks' order. datacenter
// is the spec's ("" is the only one). progress (may be nil) is called
// with the bytes read so far and res.Bytes, never concurrently.
func SumFlatExtents(ctx context.Context, c *govmomi.Client, datacenter string, res FailoverResult, progress func(done, total int64)) ([]FileSum, error) {
	fd := find.NewFinder(c.Client, false)
	var dc *object.Datacenter
	var err error
	if datacenter == "" {
		dc, err = fd.DefaultDatacenter(ctx)
	} else {
		dc, err = fd.Datacenter(ctx, datacenter)
	}
	if err != nil {
		return nil, findError("datacenter", datacenter, err)
	}
	fd.SetDatacenter(dc)
	stores := map[string]*object.Datastore{}
	var done, reported int64
	report := func(force bool) {
		if progress != nil && (force || done-reported >= progressStep) {
			reported = done
			progress(done, res.Bytes)
		}
	}
	var out []FileSum
	for _, desc := range res.Disks {
		var p object.DatastorePath
		if !p.FromString(desc) || p.Path == "" {
			return out, fmt.Errorf("unreadable datastore path %q", desc)
		}
		ds := stores[p.Datastore]
		if ds == nil {
			if ds, err = fd.Datastore(ctx, p.Datastore); err != nil {
				return out, findError("datastore", p.Datastore, err)
			}
			stores[p.Datastore] = ds
		}
		flat := FlatPath(p.Path)
		sum, n, err := sumFile(ctx, ds, flat, func(k int64) { done += k; report(false) })
		if err != nil {
			return out, fmt.Errorf("read back %s: %w", ds.Path(flat), err)
		}
		out = append(out, FileSum{Path: ds.Path(flat), SHA256: sum, Size: n})
	}
	report(true)
	return out, nil
}

// sumFile downloads one datastore file and hashes it.
func sumFile(ctx context.Context, ds *object.Datastore, path string, add func(int64)) (string, int64, error) {
	rc, size, err := ds.Download(ctx, path, &soap.DefaultDownload)
	if err != nil {
		return "", 0, err
	}
	defer rc.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	var n int64
	for {
		k, err := rc.Read(buf)
		if k > 0 {
			h.Write(buf[:k])
			n += int64(k)
			add(int64(k))
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", n, err
		}
	}
	if size >= 0 && n != size {
		return "", n, fmt.Errorf("read %d bytes of %d", n, size)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// PowerOn powers a VM on (ref is its managed object id, e.g. vm-42) and
// waits until it runs. It returns false, and does nothing, when the VM
// runs already; ErrNotFound when no VM has the ref.
func PowerOn(ctx context.Context, c *govmomi.Client, ref string) (bool, error) {
	return setPower(ctx, c, ref, true)
}

// setPower powers a VM on or off (hard, as vCenter's Power Off) and waits
// until it is so: false, doing nothing, when it is so already (or became
// so meanwhile by someone else's hand).
func setPower(ctx context.Context, c *govmomi.Client, ref string, on bool) (bool, error) {
	want, verb := types.VirtualMachinePowerStatePoweredOff, "power off"
	if on {
		want, verb = types.VirtualMachinePowerStatePoweredOn, "power on"
	}
	vm := object.NewVirtualMachine(c.Client, types.ManagedObjectReference{Type: "VirtualMachine", Value: ref})
	st, err := vm.PowerState(ctx)
	if err != nil {
		if fault.Is(err, &types.ManagedObjectNotFound{}) {
			return false, fmt.Errorf("VM %s: %w", ref, ErrNotFound)
		}
		return false, fmt.Errorf("VM %s: %w", ref, err)
	}
	if st == want {
		return false, nil
	}
	var t *object.Task
	if on {
		t, err = vm.PowerOn(ctx)
	} else {
		t, err = vm.PowerOff(ctx)
	}
	if err == nil {
		err = t.Wait(ctx)
	}
	if err != nil {
		if fault.Is(err, &types.InvalidPowerState{}) {
			if st, serr := vm.PowerState(ctx); serr == nil && st == want {
				return false, nil
			}
		}
		return false, fmt.Errorf("%s VM %s: %w", verb, ref, err)
	}
	return true, nil
}
