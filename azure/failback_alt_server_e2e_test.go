//go:build e2e

package azure_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// The alternate location of a committed failover to Azure: the recovered
// VM's managed disk copied into a new VM made through vCenter (govmomi's
// simulator). The disk's size is not a multiple of 1 MiB (the managed
// disk rounded up: the new VM's disk is the machine's first size bytes).
// A refused datastore changes nothing; a cancel during the copy (held in
// the read SAS's grant) and a read that fails during the copy
// (the page blob behind the managed disk cut short) removes the new VM,
// starts the Azure VM again and revokes every read SAS; the next
// failback deallocates the VM, copies its final state (the new VM's flat
// file equals the managed disk's first size bytes), records the failback
// and powers the new VM on. The original disk is not touched. Against
// the fake ARM and Azurite only, never real Azure.
func TestServerFailbackAlternateFromAzure(t *testing.T) {
	const size = 6<<20 + 4096
	r, pb, write, _ := startAzureFailback(t, size)
	c, ctx := r.c, r.ctx
	const pw = "Vc-S3cret-Pw-9117"
	sim, err := vcsim.Start("administrator@vsphere.local", pw)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sim.Close)
	if _, err := c.AddVCenter(ctx, api.AddVCenterRequest{Name: "vc1", URL: sim.URL, User: sim.User, Password: pw, Thumbprint: sim.Thumbprint}); err != nil {
		t.Fatal(err)
	}
	gc, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gc.Logout(context.Background()) })
	fnd := find.NewFinder(gc.Client, true)
	dc, err := fnd.DefaultDatacenter(ctx)
	if err != nil {
		t.Fatal(err)
	}
	fnd.SetDatacenter(dc)
	ds, err := fnd.Datastore(ctx, "LocalDS_0")
	if err != nil {
		t.Fatal(err)
	}
	var mds mo.Datastore
	if err := ds.Properties(ctx, ds.Reference(), []string{"summary"}, &mds); err != nil {
		t.Fatal(err)
	}
	dsDir := mds.Summary.Url
	origSum := fileSum(t, r.disk)
	running := func(when string) {
		t.Helper()
		if p := r.arm.VMPower("net-rg", "web01-recovered"); p != "running" {
			t.Fatalf("the Azure VM %s: %q", when, p)
		}
		if g := r.arm.Grants(); len(g) != 0 {
			t.Fatalf("read SAS not revoked %s: %v", when, g)
		}
		if fos, err := c.Failovers(ctx, false); err != nil || len(fos) != 1 || fos[0].State != "committed" {
			t.Fatalf("the failover %s: %+v %v", when, fos, err)
		}
		if _, err := vcsim.FindVM(ctx, gc, "web01-failback"); err == nil {
			t.Fatalf("a new VM %s", when)
		}
		if _, err := os.Stat(filepath.Join(dsDir, "web01-failback")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("the new VM's folder %s: %v", when, err)
		}
	}
	write(6)

	bad := api.FailbackRequest{Alternate: true, VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: "nosuch"}}
	var se *api.Error
	if _, err := c.FailbackTo(ctx, "web01", bad); !errors.As(err, &se) || se.Status != http.StatusBadRequest {
		t.Fatalf("an alternate failback to a datastore that does not exist: %v", err)
	}
	running("after a refused datastore")

	// Cancelled during the copy, with the VM deallocated: from within
	// the read SAS's grant, which is then refused (a grant that lands
	// after the client gave up and revoked is not handled: not done).
	req := api.FailbackRequest{Alternate: true, VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: "LocalDS_0"}}
	jobID := make(chan string, 1)
	sas := r.arm.GrantSAS
	var power string
	r.arm.GrantSAS = func(armcompute.Disk) (string, error) {
		power = r.arm.VMPower("net-rg", "web01-recovered")
		if _, err := c.CancelJob(ctx, <-jobID); err != nil {
			t.Errorf("cancel the failback during its copy: %v", err)
		}
		return "", errors.New("refused after the cancel")
	}
	j, err := c.FailbackTo(ctx, "web01", req)
	if err != nil {
		t.Fatal(err)
	}
	jobID <- j.ID
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	defer wcancel()
	if j, err = c.WaitJob(wctx, j.ID, nil); err != nil || j.State != api.JobCancelled || !slices.Contains(stepNames(j), "web01: power the recovered VM on again=done") {
		t.Fatalf("a cancelled failback: %v %s %s, steps %v", err, j.State, j.Error, stepNames(j))
	}
	if power != "deallocated" {
		t.Fatalf("the Azure VM during the copy: %q", power)
	}
	r.arm.GrantSAS = sas
	running("after a cancel")

	// The page blob behind the managed disk cut short: the copy's read
	// fails once the VM is deallocated.
	full := blobBytes(t, ctx, pb, -1)
	if _, err := pb.Resize(ctx, 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	j = r.run(t, func() (api.Job, error) { return c.FailbackTo(ctx, "web01", req) })
	if j.State != api.JobFailed || !slices.Contains(stepNames(j), "web01: stop the recovered VM=done") ||
		!slices.Contains(stepNames(j), "web01: power the recovered VM on again=done") {
		t.Fatalf("a failback whose read fails: %s %s, steps %v", j.State, j.Error, stepNames(j))
	}
	t.Logf("the failback whose read fails: %s", j.Error)
	running("after a failed copy")
	if _, err := pb.Resize(ctx, int64(len(full)), nil); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(full); off += 4 << 20 {
		n := min(4<<20, len(full)-off)
		if _, err := pb.UploadPages(ctx, streaming.NopCloser(bytes.NewReader(full[off:off+n])), blob.HTTPRange{Offset: int64(off), Count: int64(n)}, nil); err != nil {
			t.Fatal(err)
		}
	}

	write(4) // the recovered machine runs on
	j = r.run(t, func() (api.Job, error) { return c.FailbackTo(ctx, "web01", req) })
	if j.State != api.JobSucceeded {
		t.Fatalf("the alternate failback: %s %s %v", j.State, j.Error, stepNames(j))
	}
	for _, s := range []string{"web01: stop the recovered VM=done", "web01: find VM web01-recovered=done", "web01: create VM in vc1=done",
		"web01: verify=done", "web01: end the failover=done", "web01: power on=done"} {
		if !slices.Contains(stepNames(j), s) {
			t.Fatalf("steps %v lack %s", stepNames(j), s)
		}
	}
	if len(j.Output) < 3 || !strings.HasPrefix(j.Output[0], "failed back to a new VM: vc1/web01-failback (vm-") ||
		!strings.Contains(j.Output[len(j.Output)-1], "web01-recovered") || !strings.Contains(j.Output[len(j.Output)-1], "stays deallocated") {
		t.Fatalf("alternate failback output %q", j.Output)
	}
	if p := r.arm.VMPower("net-rg", "web01-recovered"); p != "deallocated" {
		t.Fatalf("the Azure VM after the failback: %q", p)
	}
	if g := r.arm.Grants(); len(g) != 0 {
		t.Fatalf("read SAS not revoked: %v", g)
	}
	// Deallocated since its copy: the managed disk's content is what was
	// copied.
	want := sha256.Sum256(blobBytes(t, ctx, pb, size))
	if got := fileSum(t, filepath.Join(dsDir, "web01-failback", "d0-flat.vmdk")); got != want {
		t.Fatal("the new VM's flat file differs from the Azure VM's final disk content")
	}
	vm, err := vcsim.FindVM(ctx, gc, "web01-failback")
	if err != nil {
		t.Fatalf("the new VM: %v", err)
	}
	var mvm mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"runtime.powerState"}, &mvm); err != nil {
		t.Fatal(err)
	}
	if mvm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("the new VM: %s", mvm.Runtime.PowerState)
	}
	if fileSum(t, r.disk) != origSum {
		t.Fatal("an alternate-location failback wrote the original disk")
	}
	all, err := c.Failovers(ctx, true)
	if err != nil || len(all) == 0 || all[0].State != "ended" || all[0].Failback == nil || all[0].Failback.State != "failed-back" ||
		all[0].Failback.VM != "vc1/web01-failback" || all[0].Failback.Compared != size {
		t.Fatalf("the failover after the failback: %+v %v", all, err)
	}
	if _, err := c.FailbackTo(ctx, "web01", req); !errors.As(err, &se) || se.Status != http.StatusConflict {
		t.Fatalf("a second alternate failback: %v", err)
	}
}

// blobBytes reads the first n bytes of a page blob (n < 0: all of it).
func blobBytes(t *testing.T, ctx context.Context, pb *pageblob.Client, n int64) []byte {
	t.Helper()
	var opts blob.DownloadStreamOptions
	if n >= 0 {
		opts.Range = blob.HTTPRange{Count: n}
	}
	dl, err := pb.DownloadStream(ctx, &opts)
	if err != nil {
		t.Fatal(err)
	}
	defer dl.Body.Close()
	b, err := io.ReadAll(dl.Body)
	if err != nil || n >= 0 && int64(len(b)) != n {
		t.Fatalf("read the page blob: %d bytes, %v", len(b), err)
	}
	return b
}

// fileSum is a file's SHA-256.
func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}
