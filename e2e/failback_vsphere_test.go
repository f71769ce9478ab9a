//go:build e2e

package e2e

// Failback with a vCenter (the govmomi simulator in process), through the
// real binaries: to an alternate location (a new VM whose flat files are
// a full copy of the failed-over disks), and to the original location of
// a machine linked to a VM, which the failback powers on.

import (
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// linkedFailbackCase is machine "m" with one 32 MiB disk, linked (BIOS
// UUID) to the simulator's VM guest01, failed over (planned) to NBD,
// committed, written to through fio, and reprotected.
type linkedFailbackCase struct {
	*failbackCase
	sim   *vcsim.Sim
	dsDir string
	ref   string // guest01's
}

func startLinkedFailbackCase(t *testing.T) *linkedFailbackCase {
	t.Helper()
	c := newFailoverCluster(t)
	lc := &linkedFailbackCase{failbackCase: &failbackCase{c: c, disk: filepath.Join(c.dir, "d.img")}}
	lc.sim = c.addSimVCenter("guest01", 32<<20)
	lc.dsDir = simDatastoreDir(t, lc.sim, "LocalDS_0")
	lc.ref = c.waitVM("guest01", "discovered", func(vm api.VM) bool { return vm.BIOSUUID == guestUUID }).Ref
	makeDisk(t, lc.disk, 32<<20, 9)
	a := c.startAgent("m", []string{"--bios-uuid", guestUUID}, "d="+lc.disk)
	c.waitState("m", "protected", hungAfter)
	c.waitStatus("m", "linked to VM guest01", func(st machineStatus) bool { return st.VM != nil && st.VM.Name == "guest01" })
	lc.fio(a.uri("d"), "fwd", 1<<20)
	r := c.failover("--machine", "m", "--planned", "--to", "nbd")
	if !strings.Contains(r.out, "m: shut down") {
		t.Fatalf("a planned failover of a linked machine shuts its VM down:\n%s", r.out)
	}
	if vm, ok := simVM(t, lc.sim, lc.ref); !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("guest01 after the planned failover: found %v, %s", ok, vm.Runtime.PowerState)
	}
	lc.export = exportURIs(t, r)["d"]
	lc.written = 0
	c.mustCLI("failover", "--machine", "m", "--commit")
	lc.fio(lc.export, "failed-over", 3<<20)
	if out := c.mustCLI("reprotect", "--machine", "m"); !strings.Contains(out, "reprotected:") {
		t.Fatalf("reprotect:\n%s", out)
	}
	lc.fio(lc.export, "reprotected", 2<<20)
	return lc
}

var alternateRE = regexp.MustCompile(`failed back to a new VM: vc1/(\S+) \((vm-\d+)\) in \[LocalDS_0\] (\S+), (\d+) bytes copied and verified`)

