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
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	azfake "github.com/Azure/azure-sdk-for-go/sdk/azcore/fake"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"

	"github.com/asrdr/asr/azure/azuritetest"
	"github.com/asrdr/asr/replication"
)

// azuriteImport makes the fake ARM's disk import read the source the way
// Azure does: the page blob must exist in Azurite, in the account the
// storage account ID names, and be a fixed VHD of its own size; the disk's
// size is the VHD's. It records each imported blob's VHD unique ID (footer
// bytes 68-84), so a test can tell which file became which disk.
type azuriteImport struct {
	mu  sync.Mutex
	ids map[string][]byte // source URI -> VHD unique ID
}

func (a *azuriteImport) check(ctx context.Context, uri, accountID string) (int64, error) {
	rid, err := arm.ParseResourceID(accountID)
	if err != nil || rid.Name != azuritetest.Account {
		return 0, fmt.Errorf("storage account %s is not Azurite's %s", accountID, azuritetest.Account)
	}
	cred, err := blob.NewSharedKeyCredential(azuritetest.Account, azuritetest.Key)
	if err != nil {
		return 0, err
	}
	bc, err := blob.NewClientWithSharedKeyCredential(uri, cred, nil)
	if err != nil {
		return 0, err
	}
	props, err := bc.GetProperties(ctx, nil)
	if err != nil {
		return 0, err
	}
	if deref(props.BlobType, "") != blob.BlobTypePageBlob {
		return 0, fmt.Errorf("%s is a %v, not a page blob", uri, deref(props.BlobType, ""))
	}
	size := deref(props.ContentLength, 0)
	if size < replication.VHDFooterSize {
		return 0, fmt.Errorf("%s: %d bytes", uri, size)
	}
	resp, err := bc.DownloadStream(ctx, &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: size - replication.VHDFooterSize, Count: replication.VHDFooterSize}})
	if err != nil {
		return 0, err
	}
	footer, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return 0, err
	}
	vsize, err := replication.CheckVHDFooter(footer)
	if err != nil {
		return 0, err
	}
	if vsize != size-replication.VHDFooterSize || vsize%replication.VHDAlign != 0 {
		return 0, fmt.Errorf("%s: VHD of %d bytes in a blob of %d", uri, vsize, size)
	}
	a.mu.Lock()
	a.ids[uri] = footer[68:84]
	a.mu.Unlock()
	return vsize, nil
}

// azuriteSAS is the fake ARM's GrantAccess on Azurite: a read SAS URL of
// the page blob disk d was imported from, which stands for the managed
// disk (a test writes into it as the recovered VM would into its disk).
func azuriteSAS(d armcompute.Disk) (string, error) {
	if d.Properties == nil || d.Properties.CreationData == nil || d.Properties.CreationData.SourceURI == nil {
		return "", fmt.Errorf("disk %s was not imported from a blob", deref(d.Name, ""))
	}
	cred, err := blob.NewSharedKeyCredential(azuritetest.Account, azuritetest.Key)
	if err != nil {
		return "", err
	}
	bc, err := blob.NewClientWithSharedKeyCredential(*d.Properties.CreationData.SourceURI, cred, nil)
	if err != nil {
		return "", err
	}
	return bc.GetSASURL(sas.BlobPermissions{Read: true}, time.Now().Add(time.Hour), nil)
}

