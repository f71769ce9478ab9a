//go:build e2e

package e2e

// Recovery through the real binary: test failovers served as NBD exports
// and read and written by qemu and libnbd, a planned failover under a
// running fio workload, and failovers to the vSphere simulator. The drills
// (QEMU boots of the recovered disks) are in drill_test.go.

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// newFailoverCluster starts a cluster whose server serves its exports on a
// port of its own (its drills use TCG: TestMain).
func newFailoverCluster(t *testing.T, serverArgs ...string) *cluster {
	t.Helper()
	return newFailoverClusterEnv(t, nil, serverArgs...)
}

// newFailoverClusterEnv is newFailoverCluster with variables added to the
// environment of the cluster's processes (cluster.env).
func newFailoverClusterEnv(t *testing.T, env []string, serverArgs ...string) *cluster {
	t.Helper()
	return newClusterEnv(t, env, append([]string{"--nbd-listen", "127.0.0.1:" + freePort(t)}, serverArgs...)...)
}

// failoverResult is what `asr failover` printed: the job's id, its RTO and
// its result lines (the lines after "job ID succeeded").
type failoverResult struct {
	out   string
	job   string
	rto   float64
	lines []string
}

var jobDoneRE = regexp.MustCompile(`(?m)^job ([0-9a-f]+) succeeded(?: \(RTO ([0-9.]+)s\))?$`)

// failover runs `asr failover ARGS` and parses its output; the job must
// succeed.
func (c *cluster) failover(args ...string) failoverResult {
	c.t.Helper()
	out := c.mustCLI(append([]string{"failover"}, args...)...)
	return parseFailover(c.t, out)
}

func parseFailover(t *testing.T, out string) failoverResult {
	t.Helper()
	locs := jobDoneRE.FindAllStringSubmatchIndex(out, -1)
	if len(locs) != 1 {
		t.Fatalf("failover output has no (or several) success lines:\n%s", out)
	}
	loc := locs[0]
	r := failoverResult{out: out, job: out[loc[2]:loc[3]]}
	if loc[4] >= 0 {
		fmt.Sscan(out[loc[4]:loc[5]], &r.rto)
	}
	for _, l := range strings.Split(strings.TrimSpace(out[loc[1]:]), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			r.lines = append(r.lines, l)
		}
	}
	return r
}

// exportURIs maps each disk to its URI from "DISK URI" result lines.
func exportURIs(t *testing.T, r failoverResult) map[string]string {
	t.Helper()
	uris := map[string]string{}
	for _, l := range r.lines {
		disk, uri, ok := strings.Cut(l, " ")
		if !ok || !strings.HasPrefix(uri, "nbd://") {
			t.Fatalf("result line %q is not DISK URI:\n%s", l, r.out)
		}
		uris[disk] = uri
	}
	return uris
}

// liveFailovers is `asr failover --list --json`.
func (c *cluster) liveFailovers() []api.Failover {
	c.t.Helper()
	var fs []api.Failover
	if err := json.Unmarshal([]byte(c.mustCLI("failover", "--list", "--json")), &fs); err != nil {
		c.t.Fatal(err)
	}
	return fs
}

// job is `asr job show ID --json`.
func (c *cluster) job(id string) api.Job {
	c.t.Helper()
	var j api.Job
	if err := json.Unmarshal([]byte(c.mustCLI("job", "show", id, "--json")), &j); err != nil {
		c.t.Fatal(err)
	}
	return j
}

// events is `asr events --machine M --json`.
func (c *cluster) events(machine string) []api.EventJSON {
	c.t.Helper()
	var es []api.EventJSON
	if err := json.Unmarshal([]byte(c.mustCLI("events", "--machine", machine, "--json")), &es); err != nil {
		c.t.Fatal(err)
	}
	return es
}

// makeHoleyDisk creates a sparse disk image: random 64 KiB to 1 MiB extents
// scattered over it, holes (never written) between them, and its last
// block written so the size is the file's.
func makeHoleyDisk(t *testing.T, path string, size int64, seed uint64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, 11))
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; {
		n := int64(64<<10) * int64(1+r.IntN(16))
		n = min(n, size-off)
		if r.IntN(2) == 0 { // data, else a hole
			for i := range buf[:n] {
				buf[i] = byte(r.Uint32())
			}
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
		}
		off += n
	}
	if _, err := f.WriteAt([]byte("end of disk"), size-4096); err != nil {
		t.Fatal(err)
	}
}

