package azure

// Failback of a failover to Azure (server/failback_vsphere.go's
// recoveredVM, its Azure side): the recovered machine is the VM
// FailoverToAzure created; its disks are managed disks. Failback reads
// each one in order through a read SAS that ARM grants on it
// (Disks.GrantAccess: the disk's VHD as a page blob), revokes the access
// once read, and stops the VM by deallocating it (or starts it again when
// a failback does not switch). Azure grants no read SAS on a disk of a VM
// that is not deallocated: while the VM runs (reprotect's pass), each
// disk is read from a snapshot of it (a full copy, tagged asr-failover,
// made, read through its own SAS, and deleted).
//
// Status: run only against the Azure SDK's fake ARM servers, whose
// GrantAccess answers a SAS URL of a page blob (or of a blob snapshot) in
// Azurite, never against real Azure.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
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
	ID, Location        string
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
		out = append(out, RecoveredDisk{Name: rid.Name, ResourceGroup: rid.ResourceGroupName, Size: size, ID: *ref.ID, Location: deref(d.Location, "")})
	}
	return out, nil
}

// OpenDisk returns a reader of disk d's d.Size bytes, in order (the VHD's
// footer, after them, is not read), through a read SAS: of the disk if
// the VM is deallocated, else of a snapshot of it made now. Close revokes
// the access (and deletes the snapshot); it must be called.
func (v *RecoveredVM) OpenDisk(ctx context.Context, d RecoveredDisk) (io.ReadCloser, error) {
	st, err := v.powerState(ctx)
	if err != nil {
		return nil, err
	}
	if st == "deallocated" {
		sas, err := grant(ctx, "disk "+d.Name, func() (*runtime.Poller[armcompute.DisksClientGrantAccessResponse], error) {
			return v.c.disks.BeginGrantAccess(ctx, d.ResourceGroup, d.Name, readAccess(), nil)
		}, func(r armcompute.DisksClientGrantAccessResponse) *string { return r.AccessSAS })
		end := func() error {
			return revoke("disk "+d.Name, func(ctx context.Context) error {
				p, err := v.c.disks.BeginRevokeAccess(ctx, d.ResourceGroup, d.Name, nil)
				if err == nil {
					_, err = p.PollUntilDone(ctx, pollOptions())
				}
				return err
			})
		}
		return readSAS(ctx, "disk "+d.Name, sas, err, d.Size, end)
	}
	snap := snapshotName(d.Name)
	what := fmt.Sprintf("snapshot %s of disk %s", snap, d.Name)
	end := func() error { return v.dropSnapshot(d.ResourceGroup, snap) }
	// A snapshot left by a pass cut short is replaced: its content is old.
	if err := end(); err != nil {
		return nil, err
	}
	sp, err := v.c.snapshots.BeginCreateOrUpdate(ctx, d.ResourceGroup, snap, armcompute.Snapshot{
		Location: to.Ptr(d.Location),
		Tags:     map[string]*string{TagFailover: to.Ptr("true")},
		Properties: &armcompute.SnapshotProperties{CreationData: &armcompute.CreationData{
			CreateOption: to.Ptr(armcompute.DiskCreateOptionCopy), SourceResourceID: to.Ptr(d.ID)}},
	}, nil)
	if err == nil {
		_, err = sp.PollUntilDone(ctx, pollOptions())
	}
	if err != nil {
		return nil, errors.Join(fmt.Errorf("make %s: %w", what, armError(err)), end())
	}
	sas, err := grant(ctx, what, func() (*runtime.Poller[armcompute.SnapshotsClientGrantAccessResponse], error) {
		return v.c.snapshots.BeginGrantAccess(ctx, d.ResourceGroup, snap, readAccess(), nil)
	}, func(r armcompute.SnapshotsClientGrantAccessResponse) *string { return r.AccessSAS })
	return readSAS(ctx, what, sas, err, d.Size, end)
}

func readAccess() armcompute.GrantAccessData {
	return armcompute.GrantAccessData{Access: to.Ptr(armcompute.AccessLevelRead), DurationInSeconds: to.Ptr(int32(grantSeconds))}
}

// snapshotName is the name of the snapshot OpenDisk makes of a disk.
func snapshotName(disk string) string {
	const suffix = "-asr-failback"
	return disk[:min(len(disk), 80-len(suffix))] + suffix
}

// grant asks for a read SAS and waits for it.
func grant[T any](ctx context.Context, what string, begin func() (*runtime.Poller[T], error), sas func(T) *string) (string, error) {
	p, err := begin()
	var r T
	if err == nil {
		r, err = p.PollUntilDone(ctx, pollOptions())
	}
	if err != nil {
		return "", fmt.Errorf("grant read access to %s: %w", what, armError(err))
	}
	if s := deref(sas(r), ""); s != "" {
		return s, nil
	}
	return "", fmt.Errorf("grant read access to %s: Azure returned no SAS", what)
}

// revoke runs an end of access, even once the caller gave up.
func revoke(what string, fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), rollbackTimeout)
	defer cancel()
	if err := fn(ctx); err != nil && !isNotFound(err) {
		return fmt.Errorf("revoke read access to %s: %w", what, armError(err))
	}
	return nil
}

// dropSnapshot revokes a snapshot's access and deletes it; one that is
// gone is fine.
func (v *RecoveredVM) dropSnapshot(rg, snap string) error {
	return revoke("snapshot "+snap, func(ctx context.Context) error {
		p, err := v.c.snapshots.BeginRevokeAccess(ctx, rg, snap, nil)
		if err == nil {
			_, err = p.PollUntilDone(ctx, pollOptions())
		}
		if err != nil && !isNotFound(err) {
			return err
		}
		d, err := v.c.snapshots.BeginDelete(ctx, rg, snap, nil)
		if err == nil {
			_, err = d.PollUntilDone(ctx, pollOptions())
		}
		return err
	})
}

// readSAS opens the page blob at sas (granted, unless gerr) for its first
// size bytes; the reader's Close, or a failure here, calls end.
func readSAS(ctx context.Context, what, sas string, gerr error, size int64, end func() error) (io.ReadCloser, error) {
	if gerr != nil {
		return nil, errors.Join(gerr, end())
	}
	bc, err := blob.NewClientWithNoCredential(sas, nil)
	var dl blob.DownloadStreamResponse
	if err == nil {
		dl, err = bc.DownloadStream(ctx, &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: 0, Count: size}})
	}
	if err != nil {
		return nil, errors.Join(fmt.Errorf("read %s: %w", what, azError(err)), end())
	}
	if n := deref(dl.ContentLength, -1); n != size {
		dl.Body.Close()
		return nil, errors.Join(fmt.Errorf("read %s: Azure sends %d bytes of its %d", what, n, size), end())
	}
	return &sasReader{body: dl.NewRetryReader(ctx, &blob.RetryReaderOptions{MaxRetries: 5}), end: end}, nil
}

// sasReader reads a disk through a SAS; Close ends the access.
type sasReader struct {
	body io.ReadCloser
	end  func() error
}

func (r *sasReader) Read(p []byte) (int, error) { return r.body.Read(p) }

func (r *sasReader) Close() error {
	r.body.Close()
	return r.end()
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
