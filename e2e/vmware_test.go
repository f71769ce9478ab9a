//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// guestVM is a VM in the simulator standing for the guest the sshd serves.
const guestUUID = "4217a1b2-c3d4-4e5f-8a9b-0c1d2e3f4a5b"

// addSimVCenter starts the simulator with one VM for the guest and
// registers it with the cluster's server through the CLI (the thumbprint
// shown first, then pinned).
func (c *cluster) addSimVCenter(vmName string, diskSize int64) *vcsim.Sim {
	t := c.t
	t.Helper()
	sim, err := vcsim.Start("administrator@vsphere.local", "e2e-Vc-Pw-5521")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sim.Close)
	ctx := context.Background()
	gc, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sim.CreateVM(ctx, gc, vcsim.VMSpec{Name: vmName, BIOSUUID: guestUUID, CPUs: 2, MemoryMiB: 2048, Disks: []int64{diskSize}, PowerOn: true}); err != nil {
		t.Fatal(err)
	}
	gc.Logout(ctx)
	pw := filepath.Join(c.dir, "vc-password")
	if err := os.WriteFile(pw, []byte(sim.Password), 0o600); err != nil {
		t.Fatal(err)
	}
	add := []string{"vcenter", "add", "--name", "vc1", "--url", sim.URL, "--user", sim.User, "--password-file", pw}
	_, err = c.cli(add...)
	if err == nil || !strings.Contains(err.Error(), "--thumbprint "+sim.Thumbprint) {
		t.Fatalf("vcenter add without a thumbprint: %v; want the thumbprint to confirm", err)
	}
	out := c.mustCLI(append(add, "--thumbprint", sim.Thumbprint)...)
	if !strings.Contains(out, sim.Thumbprint) {
		t.Fatalf("vcenter add: %s", out)
	}
	return sim
}

// vms is `asr vms --json`.
func (c *cluster) vms() []api.VM {
	c.t.Helper()
	var vms []api.VM
	if err := json.Unmarshal([]byte(c.mustCLI("vms", "--json")), &vms); err != nil {
		c.t.Fatal(err)
	}
	return vms
}

func (c *cluster) waitVM(name, what string, ok func(api.VM) bool) api.VM {
	c.t.Helper()
	deadline := time.Now().Add(hungAfter)
	for time.Now().Before(deadline) {
		for _, vm := range c.vms() {
			if vm.Name == name && ok(vm) {
				return vm
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("VM %s never %s: %+v", name, what, c.vms())
	return api.VM{}
}

// killPidFile kills the process whose pid an install's pid file holds (the
// pushed agent runs detached from the test), if it still runs.
func killPidFile(path string) {
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// TestE2EProtectFromInventory is the administrator's flow: register the
// vCenter, see the VM, enable replication with a push install over a real
// OpenSSH server (host key unknown: refused with its fingerprint, then
// confirmed), the machine appears linked to the VM, initial replication
// completes and the latest point equals the disk; a wrong key and a changed
// host key give their clear errors; unprotect removes the agent.
func TestE2EProtectFromInventory(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	const size = 24 << 20
	c.addSimVCenter("guest01", size)
	vm := c.waitVM("guest01", "discovered", func(vm api.VM) bool { return vm.BIOSUUID == guestUUID })
	if vm.Machine != "" || vm.PowerState != "poweredOn" || vm.CPUs != 2 || vm.MemoryMiB != 2048 || len(vm.Disks) != 1 || vm.Disks[0].CapacityBytes != size {
		t.Fatalf("guest01 as discovered: %+v", vm)
	}

	ssh := startSSHD(t)
	guest := t.TempDir() // the guest's file system, as far as the test goes
	disk := filepath.Join(guest, "disk0.img")
	makeDisk(t, disk, size, 7)
	want := sha256File(t, disk)
	install := filepath.Join(guest, "opt-asr")
	t.Cleanup(func() { killPidFile(filepath.Join(install, "agent.pid")) })
	protect := []string{"protect", "--vm", "guest01", "--ssh", "root@" + ssh.Addr, "--ssh-key", ssh.KeyFile,
		"--disk", "d0=" + disk, "--install-dir", install, "--skip-uuid-check"}

	// The host key is not known yet: refused, with its fingerprint.
	fp := ssh.fingerprint()
	_, err := c.cli(protect...)
	if err == nil || !strings.Contains(err.Error(), "--accept-host-key "+fp) {
		t.Fatalf("protect to an unknown host: %v; want its fingerprint %s to confirm", err, fp)
	}
	if _, err := os.Stat(install); !os.IsNotExist(err) {
		t.Fatalf("an unconfirmed host left %s: %v", install, err)
	}
	// A key the guest does not accept.
	otherKey := filepath.Join(t.TempDir(), "other")
	if out, err := runTool(context.Background(), t, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", otherKey); err != nil {
		t.Fatalf("ssh-keygen: %v: %s", err, out)
	}
	bad := append([]string(nil), protect...)
	bad[6] = otherKey
	// (The operator confirms the host key: it is recorded, the login still
	// fails.)
	_, err = c.cli(append(bad, "--accept-host-key", fp)...)
	if err == nil || !strings.Contains(err.Error(), "authentication failed") {
		t.Fatalf("protect with a wrong key: %v", err)
	}
	if _, err := os.Stat(install); !os.IsNotExist(err) {
		t.Fatalf("a refused login left %s: %v", install, err)
	}

	// With the right key, the host key known: installed, registered,
	// replicating.
	out := c.mustCLI(protect...)
	for _, step := range []string{"connect", "prerequisites", "copy", "reachability", "configure", "service", "registration", "initial replication", "succeeded"} {
		if !strings.Contains(out, step) {
			t.Fatalf("protect's output lacks step %q:\n%s", step, out)
		}
	}
	c.waitState("guest01", "protected", hungAfter)
	st := c.status("guest01")
	if st.VM == nil || st.VM.Name != "guest01" || st.BIOSUUID != guestUUID {
		t.Fatalf("machine guest01 not linked to its VM: %+v", st.Machine)
	}
	c.waitVM("guest01", "shown as protected by guest01", func(vm api.VM) bool { return vm.Machine == "guest01" })
	point := c.tag("guest01")
	c.recoverAndCheck("guest01", point, map[string]string{"d0": want})

	// Again: idempotent (the binary is replaced, the agent restarted; the
	// host key is known now).
	out = c.mustCLI(protect...)
	if !strings.Contains(out, "succeeded") {
		t.Fatalf("second protect:\n%s", out)
	}
	c.waitState("guest01", "protected", hungAfter)

	// A changed host key: refused, whatever the operator passes.
	ssh.newHostKey()
	_, err = c.cli(protect...)
	if err == nil || !strings.Contains(err.Error(), "mismatch") {
		t.Fatalf("protect after the host key changed: %v", err)
	}
	ssh.newHostKeyBack()

	// Unprotect: the agent stops and its directory goes.
	pidFile := filepath.Join(install, "agent.pid")
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	c.mustCLI("unprotect", "--vm", "guest01", "--ssh", "root@"+ssh.Addr, "--ssh-key", ssh.KeyFile, "--install-dir", install)
	if _, err := os.Stat(install); !os.IsNotExist(err) {
		t.Fatalf("unprotect left %s: %v", install, err)
	}
	if alive(pid) {
		t.Fatalf("the agent (pid %d) still runs after unprotect", pid)
	}
	c.waitVM("guest01", "unprotected", func(vm api.VM) bool { return vm.Machine == "" || vm.Machine == "guest01" })
}
