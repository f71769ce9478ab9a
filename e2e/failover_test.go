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
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/server/api"
)

// newFailoverCluster starts a cluster whose server serves its exports on a
// port of its own, and whose drills use TCG (the same on every machine,
// with or without /dev/kvm).
func newFailoverCluster(t *testing.T) *cluster {
	t.Helper()
	t.Setenv("ASR_DRILL_ACCEL", "tcg") // inherited by the server process
	return newClusterArgs(t, "--nbd-listen", "127.0.0.1:"+freePort(t))
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
// acknowledged is in the last point. Commit then ends the protection.
func TestE2EFailoverPlannedUnderFio(t *testing.T) {
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
	st := c.status("m")
	if st.State != api.StateUnprotected || !st.Unprotected {
		t.Fatalf("after commit the machine is %s (unprotected %v)", st.State, st.Unprotected)
	}
	// The failed-over machine keeps running from its export.
	if got := nbdCopySum(t, uris["d"]); got != src {
		t.Fatal("the export changed at commit")
	}
}

// silence unused imports until the vSphere test below uses them.
var (
	_ = find.NewFinder
	_ = object.NewVirtualMachine
	_ = property.DefaultCollector
	_ mo.Datastore
	_ types.ManagedObjectReference
	_ = time.Second
)
