//go:build e2e

package azure

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	azfake "github.com/Azure/azure-sdk-for-go/sdk/azcore/fake"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"

	"github.com/asrdr/asr/azure/azuritetest"
	"github.com/asrdr/asr/azure/fakearm"
	"github.com/asrdr/asr/replication"
)

// mustVHD writes a fixed VHD of a raw image of size bytes, filled with
// fill, and returns its path, virtual size and unique ID.
func mustVHD(t *testing.T, dir, name string, size int, fill byte) (string, int64, []byte) {
	t.Helper()
	raw := filepath.Join(dir, name+".img")
	if err := os.WriteFile(raw, bytes.Repeat([]byte{fill}, size), 0o600); err != nil {
		t.Fatal(err)
	}
	path, vsize, err := replication.ConvertToVHD(raw)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, vsize, f[len(f)-replication.VHDFooterSize+68 : len(f)-replication.VHDFooterSize+84]
}

// TestFailoverAzurite: VHDs uploaded to Azurite by UploadVHD, described by
// FailoverDisk, fail over through the fake ARM, whose disk import reads
// the blobs back from Azurite.
func TestFailoverAzurite(t *testing.T) {
	cs := azuritetest.Start(t)
	tg := mustOpen(t, Config{ConnectionString: cs, Container: containerFor(t.TempDir())})
	defer mustCloseTarget(t, tg)
	ctx := t.Context()
	dir := t.TempDir()

	spec := testSpec()
	spec.StorageResourceGroup = "storage-rg"
	var disks []FailoverDisk
	var uniq [][]byte
	var vsizes []int64
	for i, size := range []int{3<<20 + 1000, 2 << 20} {
		path, vsize, id := mustVHD(t, dir, fmt.Sprintf("disk%d", i), size, byte('a'+i))
		name := fmt.Sprintf("failover/web01-%d.vhd", i)
		if _, err := tg.UploadVHD(ctx, path, name); err != nil {
			t.Fatal(err)
		}
		d, err := tg.FailoverDisk(ctx, spec, name, "")
		if err != nil {
			t.Fatalf("FailoverDisk(%s): %v", name, err)
		}
		wantAcct := "/subscriptions/" + testSub + "/resourceGroups/storage-rg/providers/Microsoft.Storage/storageAccounts/" + azuritetest.Account
		if d.StorageAccountID != wantAcct || d.Size != vsize || !strings.HasSuffix(d.BlobURL, "/"+name) || strings.Contains(d.BlobURL, "?") {
			t.Fatalf("FailoverDisk(%s) = %+v; want account %s, size %d", name, d, wantAcct, vsize)
		}
		disks = append(disks, d)
		uniq = append(uniq, id)
		vsizes = append(vsizes, vsize)
	}

	t.Run("FailoverDiskErrors", func(t *testing.T) {
		if _, err := tg.FailoverDisk(ctx, spec, "failover/missing.vhd", ""); !errors.Is(err, replication.ErrNotFound) {
			t.Errorf("a missing blob: %v, want ErrNotFound", err)
		}
		if _, err := tg.cc.NewPageBlobClient("failover/junk").Create(ctx, 1<<20, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := tg.FailoverDisk(ctx, spec, "failover/junk", ""); !errors.Is(err, replication.ErrCorrupt) {
			t.Errorf("a page blob that is no VHD: %v, want ErrCorrupt", err)
		}
		bad := spec
		bad.Subscription = "nope"
		if _, err := tg.FailoverDisk(ctx, bad, "failover/web01-0.vhd", ""); !errors.Is(err, ErrInvalidFailover) {
			t.Errorf("a bad subscription: %v, want ErrInvalidFailover", err)
		}
	})

	t.Run("Failover", func(t *testing.T) {
		f := fakearm.New(t)
		imp := fakearm.NewAzuriteImport()
		f.ImportCheck = imp.Check
		res, _ := mustFailover(t, f, spec, disks)
		checkFailover(t, f, spec, disks, res, "Standard_D4s_v3")
		for i, id := range res.DiskIDs {
			d, _ := f.Disk(id)
			if got := deref(d.Properties.DiskSizeBytes, 0); got != vsizes[i] {
				t.Errorf("disk %d: %d bytes, want the VHD's %d", i, got, vsizes[i])
			}
			if got := imp.ID(disks[i].BlobURL); !bytes.Equal(got, uniq[i]) {
				t.Errorf("disk %d imported the VHD %x, want %x (disk%d.vhd)", i, got, uniq[i], i)
			}
		}
	})

	t.Run("MissingBlob", func(t *testing.T) {
		f := fakearm.New(t)
		imp := fakearm.NewAzuriteImport()
		f.ImportCheck = imp.Check
		ds := append([]FailoverDisk(nil), disks...)
		ds[1].BlobURL = strings.Replace(ds[1].BlobURL, "web01-1.vhd", "web01-9.vhd", 1)
		_, err := FailoverToAzure(ctx, &azfake.TokenCredential{}, f.Options(), spec, ds, nil)
		if err == nil || !strings.Contains(err.Error(), "import disk web01-datadisk-0") {
			t.Fatalf("err %v, want the import of the missing blob failing", err)
		}
		if got := f.Resources(); len(got) != 0 {
			t.Fatalf("left: %v", got)
		}
	})

	t.Run("RollbackAndTestFailover", func(t *testing.T) {
		f := fakearm.New(t)
		f.ImportCheck = fakearm.NewAzuriteImport().Check
		f.VMFail = "provision"
		if _, err := FailoverToAzure(ctx, &azfake.TokenCredential{}, f.Options(), spec, disks, nil); err == nil {
			t.Fatal("failover succeeded with the VM failing")
		}
		if got := f.Resources(); len(got) != 0 {
			t.Fatalf("left after the rollback: %v", got)
		}
		// The blobs stay: a rollback deletes only what it created in
		// ARM, and the upload can be imported again.
		for _, d := range disks {
			bc, err := blob.NewClientWithSharedKeyCredential(d.BlobURL, mustKeyCred(t), nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := bc.GetProperties(ctx, nil); err != nil {
				t.Fatalf("blob %s after the rollback: %v", d.BlobURL, err)
			}
		}

		f.VMFail = ""
		test := spec
		test.Test = true
		test.VNet, test.Subnet = "test-vnet", "isolated"
		// Another name, as a test failover beside the source would have;
		// also, the SDK's fake keeps state for a PUT URL whose operation
		// failed: a second PUT of web01 here got "fake poller response is
		// empty".
		test.VMName = "web01-test"
		res, _ := mustFailover(t, f, test, disks)
		checkFailover(t, f, test, disks, res, "Standard_D4s_v3")
		if err := DeleteFailover(ctx, &azfake.TokenCredential{}, f.Options(), res); err != nil {
			t.Fatal(err)
		}
		if got := f.Resources(); len(got) != 0 {
			t.Fatalf("left after DeleteFailover: %v", got)
		}
	})
}

func mustKeyCred(t *testing.T) *blob.SharedKeyCredential {
	t.Helper()
	c, err := blob.NewSharedKeyCredential(azuritetest.Account, azuritetest.Key)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRecoveredVMAzurite: a failover's VM as failback uses it. Its disks
// are listed in order with the VHDs' sizes; while the VM runs each is read
// from a snapshot (a blob snapshot in Azurite: a write after it is not
// seen), deleted on Close; deallocated, from the disk itself (the page
// blob it was imported from, written into here as the recovered VM
// would), through a read SAS the fake ARM grants, without the VHD footer,
// revoked on Close. The VM deallocates and starts.
func TestRecoveredVMAzurite(t *testing.T) {
	cs := azuritetest.Start(t)
	tg := mustOpen(t, Config{ConnectionString: cs, Container: containerFor(t.TempDir())})
	defer mustCloseTarget(t, tg)
	ctx := t.Context()
	dir := t.TempDir()
	spec := testSpec()
	var disks []FailoverDisk
	for i, size := range []int{2 << 20, 3 << 20} {
		path, _, _ := mustVHD(t, dir, fmt.Sprintf("disk%d", i), size, byte('p'+i))
		name := fmt.Sprintf("failover/app-%d.vhd", i)
		if _, err := tg.UploadVHD(ctx, path, name); err != nil {
			t.Fatal(err)
		}
		d, err := tg.FailoverDisk(ctx, spec, name, "")
		if err != nil {
			t.Fatal(err)
		}
		disks = append(disks, d)
	}
	f := fakearm.NewAzurite(t)
	res, _ := mustFailover(t, f, spec, disks)
	if _, err := OpenRecoveredVM(&azfake.TokenCredential{}, f.Options(), FailoverResult{VMName: "x", Subscription: testSub, Test: true, VMID: "id"}); !errors.Is(err, ErrInvalidFailover) {
		t.Fatalf("a test failover's VM: %v", err)
	}
	vm, err := OpenRecoveredVM(&azfake.TokenCredential{}, f.Options(), res)
	if err != nil {
		t.Fatal(err)
	}
	got, err := vm.Disks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Name != "web01-osdisk" || got[0].Size != 2<<20 || got[1].Name != "web01-datadisk-0" || got[1].Size != 3<<20 {
		t.Fatalf("disks %+v", got)
	}
	// The recovered VM writes into its data disk.
	want := bytes.Repeat([]byte{'q'}, 3<<20)
	copy(want[1<<20:], bytes.Repeat([]byte{'Z'}, 512))
	if _, err := tg.cc.NewPageBlobClient("failover/app-1.vhd").UploadPages(ctx, streaming.NopCloser(bytes.NewReader(want[1<<20:1<<20+512])), blob.HTTPRange{Offset: 1 << 20, Count: 512}, nil); err != nil {
		t.Fatal(err)
	}
	for i, d := range got {
		rc, err := vm.OpenDisk(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		if g := f.Grants(); len(g) != 1 || !strings.HasPrefix(g[0], "snapshot ") {
			t.Fatalf("grants while reading a running VM's disk: %v", g)
		}
		if i == 1 { // after the snapshot: not in what is read
			if _, err := tg.cc.NewPageBlobClient("failover/app-1.vhd").UploadPages(ctx, streaming.NopCloser(bytes.NewReader(make([]byte, 512))), blob.HTTPRange{Offset: 0, Count: 512}, nil); err != nil {
				t.Fatal(err)
			}
		}
		b, err := io.ReadAll(rc)
		if err != nil {
			t.Fatal(err)
		}
		if err := rc.Close(); err != nil {
			t.Fatal(err)
		}
		exp := bytes.Repeat([]byte{byte('p' + i)}, int(d.Size))
		if i == 1 {
			exp = want
		}
		if !bytes.Equal(b, exp) {
			t.Fatalf("disk %s: %d bytes read, not the disk's content", d.Name, len(b))
		}
	}
	if g := f.Grants(); len(g) != 0 {
		t.Fatalf("grants left: %v", g)
	}
	if res := f.Resources(); slices.ContainsFunc(res, func(r string) bool { return strings.HasPrefix(r, "snapshot ") }) {
		t.Fatalf("snapshots left: %v", res)
	}
	// Deallocated: the disk itself, with the write made after the snapshot.
	if _, err := vm.Deallocate(ctx); err != nil {
		t.Fatal(err)
	}
	rc, err := vm.OpenDisk(ctx, got[1])
	if err != nil {
		t.Fatal(err)
	}
	if g := f.Grants(); len(g) != 1 || g[0] != testRG+"/web01-datadisk-0" {
		t.Fatalf("grants while reading a deallocated VM's disk: %v", g)
	}
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Close(); err != nil {
		t.Fatal(err)
	}
	copy(want, make([]byte, 512))
	if !bytes.Equal(b, want) {
		t.Fatal("the deallocated VM's disk: not its content")
	}
	if g := f.Grants(); len(g) != 0 {
		t.Fatalf("grants left: %v", g)
	}
	if _, err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for _, step := range []struct {
		fn    func(context.Context) (bool, error)
		did   bool
		state string
	}{{vm.Deallocate, true, "deallocated"}, {vm.Deallocate, false, "deallocated"}, {vm.Start, true, "running"}, {vm.Start, false, "running"}} {
		did, err := step.fn(ctx)
		if err != nil || did != step.did || f.VMPower(testRG, "web01") != step.state {
			t.Fatalf("power: %v %v, state %s; want %v %s", did, err, f.VMPower(testRG, "web01"), step.did, step.state)
		}
	}
	gone, _ := OpenRecoveredVM(&azfake.TokenCredential{}, f.Options(), FailoverResult{Subscription: testSub, ResourceGroup: testRG, VMName: "nosuchvm", VMID: "x"})
	if _, err := gone.Disks(ctx); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("a missing VM: %v", err)
	}
}
