package azure

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	azfake "github.com/Azure/azure-sdk-for-go/sdk/azcore/fake"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8"
	computefake "github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8/fake"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v9"
	networkfake "github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v9/fake"
)

func init() {
	// The fakes answer at once; the SDK allows a polling interval under a
	// second only in tests.
	pollFrequency = time.Millisecond
}

const (
	testSub = "11111111-2222-3333-4444-555555555555"
	testRG  = "dr-rg"
)

// fakeARM is a small in-memory Azure Resource Manager behind the SDK's own
// fake servers (armcompute/v8/fake, armnetwork/v9/fake): it keeps the
// disks, NICs and VMs created, returns them on Get, honours deletes, and
// refuses what Azure refuses for the same reason: a disk attached to a VM
// or a NIC in use cannot be deleted, a VM needs existing, unattached disks
// and NICs, a NIC an existing subnet.
type fakeARM struct {
	t *testing.T

	// importCheck, if set, checks a disk import's source (the Azurite tests
	// read the page blob) and returns the disk's size.
	importCheck func(ctx context.Context, sourceURI, storageAccountID string) (int64, error)
	// vmFail injects a failure at the VM step: "put" refuses the PUT
	// itself, "provision" creates the VM, attaches its disks and NIC, and
	// fails the operation, as an allocation failure does; "late" answers
	// the PUT with an error but carries it out later, once the VM's
	// delete has found nothing (a create whose caller gave up, landing
	// after the rollback looked).
	vmFail string
	lateVM *lateVM // the PUT "late" holds back
	// grantSAS, if set, answers a disk's GrantAccess with a read SAS URL
	// (the Azurite tests: of the page blob the disk was imported from);
	// unset, GrantAccess is refused.
	grantSAS func(d armcompute.Disk) (string, error)
	// snapshotSAS, if set, freezes a copy of disk d for a snapshot and
	// returns its read SAS URL (Azurite: a blob snapshot of the blob d
	// was imported from); unset, a snapshot's GrantAccess is refused.
	snapshotSAS func(d armcompute.Disk) (string, error)

	mu      sync.Mutex
	calls   int      // every request
	writes  []string // "PUT disks/NAME", "DELETE vms/NAME", ... in order
	subnets map[string]armnetwork.Subnet
	disks   map[string]armcompute.Disk
	nics    map[string]armnetwork.Interface
	vms     map[string]armcompute.VirtualMachine
	power   map[string]string // VM -> "running" | "deallocated"
	granted map[string]bool   // disks and snapshots with a read SAS not revoked
	snaps   map[string]string // snapshot -> its read SAS ("" if none)

	compute, network policy.Transporter
}

func newFakeARM(t *testing.T) *fakeARM {
	f := &fakeARM{
		t:       t,
		subnets: map[string]armnetwork.Subnet{},
		disks:   map[string]armcompute.Disk{},
		nics:    map[string]armnetwork.Interface{},
		vms:     map[string]armcompute.VirtualMachine{},
		power:   map[string]string{},
		granted: map[string]bool{},
		snaps:   map[string]string{},
	}
	f.addSubnet("net-rg", "dr-vnet", "app")
	f.addSubnet("net-rg", "test-vnet", "isolated")
	f.compute = computefake.NewServerFactoryTransport(&computefake.ServerFactory{
		DisksServer: computefake.DisksServer{
			Get:                 f.getDisk,
			BeginCreateOrUpdate: f.putDisk,
			BeginDelete:         f.deleteDisk,
			BeginGrantAccess:    f.grantAccess,
			BeginRevokeAccess:   f.revokeAccess,
		},
		VirtualMachinesServer: computefake.VirtualMachinesServer{
			Get:                 f.getVM,
			BeginCreateOrUpdate: f.putVM,
			BeginDelete:         f.deleteVM,
			InstanceView:        f.instanceView,
			BeginDeallocate:     f.deallocate,
			BeginStart:          f.start,
		},
		SnapshotsServer: computefake.SnapshotsServer{
			BeginCreateOrUpdate: f.putSnapshot,
			BeginGrantAccess:    f.grantSnapshot,
			BeginRevokeAccess:   f.revokeSnapshot,
			BeginDelete:         f.deleteSnapshot,
		},
	})
	f.network = networkfake.NewServerFactoryTransport(&networkfake.ServerFactory{
		InterfacesServer: networkfake.InterfacesServer{
			Get:                 f.getNIC,
			BeginCreateOrUpdate: f.putNIC,
			BeginDelete:         f.deleteNIC,
		},
		SubnetsServer: networkfake.SubnetsServer{Get: f.getSubnet},
	})
	return f
}

// Do routes a request to the compute or the network fake, counting it.
func (f *fakeARM) Do(req *http.Request) (*http.Response, error) {
	f.mu.Lock()
	f.calls++
	f.mu.Unlock()
	switch p := strings.ToLower(req.URL.Path); {
	case strings.Contains(p, "/providers/microsoft.compute/"):
		return f.compute.Do(req)
	case strings.Contains(p, "/providers/microsoft.network/"):
		return f.network.Do(req)
	}
	f.t.Errorf("fake ARM: unexpected request %s %s", req.Method, req.URL)
	return nil, fmt.Errorf("fake ARM: no route for %s", req.URL.Path)
}

// options are the ARM client options that reach this fake.
func (f *fakeARM) options() *arm.ClientOptions {
	return &arm.ClientOptions{ClientOptions: azcore.ClientOptions{Transport: f}}
}

func (f *fakeARM) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func (f *fakeARM) writeLog() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.writes)
}

func (f *fakeARM) id(rg, typ, name string) string {
	return fmt.Sprintf("/subscriptions/%s/resourceGroups/%s/providers/%s/%s", testSub, rg, typ, name)
}

func key(rg, name string) string { return strings.ToLower(rg + "/" + name) }

func (f *fakeARM) addSubnet(rg, vnet, name string) {
	f.subnets[key(rg, vnet+"/"+name)] = armnetwork.Subnet{
		ID:   to.Ptr(f.id(rg, "Microsoft.Network/virtualNetworks", vnet+"/subnets/"+name)),
		Name: to.Ptr(name),
	}
}

