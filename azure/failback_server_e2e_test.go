//go:build e2e

package azure_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server/api"
)

// startAzureFailback starts an azureRig whose disk of size bytes is
// failed over to Azure (a real failover) and committed; pb is the page
// blob standing for the recovered disk; write writes n
// random 64 KiB blocks into the recovered disk (the page blob it was
// imported from, which the fake ARM's read SAS reads), adding to *wrote.
func startAzureFailback(t *testing.T, size int64) (r *azureRig, pb *pageblob.Client, write func(n int), wrote *int64) {
	t.Helper()
	r = startAzureRig(t, int(size))
	c, ctx := r.c, r.ctx
	target := &api.AzureTarget{Subscription: "11111111-2222-3333-4444-555555555555", ResourceGroup: "net-rg", Location: "westeurope", VNet: "dr-vnet", Subnet: "app"}
	if j := r.run(t, func() (api.Job, error) {
		return c.StartFailover(ctx, api.FailoverRequest{Machine: "web01", To: api.ToAzure, Azure: target})
	}); j.State != api.JobSucceeded {
		t.Fatalf("failover to Azure: %s %s", j.State, j.Error)
	}
	fos, err := c.Failovers(ctx, false)
	if err != nil || len(fos) != 1 {
		t.Fatalf("failovers %+v %v", fos, err)
	}
	if j := r.run(t, func() (api.Job, error) { return c.FailoverAction(ctx, "commit", api.FailoverAction{Machine: "web01"}) }); j.State != api.JobSucceeded {
		t.Fatalf("commit: %s %s %v", j.State, j.Error, j.Steps)
	}
	if j, err := c.Failback(ctx, "web01"); err == nil || !strings.Contains(err.Error(), "not reprotected") {
		t.Fatalf("failback before reprotect: %+v %v", j, err)
	}

	// The recovered VM's disk: the page blob the managed disk came from.
	cc, err := container.NewClientFromConnectionString(r.az.ConnString(), "failover-vault", nil)
	if err != nil {
		t.Fatal(err)
	}
	pb = cc.NewPageBlobClient(fmt.Sprintf("failover/web01-%s-d0.vhd", fos[0].ID))
	rnd := rand.New(rand.NewPCG(14, 15))
	wrote = new(int64)
	write = func(n int) {
		t.Helper()
		buf := make([]byte, 65536)
		for range n {
			for i := range buf {
				buf[i] = byte(rnd.IntN(256))
			}
			off := rnd.Int64N(size/65536) * 65536 // within the machine's disk
			if _, err := pb.UploadPages(ctx, streaming.NopCloser(bytes.NewReader(buf)), blob.HTTPRange{Offset: off, Count: 65536}, nil); err != nil {
				t.Fatal(err)
			}
			*wrote += 65536
		}
	}
	return r, pb, write, wrote
}

// The cycle of a failover to Azure through the server: a real failover
// (VM, managed disk imported from the VHD page blob) committed, the
// recovered VM's writes (into the page blob the fake ARM's GrantAccess
// answers a read SAS of: it stands for the managed disk), reprotect
// freezes the original and sends only the blocks that differ (read from
// snapshots of the running VM's disks), more
// writes, failback deallocates the VM, sends what changed, verifies: the
// original disk's SHA-256 equals the recovered disk's. Every read SAS is
// revoked. Run against the fake ARM and Azurite only, never real Azure.
// The disk's size a multiple of 1 MiB (the VHD's size), or not (the
// VHD, hence the managed disk, rounded up: the first size bytes are the
// machine's disk).
func TestServerFailbackFromAzure(t *testing.T) {
	for _, size := range []int64{8 << 20, 6<<20 + 4096} {
		t.Run(fmt.Sprint(size), func(t *testing.T) { testServerFailbackFromAzure(t, size) })
	}
}