// TestE2EFailbackAlternateVSphere: protect, planned failover to NBD, fio
// into the export, reprotect, more fio, then `asr failback --alternate
// --vcenter vc1 --datastore LocalDS_0`: a new VM in the simulator with the
// source's shape and one disk, powered on, whose flat file in the
// datastore's directory equals the export's final content; the original
// disk is not written; forward reprotect is refused with what to do.
func TestE2EFailbackAlternateVSphere(t *testing.T) {
	t.Parallel()
	lc := startLinkedFailbackCase(t)
	c := lc.c
	// Refused before anything stops: an unknown datastore.
	if out, err := c.cli("failback", "--machine", "m", "--alternate", "--vcenter", "vc1", "--datastore", "nope"); err == nil || !strings.Contains(err.Error()+out, "nope") {
		t.Fatalf("alternate failback to an unknown datastore: %v\n%s", err, out)
	}
	if out, err := c.cli("failback", "--machine", "m", "--alternate", "--datastore", "LocalDS_0"); err == nil || !strings.Contains(err.Error()+out, "--vcenter") {
		t.Fatalf("alternate failback without a vCenter: %v\n%s", err, out)
	}
	want := nbdCopySum(t, lc.export)
	c.waitStatus("m", "the writes on the original disk", func(machineStatus) bool {
		fs := c.liveFailovers()
		return len(fs) == 1 && fs[0].Failback != nil && fs[0].Failback.Pending == 0
	})
	original := sha256File(t, lc.disk)

	// The new VM goes in a VM folder of the operator's (--folder).
	if out, err := c.cli("failback", "--machine", "m", "--alternate", "--vcenter", "vc1", "--datastore", "LocalDS_0", "--folder", "/DC0/vm/nope"); err == nil || !strings.Contains(err.Error()+out, "nope") {
		t.Fatalf("alternate failback to an unknown folder: %v\n%s", err, out)
	}
	folder := simVMFolder(t, lc.sim, "DR")
	out := c.mustCLI("failback", "--machine", "m", "--alternate", "--vcenter", "vc1", "--datastore", "LocalDS_0", "--folder", "/DC0/vm/DR")
	t.Logf("alternate failback:\n%s", out)
	m := alternateRE.FindStringSubmatch(out)
	if m == nil || m[1] != "guest01-failback" || m[3] != "guest01-failback" || m[4] != "33554432" {
		t.Fatalf("alternate failback output:\n%s", out)
	}
	if !strings.Contains(out, "has no asr agent") || !strings.Contains(out, "asr protect --vm guest01-failback") {
		t.Fatalf("the output does not say how to protect the new VM:\n%s", out)
	}
	vm, ok := simVM(t, lc.sim, m[2])
	if !ok || vm.Name != "guest01-failback" || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("the new VM %s: found %v, %s, %s", m[2], ok, vm.Name, vm.Runtime.PowerState)
	}
	if vm.Parent == nil || *vm.Parent != folder {
		t.Fatalf("the new VM is in folder %v, want /DC0/vm/DR (%v)", vm.Parent, folder)
	}
	if vm.Config == nil || vm.Config.Hardware.NumCPU != 2 || vm.Config.Hardware.MemoryMB != 2048 {
		t.Fatalf("the new VM's hardware %+v, want guest01's 2 CPUs and 2048 MiB", vm.Config)
	}
	var files []string
	for _, d := range vm.Config.Hardware.Device {
		if vd, ok := d.(*types.VirtualDisk); ok && vd.CapacityInBytes == 32<<20 {
			files = append(files, vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo).FileName)
		}
	}
	if len(files) != 1 || files[0] != "[LocalDS_0] guest01-failback/d.vmdk" {
		t.Fatalf("the new VM's disks %v", files)
	}
	if got := sha256File(t, filepath.Join(lc.dsDir, "guest01-failback", "d-flat.vmdk")); got != want {
		t.Fatalf("the new VM's flat file sha256 %s, the failed-over disk's final state %s", got, want)
	}
	if got := sha256File(t, lc.disk); got != original {
		t.Fatal("an alternate-location failback wrote the original disk")
	}
	if st := c.status("m"); st.Direction != "failed-back" {
		t.Fatalf("after the failback: direction %q", st.Direction)
	}
	if fs := c.liveFailovers(); len(fs) != 0 {
		t.Fatalf("live failovers after the failback: %+v", fs)
	}
	if out, err := c.cli("reprotect", "--machine", "m"); err == nil || !strings.Contains(err.Error()+out, "asr protect --vm guest01-failback") {
		t.Fatalf("forward reprotect after an alternate failback: %v\n%s", err, out)
	}
	if vm, ok := simVM(t, lc.sim, lc.ref); !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("guest01 after an alternate failback: found %v, %s (want it left off)", ok, vm.Runtime.PowerState)
	}
}

// TestE2EFailbackPowersOnVM: the original-location failback of a machine
// linked to guest01 powers the VM on through the vCenter at the switch
// (the planned failover shut it down); the original disk equals the
// export's final content.
func TestE2EFailbackPowersOnVM(t *testing.T) {
	t.Parallel()
	lc := startLinkedFailbackCase(t)
	want := nbdCopySum(t, lc.export)
	out := lc.c.mustCLI("failback", "--machine", "m")
	t.Logf("failback:\n%s", out)
	if !regexp.MustCompile(`m: power on VM\s+done: powered on`).MatchString(out) {
		t.Fatalf("the failback's output has no power-on of the VM:\n%s", out)
	}
	lc.checkFailedBack(out, want)
	if vm, ok := simVM(t, lc.sim, lc.ref); !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("guest01 after failback: found %v, %s", ok, vm.Runtime.PowerState)
	}
}