func (f *fakeARM) getSubnet(_ context.Context, rg, vnet, name string, _ *armnetwork.SubnetsClientGetOptions) (resp azfake.Responder[armnetwork.SubnetsClientGetResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if name == "forbidden" {
		errResp.SetResponseError(http.StatusForbidden, "AuthorizationFailed")
		return
	}
	s, ok := f.subnets[key(rg, vnet+"/"+name)]
	if !ok {
		errResp.SetResponseError(http.StatusNotFound, "NotFound")
		return
	}
	resp.SetResponse(http.StatusOK, armnetwork.SubnetsClientGetResponse{Subnet: s}, nil)
	return
}

func (f *fakeARM) getDisk(_ context.Context, rg, name string, _ *armcompute.DisksClientGetOptions) (resp azfake.Responder[armcompute.DisksClientGetResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.disks[key(rg, name)]
	if !ok {
		errResp.SetResponseError(http.StatusNotFound, "ResourceNotFound")
		return
	}
	resp.SetResponse(http.StatusOK, armcompute.DisksClientGetResponse{Disk: d}, nil)
	return
}

func (f *fakeARM) putDisk(ctx context.Context, rg, name string, d armcompute.Disk, _ *armcompute.DisksClientBeginCreateOrUpdateOptions) (resp azfake.PollerResponder[armcompute.DisksClientCreateOrUpdateResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	f.writes = append(f.writes, "PUT disks/"+name)
	_, exists := f.disks[key(rg, name)]
	f.mu.Unlock()
	if exists {
		// An import onto an existing disk is an update Azure refuses.
		errResp.SetResponseError(http.StatusConflict, "OperationNotAllowed")
		return
	}
	cd := d.Properties
	if d.Location == nil || cd == nil || cd.CreationData == nil || deref(cd.CreationData.CreateOption, "") != armcompute.DiskCreateOptionImport ||
		deref(cd.CreationData.SourceURI, "") == "" || deref(cd.CreationData.StorageAccountID, "") == "" {
		f.t.Errorf("disk %s: not an import with a source URI and storage account: %+v", name, cd)
		errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
		return
	}
	size := int64(1 << 30)
	if f.importCheck != nil {
		var err error
		if size, err = f.importCheck(ctx, *cd.CreationData.SourceURI, *cd.CreationData.StorageAccountID); err != nil {
			f.t.Logf("disk %s: import refused: %v", name, err)
			errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
			return
		}
	}
	d.ID = to.Ptr(f.id(rg, "Microsoft.Compute/disks", name))
	d.Name = to.Ptr(name)
	cd.DiskSizeBytes = to.Ptr(size)
	cd.DiskState = to.Ptr(armcompute.DiskStateUnattached)
	cd.ProvisioningState = to.Ptr("Succeeded")
	f.mu.Lock()
	f.disks[key(rg, name)] = d
	f.mu.Unlock()
	// An import takes a while: one poll in progress, then done.
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.DisksClientCreateOrUpdateResponse{Disk: d}, nil)
	return
}

func (f *fakeARM) deleteDisk(_ context.Context, rg, name string, _ *armcompute.DisksClientBeginDeleteOptions) (resp azfake.PollerResponder[armcompute.DisksClientDeleteResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "DELETE disks/"+name)
	d, ok := f.disks[key(rg, name)]
	switch {
	case !ok:
		resp.SetTerminalResponse(http.StatusNoContent, armcompute.DisksClientDeleteResponse{}, nil)
	case d.ManagedBy != nil:
		errResp.SetResponseError(http.StatusConflict, "OperationNotAllowed") // attached to a VM
	default:
		delete(f.disks, key(rg, name))
		resp.SetTerminalResponse(http.StatusOK, armcompute.DisksClientDeleteResponse{}, nil)
	}
	return
}

func (f *fakeARM) getNIC(_ context.Context, rg, name string, _ *armnetwork.InterfacesClientGetOptions) (resp azfake.Responder[armnetwork.InterfacesClientGetResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.nics[key(rg, name)]
	if !ok {
		errResp.SetResponseError(http.StatusNotFound, "NotFound")
		return
	}
	resp.SetResponse(http.StatusOK, armnetwork.InterfacesClientGetResponse{Interface: n}, nil)
	return
}

func (f *fakeARM) putNIC(_ context.Context, rg, name string, n armnetwork.Interface, _ *armnetwork.InterfacesClientBeginCreateOrUpdateOptions) (resp azfake.PollerResponder[armnetwork.InterfacesClientCreateOrUpdateResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "PUT nics/"+name)
	if n.Properties == nil || len(n.Properties.IPConfigurations) != 1 || n.Properties.IPConfigurations[0].Properties == nil ||
		n.Properties.IPConfigurations[0].Properties.Subnet == nil {
		errResp.SetResponseError(http.StatusBadRequest, "InvalidRequestFormat")
		return
	}
	ipc := n.Properties.IPConfigurations[0].Properties
	found := false
	for _, s := range f.subnets {
		found = found || strings.EqualFold(*s.ID, deref(ipc.Subnet.ID, ""))
	}
	if !found {
		errResp.SetResponseError(http.StatusBadRequest, "InvalidResourceReference")
		return
	}
	n.ID = to.Ptr(f.id(rg, "Microsoft.Network/networkInterfaces", name))
	n.Name = to.Ptr(name)
	if deref(ipc.PrivateIPAllocationMethod, "") == armnetwork.IPAllocationMethodDynamic {
		ipc.PrivateIPAddress = to.Ptr(fmt.Sprintf("10.0.0.%d", 4+len(f.nics)))
	}
	f.nics[key(rg, name)] = n
	resp.SetTerminalResponse(http.StatusCreated, armnetwork.InterfacesClientCreateOrUpdateResponse{Interface: n}, nil)
	return
}

func (f *fakeARM) deleteNIC(_ context.Context, rg, name string, _ *armnetwork.InterfacesClientBeginDeleteOptions) (resp azfake.PollerResponder[armnetwork.InterfacesClientDeleteResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "DELETE nics/"+name)
	n, ok := f.nics[key(rg, name)]
	switch {
	case !ok:
		resp.SetTerminalResponse(http.StatusNoContent, armnetwork.InterfacesClientDeleteResponse{}, nil)
	case n.Properties.VirtualMachine != nil:
		errResp.SetResponseError(http.StatusBadRequest, "NicInUse")
	default:
		delete(f.nics, key(rg, name))
		resp.SetTerminalResponse(http.StatusOK, armnetwork.InterfacesClientDeleteResponse{}, nil)
	}
	return
}

func (f *fakeARM) getVM(_ context.Context, rg, name string, _ *armcompute.VirtualMachinesClientGetOptions) (resp azfake.Responder[armcompute.VirtualMachinesClientGetResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	vm, ok := f.vms[key(rg, name)]
	if !ok {
		errResp.SetResponseError(http.StatusNotFound, "ResourceNotFound")
		return
	}
	resp.SetResponse(http.StatusOK, armcompute.VirtualMachinesClientGetResponse{VirtualMachine: vm}, nil)
	return
}

func (f *fakeARM) putVM(_ context.Context, rg, name string, vm armcompute.VirtualMachine, opts *armcompute.VirtualMachinesClientBeginCreateOrUpdateOptions) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientCreateOrUpdateResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "PUT vms/"+name)
	if _, ok := f.vms[key(rg, name)]; ok && opts != nil && deref(opts.IfNoneMatch, "") == "*" {
		errResp.SetResponseError(http.StatusPreconditionFailed, "PreconditionFailed")
		return
	}
	if f.vmFail == "put" {
		errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
		return
	}
	if f.vmFail == "late" {
		f.vmFail, f.lateVM = "", &lateVM{rg: rg, name: name, vm: vm}
		errResp.SetResponseError(http.StatusGatewayTimeout, "GatewayTimeout")
		return
	}
	p := vm.Properties
	if p == nil || p.HardwareProfile == nil || p.StorageProfile == nil || p.StorageProfile.OSDisk == nil || p.NetworkProfile == nil {
		errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
		return
	}
	// Every disk and NIC named must exist and be free.
	var diskKeys, nicKeys []string
	refs := []*armcompute.ManagedDiskParameters{p.StorageProfile.OSDisk.ManagedDisk}
	for _, dd := range p.StorageProfile.DataDisks {
		refs = append(refs, dd.ManagedDisk)
	}
	for _, r := range refs {
		k, ok := f.lookup(r.ID, "Microsoft.Compute/disks")
		if d, exists := f.disks[k]; !ok || !exists || d.ManagedBy != nil {
			errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
			return
		}
		diskKeys = append(diskKeys, k)
	}
	for _, r := range p.NetworkProfile.NetworkInterfaces {
		k, ok := f.lookup(r.ID, "Microsoft.Network/networkInterfaces")
		if n, exists := f.nics[k]; !ok || !exists || n.Properties.VirtualMachine != nil {
			errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
			return
		}
		nicKeys = append(nicKeys, k)
	}
	vm.ID = to.Ptr(f.id(rg, "Microsoft.Compute/virtualMachines", name))
	vm.Name = to.Ptr(name)
	p.ProvisioningState = to.Ptr("Succeeded")
	if f.vmFail == "provision" {
		p.ProvisioningState = to.Ptr("Failed")
	}
	f.vms[key(rg, name)] = vm
	f.power[key(rg, name)] = "running" // Azure starts what it creates
	for _, k := range diskKeys {
		d := f.disks[k]
		d.ManagedBy = vm.ID
		d.Properties.DiskState = to.Ptr(armcompute.DiskStateAttached)
		f.disks[k] = d
	}
	for _, k := range nicKeys {
		n := f.nics[k]
		n.Properties.VirtualMachine = &armnetwork.SubResource{ID: vm.ID}
		f.nics[k] = n
	}
	resp.AddNonTerminalResponse(http.StatusCreated, nil)
	if f.vmFail == "provision" {
		resp.SetTerminalError(http.StatusConflict, "AllocationFailed")
		return
	}
	resp.SetTerminalResponse(http.StatusOK, armcompute.VirtualMachinesClientCreateOrUpdateResponse{VirtualMachine: vm}, nil)
	return
}

// lateVM is a VM create the fake carries out after the fact.
type lateVM struct {
	rg, name string
	vm       armcompute.VirtualMachine
}

func (f *fakeARM) deleteVM(ctx context.Context, rg, name string, o *armcompute.VirtualMachinesClientBeginDeleteOptions) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientDeleteResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	late := f.lateVM
	if _, ok := f.vms[key(rg, name)]; ok {
		late = nil
	}
	if late != nil {
		f.lateVM = nil
	}
	f.mu.Unlock()
	resp, errResp = f.deleteVMNow(rg, name)
	if late != nil { // the held-back create lands now that the delete found nothing
		f.putVM(ctx, late.rg, late.name, late.vm, nil)
	}
	return resp, errResp
}

func (f *fakeARM) deleteVMNow(rg, name string) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientDeleteResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "DELETE vms/"+name)
	vm, ok := f.vms[key(rg, name)]
	if !ok {
		resp.SetTerminalResponse(http.StatusNoContent, armcompute.VirtualMachinesClientDeleteResponse{}, nil)
		return
	}
	delete(f.vms, key(rg, name))
	delete(f.power, key(rg, name))
	// Deleting a VM detaches its disks and NICs and leaves them.
	for k, d := range f.disks {
		if d.ManagedBy != nil && strings.EqualFold(*d.ManagedBy, *vm.ID) {
			d.ManagedBy = nil
			d.Properties.DiskState = to.Ptr(armcompute.DiskStateUnattached)
			f.disks[k] = d
		}
	}
	for k, n := range f.nics {
		if n.Properties.VirtualMachine != nil && strings.EqualFold(*n.Properties.VirtualMachine.ID, *vm.ID) {
			n.Properties.VirtualMachine = nil
			f.nics[k] = n
		}
	}
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.VirtualMachinesClientDeleteResponse{}, nil)
	return
}