func testServerFailbackFromAzure(t *testing.T, size int64) {
	r, pb, write, wp := startAzureFailback(t, size)
	c, ctx := r.c, r.ctx
	write(10)
	j := r.run(t, func() (api.Job, error) { return c.Reprotect(ctx, "web01") })
	if j.State != api.JobSucceeded || len(j.Output) != 2 {
		t.Fatalf("reprotect: %s %s %v %q", j.State, j.Error, j.Steps, j.Output)
	}
	var compared, differ, sent int64
	if _, err := fmt.Sscanf(j.Output[0], "reprotected: %d bytes compared, %d differ, %d bytes sent to the original disks", &compared, &differ, &sent); err != nil {
		t.Fatalf("reprotect output %q: %v", j.Output[0], err)
	}
	if compared != size || sent != differ || sent <= 0 || sent > *wp {
		t.Fatalf("reprotect: %d compared, %d differ, %d sent, for %d bytes written into the recovered disk", compared, differ, sent, *wp)
	}
	if steps := stepNames(j); !slices.Contains(steps, "web01: find VM web01-recovered=done") || !slices.Contains(steps, "web01: compare and send=done") {
		t.Fatalf("reprotect steps %v", steps)
	}
	if p := r.arm.VMPower("net-rg", "web01-recovered"); p != "running" {
		t.Fatalf("the recovered VM after reprotect: %q", p)
	}
	// Reprotect read snapshots of the running VM's disks (Azure grants no
	// SAS on them), deleted after.
	if res := r.arm.Resources(); slices.ContainsFunc(res, func(s string) bool { return strings.HasPrefix(s, "snapshot ") }) || len(r.arm.Grants()) != 0 {
		t.Fatalf("after reprotect: %v, grants %v", res, r.arm.Grants())
	}
	before := *wp
	write(5)
	j = r.run(t, func() (api.Job, error) { return c.Failback(ctx, "web01") })
	if j.State != api.JobSucceeded {
		t.Fatalf("failback: %s %s %v", j.State, j.Error, stepNames(j))
	}
	steps := stepNames(j)
	for _, s := range []string{"web01: stop the recovered VM=done", "web01: send the last changes=done", "web01: verify=done", "web01: end the failover=done"} {
		if !slices.Contains(steps, s) {
			t.Fatalf("failback steps %v lack %s", steps, s)
		}
	}
	var fbSent, fbCompared int64
	if _, err := fmt.Sscanf(j.Output[0], "failed back: %d bytes sent, %d bytes compared", &fbSent, &fbCompared); err != nil {
		t.Fatalf("failback output %q: %v", j.Output, err)
	}
	if fbCompared != size || fbSent-sent <= 0 || fbSent-sent > *wp-before {
		t.Fatalf("failback: %d sent in all (%d at reprotect), %d compared, for %d bytes written since reprotect", fbSent, sent, fbCompared, *wp-before)
	}
	if p := r.arm.VMPower("net-rg", "web01-recovered"); p != "deallocated" {
		t.Fatalf("the recovered VM after failback: %q", p)
	}
	if g := r.arm.Grants(); len(g) != 0 {
		t.Fatalf("read SAS not revoked: %v", g)
	}
	checkOriginalEqualsRecovered(t, r, pb, size)
	if fos, _ := c.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers after failback: %+v", fos)
	}
}

// checkOriginalEqualsRecovered checks that the original disk's SHA-256
// equals the recovered disk's first size bytes.
func checkOriginalEqualsRecovered(t *testing.T, r *azureRig, pb *pageblob.Client, size int64) {
	t.Helper()
	dl, err := pb.DownloadStream(r.ctx, &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: 0, Count: size}})
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	_, err = io.Copy(h, dl.Body)
	dl.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(r.disk)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(orig) != [32]byte(h.Sum(nil)) {
		t.Fatal("the original disk differs from the recovered disk's final state")
	}
}

