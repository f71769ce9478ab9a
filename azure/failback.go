package azure

// Failback of a failover to Azure (server/failback_vsphere.go's
// recoveredVM, its Azure side): the recovered machine is the VM
// FailoverToAzure created; its disks are managed disks. Failback reads
// each one in order through a read SAS that ARM grants on it
// (Disks.GrantAccess: the disk's VHD as a page blob), revokes the access
// once read, and stops the VM by deallocating it (or starts it again when
// a failback does not switch).
//
// Status: run only against the Azure SDK's fake ARM servers, whose
// GrantAccess answers a SAS URL of a page blob in Azurite, never against
// real Azure. Known difference: Azure refuses a read SAS on a disk
// attached to a running VM, so reprotect's pass, which reads the disks
// while the recovered VM runs, would need a snapshot of each disk there
// (not done); failback's pass runs with the VM deallocated, which Azure
// allows.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"

	"github.com/asrdr/asr/replication"
)

// grantSeconds is how long a disk's read SAS lasts: long enough to read a
// large disk once (4 TiB at 300 MB/s).
const grantSeconds = 4 * 3600

// RecoveredVM is a failover's VM in Azure, as failback uses it.
type RecoveredVM struct {
	c        *armClients
	rg, name string
}

// RecoveredDisk is one managed disk of a recovered VM: its name, resource
// group and size (the VHD's virtual size, without the footer).
type RecoveredDisk struct {
	Name, ResourceGroup string
	Size                int64
}

// OpenRecoveredVM returns the VM of a failover's result (no call made).
// A test failover's VM, or a result without a VM, is refused.
func OpenRecoveredVM(cred azcore.TokenCredential, opts *arm.ClientOptions, res FailoverResult) (*RecoveredVM, error) {
	if res.Test || res.VMID == "" {
		return nil, fmt.Errorf("%w: failover %s made no VM to fail back from (a test failover, or none recorded)", ErrInvalidFailover, res.VMName)
	}
	if err := checkSubscription(res.Subscription); err != nil {
		return nil, err
	}
	c, err := newARMClients(res.Subscription, cred, opts)
	if err != nil {
		return nil, err
	}
	return &RecoveredVM{c: c, rg: res.ResourceGroup, name: res.VMName}, nil
}

// ResourceGroup is the VM's resource group.
func (v *RecoveredVM) ResourceGroup() string { return v.rg }

// String names the VM: "RG/NAME".
func (v *RecoveredVM) String() string { return v.rg + "/" + v.name }

// Disks returns the VM's managed disks, the OS disk first, then the data
// disks by LUN (the order FailoverToAzure attached them), each with its
// size. A missing VM wraps replication.ErrNotFound; a disk that is not a
// managed disk is an error.
func (v *RecoveredVM) Disks(ctx context.Context) ([]RecoveredDisk, error) {
	r, err := v.c.vms.Get(ctx, v.rg, v.name, nil)
	if isNotFound(err) {
		return nil, fmt.Errorf("VM %s: %w", v, replication.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", v, armError(err))
	}
	p := r.Properties
	if p == nil || p.StorageProfile == nil || p.StorageProfile.OSDisk == nil {
		return nil, fmt.Errorf("VM %s: Azure returned no storage profile", v)
	}
	refs := []*armcompute.ManagedDiskParameters{p.StorageProfile.OSDisk.ManagedDisk}
	dds := slices.Clone(p.StorageProfile.DataDisks)
	slices.SortFunc(dds, func(a, b *armcompute.DataDisk) int { return int(deref(a.Lun, 0) - deref(b.Lun, 0)) })
	for _, dd := range dds {
		refs = append(refs, dd.ManagedDisk)
	}
	var out []RecoveredDisk
	for i, ref := range refs {
		if ref == nil || ref.ID == nil {
			return nil, fmt.Errorf("VM %s: disk %d is not a managed disk", v, i)
		}
		rid, err := arm.ParseResourceID(*ref.ID)
		if err != nil || !strings.EqualFold(rid.ResourceType.String(), "Microsoft.Compute/disks") {
			return nil, fmt.Errorf("VM %s: disk %d: %q is not a managed disk's ID", v, i, *ref.ID)
		}
		d, err := v.c.disks.Get(ctx, rid.ResourceGroupName, rid.Name, nil)
		if err != nil {
			return nil, fmt.Errorf("VM %s: disk %s: %w", v, rid.Name, armError(err))
		}
		size := int64(0)
		if d.Properties != nil {
			size = deref(d.Properties.DiskSizeBytes, 0)
		}
		if size <= 0 || size%replication.VHDAlign != 0 {
			return nil, fmt.Errorf("VM %s: disk %s: Azure says %d bytes", v, rid.Name, size)
		}
		out = append(out, RecoveredDisk{Name: rid.Name, ResourceGroup: rid.ResourceGroupName, Size: size})
	}
	return out, nil
}

// OpenDisk grants read access to disk d and returns a reader of its
// d.Size bytes, in order (the VHD's footer, after them, is not read).
// Close revokes the access; it must be called.
func (v *RecoveredVM) OpenDisk(ctx context.Context, d RecoveredDisk) (io.ReadCloser, error) {
	p, err := v.c.disks.BeginGrantAccess(ctx, d.ResourceGroup, d.Name, armcompute.GrantAccessData{
		Access: to.Ptr(armcompute.AccessLevelRead), DurationInSeconds: to.Ptr(int32(grantSeconds))}, nil)
	var r armcompute.DisksClientGrantAccessResponse
	if err == nil {
		r, err = p.PollUntilDone(ctx, pollOptions())
	}
	if err != nil {
		return nil, fmt.Errorf("grant read access to disk %s: %w", d.Name, armError(err))
	}
	rc := &diskReader{v: v, d: d}
	sas := deref(r.AccessSAS, "")
	if sas == "" {
		return nil, errors.Join(fmt.Errorf("grant read access to disk %s: Azure returned no SAS", d.Name), rc.revoke())
	}
	bc, err := blob.NewClientWithNoCredential(sas, nil)
	var dl blob.DownloadStreamResponse
	if err == nil {
		dl, err = bc.DownloadStream(ctx, &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: 0, Count: d.Size}})
	}
	if err != nil {
		return nil, errors.Join(fmt.Errorf("read disk %s: %w", d.Name, azError(err)), rc.revoke())
	}
	if n := deref(dl.ContentLength, -1); n != d.Size {
		dl.Body.Close()
		return nil, errors.Join(fmt.Errorf("read disk %s: Azure sends %d bytes of its %d", d.Name, n, d.Size), rc.revoke())
	}
	rc.body = dl.NewRetryReader(ctx, &blob.RetryReaderOptions{MaxRetries: 5})
	return rc, nil
}