// lookup turns a resource ID of the given type into a map key.
func (f *fakeARM) lookup(id *string, typ string) (string, bool) {
	if id == nil {
		return "", false
	}
	rid, err := arm.ParseResourceID(*id)
	if err != nil || !strings.EqualFold(rid.ResourceType.String(), typ) || rid.SubscriptionID != testSub {
		return "", false
	}
	return key(rid.ResourceGroupName, rid.Name), true
}

// resources lists what exists, sorted: "disk RG/NAME", "nic ...", "vm ...".
func (f *fakeARM) resources() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for k := range f.disks {
		out = append(out, "disk "+k)
	}
	for k := range f.nics {
		out = append(out, "nic "+k)
	}
	for k := range f.vms {
		out = append(out, "vm "+k)
	}
	for k := range f.snaps {
		out = append(out, "snapshot "+k)
	}
	slices.Sort(out)
	return out
}

func testSpec() FailoverSpec {
	return FailoverSpec{
		Subscription:      testSub,
		ResourceGroup:     testRG,
		Location:          "westeurope",
		VNet:              "dr-vnet",
		Subnet:            "app",
		VNetResourceGroup: "net-rg",
		VMName:            "web01",
		OSType:            "Linux",
		CPUs:              4,
		MemoryMiB:         16 << 10,
	}
}