// fioFile writes n bytes of random 64 KiB blocks into a file with fio (the
// recovered VM's guest writing its disk: the simulator's datastore is a
// directory, and the flat file is the VM's disk).
func (fc *failbackCase) fioFile(path, name string, n int64) {
	t := fc.c.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
	defer cancel()
	out, err := runTool(ctx, t, "fio", "--name="+name, "--filename="+path, "--ioengine=psync", "--rw=randwrite", "--bs=64k",
		"--size=32M", "--io_size="+strconv.FormatInt(n, 10), "--end_fsync=1", "--randseed="+strconv.Itoa(len(name)*7+int(n%97)))
	if err != nil {
		t.Fatalf("fio %s: %v\n%s", name, err, out)
	}
	fc.written += n
}

var reprotectedRE = regexp.MustCompile(`reprotected: (\d+) bytes compared, (\d+) differ, (\d+) bytes sent to the original disks`)

// vsphereFailbackCase is machine "m" with one 32 MiB disk, linked to
// the simulator's guest01, written after its last point (1 MiB at 30 MiB,
// on the original only), failed over unplanned to vSphere at that point
// and committed.
type vsphereFailbackCase struct {
	*failbackCase
	sim  *vcsim.Sim
	flat string // the recovered VM's flat file in the datastore's directory
	ref  string // the recovered VM's
}

func startVSphereFailbackCase(t *testing.T) *vsphereFailbackCase {
	t.Helper()
	c := newFailoverCluster(t)
	const size = 32 << 20
	sim := c.addSimVCenter("guest01", size)
	dsDir := simDatastoreDir(t, sim, "LocalDS_0")
	c.waitVM("guest01", "discovered", func(vm api.VM) bool { return vm.BIOSUUID == guestUUID })
	fc := &failbackCase{c: c, disk: filepath.Join(c.dir, "d.img")}
	makeDisk(t, fc.disk, size, 11)
	a := c.startAgent("m", []string{"--bios-uuid", guestUUID}, "d="+fc.disk)
	c.waitState("m", "protected", hungAfter)
	c.waitStatus("m", "linked to VM guest01", func(st machineStatus) bool { return st.VM != nil && st.VM.Name == "guest01" })
	fc.fio(a.uri("d"), "fwd", 1<<20)
	point := c.tag("m")
	// After the point, on the original only: 1 MiB at 30 MiB (fio's
	// random offsets repeat from run to run whatever the seed, so the
	// recovered VM's random writes below would cover random ones).
	ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
	defer cancel()
	if out, err := runTool(ctx, t, "fio", "--name=after-point", "--ioengine=nbd", "--uri="+a.uri("d"), "--rw=write", "--bs=64k",
		"--offset=30M", "--size=1M"); err != nil {
		t.Fatalf("fio after-point: %v\n%s", err, out)
	}
	r := c.failover("--machine", "m", "--point", point, "--to", "vsphere", "--vcenter", "vc1", "--datastore", "LocalDS_0")
	vmPath, ref := vsphereResult(t, r, "m")
	if vmPath != "vc1/guest01-recovered" {
		t.Fatalf("recovered VM %s:\n%s", vmPath, r.out)
	}
	c.mustCLI("failover", "--machine", "m", "--commit")
	if st := c.status("m"); st.Direction != "failed-over" || st.Unprotected {
		t.Fatalf("after commit: direction %q, unprotected %v", st.Direction, st.Unprotected)
	}
	fc.written = 0
	return &vsphereFailbackCase{failbackCase: fc, sim: sim, ref: ref, flat: filepath.Join(dsDir, "guest01-recovered", "d-flat.vmdk")}
}