// azuriteSnapshotSAS is the fake ARM's snapshot of disk d on Azurite: a
// blob snapshot of the page blob d was imported from (a frozen copy), and
// a read SAS URL of it.
func azuriteSnapshotSAS(d armcompute.Disk) (string, error) {
	if d.Properties == nil || d.Properties.CreationData == nil || d.Properties.CreationData.SourceURI == nil {
		return "", fmt.Errorf("disk %s was not imported from a blob", deref(d.Name, ""))
	}
	cred, err := blob.NewSharedKeyCredential(azuritetest.Account, azuritetest.Key)
	if err != nil {
		return "", err
	}
	bc, err := blob.NewClientWithSharedKeyCredential(*d.Properties.CreationData.SourceURI, cred, nil)
	if err != nil {
		return "", err
	}
	r, err := bc.CreateSnapshot(context.Background(), nil)
	if err != nil {
		return "", err
	}
	sc, err := bc.WithSnapshot(deref(r.Snapshot, ""))
	if err != nil {
		return "", err
	}
	return sc.GetSASURL(sas.BlobPermissions{Read: true}, time.Now().Add(time.Hour), nil)
}

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
		f := newFakeARM(t)
		imp := &azuriteImport{ids: map[string][]byte{}}
		f.importCheck = imp.check
		res, _ := mustFailover(t, f, spec, disks)
		checkFailover(t, f, spec, disks, res, "Standard_D4s_v3")
		f.mu.Lock()
		defer f.mu.Unlock()
		for i, id := range res.DiskIDs {
			k, _ := f.lookup(&id, "Microsoft.Compute/disks")
			d := f.disks[k]
			if got := deref(d.Properties.DiskSizeBytes, 0); got != vsizes[i] {
				t.Errorf("disk %d: %d bytes, want the VHD's %d", i, got, vsizes[i])
			}
			if got := imp.ids[disks[i].BlobURL]; !bytes.Equal(got, uniq[i]) {
				t.Errorf("disk %d imported the VHD %x, want %x (disk%d.vhd)", i, got, uniq[i], i)
			}
		}
	})

	t.Run("MissingBlob", func(t *testing.T) {
		f := newFakeARM(t)
		imp := &azuriteImport{ids: map[string][]byte{}}
		f.importCheck = imp.check
		ds := append([]FailoverDisk(nil), disks...)
		ds[1].BlobURL = strings.Replace(ds[1].BlobURL, "web01-1.vhd", "web01-9.vhd", 1)
		_, err := FailoverToAzure(ctx, &azfake.TokenCredential{}, f.options(), spec, ds, nil)
		if err == nil || !strings.Contains(err.Error(), "import disk web01-datadisk-0") {
			t.Fatalf("err %v, want the import of the missing blob failing", err)
		}
		if got := f.resources(); len(got) != 0 {
			t.Fatalf("left: %v", got)
		}
	})

	t.Run("RollbackAndTestFailover", func(t *testing.T) {
		f := newFakeARM(t)
		f.importCheck = (&azuriteImport{ids: map[string][]byte{}}).check
		f.vmFail = "provision"
		if _, err := FailoverToAzure(ctx, &azfake.TokenCredential{}, f.options(), spec, disks, nil); err == nil {
			t.Fatal("failover succeeded with the VM failing")
		}
		if got := f.resources(); len(got) != 0 {
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

		f.vmFail = ""
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
		if err := DeleteFailover(ctx, &azfake.TokenCredential{}, f.options(), res); err != nil {
			t.Fatal(err)
		}
		if got := f.resources(); len(got) != 0 {
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
	f := NewFakeARM(t)
	res, _ := mustFailover(t, f, spec, disks)
	if _, err := OpenRecoveredVM(&azfake.TokenCredential{}, f.options(), FailoverResult{VMName: "x", Subscription: testSub, Test: true, VMID: "id"}); !errors.Is(err, ErrInvalidFailover) {
		t.Fatalf("a test failover's VM: %v", err)
	}
	vm, err := OpenRecoveredVM(&azfake.TokenCredential{}, f.options(), res)
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
		if g := f.grants(); len(g) != 1 || !strings.HasPrefix(g[0], "snapshot ") {
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
	if g := f.grants(); len(g) != 0 {
		t.Fatalf("grants left: %v", g)
	}
	if res := f.resources(); slices.ContainsFunc(res, func(r string) bool { return strings.HasPrefix(r, "snapshot ") }) {
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
	if g := f.grants(); len(g) != 1 || g[0] != testRG+"/web01-datadisk-0" {
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
	if g := f.grants(); len(g) != 0 {
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
		if err != nil || did != step.did || f.vmPower(testRG, "web01") != step.state {
			t.Fatalf("power: %v %v, state %s; want %v %s", did, err, f.vmPower(testRG, "web01"), step.did, step.state)
		}
	}
	gone, _ := OpenRecoveredVM(&azfake.TokenCredential{}, f.options(), FailoverResult{Subscription: testSub, ResourceGroup: testRG, VMName: "nosuchvm", VMID: "x"})
	if _, err := gone.Disks(ctx); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("a missing VM: %v", err)
	}
}