// testDisks are three disks in the account "drstore": an OS disk and two
// data disks.
func testDisks() []FailoverDisk {
	acct := "/subscriptions/" + testSub + "/resourceGroups/" + testRG + "/providers/Microsoft.Storage/storageAccounts/drstore"
	var ds []FailoverDisk
	for i, size := range []int64{8 << 20, 4 << 20, 2 << 20} {
		ds = append(ds, FailoverDisk{
			BlobURL:          fmt.Sprintf("https://drstore.blob.core.windows.net/vault/failover/web01-%d.vhd", i),
			StorageAccountID: acct,
			Size:             size,
		})
	}
	return ds
}

func mustFailover(t *testing.T, f *fakeARM, spec FailoverSpec, disks []FailoverDisk) (FailoverResult, []string) {
	t.Helper()
	var steps []string
	res, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.options(), spec, disks, func(s string) { steps = append(steps, s) })
	if err != nil {
		t.Fatalf("FailoverToAzure: %v\nsteps:\n%s", err, strings.Join(steps, "\n"))
	}
	return res, steps
}

// checkFailover checks what a successful failover of spec and disks left
// in f: the disks imported from their blobs in order, the OS disk first,
// the NIC in the subnet, the VM with the size, NIC and disks.
func checkFailover(t *testing.T, f *fakeARM, spec FailoverSpec, disks []FailoverDisk, res FailoverResult, wantSize string) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	wantTag := func(what string, tags map[string]*string) {
		t.Helper()
		if deref(tags[TagFailover], "") != "true" {
			t.Errorf("%s: no tag %s=true: %v", what, TagFailover, tags)
		}
		if got := deref(tags[TagTestFailover], ""); (got == "true") != spec.Test {
			t.Errorf("%s: tag %s=%q with Test=%v", what, TagTestFailover, got, spec.Test)
		}
	}
	if len(res.DiskIDs) != len(disks) {
		t.Fatalf("result has %d disks, want %d", len(res.DiskIDs), len(disks))
	}
	for i, want := range disks {
		k, _ := f.lookup(&res.DiskIDs[i], "Microsoft.Compute/disks")
		d, ok := f.disks[k]
		if !ok {
			t.Fatalf("disk %d (%s) does not exist", i, res.DiskIDs[i])
		}
		cd := d.Properties.CreationData
		if got := deref(cd.SourceURI, ""); got != want.BlobURL {
			t.Errorf("disk %d imported from %s, want %s", i, got, want.BlobURL)
		}
		if got := deref(cd.StorageAccountID, ""); got != want.StorageAccountID {
			t.Errorf("disk %d storage account %s, want %s", i, got, want.StorageAccountID)
		}
		if deref(d.Location, "") != spec.Location {
			t.Errorf("disk %d in %v", i, deref(d.Location, ""))
		}
		if i == 0 && deref(d.Properties.OSType, "") != armcompute.OperatingSystemTypes(spec.OSType) {
			t.Errorf("OS disk OS type %v, want %s", deref(d.Properties.OSType, ""), spec.OSType)
		}
		if i > 0 && d.Properties.OSType != nil {
			t.Errorf("data disk %d has an OS type", i)
		}
		wantTag("disk "+k, d.Tags)
	}

	vk, _ := f.lookup(&res.VMID, "Microsoft.Compute/virtualMachines")
	vm, ok := f.vms[vk]
	if !ok || vk != key(spec.ResourceGroup, spec.VMName) {
		t.Fatalf("VM %s (%s) does not exist", spec.VMName, res.VMID)
	}
	wantTag("VM", vm.Tags)
	if got := string(deref(vm.Properties.HardwareProfile.VMSize, "")); got != wantSize || res.Size != wantSize {
		t.Errorf("VM size %s, result %s, want %s", got, res.Size, wantSize)
	}
	sp := vm.Properties.StorageProfile
	if deref(sp.OSDisk.CreateOption, "") != armcompute.DiskCreateOptionTypesAttach || deref(sp.OSDisk.ManagedDisk.ID, "") != res.DiskIDs[0] {
		t.Errorf("OS disk: %s %s, want Attach %s", deref(sp.OSDisk.CreateOption, ""), deref(sp.OSDisk.ManagedDisk.ID, ""), res.DiskIDs[0])
	}
	if len(sp.DataDisks) != len(disks)-1 {
		t.Fatalf("%d data disks, want %d", len(sp.DataDisks), len(disks)-1)
	}
	for i, dd := range sp.DataDisks {
		if deref(dd.Lun, -1) != int32(i) || deref(dd.ManagedDisk.ID, "") != res.DiskIDs[i+1] || deref(dd.CreateOption, "") != armcompute.DiskCreateOptionTypesAttach {
			t.Errorf("data disk %d: LUN %d, %s %s; want LUN %d, Attach %s", i, deref(dd.Lun, -1), deref(dd.CreateOption, ""), deref(dd.ManagedDisk.ID, ""), i, res.DiskIDs[i+1])
		}
	}
	nics := vm.Properties.NetworkProfile.NetworkInterfaces
	if len(nics) != 1 || deref(nics[0].ID, "") != res.NICID {
		t.Fatalf("VM NICs %v, want %s", nics, res.NICID)
	}
	nk, _ := f.lookup(&res.NICID, "Microsoft.Network/networkInterfaces")
	nic, ok := f.nics[nk]
	if !ok {
		t.Fatalf("NIC %s does not exist", res.NICID)
	}
	wantTag("NIC", nic.Tags)
	vnetRG := spec.VNetResourceGroup
	if vnetRG == "" {
		vnetRG = spec.ResourceGroup
	}
	wantSubnet := f.id(vnetRG, "Microsoft.Network/virtualNetworks", spec.VNet+"/subnets/"+spec.Subnet)
	if got := deref(nic.Properties.IPConfigurations[0].Properties.Subnet.ID, ""); got != wantSubnet {
		t.Errorf("NIC in subnet %s, want %s", got, wantSubnet)
	}
	if res.PrivateIP == "" {
		t.Errorf("no private IP in the result")
	}
}