// nbdCopySum copies an export to a file with nbdcopy and returns the
// file's sha256.
func nbdCopySum(t *testing.T, uri string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "copy.img")
	nbdPeerRun(t, "nbdcopy", uri, dst)
	sum := sha256File(t, dst)
	os.Remove(dst)
	return sum
}

// TestE2EFailoverTestNBD is an instant test failover: the point's disks
// are served as NBD exports at once, read by nbdcopy and nbdinfo byte for
// byte as the point holds them, written by qemu-io without the point
// changing; replication and new points go on meanwhile; cleanup removes
// the exports.
func TestE2EFailoverTestNBD(t *testing.T) {
	t.Parallel()
	c := newFailoverCluster(t)
	d0, d1 := filepath.Join(c.dir, "d0.img"), filepath.Join(c.dir, "d1.img")
	makeHoleyDisk(t, d0, 48<<20, 1)
	makeHoleyDisk(t, d1, 20<<20+4096, 2) // not a whole MiB
	c.startAgent("m", nil, "d0="+d0, "d1="+d1)
	c.waitState("m", "protected", hungAfter)
	want := map[string]string{"d0": sha256File(t, d0), "d1": sha256File(t, d1)}
	point := c.tag("m")
	c.recoverAndCheck("m", point, want)

	// A later write on the source: the failover is of the point, not of
	// the disk as it is now.
	a := c.agents["m"]
	nbdPeerRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5c 2M 1M", a.uri("d0"))
	c.tag("m")

	r := c.failover("--machine", "m", "--test", "--point", point, "--to", "nbd")
	uris := exportURIs(t, r)
	if len(uris) != 2 || !strings.Contains(r.out, "(RTO ") {
		t.Fatalf("test failover: exports %v:\n%s", uris, r.out)
	}
	if j := c.job(r.job); j.State != api.JobSucceeded || j.RTO <= 0 || j.RTO > 60 {
		t.Fatalf("test failover job: %+v", j)
	}
	for disk, uri := range uris {
		if !strings.HasSuffix(uri, "/m/"+disk) {
			t.Errorf("disk %s exported as %s", disk, uri)
		}
		info := nbdPeerRun(t, "nbdinfo", "--json", uri)
		var ni struct {
			Exports []struct {
				Size       int64 `json:"export-size"`
				IsReadOnly bool  `json:"is_read_only"`
			} `json:"exports"`
		}
		if err := json.Unmarshal([]byte(info), &ni); err != nil || len(ni.Exports) != 1 {
			t.Fatalf("nbdinfo %s: %v\n%s", uri, err, info)
		}
		fi, _ := os.Stat(filepath.Join(c.dir, disk+".img"))
		if ni.Exports[0].Size != fi.Size() || ni.Exports[0].IsReadOnly {
			t.Errorf("export %s: size %d read-only %v, want %d read-write", uri, ni.Exports[0].Size, ni.Exports[0].IsReadOnly, fi.Size())
		}
		if got := nbdCopySum(t, uri); got != want[disk] {
			t.Fatalf("export %s: nbdcopy sha256 %s, the point holds %s", uri, got, want[disk])
		}
	}
	fs := c.liveFailovers()
	if len(fs) != 1 || fs[0].Machine != "m" || fs[0].Kind != api.FailoverTest || fs[0].Point != point || fs[0].State != "active" {
		t.Fatalf("live failovers: %+v", fs)
	}

	// The recovered machine writes: the export changes, the point does not.
	out := nbdPeerRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", uris["d0"])
	if strings.Contains(out, "fail") || strings.Contains(out, "mismatch") {
		t.Fatalf("qemu-io on the export:\n%s", out)
	}
	if got := nbdCopySum(t, uris["d0"]); got == want["d0"] {
		t.Fatal("a write to the export did not change it")
	}
	nbdPeerRun(t, "qemu-io", "-f", "raw", "-c", "read -P 0xab 0 1M", uris["d0"]) // kept across connections
	c.recoverAndCheck("m", point, want)
	if got := nbdCopySum(t, uris["d1"]); got != want["d1"] {
		t.Fatal("a write to d0's export changed d1's")
	}

	// Protection goes on during the test: a new point of the source as it
	// is now.
	nbdPeerRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x6d 5M 64k", a.uri("d1"))
	during := c.tag("m")
	c.recoverAndCheck("m", during, map[string]string{"d0": sha256File(t, d0), "d1": sha256File(t, d1)})
	if st := c.status("m"); st.State != "protected" {
		t.Fatalf("during a test failover the machine is %s", st.State)
	}

	cl := c.mustCLI("failover", "--machine", "m", "--cleanup")
	if !strings.Contains(cl, "succeeded") {
		t.Fatalf("cleanup:\n%s", cl)
	}
	for _, uri := range uris {
		ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
		out, err := runTool(ctx, t, "nbdinfo", uri)
		cancel()
		if err == nil {
			t.Fatalf("nbdinfo %s after cleanup succeeded:\n%s", uri, out)
		}
	}
	if fs := c.liveFailovers(); len(fs) != 0 {
		t.Fatalf("live failovers after cleanup: %+v", fs)
	}
	ents, _ := os.ReadDir(filepath.Join(c.srvDir, "failovers"))
	if len(ents) != 0 {
		t.Fatalf("cleanup left %d overlay directories", len(ents))
	}
	// And the held point is still there to recover (a test never releases
	// points).
	c.recoverAndCheck("m", point, want)
}

