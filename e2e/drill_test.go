//go:build e2e

package e2e

// Verified drills through the real binary: a protected disk that holds a
// bootable system is recovered from its point and booted in QEMU by the
// server; the drill passes on the guest's console marker and HTTP port, and
// fails, with its reason and an event, when the recovered kernel is damaged.

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/drill/bootdisk"
)

// drillTools are the programs a drill and bootdisk.Make need.
var drillTools = map[string]string{
	"qemu-system-x86_64": "qemu-system-x86",
	"syslinux":           "syslinux",
	"mcopy":              "mtools",
}

// protectBootDisk makes a bootable disk with o, protects it as machine m's
// disk "boot" and returns the id of a point of it.
func protectBootDisk(t *testing.T, c *cluster, m string, o bootdisk.Options) string {
	t.Helper()
	for tool, pkg := range drillTools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is required for a drill but is not installed: install it (apt-get install %s)", tool, pkg)
		}
	}
	disk := filepath.Join(c.dir, m+"-boot.img")
	if err := bootdisk.Make(disk, 64, o); err != nil {
		t.Fatalf("make the boot disk (needs linux-image-cloud-amd64, busybox-static, syslinux, mtools): %v", err)
	}
	want := sha256File(t, disk)
	c.startAgent(m, nil, "boot="+disk)
	c.waitState(m, "protected", hungAfter)
	point := c.tag(m)
	c.recoverAndCheck(m, point, map[string]string{"boot": want})
	return point
}

var jobStartRE = regexp.MustCompile(`(?m)^job ([0-9a-f]+): `)

// TestE2EDrillBootsProtectedDisk drills a protected bootable disk: the
// server boots the point's exports in QEMU (TCG), the guest's console
// shows the marker and its port 80 answers; the job records the RTO and
// the boot step; nothing of the drill stays live.
func TestE2EDrillBootsProtectedDisk(t *testing.T) {
	t.Parallel()
	c := newFailoverCluster(t)
	point := protectBootDisk(t, c, "m", bootdisk.Options{Hostname: "drill-m", Marker: "e2e-drill"})

	r := c.failover("--machine", "m", "--test", "--to", "qemu", "--boot-check", bootdisk.BootedMarker+" drill-m", "--boot-port", "80")
	t.Logf("drill:\n%s", r.out)
	if len(r.lines) != 1 || !regexp.MustCompile(`^m passed: booted in [0-9.]+s \(tcg\)$`).MatchString(r.lines[0]) {
		t.Fatalf("drill result lines %q:\n%s", r.lines, r.out)
	}
	if r.rto <= 0 {
		t.Fatalf("drill RTO %v:\n%s", r.rto, r.out)
	}

	var jobs []api.Job
	if err := json.Unmarshal([]byte(c.mustCLI("jobs", "--json")), &jobs); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, j := range jobs {
		if j.ID == r.job {
			found = j.Kind == "drill" && j.State == api.JobSucceeded && j.RTO > 0
		}
	}
	if !found {
		t.Fatalf("asr jobs --json does not show drill %s as succeeded with an RTO: %+v", r.job, jobs)
	}
	j := c.job(r.job)
	if j.RTO <= 0 {
		t.Fatalf("job show: RTO %v", j.RTO)
	}
	var boot *api.JobStep
	for i, st := range j.Steps {
		if st.Name == "m: boot" {
			boot = &j.Steps[i]
		}
	}
	if boot == nil || boot.State != "done" || !strings.Contains(boot.Detail, "passed: booted in") {
		t.Fatalf("job %s has no passed boot step: %+v", j.ID, j.Steps)
	}
	if fs := c.liveFailovers(); len(fs) != 0 {
		t.Fatalf("a drill left live failovers: %+v", fs)
	}
	var all []api.Failover
	if err := json.Unmarshal([]byte(c.mustCLI("failover", "--list", "--all", "--json")), &all); err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || all[0].State != "ended" || all[0].Point != point || all[0].Drill == nil || !all[0].Drill.Passed || all[0].Drill.BootTime <= 0 {
		t.Fatalf("the drill's record: %+v", all)
	}
	if !hasEvent(c.events("m"), "drill-passed") {
		t.Fatalf("no drill-passed event: %+v", c.events("m"))
	}
	// The guest wrote to its disk: into the drill's overlay, which is gone,
	// never into the point.
	c.recoverAndCheck("m", point, map[string]string{"boot": sha256File(t, filepath.Join(c.dir, "m-boot.img"))})
}

// TestE2EDrillCorruptKernelFails drills a disk whose kernel is damaged:
// the command fails, the job is failed with the reason, a drill-failed
// event is raised and nothing stays live. The damaged kernel hangs without
// a word, so the drill ends at its boot timeout: a short one, as what is
// tested here is the server's handling of a failed drill (that the
// damaged kernel is what fails: server/drill's TestBootCorruptKernelFails).
func TestE2EDrillCorruptKernelFails(t *testing.T) {
	t.Parallel()
	c := newFailoverCluster(t)
	protectBootDisk(t, c, "m", bootdisk.Options{CorruptKernel: true})

	out, err := c.cli("failover", "--machine", "m", "--test", "--to", "qemu", "--boot-check", bootdisk.BootedMarker, "--boot-port", "80", "--boot-timeout", "15s")
	if err == nil {
		t.Fatalf("a drill of a corrupted kernel succeeded:\n%s", out)
	}
	t.Logf("drill: %v\n%s", err, out)
	m := jobStartRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no job id in the output:\n%s", out)
	}
	j := c.job(m[1])
	if j.State != api.JobFailed || !strings.Contains(j.Error, "drill failed") || !strings.Contains(j.Error, "never matched") {
		t.Fatalf("drill job: state %s error %q", j.State, j.Error)
	}
	if !strings.Contains(err.Error(), "never matched") {
		t.Fatalf("the command's error lacks the reason: %v", err)
	}
	var boot *api.JobStep
	for i, st := range j.Steps {
		if st.Name == "m: boot" {
			boot = &j.Steps[i]
		}
	}
	if boot == nil || boot.State != "failed" || !strings.HasPrefix(boot.Detail, "timed out after 15s") {
		t.Fatalf("job %s: boot step %+v, want failed with its reason", j.ID, boot)
	}
	if !hasEvent(c.events("m"), "drill-failed") {
		t.Fatalf("no drill-failed event: %+v", c.events("m"))
	}
	if fs := c.liveFailovers(); len(fs) != 0 {
		t.Fatalf("a failed drill left live failovers: %+v", fs)
	}
}

func hasEvent(es []api.EventJSON, kind string) bool {
	for _, e := range es {
		if e.Kind == kind {
			return true
		}
	}
	return false
}