func TestFailover(t *testing.T) {
	f := newFakeARM(t)
	spec, disks := testSpec(), testDisks()
	disks[1].Name = "web01-data"
	res, steps := mustFailover(t, f, spec, disks)
	checkFailover(t, f, spec, disks, res, "Standard_D4s_v3")

	// Disks first, OS disk first, then the NIC, then the VM.
	want := []string{"PUT disks/web01-osdisk", "PUT disks/web01-data", "PUT disks/web01-datadisk-1", "PUT nics/web01-nic", "PUT vms/web01"}
	if got := f.writeLog(); !slices.Equal(got, want) {
		t.Errorf("writes %v, want %v", got, want)
	}
	if len(steps) < 5 || !strings.Contains(steps[len(steps)-1], "created") {
		t.Errorf("progress: %q", steps)
	}

	// A second failover of the same names is refused before it creates
	// anything, and leaves the first alone.
	before := f.resources()
	writes := len(f.writeLog())
	if _, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.options(), spec, disks, nil); !errors.Is(err, ErrExists) {
		t.Fatalf("second failover: %v, want ErrExists", err)
	}
	if got := f.resources(); !slices.Equal(got, before) || len(f.writeLog()) != writes {
		t.Fatalf("the refused failover changed things: %v, writes %v", got, f.writeLog()[writes:])
	}

	// Not a test failover: DeleteFailover refuses it and calls nothing.
	calls := f.callCount()
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.options(), res); !errors.Is(err, ErrNotTest) {
		t.Fatalf("DeleteFailover of a failover: %v, want ErrNotTest", err)
	}
	if f.callCount() != calls {
		t.Fatalf("DeleteFailover of a failover made %d calls", f.callCount()-calls)
	}
	// Nor does it take a result marked Test whose resources are not.
	res.Test = true
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.options(), res); !errors.Is(err, ErrNotTest) {
		t.Fatalf("DeleteFailover of a failover relabelled as a test: %v, want ErrNotTest", err)
	}
	if got := f.resources(); !slices.Equal(got, before) {
		t.Fatalf("DeleteFailover refused but changed things: %v", got)
	}
}

func TestTestFailover(t *testing.T) {
	f := newFakeARM(t)
	spec, disks := testSpec(), testDisks()[:1]
	spec.Test = true
	spec.VNet, spec.Subnet = "test-vnet", "isolated"
	spec.Size = "Standard_B2s"
	spec.OSType = "Windows"
	spec.VMName = "web01-test"
	spec.PrivateIP = "10.1.2.3"
	spec.Tags = map[string]string{"owner": "dr-team"}
	res, _ := mustFailover(t, f, spec, disks)
	checkFailover(t, f, spec, disks, res, "Standard_B2s")
	if res.PrivateIP != "10.1.2.3" {
		t.Errorf("private IP %q, want the static 10.1.2.3", res.PrivateIP)
	}
	f.mu.Lock()
	vm := f.vms[key(testRG, "web01-test")]
	f.mu.Unlock()
	if deref(vm.Tags["owner"], "") != "dr-team" {
		t.Errorf("VM tags %v: the spec's are missing", vm.Tags)
	}

	// DeleteFailover removes everything, VM first, and again is a no-op.
	before := len(f.writeLog())
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.options(), res); err != nil {
		t.Fatal(err)
	}
	if got := f.resources(); len(got) != 0 {
		t.Fatalf("left after DeleteFailover: %v", got)
	}
	want := []string{"DELETE vms/web01-test", "DELETE nics/web01-test-nic", "DELETE disks/web01-test-osdisk"}
	if got := f.writeLog()[before:]; !slices.Equal(got, want) {
		t.Errorf("deletes %v, want %v", got, want)
	}
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.options(), res); err != nil {
		t.Fatalf("DeleteFailover again: %v", err)
	}
}

// TestFailoverRollback: a failure at the VM step deletes the NIC and the
// disks (and the VM, if Azure created it), in reverse order.
func TestFailoverRollback(t *testing.T) {
	for _, fail := range []string{"put", "provision"} {
		t.Run(fail, func(t *testing.T) {
			f := newFakeARM(t)
			f.vmFail = fail
			var steps []string
			_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.options(), testSpec(), testDisks(), func(s string) { steps = append(steps, s) })
			if err == nil {
				t.Fatal("failover succeeded with a failing VM step")
			}
			if !strings.Contains(err.Error(), "create VM") || strings.Contains(err.Error(), "left resources behind") {
				t.Errorf("error: %v", err)
			}
			var re *azcore.ResponseError
			if !errors.As(err, &re) {
				t.Errorf("error %v does not wrap the ResponseError", err)
			}
			if got := f.resources(); len(got) != 0 {
				t.Fatalf("left after the rollback: %v", got)
			}
			want := []string{"PUT disks/web01-osdisk", "PUT disks/web01-datadisk-0", "PUT disks/web01-datadisk-1", "PUT nics/web01-nic", "PUT vms/web01",
				"DELETE vms/web01", "DELETE nics/web01-nic", "DELETE disks/web01-datadisk-1", "DELETE disks/web01-datadisk-0", "DELETE disks/web01-osdisk"}
			if got := f.writeLog(); !slices.Equal(got, want) {
				t.Errorf("writes %v\nwant %v", got, want)
			}
			if !slices.ContainsFunc(steps, func(s string) bool { return strings.HasPrefix(s, "roll back") }) {
				t.Errorf("progress does not report the rollback: %q", steps)
			}
		})
	}
}

// TestFailoverRollbackCancelled: a rollback runs even when the caller's
// context is done.
func TestFailoverRollbackCancelled(t *testing.T) {
	f := newFakeARM(t)
	ctx, cancel := context.WithCancel(t.Context())
	_, err := FailoverToAzure(ctx, &azfake.TokenCredential{}, f.options(), testSpec(), testDisks(), func(s string) {
		if strings.HasPrefix(s, "create VM") {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
	if got := f.resources(); len(got) != 0 {
		t.Fatalf("left after a cancelled failover: %v", got)
	}
}

// TestFailoverRollbackLateCreate: a VM create answered with an error but
// carried out after the rollback's delete of the VM found nothing (the VM
// then holds the disks and NIC, whose deletes fail) is cleaned up by the
// rollback's next round.
func TestFailoverRollbackLateCreate(t *testing.T) {
	f := newFakeARM(t)
	f.vmFail = "late"
	_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.options(), testSpec(), testDisks(), nil)
	if err == nil || strings.Contains(err.Error(), "left resources behind") {
		t.Fatalf("err %v, want the VM's failure and a complete rollback", err)
	}
	if got := f.resources(); len(got) != 0 {
		t.Fatalf("left after a late VM create: %v", got)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if n := strings.Count(strings.Join(f.writes, " "), "DELETE vms/"); n < 2 {
		t.Errorf("the VM was deleted %d times, want a second round after it appeared: %v", n, f.writes)
	}
}

// TestFailoverImportRefused: a disk Azure cannot import stops the failover
// there, and the disks before it are deleted.
func TestFailoverImportRefused(t *testing.T) {
	f := newFakeARM(t)
	f.importCheck = func(_ context.Context, uri, _ string) (int64, error) {
		if strings.HasSuffix(uri, "-1.vhd") {
			return 0, errors.New("not a VHD")
		}
		return 1 << 20, nil
	}
	if _, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.options(), testSpec(), testDisks(), nil); err == nil || !strings.Contains(err.Error(), "import disk web01-datadisk-0") {
		t.Fatalf("err %v, want the import of web01-datadisk-0 failing", err)
	}
	if got := f.resources(); len(got) != 0 {
		t.Fatalf("left: %v", got)
	}
}

func TestFailoverMissingSubnet(t *testing.T) {
	f := newFakeARM(t)
	spec := testSpec()
	spec.Subnet = "nope"
	_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.options(), spec, testDisks(), nil)
	if !isNotFound(err) || !strings.Contains(err.Error(), "subnet dr-vnet/nope") {
		t.Fatalf("err %v, want a not-found subnet", err)
	}
	if len(f.writeLog()) != 0 {
		t.Fatalf("writes: %v", f.writeLog())
	}
}

func TestFailoverForbidden(t *testing.T) {
	f := newFakeARM(t)
	spec := testSpec()
	spec.Subnet = "forbidden"
	_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.options(), spec, testDisks(), nil)
	if !errors.Is(err, ErrARMAuth) || !strings.Contains(err.Error(), "403 AuthorizationFailed") {
		t.Fatalf("err %v, want ErrARMAuth with the status and code", err)
	}
}