// TestE2EFailoverPlannedUnderFio is a planned failover while fio writes
// to the protected disk at random through the agent: the source refuses
// writes from the freeze on (fio stops with EPERM), and the failed-over
// disk equals the source disk byte for byte, so every write the source
// acknowledged is in the last point. Commit keeps the source frozen, its
// agent registered (failback's master target).
func TestE2EFailoverPlannedUnderFio(t *testing.T) {
	t.Parallel()
	c := newFailoverCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeDisk(t, disk, 64<<20, 3)
	a := c.startAgent("m", nil, "d="+disk)
	c.waitState("m", "protected", hungAfter)
	before := c.status("m").BytesReceived

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute) // ends a hung fio
	defer cancel()
	var fio background
	var fioOut string
	fio.run(func() error {
		var err error
		fioOut, err = runTool(ctx, t, "fio", "--name=planned", "--ioengine=nbd", "--uri="+a.uri("d"),
			"--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=64M", "--time_based", "--runtime=600",
			"--continue_on_error=none")
		return err
	})
	// fio's writes reach the server: the workload is under way.
	c.waitReceived("m", before+8<<20)

	r := c.failover("--machine", "m", "--planned", "--to", "nbd")
	t.Logf("planned failover:\n%s", r.out)
	if !strings.Contains(r.out, "m: freeze") || !strings.Contains(r.out, "no acknowledged write is after it") {
		t.Fatalf("planned failover output lacks the freeze:\n%s", r.out)
	}
	uris := exportURIs(t, r)
	if len(uris) != 1 || uris["d"] == "" {
		t.Fatalf("planned failover exports %v", uris)
	}

	// The source refuses writes now: fio stops on its first error.
	err := fio.wait()
	if err == nil {
		t.Fatalf("fio ran its 600 s through a planned failover:\n%s", fioOut)
	}
	if !strings.Contains(fioOut, "Operation not permitted") {
		t.Fatalf("fio stopped with %v, not on EPERM:\n%s", err, fioOut)
	}
	if ctx.Err() != nil {
		t.Fatal("fio was killed, not stopped by its write errors")
	}
	t.Logf("fio: %v\n%s", err, nbdPeerTruncate(fioOut))

	// The failed-over disk is the source as fio left it.
	src := sha256File(t, disk)
	if got := nbdCopySum(t, uris["d"]); got != src {
		t.Fatalf("failed-over disk sha256 %s, source %s: an acknowledged write is missing", got, src)
	}
	fs := c.liveFailovers()
	if len(fs) != 1 || fs[0].Kind != api.FailoverReal || fs[0].State != "active" {
		t.Fatalf("live failovers: %+v", fs)
	}
	// Still frozen: a write now is refused too.
	ctx2, cancel2 := context.WithTimeout(context.Background(), hungAfter)
	out, err := runTool(ctx2, t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", a.uri("d"))
	cancel2()
	if err == nil && !strings.Contains(out, "Operation not permitted") {
		t.Fatalf("a write to the frozen source:\n%s", out)
	}

	cm := c.mustCLI("failover", "--machine", "m", "--commit")
	if !strings.Contains(cm, "succeeded") {
		t.Fatalf("commit:\n%s", cm)
	}
	// A planned failover to NBD keeps its source registered and frozen:
	// it is failback's master target (failback_test.go).
	st := c.status("m")
	if st.Unprotected || st.Direction != "failed-over" {
		t.Fatalf("after commit the machine is %s (unprotected %v, direction %q)", st.State, st.Unprotected, st.Direction)
	}
	// The failed-over machine keeps running from its export.
	if got := nbdCopySum(t, uris["d"]); got != src {
		t.Fatal("the export changed at commit")
	}
}

