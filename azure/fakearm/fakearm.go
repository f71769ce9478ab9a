// Package fakearm is a small in-memory Azure Resource Manager for tests,
// behind the Azure SDK's own fake servers (armcompute/v8/fake,
// armnetwork/v9/fake): the disks, snapshots, NICs, VMs and subnets a
// failover to Azure and its failback use. The azure package's tests reach
// it in process (Options: its Do as the SDK's transport); the end-to-end
// tests of the real binary reach it over HTTPS (Serve, with a token
// endpoint). NewAzurite backs its disks with page blobs in Azurite.
//
// It checks what asr sends and refuses what Azure refuses for the same
// reasons it knows of; it is not Azure, and passing against it says
// nothing of Azure's own validation, quotas or timings.
package fakearm

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	azfake "github.com/Azure/azure-sdk-for-go/sdk/azcore/fake"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8"
	computefake "github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8/fake"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v9"
	networkfake "github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v9/fake"
	"github.com/google/uuid"
)

// Subscription is the fake's subscription: it answers no other.
const Subscription = "11111111-2222-3333-4444-555555555555"

// ARM is a small in-memory Azure Resource Manager behind the SDK's own
// fake servers (armcompute/v8/fake, armnetwork/v9/fake): it keeps the
// disks, NICs and VMs created, returns them on Get, honours deletes, and
// refuses what Azure refuses for the same reason: a disk attached to a VM
// or a NIC in use cannot be deleted, a VM needs existing, unattached disks
// and NICs, a NIC an existing subnet.
type ARM struct {
	t testing.TB

	// ImportCheck, if set, checks a disk import's source (the Azurite tests
	// read the page blob) and returns the disk's size.
	ImportCheck func(ctx context.Context, sourceURI, storageAccountID string) (int64, error)
	// VMFail injects a failure at the VM step: "put" refuses the PUT
	// itself, "provision" creates the VM, attaches its disks and NIC, and
	// fails the operation, as an allocation failure does; "late" answers
	// the PUT with an error but carries it out later, once the VM's
	// delete has found nothing (a create whose caller gave up, landing
	// after the rollback looked).
	VMFail string
	lateVM *lateVM // the PUT "late" holds back
	// GrantSAS, if set, answers a disk's GrantAccess with a read SAS URL
	// (the Azurite tests: of the page blob the disk was imported from);
	// unset, GrantAccess is refused.
	GrantSAS func(d armcompute.Disk) (string, error)
	// SnapshotSAS, if set, freezes a copy of disk d for a snapshot and
	// returns its read SAS URL (Azurite: a blob snapshot of the blob d
	// was imported from); unset, a snapshot's GrantAccess is refused.
	SnapshotSAS func(d armcompute.Disk) (string, error)

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

// New returns a fake ARM with the subnets net-rg/dr-vnet/app and
// net-rg/test-vnet/isolated. Its unexpected requests fail t.
func New(t testing.TB) *ARM {
	f := &ARM{
		t:       t,
		subnets: map[string]armnetwork.Subnet{},
		disks:   map[string]armcompute.Disk{},
		nics:    map[string]armnetwork.Interface{},
		vms:     map[string]armcompute.VirtualMachine{},
		power:   map[string]string{},
		granted: map[string]bool{},
		snaps:   map[string]string{},
	}
	f.AddSubnet("net-rg", "dr-vnet", "app")
	f.AddSubnet("net-rg", "test-vnet", "isolated")
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
func (f *ARM) Do(req *http.Request) (*http.Response, error) {
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

// Options are the ARM client options that reach this fake in process
// (its Do as the transport).
func (f *ARM) Options() *arm.ClientOptions {
	return &arm.ClientOptions{ClientOptions: azcore.ClientOptions{Transport: f}}
}

// Calls counts the requests the fake has answered.
func (f *ARM) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// Writes lists the requests that change something, in order: "PUT
// disks/NAME", "DELETE vms/NAME", "POST disks/NAME/beginGetAccess", ...
func (f *ARM) Writes() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.writes)
}

// ID is the resource ID of name, of type typ, in the fake's subscription.
func (f *ARM) ID(rg, typ, name string) string {
	return fmt.Sprintf("/subscriptions/%s/resourceGroups/%s/providers/%s/%s", Subscription, rg, typ, name)
}

func key(rg, name string) string { return strings.ToLower(rg + "/" + name) }

// AddSubnet makes subnet name of vnet in resource group rg.
func (f *ARM) AddSubnet(rg, vnet, name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.subnets[key(rg, vnet+"/"+name)] = armnetwork.Subnet{
		ID:   to.Ptr(f.ID(rg, "Microsoft.Network/virtualNetworks", vnet+"/subnets/"+name)),
		Name: to.Ptr(name),
	}
}

func (f *ARM) getSubnet(_ context.Context, rg, vnet, name string, _ *armnetwork.SubnetsClientGetOptions) (resp azfake.Responder[armnetwork.SubnetsClientGetResponse], errResp azfake.ErrorResponder) {
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

func (f *ARM) getDisk(_ context.Context, rg, name string, _ *armcompute.DisksClientGetOptions) (resp azfake.Responder[armcompute.DisksClientGetResponse], errResp azfake.ErrorResponder) {
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

func (f *ARM) putDisk(ctx context.Context, rg, name string, d armcompute.Disk, _ *armcompute.DisksClientBeginCreateOrUpdateOptions) (resp azfake.PollerResponder[armcompute.DisksClientCreateOrUpdateResponse], errResp azfake.ErrorResponder) {
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
	if f.ImportCheck != nil {
		var err error
		if size, err = f.ImportCheck(ctx, *cd.CreationData.SourceURI, *cd.CreationData.StorageAccountID); err != nil {
			f.t.Logf("disk %s: import refused: %v", name, err)
			errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
			return
		}
	}
	d.ID = to.Ptr(f.ID(rg, "Microsoft.Compute/disks", name))
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

func (f *ARM) deleteDisk(_ context.Context, rg, name string, _ *armcompute.DisksClientBeginDeleteOptions) (resp azfake.PollerResponder[armcompute.DisksClientDeleteResponse], errResp azfake.ErrorResponder) {
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

func (f *ARM) getNIC(_ context.Context, rg, name string, _ *armnetwork.InterfacesClientGetOptions) (resp azfake.Responder[armnetwork.InterfacesClientGetResponse], errResp azfake.ErrorResponder) {
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

func (f *ARM) putNIC(_ context.Context, rg, name string, n armnetwork.Interface, _ *armnetwork.InterfacesClientBeginCreateOrUpdateOptions) (resp azfake.PollerResponder[armnetwork.InterfacesClientCreateOrUpdateResponse], errResp azfake.ErrorResponder) {
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
	n.ID = to.Ptr(f.ID(rg, "Microsoft.Network/networkInterfaces", name))
	n.Name = to.Ptr(name)
	if deref(ipc.PrivateIPAllocationMethod, "") == armnetwork.IPAllocationMethodDynamic {
		ipc.PrivateIPAddress = to.Ptr(fmt.Sprintf("10.0.0.%d", 4+len(f.nics)))
	}
	f.nics[key(rg, name)] = n
	resp.SetTerminalResponse(http.StatusCreated, armnetwork.InterfacesClientCreateOrUpdateResponse{Interface: n}, nil)
	return
}

func (f *ARM) deleteNIC(_ context.Context, rg, name string, _ *armnetwork.InterfacesClientBeginDeleteOptions) (resp azfake.PollerResponder[armnetwork.InterfacesClientDeleteResponse], errResp azfake.ErrorResponder) {
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

func (f *ARM) getVM(_ context.Context, rg, name string, _ *armcompute.VirtualMachinesClientGetOptions) (resp azfake.Responder[armcompute.VirtualMachinesClientGetResponse], errResp azfake.ErrorResponder) {
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

func (f *ARM) putVM(_ context.Context, rg, name string, vm armcompute.VirtualMachine, opts *armcompute.VirtualMachinesClientBeginCreateOrUpdateOptions) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientCreateOrUpdateResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "PUT vms/"+name)
	if _, ok := f.vms[key(rg, name)]; ok && opts != nil && deref(opts.IfNoneMatch, "") == "*" {
		errResp.SetResponseError(http.StatusPreconditionFailed, "PreconditionFailed")
		return
	}
	if f.VMFail == "put" {
		errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
		return
	}
	if f.VMFail == "late" {
		f.VMFail, f.lateVM = "", &lateVM{rg: rg, name: name, vm: vm}
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
	vm.ID = to.Ptr(f.ID(rg, "Microsoft.Compute/virtualMachines", name))
	vm.Name = to.Ptr(name)
	p.ProvisioningState = to.Ptr("Succeeded")
	// Azure gives each VM a unique id, which its guest sees as the SMBIOS
	// UUID (/sys/class/dmi/id/product_uuid).
	p.VMID = to.Ptr(uuid.NewString())
	if f.VMFail == "provision" {
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
	if f.VMFail == "provision" {
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

func (f *ARM) deleteVM(ctx context.Context, rg, name string, o *armcompute.VirtualMachinesClientBeginDeleteOptions) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientDeleteResponse], errResp azfake.ErrorResponder) {
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

func (f *ARM) deleteVMNow(rg, name string) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientDeleteResponse], errResp azfake.ErrorResponder) {
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
func (f *ARM) lookup(id *string, typ string) (string, bool) {
	if id == nil {
		return "", false
	}
	rid, err := arm.ParseResourceID(*id)
	if err != nil || !strings.EqualFold(rid.ResourceType.String(), typ) || rid.SubscriptionID != Subscription {
		return "", false
	}
	return key(rid.ResourceGroupName, rid.Name), true
}

// Resources lists what exists, sorted: "disk RG/NAME", "nic ...", "vm ...".
func (f *ARM) Resources() []string {
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

// grantAccess answers a disk's read SAS through GrantSAS, recording the
// grant until it is revoked.
func (f *ARM) grantAccess(_ context.Context, rg, name string, g armcompute.GrantAccessData, _ *armcompute.DisksClientBeginGrantAccessOptions) (resp azfake.PollerResponder[armcompute.DisksClientGrantAccessResponse], errResp azfake.ErrorResponder) {
	f.mu.Lock()
	f.writes = append(f.writes, "POST disks/"+name+"/beginGetAccess")
	d, ok := f.disks[key(rg, name)]
	f.mu.Unlock()
	if !ok {
		errResp.SetResponseError(http.StatusNotFound, "ResourceNotFound")
		return
	}
	if deref(g.Access, "") != armcompute.AccessLevelRead || deref(g.DurationInSeconds, 0) <= 0 || f.GrantSAS == nil {
		errResp.SetResponseError(http.StatusBadRequest, "InvalidParameter")
		return
	}
	// As Azure: no SAS on a disk of a VM that is not deallocated.
	if d.ManagedBy != nil {
		k, _ := f.lookup(d.ManagedBy, "Microsoft.Compute/virtualMachines")
		if f.VMPower(strings.SplitN(k, "/", 2)[0], strings.SplitN(k, "/", 2)[1]) != "deallocated" {
			errResp.SetResponseError(http.StatusConflict, "OperationNotAllowed")
			return
		}
	}
	sas, err := f.GrantSAS(d)
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

func (f *ARM) revokeAccess(_ context.Context, rg, name string, _ *armcompute.DisksClientBeginRevokeAccessOptions) (resp azfake.PollerResponder[armcompute.DisksClientRevokeAccessResponse], errResp azfake.ErrorResponder) {
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

// Grants lists the disks ("rg/name") and snapshots ("snapshot rg/name")
// whose read SAS is not revoked.
func (f *ARM) Grants() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for k := range f.granted {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func (f *ARM) instanceView(_ context.Context, rg, name string, _ *armcompute.VirtualMachinesClientInstanceViewOptions) (resp azfake.Responder[armcompute.VirtualMachinesClientInstanceViewResponse], errResp azfake.ErrorResponder) {
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
func (f *ARM) setPower(rg, name, verb, state string) (int, string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, "POST vms/"+name+"/"+verb)
	if _, ok := f.power[key(rg, name)]; !ok {
		return http.StatusNotFound, "ResourceNotFound"
	}
	f.power[key(rg, name)] = state
	return http.StatusOK, ""
}

// VMPower is a VM's power state ("" if there is no VM).
func (f *ARM) VMPower(rg, name string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.power[key(rg, name)]
}

func (f *ARM) deallocate(_ context.Context, rg, name string, _ *armcompute.VirtualMachinesClientBeginDeallocateOptions) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientDeallocateResponse], errResp azfake.ErrorResponder) {
	if code, e := f.setPower(rg, name, "deallocate", "deallocated"); e != "" {
		errResp.SetResponseError(code, e)
		return
	}
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.VirtualMachinesClientDeallocateResponse{}, nil)
	return
}

func (f *ARM) start(_ context.Context, rg, name string, _ *armcompute.VirtualMachinesClientBeginStartOptions) (resp azfake.PollerResponder[armcompute.VirtualMachinesClientStartResponse], errResp azfake.ErrorResponder) {
	if code, e := f.setPower(rg, name, "start", "running"); e != "" {
		errResp.SetResponseError(code, e)
		return
	}
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.VirtualMachinesClientStartResponse{}, nil)
	return
}

func (f *ARM) putSnapshot(_ context.Context, rg, name string, sn armcompute.Snapshot, _ *armcompute.SnapshotsClientBeginCreateOrUpdateOptions) (resp azfake.PollerResponder[armcompute.SnapshotsClientCreateOrUpdateResponse], errResp azfake.ErrorResponder) {
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
	if f.SnapshotSAS != nil {
		var err error
		if sas, err = f.SnapshotSAS(src); err != nil {
			f.t.Logf("snapshot %s: %v", name, err)
			errResp.SetResponseError(http.StatusInternalServerError, "InternalError")
			return
		}
	}
	sn.ID = to.Ptr(f.ID(rg, "Microsoft.Compute/snapshots", name))
	sn.Name = to.Ptr(name)
	f.mu.Lock()
	f.snaps[key(rg, name)] = sas
	f.mu.Unlock()
	resp.AddNonTerminalResponse(http.StatusAccepted, nil)
	resp.SetTerminalResponse(http.StatusOK, armcompute.SnapshotsClientCreateOrUpdateResponse{Snapshot: sn}, nil)
	return
}

func (f *ARM) grantSnapshot(_ context.Context, rg, name string, g armcompute.GrantAccessData, _ *armcompute.SnapshotsClientBeginGrantAccessOptions) (resp azfake.PollerResponder[armcompute.SnapshotsClientGrantAccessResponse], errResp azfake.ErrorResponder) {
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

func (f *ARM) revokeSnapshot(_ context.Context, rg, name string, _ *armcompute.SnapshotsClientBeginRevokeAccessOptions) (resp azfake.PollerResponder[armcompute.SnapshotsClientRevokeAccessResponse], errResp azfake.ErrorResponder) {
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

func (f *ARM) deleteSnapshot(_ context.Context, rg, name string, _ *armcompute.SnapshotsClientBeginDeleteOptions) (resp azfake.PollerResponder[armcompute.SnapshotsClientDeleteResponse], errResp azfake.ErrorResponder) {
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

// Disk returns the disk of resource ID id, if it exists.
func (f *ARM) Disk(id string) (armcompute.Disk, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k, ok := f.lookup(&id, "Microsoft.Compute/disks")
	d, exists := f.disks[k]
	return d, ok && exists
}

// VM returns the VM of resource ID id, if it exists.
func (f *ARM) VM(id string) (armcompute.VirtualMachine, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k, ok := f.lookup(&id, "Microsoft.Compute/virtualMachines")
	vm, exists := f.vms[k]
	return vm, ok && exists
}

// NIC returns the NIC of resource ID id, if it exists.
func (f *ARM) NIC(id string) (armnetwork.Interface, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k, ok := f.lookup(&id, "Microsoft.Network/networkInterfaces")
	n, exists := f.nics[k]
	return n, ok && exists
}

// deref returns *p, or def if p is nil.
func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}
