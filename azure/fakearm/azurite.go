package fakearm

import (
	"context"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"

	"github.com/asrdr/asr/azure/azuritetest"
	"github.com/asrdr/asr/replication"
)

// NewAzurite returns a fake ARM (New) importing disks only from fixed-VHD
// page blobs in Azurite (AzuriteImport); a disk's GrantAccess answers a
// read SAS of the blob it was imported from (refused, as by Azure, unless
// its VM is deallocated), a snapshot's a SAS of a blob snapshot of that
// blob. The blob stands for the managed disk: a test writes into it as
// the recovered VM would.
func NewAzurite(t testing.TB) *ARM {
	f := New(t)
	f.ImportCheck = NewAzuriteImport().Check
	f.GrantSAS = AzuriteSAS
	f.SnapshotSAS = AzuriteSnapshotSAS
	return f
}

// NewAzuriteImport returns an empty AzuriteImport.
func NewAzuriteImport() *AzuriteImport { return &AzuriteImport{ids: map[string][]byte{}} }

// ID is the VHD unique ID of the blob imported from uri (nil if none).
func (a *AzuriteImport) ID(uri string) []byte {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ids[uri]
}

// AzuriteImport makes the fake ARM's disk import read the source the way
// Azure does: the page blob must exist in Azurite, in the account the
// storage account ID names, and be a fixed VHD of its own size; the disk's
// size is the VHD's. It records each imported blob's VHD unique ID (footer
// bytes 68-84), so a test can tell which file became which disk.
type AzuriteImport struct {
	mu  sync.Mutex
	ids map[string][]byte // source URI -> VHD unique ID
}

// Check is the fake's ImportCheck on Azurite.
func (a *AzuriteImport) Check(ctx context.Context, uri, accountID string) (int64, error) {
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

// AzuriteSAS is the fake ARM's GrantAccess on Azurite: a read SAS URL of
// the page blob disk d was imported from, which stands for the managed
// disk (a test writes into it as the recovered VM would into its disk).
func AzuriteSAS(d armcompute.Disk) (string, error) {
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

// AzuriteSnapshotSAS is the fake ARM's snapshot of disk d on Azurite: a
// blob snapshot of the page blob d was imported from (a frozen copy), and
// a read SAS URL of it.
func AzuriteSnapshotSAS(d armcompute.Disk) (string, error) {
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