// simDatastoreDir is the local directory behind a datastore of the
// simulator (its summary.url).
func simDatastoreDir(t *testing.T, sim *vcsim.Sim, name string) string {
	t.Helper()
	ctx := context.Background()
	gc, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Logout(ctx)
	f := find.NewFinder(gc.Client, true)
	dc, err := f.DefaultDatacenter(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f.SetDatacenter(dc)
	ds, err := f.Datastore(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	var mds mo.Datastore
	if err := ds.Properties(ctx, ds.Reference(), []string{"summary"}, &mds); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(mds.Summary.Url); err != nil || !fi.IsDir() {
		t.Fatalf("datastore %s: url %q is not a local directory: %v", name, mds.Summary.Url, err)
	}
	return mds.Summary.Url
}

// simVM reads a VM of the simulator by its reference; found is false once
// it is gone.
func simVM(t *testing.T, sim *vcsim.Sim, ref string) (vm mo.VirtualMachine, found bool) {
	t.Helper()
	ctx := context.Background()
	gc, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Logout(ctx)
	err = property.DefaultCollector(gc.Client).RetrieveOne(ctx, types.ManagedObjectReference{Type: "VirtualMachine", Value: ref},
		[]string{"name", "config", "runtime.powerState", "parent"}, &vm)
	if err != nil {
		if strings.Contains(err.Error(), "ManagedObjectNotFound") || strings.Contains(err.Error(), "has already been deleted") {
			return vm, false
		}
		t.Fatal(err)
	}
	return vm, true
}

// vsphereResult parses a failover's "MACHINE VCENTER/VM REF" line.
func vsphereResult(t *testing.T, r failoverResult, machine string) (vmPath, ref string) {
	t.Helper()
	if len(r.lines) != 1 {
		t.Fatalf("failover to vSphere: result lines %q:\n%s", r.lines, r.out)
	}
	f := strings.Fields(r.lines[0])
	if len(f) != 3 || f[0] != machine {
		t.Fatalf("failover to vSphere: result line %q:\n%s", r.lines[0], r.out)
	}
	return f[1], f[2]
}

// TestE2EFailoverVSphere fails a machine linked to a simulated VM over to
// the vSphere simulator through the real binary: a test failover creates a
// powered-off VM that cleanup removes with its folder; a failover uploads
// the point's disk (the datastore's flat file equals it byte for byte) and
// creates a powered-on VM with the source's CPUs and memory.
func TestE2EFailoverVSphere(t *testing.T) {
	t.Parallel()
	c := newFailoverCluster(t)
	const size = 24 << 20
	sim := c.addSimVCenter("guest01", size)
	dsDir := simDatastoreDir(t, sim, "LocalDS_0")
	disk := filepath.Join(c.dir, "d0.img")
	makeHoleyDisk(t, disk, size, 4)
	want := sha256File(t, disk)
	c.startAgent("m", []string{"--bios-uuid", guestUUID}, "d0="+disk)
	c.waitState("m", "protected", hungAfter)
	c.waitStatus("m", "linked to VM guest01", func(st machineStatus) bool { return st.VM != nil && st.VM.Name == "guest01" })
	point := c.tag("m")
	c.recoverAndCheck("m", point, map[string]string{"d0": want})

	// A test failover: a VM, powered off unless asked, on an isolated
	// network; cleanup removes it and its files.
	r := c.failover("--machine", "m", "--test", "--point", point, "--to", "vsphere", "--vcenter", "vc1", "--datastore", "LocalDS_0")
	vmPath, ref := vsphereResult(t, r, "m")
	if vmPath != "vc1/guest01-test" {
		t.Fatalf("test VM %s:\n%s", vmPath, r.out)
	}
	vm, ok := simVM(t, sim, ref)
	if !ok || vm.Name != "guest01-test" || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("test VM %s: found %v, %s, %s", ref, ok, vm.Name, vm.Runtime.PowerState)
	}
	if got := sha256File(t, filepath.Join(dsDir, "guest01-test", "d0-flat.vmdk")); got != want {
		t.Fatalf("test VM's flat disk sha256 %s, the point holds %s", got, want)
	}
	if fs := c.liveFailovers(); len(fs) != 1 || fs[0].VM != "vc1/guest01-test" {
		t.Fatalf("live failovers: %+v", fs)
	}
	c.mustCLI("failover", "--machine", "m", "--cleanup")
	if _, ok := simVM(t, sim, ref); ok {
		t.Fatalf("cleanup left the test VM %s", ref)
	}
	if _, err := os.Stat(filepath.Join(dsDir, "guest01-test")); !os.IsNotExist(err) {
		t.Fatalf("cleanup left the test VM's folder: %v", err)
	}
	if fs := c.liveFailovers(); len(fs) != 0 {
		t.Fatalf("live failovers after cleanup: %+v", fs)
	}

	// A failover: powered on, the source's shape, the point's bytes.
	r = c.failover("--machine", "m", "--point", point, "--to", "vsphere", "--vcenter", "vc1", "--datastore", "LocalDS_0")
	t.Logf("failover:\n%s", r.out)
	if !regexp.MustCompile(`(?m)done: VM guest01-recovered \(vm-[0-9]+\), powered on, networks VM Network$`).MatchString(r.out) {
		t.Fatalf("the create step's detail:\n%s", r.out)
	}
	vmPath, ref = vsphereResult(t, r, "m")
	if vmPath != "vc1/guest01-recovered" {
		t.Fatalf("recovered VM %s:\n%s", vmPath, r.out)
	}
	vm, ok = simVM(t, sim, ref)
	if !ok || vm.Name != "guest01-recovered" || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("recovered VM %s: found %v, %s, %s", ref, ok, vm.Name, vm.Runtime.PowerState)
	}
	if vm.Config == nil || vm.Config.Hardware.NumCPU != 2 || vm.Config.Hardware.MemoryMB != 2048 {
		t.Fatalf("recovered VM hardware %+v, want the source's 2 CPUs and 2048 MiB", vm.Config)
	}
	var vdisks []*types.VirtualDisk
	for _, d := range vm.Config.Hardware.Device {
		if vd, ok := d.(*types.VirtualDisk); ok {
			vdisks = append(vdisks, vd)
		}
	}
	if len(vdisks) != 1 || vdisks[0].CapacityInBytes != size {
		t.Fatalf("recovered VM disks %+v", vdisks)
	}
	if got := sha256File(t, filepath.Join(dsDir, "guest01-recovered", "d0-flat.vmdk")); got != want {
		t.Fatalf("recovered flat disk sha256 %s, the point holds %s", got, want)
	}
	if fs := c.liveFailovers(); len(fs) != 1 || fs[0].Kind != api.FailoverReal || fs[0].VM != "vc1/guest01-recovered" {
		t.Fatalf("live failovers: %+v", fs)
	}
	if _, err := c.cli("failover", "--machine", "m", "--cleanup"); err == nil {
		t.Fatal("cleanup of a failover (not a test) succeeded")
	}
	c.mustCLI("failover", "--machine", "m", "--commit")
	// The source stays registered: failback goes back to it.
	if st := c.status("m"); st.Unprotected || st.Direction != "failed-over" {
		t.Fatalf("after commit the machine is %s (unprotected %v), direction %q", st.State, st.Unprotected, st.Direction)
	}
	if _, ok := simVM(t, sim, ref); !ok {
		t.Fatal("commit removed the recovered VM")
	}
}
