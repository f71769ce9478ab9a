//go:build e2e

package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmware/govmomi/vim25/types"
)

// TestE2EFailbackAlternateFromVSphere: a committed failover to vSphere
// (the simulator), fio into the recovered VM's flat file, reprotect, more
// fio; then `asr failback --alternate`: the recovered VM powered off, its
// flat file copied through vCenter into a new VM, powered on, whose flat
// file equals the recovered VM's final state by SHA-256; the recovered VM
// stays off, the original disk is not written, the failover ends.
func TestE2EFailbackAlternateFromVSphere(t *testing.T) {
	t.Parallel()
	vc := startVSphereFailbackCase(t)
	fc, c, flat, sim, ref := vc.failbackCase, vc.c, vc.flat, vc.sim, vc.ref
	dsDir := filepath.Dir(filepath.Dir(flat))
	fc.fioFile(flat, "recovered", 3<<20)
	c.mustCLI("reprotect", "--machine", "m")
	fc.fioFile(flat, "recovered-after-reprotect", 2<<20)
	if out, err := c.cli("failback", "--machine", "m", "--alternate", "--vcenter", "vc1", "--datastore", "nope"); err == nil || !strings.Contains(err.Error()+out, "nope") {
		t.Fatalf("alternate failback to an unknown datastore: %v\n%s", err, out)
	}
	if vm, ok := simVM(t, sim, ref); !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("the recovered VM after a refused failback: found %v, %s", ok, vm.Runtime.PowerState)
	}
	original := sha256File(t, fc.disk)

	out := c.mustCLI("failback", "--machine", "m", "--alternate", "--vcenter", "vc1", "--datastore", "LocalDS_0")
	t.Logf("alternate failback:\n%s", out)
	for _, s := range []string{"m: stop the recovered VM", "m: create VM in vc1", "m: verify", "m: end the failover", "guest01-recovered in vCenter vc1 stays powered off"} {
		if !strings.Contains(out, s) {
			t.Fatalf("alternate failback output lacks %q:\n%s", s, out)
		}
	}
	m := alternateRE.FindStringSubmatch(out)
	if m == nil || m[1] != "guest01-failback" || m[3] != "guest01-failback" || m[4] != "33554432" {
		t.Fatalf("alternate failback output:\n%s", out)
	}
	vm, ok := simVM(t, sim, m[2])
	if !ok || vm.Name != "guest01-failback" || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("the new VM %s: found %v, %s, %s", m[2], ok, vm.Name, vm.Runtime.PowerState)
	}
	want := sha256File(t, flat)
	if got := sha256File(t, filepath.Join(dsDir, "guest01-failback", "d-flat.vmdk")); got != want {
		t.Fatalf("the new VM's flat file sha256 %s, the recovered VM's final state %s", got, want)
	}
	if vm, ok := simVM(t, sim, ref); !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("the recovered VM after the failback: found %v, %s", ok, vm.Runtime.PowerState)
	}
	if got := sha256File(t, fc.disk); got != original {
		t.Fatal("an alternate-location failback wrote the original disk")
	}
	if st := c.status("m"); st.Direction != "failed-back" {
		t.Fatalf("after the failback: direction %q", st.Direction)
	}
	if fs := c.liveFailovers(); len(fs) != 0 {
		t.Fatalf("live failovers after the failback: %+v", fs)
	}
}