// TestFailoverInvalid: bad input is refused, saying what is wrong, before
// any call to Azure.
func TestFailoverInvalid(t *testing.T) {
	tests := []struct {
		name   string
		spec   func(*FailoverSpec)
		disks  func([]FailoverDisk) []FailoverDisk
		errHas string
	}{
		{"subscription", func(s *FailoverSpec) { s.Subscription = "my-sub" }, nil, "subscription"},
		{"subscription uppercase", func(s *FailoverSpec) { s.Subscription = strings.ToUpper(testSub) + "X" }, nil, "subscription"},
		{"no resource group", func(s *FailoverSpec) { s.ResourceGroup = "" }, nil, "resource group"},
		{"resource group ends in a period", func(s *FailoverSpec) { s.ResourceGroup = "rg." }, nil, "resource group"},
		{"resource group slash", func(s *FailoverSpec) { s.ResourceGroup = "a/b" }, nil, "resource group"},
		{"resource group too long", func(s *FailoverSpec) { s.ResourceGroup = strings.Repeat("r", 91) }, nil, "resource group"},
		{"vnet resource group", func(s *FailoverSpec) { s.VNetResourceGroup = "a b" }, nil, "VNet resource group"},
		{"location display name", func(s *FailoverSpec) { s.Location = "West Europe" }, nil, "location"},
		{"no location", func(s *FailoverSpec) { s.Location = "" }, nil, "location"},
		{"vnet", func(s *FailoverSpec) { s.VNet = "-vnet" }, nil, "VNet name"},
		{"subnet", func(s *FailoverSpec) { s.Subnet = "" }, nil, "subnet name"},
		{"os type", func(s *FailoverSpec) { s.OSType = "FreeBSD" }, nil, "OS type"},
		{"no vm name", func(s *FailoverSpec) { s.VMName = "" }, nil, "VM name"},
		{"vm name underscore", func(s *FailoverSpec) { s.VMName = "web_01" }, nil, "VM name"},
		{"vm name ends with hyphen", func(s *FailoverSpec) { s.VMName = "web-" }, nil, "VM name"},
		{"linux vm name too long", func(s *FailoverSpec) { s.VMName = strings.Repeat("a", 65) }, nil, "1 to 64"},
		{"windows vm name too long", func(s *FailoverSpec) { s.OSType, s.VMName = "Windows", "web-server-0001x" }, nil, "1 to 15"},
		{"windows vm name digits", func(s *FailoverSpec) { s.OSType, s.VMName = "Windows", "12345" }, nil, "not all digits"},
		{"windows vm name period", func(s *FailoverSpec) { s.OSType, s.VMName = "Windows", "web.01" }, nil, "VM name"},
		{"size", func(s *FailoverSpec) { s.Size = "Standard D2s v3" }, nil, "VM size"},
		{"too big for a default size", func(s *FailoverSpec) { s.CPUs = 128 }, nil, "set the size"},
		{"generation", func(s *FailoverSpec) { s.HyperVGeneration = "V3" }, nil, "Hyper-V generation"},
		{"disk sku", func(s *FailoverSpec) { s.DiskSKU = "UltraSSD_LRS" }, nil, "disk SKU"},
		{"private ip", func(s *FailoverSpec) { s.PrivateIP = "10.0.0.300" }, nil, "private IP"},
		{"tag", func(s *FailoverSpec) { s.Tags = map[string]string{"a/b": "x"} }, nil, "tag"},
		{"own tag", func(s *FailoverSpec) { s.Tags = map[string]string{TagTestFailover: "false"} }, nil, "failover's own"},
		{"no disks", nil, func([]FailoverDisk) []FailoverDisk { return nil }, "no disks"},
		{"too many disks", nil, func(d []FailoverDisk) []FailoverDisk {
			for len(d) < 66 {
				x := d[0]
				x.BlobURL += fmt.Sprint(len(d))
				d = append(d, x)
			}
			return d
		}, "at most 64 data disks"},
		{"disk name", nil, func(d []FailoverDisk) []FailoverDisk { d[1].Name = "data disk"; return d }, "disk name"},
		{"disk names twice", nil, func(d []FailoverDisk) []FailoverDisk { d[1].Name, d[2].Name = "Data", "data"; return d }, "given twice"},
		{"blob twice", nil, func(d []FailoverDisk) []FailoverDisk { d[2].BlobURL = d[1].BlobURL; return d }, "for two disks"},
		{"blob sas", nil, func(d []FailoverDisk) []FailoverDisk { d[0].BlobURL += "?sv=1&sig=x"; return d }, "blob URL"},
		{"blob http", nil, func(d []FailoverDisk) []FailoverDisk {
			d[0].BlobURL = strings.Replace(d[0].BlobURL, "https:", "http:", 1)
			return d
		}, "plain http"},
		{"blob not a blob", nil, func(d []FailoverDisk) []FailoverDisk {
			d[0].BlobURL = "https://example.com/vault/x.vhd"
			return d
		}, "blob URL"},
		{"storage account id", nil, func(d []FailoverDisk) []FailoverDisk { d[0].StorageAccountID = "drstore"; return d }, "storage account ID"},
		{"storage account of another account", nil, func(d []FailoverDisk) []FailoverDisk {
			d[0].StorageAccountID = strings.Replace(d[0].StorageAccountID, "/drstore", "/other", 1)
			return d
		}, `names account "other"`},
		{"disk size unaligned", nil, func(d []FailoverDisk) []FailoverDisk { d[0].Size += 512; return d }, "1 MiB"},
		{"disk size zero", nil, func(d []FailoverDisk) []FailoverDisk { d[0].Size = 0; return d }, "1 MiB"},
		{"disk too big", nil, func(d []FailoverDisk) []FailoverDisk { d[0].Size = 8 << 40; return d }, "8 TiB"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeARM(t)
			spec, disks := testSpec(), testDisks()
			if tt.spec != nil {
				tt.spec(&spec)
			}
			if tt.disks != nil {
				disks = tt.disks(disks)
			}
			_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.options(), spec, disks, nil)
			if !errors.Is(err, ErrInvalidFailover) || !strings.Contains(err.Error(), tt.errHas) {
				t.Fatalf("err %v, want ErrInvalidFailover saying %q", err, tt.errHas)
			}
			if n := f.callCount(); n != 0 {
				t.Fatalf("%d calls to Azure for an invalid failover", n)
			}
		})
	}
}