// A recovery plan holding a machine failed over to Azure (by itself)
// reprotects and fails it back by the failover to Azure's path: the
// plan's reprotect reads snapshots of the running VM's disks and sends
// only what differs; the plan's failback deallocates the VM, sends the
// rest, verifies and switches; the original disk equals the recovered
// one. Against the fake ARM and Azurite only.
func TestServerFailbackPlanFromAzure(t *testing.T) {
	const size = 4 << 20
	r, pb, write, wp := startAzureFailback(t, size)
	c, ctx := r.c, r.ctx
	if _, err := c.CreatePlan(ctx, api.Plan{Name: "az", Groups: []api.PlanGroup{{Machines: []string{"web01"}}}}); err != nil {
		t.Fatal(err)
	}
	write(6)
	j := r.run(t, func() (api.Job, error) { return c.ReprotectPlan(ctx, "az") })
	if j.State != api.JobSucceeded || len(j.Output) != 2 || !strings.HasPrefix(j.Output[0], "plan az reprotected: 1 machine,") {
		t.Fatalf("the plan's reprotect: %s %s %q", j.State, j.Error, j.Output)
	}
	var compared, differ, sent int64
	if _, err := fmt.Sscanf(j.Output[1], "web01: reprotected: %d bytes compared, %d differ, %d bytes sent", &compared, &differ, &sent); err != nil ||
		compared != size || sent != differ || sent <= 0 || sent > *wp {
		t.Fatalf("the plan's reprotect %q (%v): for %d bytes written", j.Output[1], err, *wp)
	}
	write(3)
	j = r.run(t, func() (api.Job, error) { return c.FailbackPlan(ctx, "az") })
	if j.State != api.JobSucceeded || len(j.Output) != 3 || !strings.HasPrefix(j.Output[0], "plan az failed back: 1 machine") ||
		!strings.Contains(j.Output[2], "web01-recovered") {
		t.Fatalf("the plan's failback: %s %s %q %v", j.State, j.Error, j.Output, stepNames(j))
	}
	for _, s := range []string{"group 1: shut down=done", "web01: stop the recovered VM=done", "web01: send the last changes=done", "web01: verify=done", "switch=done", "group 1: power on=done"} {
		if !slices.Contains(stepNames(j), s) {
			t.Fatalf("the plan's failback steps %v lack %s", stepNames(j), s)
		}
	}
	if p := r.arm.VMPower("net-rg", "web01-recovered"); p != "deallocated" {
		t.Fatalf("the recovered VM after the plan's failback: %q", p)
	}
	if g := r.arm.Grants(); len(g) != 0 {
		t.Fatalf("read SAS not revoked: %v", g)
	}
	checkOriginalEqualsRecovered(t, r, pb, size)
	if fos, _ := c.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers after the plan's failback: %+v", fos)
	}
}

func stepNames(j api.Job) []string {
	var out []string
	for _, s := range j.Steps {
		out = append(out, s.Name+"="+s.State)
	}
	return out
}

