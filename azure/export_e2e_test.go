//go:build e2e

package azure

import (
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
)

// For the server's failover test (package azure_test): the fake ARM whose
// disk import reads the page blob back from Azurite.

// FakeARM is the in-memory ARM behind the SDK's fake servers.
type FakeARM = fakeARM

// TestSubscription is the fake ARM's subscription.
const TestSubscription = testSub

// NewFakeARM returns a fake ARM with the subnets net-rg/dr-vnet/app and
// net-rg/test-vnet/isolated, importing disks only from fixed-VHD page
// blobs in Azurite; a disk's GrantAccess answers a read SAS of the blob
// it was imported from (refused, as by Azure, unless its VM is
// deallocated), a snapshot's a SAS of a blob snapshot of that blob.
func NewFakeARM(t *testing.T) *FakeARM {
	f := newFakeARM(t)
	a := &azuriteImport{ids: map[string][]byte{}}
	f.importCheck = a.check
	f.grantSAS = azuriteSAS
	f.snapshotSAS = azuriteSnapshotSAS
	return f
}

// Options are the ARM client options that reach the fake.
func (f *fakeARM) Options() *arm.ClientOptions { return f.options() }

// Resources lists what exists: "disk RG/NAME", "nic ...", "vm ...".
func (f *fakeARM) Resources() []string { return f.resources() }

// Grants lists the disks ("RG/NAME") and snapshots ("snapshot RG/NAME")
// whose read SAS was not revoked.
func (f *fakeARM) Grants() []string { return f.grants() }

// VMPower is a VM's power state: "running", "deallocated", "" if none.
func (f *fakeARM) VMPower(rg, name string) string { return f.vmPower(rg, name) }