// TestE2EFailbackFromVSphere: protect a machine linked to the simulator's
// guest01 with the real agent, write after a point on the original, fail
// over (unplanned) to vSphere from that point and commit; fio writes into
// the recovered VM's flat file in the datastore's directory; reprotect
// freezes the original agent and sends only the blocks that differ
// (bytes sent far below the disk's size); more fio; failback powers the
// recovered VM off, sends the rest and verifies: the original disk's
// SHA-256 equals the recovered VM's final disk; forward protection
// resumes and a new point recovers bit-exact.
func TestE2EFailbackFromVSphere(t *testing.T) {
	t.Parallel()
	vc := startVSphereFailbackCase(t)
	fc, c, flat, sim, ref := vc.failbackCase, vc.c, vc.flat, vc.sim, vc.ref
	const size = 32 << 20
	fc.fioFile(flat, "recovered", 3<<20)

	out := c.mustCLI("reprotect", "--machine", "m")
	m := reprotectedRE.FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, "freeze the original") {
		t.Fatalf("reprotect:\n%s", out)
	}
	compared, _ := strconv.ParseInt(m[1], 10, 64)
	sent, _ := strconv.ParseInt(m[3], 10, 64)
	// What differs: fio's blocks in the recovered VM and the original's
	// writes after the point (1 MiB, some of it covered by the former).
	if compared != size || sent <= fc.written || sent > fc.written+1<<20 {
		t.Fatalf("reprotect compared %d bytes and sent %d, for %d written into the recovered VM", compared, sent, fc.written)
	}
	t.Logf("reprotect: %d bytes compared, %d sent", compared, sent)
	if st := c.status("m"); st.Direction != "reprotected" {
		t.Fatalf("after reprotect: direction %q", st.Direction)
	}
	fc.fioFile(flat, "recovered-after-reprotect", 2<<20)

	out = c.mustCLI("failback", "--machine", "m")
	for _, s := range []string{"m: stop the recovered VM", "m: send the last changes", "m: verify", "m: end the failover", "guest01-recovered stays powered off"} {
		if !strings.Contains(out, s) {
			t.Fatalf("failback output lacks %q:\n%s", s, out)
		}
	}
	fc.checkFailedBack(out, sha256File(t, flat))
	if vm, ok := simVM(t, sim, ref); !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("the recovered VM after failback: found %v, %s", ok, vm.Runtime.PowerState)
	}
	fc.checkForward()
}

