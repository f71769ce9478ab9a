package vmware

import (
	"bytes"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"
)

// TestReadBackAndPowerOn: a request checked by CheckFailover makes
// nothing (and one naming an existing VM is refused); the flat extents of
// a VM FailoverToVSphere made read back with the SHA-256 of what was
// uploaded, and a changed byte in the datastore shows; PowerOn powers the
// VM on once, then reports it running, and refuses an unknown VM.
func TestReadBackAndPowerOn(t *testing.T) {
	s := mustFailoverSim(t)
	ctx := ctxT(t)
	contents := [][]byte{mustDiskBytes(t, 3<<20, 11), mustDiskBytes(t, 2<<20+512, 12)}
	disks := []FailoverDisk{
		{Name: "d0", Size: int64(len(contents[0])), Src: bytes.NewReader(contents[0]), Unit: -1},
		{Name: "d1", Size: int64(len(contents[1])), Src: bytes.NewReader(contents[1]), Unit: -1},
	}
	spec := FailoverSpec{VMName: "app 01-failback", Datastore: s.ds, CPUs: 1, MemoryMiB: 512, NICs: []NIC{{Type: "vmxnet3"}}}

	if err := CheckFailover(ctx, s.c, spec, disks); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.dsDir, spec.VMName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("CheckFailover made the VM's folder: %v", err)
	}
	bad := spec
	bad.Datastore = "nope"
	if err := CheckFailover(ctx, s.c, bad, disks); !errors.Is(err, ErrNotFound) {
		t.Fatalf("CheckFailover of an unknown datastore: %v", err)
	}

	res, err := FailoverToVSphere(ctx, s.c, spec, disks, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckFailover(ctx, s.c, spec, disks); !errors.Is(err, ErrExists) {
		t.Fatalf("CheckFailover of a name in use: %v", err)
	}
	var calls [][2]int64
	sums, err := SumFlatExtents(ctx, s.c, "", res, func(done, total int64) { calls = append(calls, [2]int64{done, total}) })
	if err != nil {
		t.Fatal(err)
	}
	if len(sums) != 2 {
		t.Fatalf("sums %+v", sums)
	}
	for i, b := range contents {
		want := sum(b)
		if sums[i].SHA256 != hex.EncodeToString(want[:]) || sums[i].Size != int64(len(b)) ||
			sums[i].Path != "[LocalDS_0] "+spec.VMName+"/"+disks[i].Name+"-flat.vmdk" {
			t.Fatalf("disk %d read back as %+v", i, sums[i])
		}
	}
	if len(calls) == 0 || calls[len(calls)-1] != [2]int64{res.Bytes, res.Bytes} {
		t.Fatalf("progress %v, want to end at %d", calls, res.Bytes)
	}

	// A byte changed in the datastore's file shows in its sum.
	flat := filepath.Join(s.dsDir, spec.VMName, "d1-flat.vmdk")
	f, err := os.OpenFile(flat, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{contents[1][4096] ^ 0xff}, 4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	sums2, err := SumFlatExtents(ctx, s.c, "", res, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sums2[0].SHA256 != sums[0].SHA256 || sums2[1].SHA256 == sums[1].SHA256 {
		t.Fatalf("a changed byte of d1: sums %+v, were %+v", sums2, sums)
	}

	on, err := PowerOn(ctx, s.c, res.Ref)
	if err != nil || !on {
		t.Fatalf("power on: %v %v", on, err)
	}
	vm := object.NewVirtualMachine(s.c.Client, types.ManagedObjectReference{Type: "VirtualMachine", Value: res.Ref})
	if st, err := vm.PowerState(ctx); err != nil || st != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("after PowerOn: %s %v", st, err)
	}
	if on, err := PowerOn(ctx, s.c, res.Ref); err != nil || on {
		t.Fatalf("power on of a running VM: %v %v", on, err)
	}
	if _, err := PowerOn(ctx, s.c, "vm-99999"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("power on of no VM: %v", err)
	}
}