// diskReader reads a disk through its SAS; Close revokes the SAS.
type diskReader struct {
	v    *RecoveredVM
	d    RecoveredDisk
	body io.ReadCloser
}

func (r *diskReader) Read(p []byte) (int, error) { return r.body.Read(p) }

func (r *diskReader) Close() error {
	r.body.Close()
	return r.revoke()
}

// revoke ends the disk's read access, even once the caller gave up.
func (r *diskReader) revoke() error {
	ctx, cancel := context.WithTimeout(context.Background(), rollbackTimeout)
	defer cancel()
	p, err := r.v.c.disks.BeginRevokeAccess(ctx, r.d.ResourceGroup, r.d.Name, nil)
	if err == nil {
		_, err = p.PollUntilDone(ctx, pollOptions())
	}
	if err != nil {
		return fmt.Errorf("revoke read access to disk %s: %w", r.d.Name, armError(err))
	}
	return nil
}

// powerState returns the VM's PowerState status ("running",
// "deallocated", ...), "" if Azure reports none.
func (v *RecoveredVM) powerState(ctx context.Context) (string, error) {
	r, err := v.c.vms.InstanceView(ctx, v.rg, v.name, nil)
	if isNotFound(err) {
		return "", fmt.Errorf("VM %s: %w", v, replication.ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("VM %s: %w", v, armError(err))
	}
	for _, s := range r.Statuses {
		if st, ok := strings.CutPrefix(deref(s.Code, ""), "PowerState/"); ok {
			return st, nil
		}
	}
	return "", nil
}

// Deallocate stops the VM and releases its hardware (the recovered
// machine writes nothing more), waiting until it is done. It returns
// false, and does nothing, when the VM is deallocated already.
func (v *RecoveredVM) Deallocate(ctx context.Context) (bool, error) {
	st, err := v.powerState(ctx)
	if err != nil {
		return false, err
	}
	if st == "deallocated" {
		return false, nil
	}
	p, err := v.c.vms.BeginDeallocate(ctx, v.rg, v.name, nil)
	if err == nil {
		_, err = p.PollUntilDone(ctx, pollOptions())
	}
	if err != nil {
		return false, fmt.Errorf("deallocate VM %s: %w", v, armError(err))
	}
	return true, nil
}

// Start starts the VM, waiting until it runs. It returns false, and does
// nothing, when it runs already.
func (v *RecoveredVM) Start(ctx context.Context) (bool, error) {
	st, err := v.powerState(ctx)
	if err != nil {
		return false, err
	}
	if st == "running" || st == "starting" {
		return false, nil
	}
	p, err := v.c.vms.BeginStart(ctx, v.rg, v.name, nil)
	if err == nil {
		_, err = p.PollUntilDone(ctx, pollOptions())
	}
	if err != nil {
		return false, fmt.Errorf("start VM %s: %w", v, armError(err))
	}
	return true, nil
}