// TestFailoverValid: names at the edges of Azure's rules pass.
func TestFailoverValid(t *testing.T) {
	for _, spec := range []func(*FailoverSpec){
		func(s *FailoverSpec) { s.ResourceGroup = "Rg_(prod).é-1" },
		func(s *FailoverSpec) { s.VMName = strings.Repeat("a", 64) },
		func(s *FailoverSpec) { s.VMName = "web.01" },
		func(s *FailoverSpec) { s.OSType, s.VMName = "windows", "web-server-0001" },
		func(s *FailoverSpec) { s.Location = "eastus2" },
		func(s *FailoverSpec) { s.HyperVGeneration, s.DiskSKU = "V2", "Premium_LRS" },
	} {
		s := testSpec()
		spec(&s)
		if _, err := check(s, testDisks()); err != nil {
			t.Errorf("%+v: %v", s, err)
		}
	}
}

func TestDefaultVMSize(t *testing.T) {
	tests := []struct {
		cpus, mem int32
		want      string
	}{
		{0, 0, "Standard_D2s_v3"},
		{1, 2048, "Standard_D2s_v3"},
		{2, 8192, "Standard_D2s_v3"},
		{2, 8193, "Standard_E2s_v3"},
		{4, 16384, "Standard_D4s_v3"},
		{4, 24576, "Standard_E4s_v3"},
		{2, 24576, "Standard_E4s_v3"},
		{6, 4096, "Standard_D8s_v3"},
		{20, 65536, "Standard_E20s_v3"},
		{24, 65536, "Standard_D32s_v3"},
		{64, 432 << 10, "Standard_E64s_v3"},
		{65, 1024, ""},
		{8, 433 << 10, ""},
	}
	for _, tt := range tests {
		got, err := DefaultVMSize(tt.cpus, tt.mem)
		if got != tt.want || (err != nil) != (tt.want == "") {
			t.Errorf("DefaultVMSize(%d, %d) = %q, %v; want %q", tt.cpus, tt.mem, got, err, tt.want)
		}
	}
}

func TestOSTypeFromGuest(t *testing.T) {
	for guest, want := range map[string]string{
		"windows2019srv_64Guest":                 "Windows",
		"Microsoft Windows Server 2019 (64-bit)": "Windows",
		"rhel8_64Guest":                          "Linux",
		"Ubuntu Linux (64-bit)":                  "Linux",
		"":                                       "Linux",
	} {
		if got := OSTypeFromGuest(guest); got != want {
			t.Errorf("OSTypeFromGuest(%q) = %q, want %q", guest, got, want)
		}
	}
}

func TestDeleteFailoverInvalid(t *testing.T) {
	f := newFakeARM(t)
	res := FailoverResult{Subscription: testSub, ResourceGroup: testRG, VMName: "x", Test: true,
		VMID: "/subscriptions/" + testSub + "/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/x"}
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.options(), res); !errors.Is(err, ErrInvalidFailover) {
		t.Fatalf("a NIC's ID as the VM's: %v", err)
	}
	res.VMID = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/x"
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.options(), res); !errors.Is(err, ErrInvalidFailover) {
		t.Fatalf("a VM in another subscription: %v", err)
	}
	if f.callCount() != 0 {
		t.Fatalf("%d calls", f.callCount())
	}
}

// grantAccess answers a disk's read SAS through grantSAS, recording the
// grant until it is revoked.
func (f *fakeARM) grantAccess(_ context.Context, rg, name string, g armcompute.GrantAccessData, _ *armcompute.DisksClientBeginGrantAccessOptions) (resp azfake.PollerResponder[armcompute.DisksClientGrantAccessResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	f.writes = append(f.writes, "POST disks/"+name+"/beginGetAccess")
	d, ok := f.disks[key(rg, name)]
	f.mu.Unlock()
	if !ok {
		errResp.SetResponseError(http.StatusNotFound, "ResourceNotFound")
		return
	}
	if deref(g.Access, "") != armcompute.AccessLevelRead || deref(g.DurationInSeconds, 0) <= 0 || f.grantSAS == nil {
		errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
		return
	}
	// As Azure: no SAS on a disk of a VM that is not deallocated.
	if d.ManagedBy != nil {
		k, _ := f.lookup(d.ManagedBy, "Microsoft.Compute/virtualMachines")
		if f.vmPower(strings.SplitN(k, "/", 2)[0], strings.SplitN(k, "/", 2)[1]) != "deallocated" {
			errResp.SetResponseError(http.StatusConflict, "OperationNotAllowed")
			return
		}
	}
	sas, err := f.grantSAS(d)
	if err != nil {
		f.t.Logf("disk %s: no SAS: %v", name, err)
		errResp.SetResponseError(http.StatusInternalServerError, "InternalError")
		return
	}
	f.mu.Lock()
	f.granted[key(rg, name)] = true
	f.mu.Unlock()
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.DisksClientGrantAccessResponse{AccessURI: armcompute.AccessURI{AccessSAS: to.Ptr(sas)}}, nil)
	return
}