// TestE2EConsoleFailbackVSphere: a failover to vSphere (the simulator)
// committed, then Reprotect and Failback from the machine's page in
// Chromium, each confirmation saying what happens to the recovered VM;
// the original disk ends equal to the recovered VM's flat file, the
// recovered VM powered off.
func TestE2EConsoleFailbackVSphere(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	c := newFailoverCluster(t)
	const size = 32 << 20
	sim := c.addSimVCenter("guest01", size)
	dsDir := simDatastoreDir(t, sim, "LocalDS_0")
	c.waitVM("guest01", "discovered", func(vm api.VM) bool { return vm.BIOSUUID == guestUUID })
	fc := &failbackCase{c: c, disk: filepath.Join(c.dir, "d.img")}
	makeDisk(t, fc.disk, size, 13)
	a := c.startAgent("m", []string{"--bios-uuid", guestUUID}, "d="+fc.disk)
	c.waitState("m", "protected", hungAfter)
	c.waitStatus("m", "linked to VM guest01", func(st machineStatus) bool { return st.VM != nil && st.VM.Name == "guest01" })
	fc.fio(a.uri("d"), "fwd", 1<<20)
	point := c.tag("m")
	r := c.failover("--machine", "m", "--point", point, "--to", "vsphere", "--vcenter", "vc1", "--datastore", "LocalDS_0")
	_, ref := vsphereResult(t, r, "m")
	c.mustCLI("failover", "--machine", "m", "--commit")
	flat := filepath.Join(dsDir, "guest01-recovered", "d-flat.vmdk")
	fc.written = 0
	fc.fioFile(flat, "recovered", 2<<20)

	p := openConsole(t, c, browser)

	p.machinePage(c, "m")
	if s := p.text("#machine-failback"); !strings.Contains(s, "Failed over") || !p.exists(`a.failback-action[data-failback="reprotect"]`) {
		t.Fatalf("the committed failover to vSphere's machine page shows:\n%s", s)
	}
	p.do(chromedp.Click(chromedp.CSS(`a.failback-action[data-failback="reprotect"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-reprotect")))
	if s := p.text("#failback-steps"); !strings.Contains(s, "vc1/guest01-recovered") || !strings.Contains(s, "only the blocks that differ") {
		t.Fatalf("the reprotect confirmation says:\n%s", s)
	}
	p.screenshot("fbvs-01-reprotect-confirm")
	p.do(chromedp.Click(chromedp.CSS("#confirm-reprotect")))
	out, steps := p.jobDone("reprotect")
	if m := reprotectedRE.FindStringSubmatch(out); m == nil || !strings.Contains(steps, "compare and send") {
		t.Fatalf("the reprotect job shows:\n%s\n%s", out, steps)
	}
	fc.fioFile(flat, "recovered-after-reprotect", 1<<20)

	p.machinePage(c, "m")
	p.do(chromedp.Click(chromedp.CSS(`a.failback-action[data-failback="failback"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-failback")))
	if s := p.text("#failback-steps"); !strings.Contains(s, "vc1/guest01-recovered is powered off") || !strings.Contains(s, "compared whole") {
		t.Fatalf("the failback confirmation says:\n%s", s)
	}
	p.screenshot("fbvs-02-failback-confirm")
	p.do(chromedp.Click(chromedp.CSS("#confirm-failback")))
	out, steps = p.jobDone("failback")
	if !strings.Contains(steps, "stop the recovered VM") || !strings.Contains(steps, "compared: equal") {
		t.Fatalf("the failback's steps:\n%s", steps)
	}
	p.screenshot("fbvs-03-failed-back-job")
	fc.checkFailedBack(out, sha256File(t, flat))
	if vm, ok := simVM(t, sim, ref); !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("the recovered VM after failback: found %v, %s", ok, vm.Runtime.PowerState)
	}
	p.machinePage(c, "m")
	if s := p.text("#machine-failback"); !strings.Contains(s, "Failed back") || !p.exists(`a.failback-action[data-failback="reprotect"]`) {
		t.Fatalf("the failed-back machine's page shows:\n%s", s)
	}
}

// TestE2EFailbackFromVSphereKilled: reprotect, then a failback whose pass
// cannot end (the original agent held by SIGSTOP); kill -9 of the server
// in the pass and of the agent; after the restarts the machine is still
// reprotected (the recovered VM was left off), and failback run again
// ends with the original equal to the recovered VM's disk; forward
// protection resumes.
func TestE2EFailbackFromVSphereKilled(t *testing.T) {
	t.Parallel()
	vc := startVSphereFailbackCase(t)
	fc, c := vc.failbackCase, vc.c
	fc.fioFile(vc.flat, "recovered", 2<<20)
	c.mustCLI("reprotect", "--machine", "m")
	fc.fioFile(vc.flat, "recovered-after-reprotect", 3<<20)
	want := sha256File(t, vc.flat)
	a := c.agents["m"]
	a.proc.pause()
	id := strings.TrimSpace(c.mustCLI("failback", "--machine", "m", "--no-wait"))
	deadline := time.Now().Add(hungAfter)
	for {
		j := c.job(id)
		pass := false
		for _, s := range j.Steps {
			if s.Name == "m: send the last changes" && s.State == "running" {
				pass = true
			}
		}
		if pass {
			break
		}
		if j.State != "running" || time.Now().After(deadline) {
			t.Fatalf("failback job %s: %+v", id, j)
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.server.kill()
	c.startServer()
	if st := c.status("m"); st.Direction != "reprotected" {
		t.Fatalf("after kill -9 of the server during failback: direction %q", st.Direction)
	}
	if vm, ok := simVM(t, vc.sim, vc.ref); !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("the recovered VM after the kill: found %v, %s", ok, vm.Runtime.PowerState)
	}
	a.proc.kill()
	c.startAgent("m", nil)
	out, err := c.cli("failback", "--machine", "m")
	if err != nil {
		t.Fatalf("failback after the kills: %v\n%s", err, out)
	}
	t.Logf("failback after the kills:\n%s", out)
	fc.checkFailedBack(out, want)
	if got := sha256File(t, vc.flat); got != want {
		t.Fatal("the recovered VM's disk changed")
	}
	fc.checkForward()
}

// simVMFolder makes a VM folder in the simulator's data center's VM folder.
func simVMFolder(t *testing.T, sim *vcsim.Sim, name string) types.ManagedObjectReference {
	t.Helper()
	ctx := context.Background()
	gc, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Logout(ctx)
	dc, err := find.NewFinder(gc.Client).DefaultDatacenter(ctx)
	if err != nil {
		t.Fatal(err)
	}
	fs, err := dc.Folders(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f, err := fs.VmFolder.CreateFolder(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	return f.Reference()
}

// TestE2EConsoleFailbackAlternate: the alternate location from the
// console, in Chromium: a linked machine failed over (planned) to NBD,
// committed and reprotected (startLinkedFailbackCase), then "Fail back to
// a new VM…" on its page; the form refused once by vCenter (an unknown
// datastore: shown with what was typed, nothing stopped), then sent with
// the simulator's datastore and a VM folder: the job's page ends
// succeeded, the new VM is in the folder, powered on, and its flat file
// equals the export's final content; the original disk is not written.
func TestE2EConsoleFailbackAlternate(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	lc := startLinkedFailbackCase(t)
	c := lc.c
	want := nbdCopySum(t, lc.export)
	c.waitStatus("m", "the writes on the original disk", func(machineStatus) bool {
		fs := c.liveFailovers()
		return len(fs) == 1 && fs[0].Failback != nil && fs[0].Failback.Pending == 0
	})
	original := sha256File(t, lc.disk)
	folder := simVMFolder(t, lc.sim, "DR")

	p := openConsole(t, c, browser)
	p.do(chromedp.Navigate(c.url()+"/machines/m"), chromedp.WaitVisible(chromedp.CSS("#machine-title")))
	p.do(chromedp.Click(chromedp.CSS("a.failback-alternate")), chromedp.WaitVisible(chromedp.CSS("#alternate-form")))
	if s := p.text("#alternate-steps"); !strings.Contains(s, "original disks are not touched") {
		t.Fatalf("the alternate location's page says:\n%s", s)
	}
	fill := func(ds string) {
		t.Helper()
		p.do(chromedp.SetValue(chromedp.CSS("#datastore"), ds), chromedp.SetValue(chromedp.CSS("#folder"), "/DC0/vm/DR"),
			chromedp.SetValue(chromedp.CSS("#vm_name"), "m-new"), chromedp.Click(chromedp.CSS("#confirm-alternate")))
	}
	fill("nope")
	p.waitVisible("showed vCenter's refusal", "#alternate-error")
	if s := p.text("#alternate-error"); !strings.Contains(s, "Nothing was started") || !strings.Contains(s, "nope") {
		t.Fatalf("the refusal shows:\n%s", s)
	}
	if v := p.evalString(`document.querySelector("#folder").value`); v != "/DC0/vm/DR" {
		t.Fatalf("the refused form lost the folder typed: %q", v)
	}
	if fs := c.liveFailovers(); len(fs) != 1 || fs[0].Failback == nil || fs[0].Failback.State != "reprotected" {
		t.Fatalf("a refused alternate failback changed the failover: %+v", fs)
	}
	p.screenshot("fbalt-01-refused")
	fill("LocalDS_0")
	p.waitVisible("showed the end of the failback job", `#job[data-state="succeeded"], #job[data-state="failed"]`)
	if s := p.text("#job-state"); s != "succeeded" {
		t.Fatalf("the failback job %s:\n%s", s, p.text("#job"))
	}
	out := p.text("#job-output")
	m := alternateRE.FindStringSubmatch(out)
	if m == nil || m[1] != "m-new" || m[4] != "33554432" {
		t.Fatalf("the failback job's output:\n%s", out)
	}
	p.screenshot("fbalt-02-done")
	vm, ok := simVM(t, lc.sim, m[2])
	if !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn || vm.Parent == nil || *vm.Parent != folder {
		t.Fatalf("the new VM %s: found %v, %s, in %v (want powered on, in %v)", m[2], ok, vm.Runtime.PowerState, vm.Parent, folder)
	}
	if got := sha256File(t, filepath.Join(lc.dsDir, "m-new", "d-flat.vmdk")); got != want {
		t.Fatalf("the new VM's flat file sha256 %s, the failed-over disk's final state %s", got, want)
	}
	if got := sha256File(t, lc.disk); got != original {
		t.Fatal("an alternate-location failback wrote the original disk")
	}
	if st := c.status("m"); st.Direction != "failed-back" {
		t.Fatalf("after the failback: direction %q", st.Direction)
	}
}