// A failback of a failover to Azure cancelled before its switch: it waits
// for the original agent (stopped) in its pass, with the VM deallocated;
// the cancel starts the VM again, revokes every read SAS and leaves the
// machine reprotected.
func TestServerFailbackFromAzureCancelled(t *testing.T) {
	r, _, write, _ := startAzureFailback(t, 4<<20)
	c, ctx := r.c, r.ctx
	write(3)
	if j := r.run(t, func() (api.Job, error) { return c.Reprotect(ctx, "web01") }); j.State != api.JobSucceeded {
		t.Fatalf("reprotect: %s %s", j.State, j.Error)
	}
	r.stopAgent()
	j, err := c.Failback(ctx, "web01")
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for waiting := false; !waiting; {
		jj, err := c.Job(wctx, j.ID)
		if err != nil {
			t.Fatalf("the failback never waited for the original agent: %v", err)
		}
		for _, s := range jj.Steps {
			waiting = waiting || s.Name == "web01: send the last changes" && s.State == "running" && strings.Contains(s.Detail, "waiting for the original agent") && jj.Cancellable
		}
		if !waiting {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if p := r.arm.VMPower("net-rg", "web01-recovered"); p != "deallocated" {
		t.Fatalf("the recovered VM during the failback's pass: %q", p)
	}
	if _, err := c.CancelJob(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	if j, err = c.WaitJob(wctx, j.ID, nil); err != nil || j.State == api.JobSucceeded || !slices.Contains(stepNames(j), "web01: power the recovered VM on again=done") {
		t.Fatalf("a cancelled failback: %v %s, steps %v", err, j.State, stepNames(j))
	}
	if p := r.arm.VMPower("net-rg", "web01-recovered"); p != "running" {
		t.Fatalf("the recovered VM after the cancel: %q", p)
	}
	if g := r.arm.Grants(); len(g) != 0 {
		t.Fatalf("read SAS not revoked after the cancel: %v", g)
	}
	if fos, err := c.Failovers(ctx, false); err != nil || len(fos) != 1 || fos[0].Failback == nil || fos[0].Failback.State != "reprotected" {
		t.Fatalf("the failover after the cancel: %+v %v", fos, err)
	}
}

// TestServerFailbackFromAzureRecoveredAgent: after a committed failover
// to Azure, an agent with the original's state and the recovered VM's
// unique id (ARM's vmId) as its BIOS UUID is the reverse source. Its
// disk stands for the VM's managed disk: a local file holding the
// recovered disk's content as the failover left it. Reprotect compares
// through it (the agent's resync against the original disks: its writes
// before reprotect found, no snapshot or read SAS), then its writes reach
// the original disks as they happen; failback freezes and drains it,
// verifies its disk against the original by SHA-256 before the
// deallocation and reads nothing through SAS. Against the fake ARM and
// Azurite only.
func TestServerFailbackFromAzureRecoveredAgent(t *testing.T) {
	const size = 8 << 20
	r, pb, _, _ := startAzureFailback(t, size)
	c, ctx := r.c, r.ctx
	vm, ok := r.arm.VM(r.arm.ID("net-rg", "Microsoft.Compute/virtualMachines", "web01-recovered"))
	if !ok || vm.Properties.VMID == nil {
		t.Fatalf("the recovered VM %+v", vm)
	}
	vmID := *vm.Properties.VMID
	dir := filepath.Dir(r.disk)
	// The recovered VM's disk as the failover made it.
	recDisk := filepath.Join(dir, "recovered0.img")
	dl, err := pb.DownloadStream(ctx, &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: 0, Count: size}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(dl.Body)
	dl.Body.Close()
	if err != nil || len(b) != size {
		t.Fatalf("download the recovered disk: %d bytes, %v", len(b), err)
	}
	if err := os.WriteFile(recDisk, b, 0o600); err != nil {
		t.Fatal(err)
	}
	// The agent's state as the replica carries it (the original agent
	// stopped meanwhile, so that its files are whole).
	r.stopAgent()
	recState := filepath.Join(dir, "recovered-state")
	if err := os.CopyFS(recState, os.DirFS(r.cfg.StateDir)); err != nil {
		t.Fatal(err)
	}
	startRigAgent(t, r.cfg)
	// The guest's writes before its agent started (not in its log):
	// only the compare finds them.
	rnd := rand.New(rand.NewPCG(14, 16))
	var before int64
	for range 4 {
		blk := make([]byte, 65536)
		for i := range blk {
			blk[i] = byte(rnd.IntN(256))
		}
		copy(b[rnd.Int64N(size/65536)*65536:], blk)
		before += 65536
	}
	if err := os.WriteFile(recDisk, b, 0o600); err != nil {
		t.Fatal(err)
	}
	rc := r.cfg
	rc.StateDir, rc.NBD, rc.BIOSUUID = recState, "unix:"+filepath.Join(dir, "recovered.sock"), vmID
	rc.Disks = []agent.DiskSpec{{Name: "d0", Path: recDisk}}
	startRigAgent(t, rc)
	machine := func() api.Machine {
		t.Helper()
		var m api.Machine
		if err := c.Do(ctx, http.MethodGet, "/api/v1/machines/web01", nil, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	waitUntil(t, "the recovered agent taken as the reverse source", func() bool {
		m := machine()
		return m.ReverseSource != nil && m.ReverseSource.Connected && m.Connected
	})
	if m := machine(); m.ReverseSource.VM != "web01-recovered" || m.ReverseSource.BIOSUUID != vmID || m.BIOSUUID == vmID {
		t.Fatalf("machine %+v, reverse source %+v", m, m.ReverseSource)
	}
	var wrote int64
	writeVia := func(n int) {
		t.Helper()
		nc, err := nbd.Dial(ctx, rc.NBD, "d0")
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		buf := make([]byte, 65536)
		for range n {
			for i := range buf {
				buf[i] = byte(rnd.IntN(256))
			}
			if err := nc.WriteAt(buf, rnd.Int64N(size/65536)*65536); err != nil {
				t.Fatalf("write through the recovered agent: %v", err)
			}
			wrote += 65536
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	// Writes before reprotect: on the agent's disk only, found by the
	// compare through it.
	writeVia(6)
	armWrites := len(r.arm.Writes())
	j := r.run(t, func() (api.Job, error) { return c.Reprotect(ctx, "web01") })
	if j.State != api.JobSucceeded || !strings.Contains(strings.Join(j.Output, "\n"), "path: the asr agent in VM web01-recovered") {
		t.Fatalf("reprotect: %s %s %v %q", j.State, j.Error, stepNames(j), j.Output)
	}
	if steps := stepNames(j); !slices.Contains(steps, "web01: compare through the recovered agent=done") || slices.Contains(steps, "web01: compare and send=done") {
		t.Fatalf("reprotect steps %v", steps)
	}
	var compared, differ, sent int64
	if _, err := fmt.Sscanf(j.Output[0], "reprotected: %d bytes compared, %d differ, %d bytes sent to the original disks", &compared, &differ, &sent); err != nil {
		t.Fatalf("reprotect output %q: %v", j.Output[0], err)
	}
	if compared != size || differ < before || sent < wrote+before || sent > 2*(wrote+before) {
		t.Fatalf("reprotect: %d compared, %d in differing chunks, %d sent, for %d bytes written through the agent and %d before it", compared, differ, sent, wrote, before)
	}
	t.Logf("reprotect: %q, %d bytes written through the agent before it, %d before the agent", j.Output, wrote, before)
	// Nothing asked of ARM: no snapshot, no read SAS.
	if w := r.arm.Writes()[armWrites:]; len(w) != 0 {
		t.Fatalf("ARM changes during reprotect through the agent: %v", w)
	}
	fileSum := func(p string) [32]byte {
		t.Helper()
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return sha256.Sum256(b)
	}
	if fileSum(r.disk) != fileSum(recDisk) {
		t.Fatal("the original disk differs from the recovered agent's after reprotect")
	}
	// Writes after it are shipped as they happen.
	writeVia(5)
	waitUntil(t, "the recovered agent's writes on the original, nothing pending", func() bool {
		m := machine()
		return fileSum(r.disk) == fileSum(recDisk) && m.Reverse != nil && m.Reverse.RPOKnown && m.Reverse.Pending == 0
	})
	writeVia(3)
	j = r.run(t, func() (api.Job, error) { return c.Failback(ctx, "web01") })
	if j.State != api.JobSucceeded {
		t.Fatalf("failback: %s %s %v", j.State, j.Error, stepNames(j))
	}
	steps := stepNames(j)
	for _, s := range []string{"web01: freeze and drain the recovered agent=done", "web01: verify through the recovered agent=done", "web01: stop the recovered VM=done", "web01: verify=done", "web01: end the failover=done"} {
		if !slices.Contains(steps, s) {
			t.Fatalf("failback steps %v lack %s", steps, s)
		}
	}
	if slices.Contains(steps, "web01: send the last changes=done") || !strings.Contains(strings.Join(j.Output, "\n"), "no pass over the stopped VM's disks") {
		t.Fatalf("failback read the stopped VM's disks: %v %q", steps, j.Output)
	}
	t.Logf("failback: %q", j.Output)
	var fbSent, fbCompared int64
	if _, err := fmt.Sscanf(j.Output[0], "failed back: %d bytes sent, %d bytes compared", &fbSent, &fbCompared); err != nil {
		t.Fatalf("failback output %q: %v", j.Output, err)
	}
	if fbCompared != size || fbSent < wrote+before || fbSent > 2*(wrote+before) {
		t.Fatalf("failback: %d sent in all, %d compared, for %d bytes written through the agent and %d before it", fbSent, fbCompared, wrote, before)
	}
	if fileSum(r.disk) != fileSum(recDisk) {
		t.Fatal("the original disk differs from the recovered agent's after failback")
	}
	if p := r.arm.VMPower("net-rg", "web01-recovered"); p != "deallocated" {
		t.Fatalf("the recovered VM after failback: %q", p)
	}
	if g := r.arm.Grants(); len(g) != 0 {
		t.Fatalf("read SAS after failback: %v", g)
	}
	if fos, _ := c.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("live failovers after failback: %+v", fos)
	}
}

// waitUntil waits for cond, at most 3 minutes.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
