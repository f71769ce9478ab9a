//go:build e2e

package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmware/govmomi/vim25/types"
)

// TestE2EFailbackAlternateFromAzure: the real binary's committed
// failover to Azure (Azurite and the SDK's fake ARM over HTTPS), writes
// into the recovered disk; a datastore vCenter does not know is refused
// with the Azure VM still running; then `asr failback --alternate`: the
// Azure VM deallocated, its managed disk read through a read SAS into a
// new VM made through vCenter (the simulator), powered on, whose flat
// file equals the recovered disk's final content by SHA-256; the Azure
// VM stays deallocated, no read SAS is left, the original disk is not
// written, the failover ends. Never real Azure.
func TestE2EFailbackAlternateFromAzure(t *testing.T) {
	t.Parallel()
	ac := startAzureFailbackCase(t)
	c := ac.c
	sim := c.addSimVCenter("guest01", 8<<20)
	dsDir := simDatastoreDir(t, sim, "LocalDS_0")
	ac.write(32) // 2 MiB
	if out, err := c.cli("failback", "--machine", "m", "--alternate", "--vcenter", "vc1", "--datastore", "nope"); err == nil || !strings.Contains(err.Error()+out, "nope") {
		t.Fatalf("alternate failback to an unknown datastore: %v\n%s", err, out)
	}
	if p := ac.arm.VMPower("net-rg", "m-recovered"); p != "running" {
		t.Fatalf("the Azure VM after a refused failback: %q", p)
	}
	original := sha256File(t, ac.disk)
	ac.write(16)

	out := c.mustCLI("failback", "--machine", "m", "--alternate", "--vcenter", "vc1", "--datastore", "LocalDS_0")
	t.Logf("alternate failback:\n%s", out)
	for _, s := range []string{"m: stop the recovered VM", "m: create VM in vc1", "m: verify", "m: end the failover", "m-recovered in Azure resource group net-rg stays deallocated"} {
		if !strings.Contains(out, s) {
			t.Fatalf("alternate failback output lacks %q:\n%s", s, out)
		}
	}
	m := alternateRE.FindStringSubmatch(out)
	if m == nil || m[4] != "33554432" {
		t.Fatalf("alternate failback output:\n%s", out)
	}
	vm, ok := simVM(t, sim, m[2])
	if !ok || vm.Name != m[1] || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("the new VM %s: found %v, %s, %s", m[2], ok, vm.Name, vm.Runtime.PowerState)
	}
	// Deallocated since its copy: the recovered disk holds what was copied.
	if got, want := sha256File(t, filepath.Join(dsDir, m[3], "d-flat.vmdk")), ac.recoveredSum(); got != want {
		t.Fatalf("the new VM's flat file sha256 %s, the recovered disk's final content %s", got, want)
	}
	if p := ac.arm.VMPower("net-rg", "m-recovered"); p != "deallocated" {
		t.Fatalf("the Azure VM after the failback: %q", p)
	}
	ac.clean("after the alternate failback")
	if got := sha256File(t, ac.disk); got != original {
		t.Fatal("an alternate-location failback wrote the original disk")
	}
	if st := c.status("m"); st.Direction != "failed-back" {
		t.Fatalf("after the failback: direction %q", st.Direction)
	}
	if fs := c.liveFailovers(); len(fs) != 0 {
		t.Fatalf("live failovers after the failback: %+v", fs)
	}
}