func (f *fakeARM) revokeAccess(_ context.Context, rg, name string, _ *armcompute.DisksClientBeginRevokeAccessOptions) (resp azfake.PollerResponder[armcompute.DisksClientRevokeAccessResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "POST disks/"+name+"/endGetAccess")
	if _, ok := f.disks[key(rg, name)]; !ok {
		errResp.SetResponseError(http.StatusNotFound, "ResourceNotFound")
		return
	}
	delete(f.granted, key(rg, name))
	resp.SetTerminalResponse(http.StatusOK, armcompute.DisksClientRevokeAccessResponse{}, nil)
	return
}

// grants lists the disks whose read SAS is not revoked.
func (f *fakeARM) grants() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for k := range f.granted {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func (f *fakeARM) instanceView(_ context.Context, rg, name string, _ *armcompute.VirtualMachinesClientInstanceViewOptions) (resp azfake.Responder[armcompute.VirtualMachinesClientInstanceViewResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st, ok := f.power[key(rg, name)]
	if !ok {
		errResp.SetResponseError(http.StatusNotFound, "ResourceNotFound")
		return
	}
	resp.SetResponse(http.StatusOK, armcompute.VirtualMachinesClientInstanceViewResponse{VirtualMachineInstanceView: armcompute.VirtualMachineInstanceView{
		Statuses: []*armcompute.InstanceViewStatus{{Code: to.Ptr("ProvisioningState/succeeded")}, {Code: to.Ptr("PowerState/" + st)}}}}, nil)
	return
}

// setPower moves a VM to state, as a deallocate or a start does.
func (f *fakeARM) setPower(rg, name, verb, state string) (int, string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "POST vms/"+name+"/"+verb)
	if _, ok := f.power[key(rg, name)]; !ok {
		return http.StatusNotFound, "ResourceNotFound"
	}
	f.power[key(rg, name)] = state
	return http.StatusOK, ""
}

// vmPower is a VM's power state ("" if there is no VM).
func (f *fakeARM) vmPower(rg, name string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.power[key(rg, name)]
}

func (f *fakeARM) deallocate(_ context.Context, rg, name string, _ *armcompute.VirtualMachinesClientBeginDeallocateOptions) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientDeallocateResponse], errResp azfake.ErrorResponder) {
	if code, e := f.setPower(rg, name, "deallocate", "deallocated"); e != "" {
		errResp.SetResponseError(code, e)
		return
	}
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.VirtualMachinesClientDeallocateResponse{}, nil)
	return
}

func (f *fakeARM) start(_ context.Context, rg, name string, _ *armcompute.VirtualMachinesClientBeginStartOptions) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientStartResponse], errResp azfake.ErrorResponder) {
	if code, e := f.setPower(rg, name, "start", "running"); e != "" {
		errResp.SetResponseError(code, e)
		return
	}
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.VirtualMachinesClientStartResponse{}, nil)
	return
}

func (f *fakeARM) putSnapshot(_ context.Context, rg, name string, sn armcompute.Snapshot, _ *armcompute.SnapshotsClientBeginCreateOrUpdateOptions) (resp azfake.PollerResponder[armcompute.SnapshotsClientCreateOrUpdateResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	f.writes = append(f.writes, "PUT snapshots/"+name)
	_, exists := f.snaps[key(rg, name)]
	var cd *armcompute.CreationData
	if sn.Properties != nil {
		cd = sn.Properties.CreationData
	}
	var src armcompute.Disk
	ok := false
	if cd != nil && deref(cd.CreateOption, "") == armcompute.DiskCreateOptionCopy {
		if k, isDisk := f.lookup(cd.SourceResourceID, "Microsoft.Compute/disks"); isDisk {
			src, ok = f.disks[k]
		}
	}
	f.mu.Unlock()
	if exists || !ok || sn.Location == nil {
		errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
		return
	}
	sas := ""
	if f.snapshotSAS != nil {
		var err error
		if sas, err = f.snapshotSAS(src); err != nil {
			f.t.Logf("snapshot %s: %v", name, err)
			errResp.SetResponseError(http.StatusInternalServerError, "InternalError")
			return
		}
	}
	sn.ID = to.Ptr(f.id(rg, "Microsoft.Compute/snapshots", name))
	sn.Name = to.Ptr(name)
	f.mu.Lock()
	f.snaps[key(rg, name)] = sas
	f.mu.Unlock()
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.SnapshotsClientCreateOrUpdateResponse{Snapshot: sn}, nil)
	return
}

func (f *fakeARM) grantSnapshot(_ context.Context, rg, name string, g armcompute.GrantAccessData, _ *armcompute.SnapshotsClientBeginGrantAccessOptions) (resp azfake.PollerResponder[armcompute.SnapshotsClientGrantAccessResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "POST snapshots/"+name+"/beginGetAccess")
	sas, ok := f.snaps[key(rg, name)]
	if !ok {
		errResp.SetResponseError(http.StatusNotFound, "ResourceNotFound")
		return
	}
	if deref(g.Access, "") != armcompute.AccessLevelRead || deref(g.DurationInSeconds, 0) <= 0 || sas == "" {
		errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
		return
	}
	f.granted["snapshot "+key(rg, name)] = true
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.SnapshotsClientGrantAccessResponse{AccessURI: armcompute.AccessURI{AccessSAS: to.Ptr(sas)}}, nil)
	return
}

func (f *fakeARM) revokeSnapshot(_ context.Context, rg, name string, _ *armcompute.SnapshotsClientBeginRevokeAccessOptions) (resp azfake.PollerResponder[armcompute.SnapshotsClientRevokeAccessResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "POST snapshots/"+name+"/endGetAccess")
	if _, ok := f.snaps[key(rg, name)]; !ok {
		errResp.SetResponseError(http.StatusNotFound, "ResourceNotFound")
		return
	}
	delete(f.granted, "snapshot "+key(rg, name))
	resp.SetTerminalResponse(http.StatusOK, armcompute.SnapshotsClientRevokeAccessResponse{}, nil)
	return
}

func (f *fakeARM) deleteSnapshot(_ context.Context, rg, name string, _ *armcompute.SnapshotsClientBeginDeleteOptions) (resp azfake.PollerResponder[armcompute.SnapshotsClientDeleteResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "DELETE snapshots/"+name)
	switch _, ok := f.snaps[key(rg, name)]; {
	case !ok:
		resp.SetTerminalResponse(http.StatusNoContent, armcompute.SnapshotsClientDeleteResponse{}, nil)
	case f.granted["snapshot "+key(rg, name)]:
		errResp.SetResponseError(http.StatusConflict, "OperationNotAllowed") // its SAS is active
	default:
		delete(f.snaps, key(rg, name))
		resp.SetTerminalResponse(http.StatusOK, armcompute.SnapshotsClientDeleteResponse{}, nil)
	}
	return
}
