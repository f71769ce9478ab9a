package azure

// Failover to Azure: recovered disks, uploaded as fixed-VHD page blobs by
// UploadVHD, become managed disks (Import from the blob), a NIC in the
// operator's subnet, and a VM that boots from the first disk.
//
// Status: this path has been run only against the Azure SDK's fake ARM
// servers (armcompute/v8/fake, armnetwork/v9/fake) and Azurite, never
// against real Azure. The fakes check what this code sends, not what Azure
// would accept: Azure's own validation (quotas, the sizes a region offers,
// a size's data-disk limit, Gen1/Gen2 support, whether the guest boots from
// the imported disk) is untested.
//
// Order and rollback: the inputs are checked first, with no call made; then
// the subnet is looked up and every name the failover would create (disks,
// NIC, VM) is checked to be free, so a failover never overwrites or adopts a
// resource it did not create. Then the disks are imported (OS disk first),
// the NIC created, and the VM created. If a step fails, what this call
// created is deleted in reverse order (VM, NIC, disks) before it returns,
// even if ctx was cancelled, within rollbackTimeout; whatever could not be
// deleted is named in the error.
//
// Power state: Azure starts a VM when it creates it; there is no
// create-stopped. A failover VM is running, and billed, once FailoverToAzure
// returns.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
	"unicode"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v9"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/google/uuid"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/retry"
)

// ErrInvalidFailover is wrapped by the errors for a FailoverSpec or
// FailoverDisk that Azure would refuse (a bad name, a missing field): they
// are returned before any call to Azure.
var ErrInvalidFailover = errors.New("invalid failover")

// ErrExists is wrapped when an Azure resource the failover would create
// exists already: a failover never overwrites or adopts a resource.
var ErrExists = errors.New("Azure resource exists already")

// ErrNotTest is wrapped when DeleteFailover is asked to delete what is not a
// test failover's.
var ErrNotTest = errors.New("not a test failover")

// Tags the failover puts on every resource it creates.
const (
	TagFailover     = "asr-failover"
	TagTestFailover = "asr-test-failover"
)

const (
	// rollbackTimeout bounds the deletion of a failed failover's resources,
	// which runs even when the caller's context is done.
	rollbackTimeout = 30 * time.Minute
	// rollbackRounds bounds the passes over what a failed failover
	// created (see the rollback).
	rollbackRounds = 6
	maxDataDisks   = 64 // the most any VM size takes
	maxPageBlob    = 8 << 40
	defaultDiskSKU = armcompute.DiskStorageAccountTypesStandardSSDLRS
)

// pollFrequency is how often a long-running ARM operation is polled when
// the service sends no Retry-After (it usually does). Tests shorten it.
var pollFrequency = 5 * time.Second

// FailoverSpec says where and as what the failover VM is created.
type FailoverSpec struct {
	// Subscription is the Azure subscription ID (a UUID). Required.
	Subscription string
	// ResourceGroup holds the VM, its NIC and its managed disks; it must
	// exist. Required.
	ResourceGroup string
	// Location is the region's short name, e.g. "westeurope"; it must be
	// the region of the VNet. Required.
	Location string
	// VNet and Subnet name the network the NIC joins; for a test failover
	// the caller passes an isolated one. Required.
	VNet, Subnet string
	// VNetResourceGroup holds the VNet; ResourceGroup if empty.
	VNetResourceGroup string
	// StorageResourceGroup holds the storage account of the VHD blobs;
	// ResourceGroup if empty (see (*Target).FailoverDisk).
	StorageResourceGroup string

	// VMName names the VM; its NIC is VMName-nic. Required. Azure's rules:
	// letters, digits and hyphens (and, for Linux, periods), starting with a
	// letter or digit, not ending with a hyphen or period; at most 15
	// characters for Windows, not all digits, and 64 for Linux.
	VMName string
	// OSType is "Linux" or "Windows" (see OSTypeFromGuest). Required.
	OSType string
	// HyperVGeneration is "V1" (BIOS; the default) or "V2" (UEFI): a source
	// VM with EFI firmware needs V2.
	HyperVGeneration string
	// Size is the VM size, e.g. "Standard_D4s_v3". Empty: DefaultVMSize of
	// CPUs and MemoryMiB, the source VM's.
	Size      string
	CPUs      int32
	MemoryMiB int32
	// DiskSKU is the managed disks' type; StandardSSD_LRS if empty, which
	// every VM size takes. Premium_LRS needs a size with premium storage
	// (an "s" in its name, as those DefaultVMSize picks).
	DiskSKU string
	// PrivateIP, if set, is the NIC's static private IPv4 address (the
	// source's, to keep it); empty: one assigned from the subnet.
	PrivateIP string
	// Test marks a test failover: its resources get the tag
	// asr-test-failover=true, and only those DeleteFailover deletes.
	Test bool
	// Tags are added to every resource, with asr-failover=true.
	Tags map[string]string
}

// FailoverDisk is a fixed VHD in a page blob, to import as a managed disk.
// (*Target).FailoverDisk makes one for a blob UploadVHD uploaded.
type FailoverDisk struct {
	// Name names the managed disk; VMName-osdisk (the first) or
	// VMName-datadisk-LUN if empty.
	Name string
	// BlobURL is the page blob's URL, without a SAS token: Azure reads it
	// with the storage account ID.
	BlobURL string
	// StorageAccountID is the resource ID of the blob's storage account.
	StorageAccountID string
	// Size is the VHD's virtual size (the blob's size less the footer), a
	// multiple of 1 MiB. Azure takes the disk's size from the VHD; this one
	// is checked and reported.
	Size int64
}

// FailoverResult names what FailoverToAzure created: what DeleteFailover
// takes to remove a test failover.
type FailoverResult struct {
	Subscription  string
	ResourceGroup string
	VMName        string
	VMID          string
	// VMUUID is the VM's unique id as ARM reports it
	// (VirtualMachineProperties.VMID), which its guest reads as its
	// SMBIOS UUID: the asr agent in the recovered guest reports it as
	// its BIOS UUID (failback's reverse source). Empty in a record made
	// before it was kept, or if ARM reported none.
	VMUUID string `json:",omitempty"`
	NICID  string
	// DiskIDs are the managed disks' resource IDs, the OS disk first, then
	// the data disks by LUN.
	DiskIDs []string
	Size    string
	// PrivateIP is the NIC's private address, if Azure reported one.
	PrivateIP string
	Test      bool
}

// OSTypeFromGuest maps a vSphere guest OS (its ID, "windows2019srv_64Guest",
// or full name, "Microsoft Windows Server 2019 (64-bit)") to the OSType
// Azure knows: "Windows" if it names Windows, else "Linux" (Azure has no
// other).
func OSTypeFromGuest(guest string) string {
	if strings.Contains(strings.ToLower(guest), "windows") {
		return "Windows"
	}
	return "Linux"
}

// vmSizes is DefaultVMSize's table: the Dsv3 (4 GiB per vCPU) and Esv3
// (8 GiB per vCPU) general-purpose and memory-optimised sizes, offered in
// nearly every region, for Gen1 and Gen2, with premium storage, ordered by
// vCPUs then memory, which orders them by price.
var vmSizes = []struct {
	name   string
	cpus   int32
	memGiB int32
}{
	{"Standard_D2s_v3", 2, 8},
	{"Standard_E2s_v3", 2, 16},
	{"Standard_D4s_v3", 4, 16},
	{"Standard_E4s_v3", 4, 32},
	{"Standard_D8s_v3", 8, 32},
	{"Standard_E8s_v3", 8, 64},
	{"Standard_D16s_v3", 16, 64},
	{"Standard_E16s_v3", 16, 128},
	{"Standard_E20s_v3", 20, 160},
	{"Standard_D32s_v3", 32, 128},
	{"Standard_E32s_v3", 32, 256},
	{"Standard_D48s_v3", 48, 192},
	{"Standard_E48s_v3", 48, 384},
	{"Standard_D64s_v3", 64, 256},
	{"Standard_E64s_v3", 64, 432},
}

// DefaultVMSize picks the first size of vmSizes with at least cpus vCPUs and
// memMiB of memory: a 1-vCPU 2 GiB source gets Standard_D2s_v3, 4 vCPUs and
// 24 GiB Standard_E4s_v3. Zero or negative values count as no requirement.
// A source larger than Standard_E64s_v3 (64 vCPUs, 432 GiB) needs an
// explicit size.
func DefaultVMSize(cpus, memMiB int32) (string, error) {
	for _, s := range vmSizes {
		if s.cpus >= cpus && int64(s.memGiB)<<10 >= int64(memMiB) {
			return s.name, nil
		}
	}
	return "", fmt.Errorf("%w: no default VM size has %d vCPUs and %d MiB; set the size", ErrInvalidFailover, cpus, memMiB)
}

// plan is a checked spec with its defaults filled in.
type plan struct {
	spec    FailoverSpec
	vnetRG  string
	nicName string
	osType  armcompute.OperatingSystemTypes
	gen     armcompute.HyperVGeneration
	sku     armcompute.DiskStorageAccountTypes
	tags    map[string]*string
	disks   []FailoverDisk
}

func invalid(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidFailover}, a...)...)
}

// check validates spec and disks against Azure's naming rules and limits,
// and fills the defaults in.
func check(spec FailoverSpec, disks []FailoverDisk) (*plan, error) {
	p := &plan{spec: spec}
	if err := checkSubscription(spec.Subscription); err != nil {
		return nil, err
	}
	if err := checkResourceGroup("resource group", spec.ResourceGroup); err != nil {
		return nil, err
	}
	p.vnetRG = spec.VNetResourceGroup
	if p.vnetRG == "" {
		p.vnetRG = spec.ResourceGroup
	} else if err := checkResourceGroup("VNet resource group", p.vnetRG); err != nil {
		return nil, err
	}
	if spec.StorageResourceGroup != "" {
		if err := checkResourceGroup("storage resource group", spec.StorageResourceGroup); err != nil {
			return nil, err
		}
	}
	if err := checkLocation(spec.Location); err != nil {
		return nil, err
	}
	if err := checkNetName("VNet", spec.VNet, 2, 64); err != nil {
		return nil, err
	}
	if err := checkNetName("subnet", spec.Subnet, 1, 80); err != nil {
		return nil, err
	}
	switch strings.ToLower(spec.OSType) {
	case "linux":
		p.osType = armcompute.OperatingSystemTypesLinux
	case "windows":
		p.osType = armcompute.OperatingSystemTypesWindows
	default:
		return nil, invalid("OS type %q: want Linux or Windows", spec.OSType)
	}
	if err := checkVMName(spec.VMName, p.osType); err != nil {
		return nil, err
	}
	p.nicName = spec.VMName + "-nic"
	switch spec.HyperVGeneration {
	case "", "V1", "v1":
		p.gen = armcompute.HyperVGenerationV1
	case "V2", "v2":
		p.gen = armcompute.HyperVGenerationV2
	default:
		return nil, invalid("Hyper-V generation %q: want V1 (BIOS) or V2 (UEFI)", spec.HyperVGeneration)
	}
	if spec.Size == "" {
		size, err := DefaultVMSize(spec.CPUs, spec.MemoryMiB)
		if err != nil {
			return nil, err
		}
		p.spec.Size = size
	} else if !validSize(spec.Size) {
		return nil, invalid("VM size %q: want a size name such as Standard_D4s_v3", spec.Size)
	}
	p.sku = defaultDiskSKU
	if spec.DiskSKU != "" {
		p.sku = armcompute.DiskStorageAccountTypes(spec.DiskSKU)
		switch p.sku {
		case armcompute.DiskStorageAccountTypesStandardLRS, armcompute.DiskStorageAccountTypesStandardSSDLRS,
			armcompute.DiskStorageAccountTypesStandardSSDZRS, armcompute.DiskStorageAccountTypesPremiumLRS,
			armcompute.DiskStorageAccountTypesPremiumZRS:
		default:
			return nil, invalid("disk SKU %q: want Standard_LRS, StandardSSD_LRS, StandardSSD_ZRS, Premium_LRS or Premium_ZRS (an imported VHD can be no other)", spec.DiskSKU)
		}
	}
	if spec.PrivateIP != "" {
		if ip := net.ParseIP(spec.PrivateIP); ip == nil || ip.To4() == nil {
			return nil, invalid("private IP %q: want an IPv4 address", spec.PrivateIP)
		}
	}
	tags, err := failoverTags(spec)
	if err != nil {
		return nil, err
	}
	p.tags = tags

	if len(disks) == 0 {
		return nil, invalid("no disks")
	}
	if len(disks) > 1+maxDataDisks {
		return nil, invalid("%d disks: a VM takes an OS disk and at most %d data disks", len(disks), maxDataDisks)
	}
	names := map[string]bool{}
	urls := map[string]bool{}
	for i, d := range disks {
		if d.Name == "" {
			if i == 0 {
				d.Name = spec.VMName + "-osdisk"
			} else {
				d.Name = fmt.Sprintf("%s-datadisk-%d", spec.VMName, i-1)
			}
		}
		if err := checkNetName("disk", d.Name, 1, 80); err != nil {
			return nil, err
		}
		if err := checkDiskSource(d); err != nil {
			return nil, fmt.Errorf("disk %s: %w", d.Name, err)
		}
		// Azure's names are case-insensitive.
		if k := strings.ToLower(d.Name); names[k] {
			return nil, invalid("disk name %q given twice", d.Name)
		} else {
			names[k] = true
		}
		if urls[d.BlobURL] {
			return nil, invalid("blob %s given for two disks", d.BlobURL)
		}
		urls[d.BlobURL] = true
		p.disks = append(p.disks, d)
	}
	return p, nil
}

func checkSubscription(s string) error {
	if u, err := uuid.Parse(s); err != nil || len(s) != 36 || u.String() != strings.ToLower(s) {
		return invalid("subscription %q: want its ID, a UUID such as 00000000-0000-0000-0000-000000000000", s)
	}
	return nil
}

// checkResourceGroup applies Azure's rule for resource group names: 1 to 90
// letters, digits, underscores, hyphens, periods and parentheses, not
// ending with a period.
func checkResourceGroup(what, name string) error {
	bad := name == "" || len(name) > 90 || strings.HasSuffix(name, ".")
	for _, r := range name {
		if !(unicode.IsLetter(r) || unicode.IsDigit(r) || strings.ContainsRune("_-.()", r)) {
			bad = true
		}
	}
	if bad {
		return invalid("%s %q: want 1 to 90 letters, digits, underscores, hyphens, periods and parentheses, not ending with a period", what, name)
	}
	return nil
}

// checkLocation wants a region's short name, as ARM takes it.
func checkLocation(loc string) error {
	bad := len(loc) < 2 || len(loc) > 40 || !('a' <= loc[0] && loc[0] <= 'z')
	for i := 0; i < len(loc) && !bad; i++ {
		c := loc[i]
		bad = !('a' <= c && c <= 'z' || '0' <= c && c <= '9')
	}
	if bad {
		return invalid("location %q: want a region's short name, lowercase letters and digits, such as westeurope (az account list-locations -o table)", loc)
	}
	return nil
}

// checkNetName applies Azure's rule for VNet, subnet, NIC and managed disk
// names: min to max letters, digits, underscores, periods and hyphens,
// starting with a letter or digit, ending with a letter, digit or
// underscore.
func checkNetName(what, name string, min, max int) error {
	alnum := func(c byte) bool { return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' }
	bad := len(name) < min || len(name) > max || !alnum(name[0]) || !(alnum(name[len(name)-1]) || name[len(name)-1] == '_')
	for i := 0; i < len(name) && !bad; i++ {
		bad = !(alnum(name[i]) || strings.IndexByte("_.-", name[i]) >= 0)
	}
	if bad {
		return invalid("%s name %q: want %d to %d letters, digits, underscores, periods and hyphens, starting with a letter or digit and ending with a letter, digit or underscore", what, name, min, max)
	}
	return nil
}

// checkVMName applies Azure's rule for VM names, stricter for Windows,
// whose computer name it becomes: letters, digits and hyphens (Linux:
// periods too), starting with a letter or digit, not ending with a hyphen or
// period; Windows 1 to 15 characters and not all digits, Linux 1 to 64.
func checkVMName(name string, os armcompute.OperatingSystemTypes) error {
	max, periods := 64, true
	if os == armcompute.OperatingSystemTypesWindows {
		max, periods = 15, false
	}
	digits := true
	bad := name == "" || len(name) > max || name[0] == '-' || name[0] == '.' || strings.HasSuffix(name, "-") || strings.HasSuffix(name, ".")
	for i := 0; i < len(name) && !bad; i++ {
		c := name[i]
		isDigit := '0' <= c && c <= '9'
		digits = digits && isDigit
		bad = !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || isDigit || c == '-' || c == '.' && periods)
	}
	if !bad && os == armcompute.OperatingSystemTypesWindows && digits {
		bad = true
	}
	if bad {
		if os == armcompute.OperatingSystemTypesWindows {
			return invalid("VM name %q: a Windows VM's name is 1 to 15 letters, digits and hyphens, not all digits, not starting or ending with a hyphen", name)
		}
		return invalid("VM name %q: a Linux VM's name is 1 to 64 letters, digits, hyphens and periods, starting with a letter or digit, not ending with a hyphen or period", name)
	}
	return nil
}

// validSize accepts what looks like a size name: Standard_D4s_v3,
// Basic_A1.
func validSize(s string) bool {
	if len(s) < 2 || len(s) > 64 || !unicode.IsLetter(rune(s[0])) {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

func failoverTags(spec FailoverSpec) (map[string]*string, error) {
	tags := map[string]*string{TagFailover: to.Ptr("true")}
	if spec.Test {
		tags[TagTestFailover] = to.Ptr("true")
	}
	if len(spec.Tags)+len(tags) > 50 {
		return nil, invalid("%d tags: a resource takes at most 50", len(spec.Tags)+len(tags))
	}
	for k, v := range spec.Tags {
		if k == "" || len(k) > 512 || len(v) > 256 || strings.ContainsAny(k, "<>%&\\?/") {
			return nil, invalid("tag %q: want a name of 1 to 512 characters without <>%%&\\?/ and a value of at most 256", k)
		}
		if k == TagFailover || k == TagTestFailover {
			return nil, invalid("tag %q is the failover's own", k)
		}
		tags[k] = to.Ptr(v)
	}
	return tags, nil
}

// checkDiskSource checks a disk's blob URL, storage account ID and size,
// and that they name the same account.
func checkDiskSource(d FailoverDisk) error {
	if err := checkEndpoint(d.BlobURL); err != nil {
		// checkEndpoint's refusal of a query is the refusal of a SAS token.
		return fmt.Errorf("%w: blob URL: %w", ErrInvalidFailover, err)
	}
	u, _ := url.Parse(d.BlobURL)
	account := blobAccount(u)
	if account == "" || len(strings.Split(strings.Trim(u.EscapedPath(), "/"), "/")) < 2+boolInt(isLoopback(u.Hostname())) {
		return invalid("blob URL %q: want https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB", d.BlobURL)
	}
	id, err := arm.ParseResourceID(d.StorageAccountID)
	if err != nil || !strings.EqualFold(id.ResourceType.String(), "Microsoft.Storage/storageAccounts") || checkSubscription(id.SubscriptionID) != nil || id.ResourceGroupName == "" {
		return invalid("storage account ID %q: want /subscriptions/SUBSCRIPTION/resourceGroups/GROUP/providers/Microsoft.Storage/storageAccounts/ACCOUNT", d.StorageAccountID)
	}
	if id.Name != account {
		return invalid("storage account ID %q names account %q, the blob URL %q", d.StorageAccountID, id.Name, account)
	}
	if d.Size <= 0 || d.Size%replication.VHDAlign != 0 || d.Size+replication.VHDFooterSize > maxPageBlob {
		return invalid("size %d: a fixed VHD's virtual size is a positive multiple of 1 MiB, with its footer at most 8 TiB", d.Size)
	}
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// blobAccount returns the storage account a blob URL names: the host's
// first label (ACCOUNT.blob.core.windows.net), or, for a loopback host
// (Azurite), the path's first segment.
func blobAccount(u *url.URL) string {
	if isLoopback(u.Hostname()) {
		a, _, _ := strings.Cut(strings.TrimPrefix(u.Path, "/"), "/")
		return a
	}
	a, rest, ok := strings.Cut(u.Hostname(), ".")
	if !ok || !strings.HasPrefix(rest, "blob.") {
		return ""
	}
	return a
}

// FailoverDisk describes the page blob blobName, uploaded by UploadVHD, as
// a disk for FailoverToAzure named diskName (empty: the default): its URL,
// without any SAS token, and the resource ID of the target's storage
// account in spec.Subscription and spec.StorageResourceGroup (or
// spec.ResourceGroup). It reads the blob's VHD footer for the size, so a
// missing blob wraps replication.ErrNotFound and one that is not a fixed
// VHD replication.ErrCorrupt.
func (t *Target) FailoverDisk(ctx context.Context, spec FailoverSpec, blobName, diskName string) (FailoverDisk, error) {
	if err := t.disks.CheckOpen(); err != nil {
		return FailoverDisk{}, err
	}
	if err := checkKey(blobName); err != nil {
		return FailoverDisk{}, err
	}
	if err := checkSubscription(spec.Subscription); err != nil {
		return FailoverDisk{}, err
	}
	rg := spec.StorageResourceGroup
	if rg == "" {
		rg = spec.ResourceGroup
	}
	if err := checkResourceGroup("storage resource group", rg); err != nil {
		return FailoverDisk{}, err
	}
	pb := t.cc.NewPageBlobClient(blobName)
	props, err := pb.GetProperties(ctx, nil)
	if err != nil {
		return FailoverDisk{}, fmt.Errorf("blob %s: %w", blobName, azError(err))
	}
	size := deref(props.ContentLength, 0)
	if size < replication.VHDFooterSize || size%512 != 0 {
		return FailoverDisk{}, fmt.Errorf("blob %s: %d bytes is not a fixed VHD: %w", blobName, size, replication.ErrCorrupt)
	}
	resp, err := pb.DownloadStream(ctx, &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: size - replication.VHDFooterSize, Count: replication.VHDFooterSize}})
	if err != nil {
		return FailoverDisk{}, fmt.Errorf("blob %s: read the VHD footer: %w", blobName, azError(err))
	}
	footer, err := io.ReadAll(io.LimitReader(resp.Body, replication.VHDFooterSize+1))
	resp.Body.Close()
	if err != nil {
		return FailoverDisk{}, fmt.Errorf("blob %s: read the VHD footer: %w", blobName, azError(err))
	}
	vsize, err := replication.CheckVHDFooter(footer)
	if err != nil {
		return FailoverDisk{}, fmt.Errorf("blob %s: %w", blobName, err)
	}
	if vsize != size-replication.VHDFooterSize {
		return FailoverDisk{}, fmt.Errorf("blob %s: the VHD footer says %d bytes, the blob holds %d and the footer: %w", blobName, vsize, size-replication.VHDFooterSize, replication.ErrCorrupt)
	}
	// The SDK escapes a blob name's slashes (%2F); the URL Azure shows for
	// the blob, and that an import is documented with, keeps them. The
	// container URL's query, a SAS token if any, goes: Azure reads the
	// blob with the storage account ID.
	u, err := url.Parse(t.cc.URL())
	if err != nil {
		return FailoverDisk{}, fmt.Errorf("blob %s: %w", blobName, err)
	}
	u.RawQuery = ""
	segs := strings.Split(blobName, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	u = u.JoinPath(segs...)
	return FailoverDisk{
		Name:             diskName,
		BlobURL:          u.String(),
		StorageAccountID: fmt.Sprintf("/subscriptions/%s/resourceGroups/%s/providers/Microsoft.Storage/storageAccounts/%s", spec.Subscription, rg, t.account),
		Size:             vsize,
	}, nil
}

// armClients are the ARM clients of one subscription.
type armClients struct {
	disks     *armcompute.DisksClient
	snapshots *armcompute.SnapshotsClient
	vms       *armcompute.VirtualMachinesClient
	nics      *armnetwork.InterfacesClient
	subnets   *armnetwork.SubnetsClient
}

func newARMClients(subscription string, cred azcore.TokenCredential, opts *arm.ClientOptions) (*armClients, error) {
	cf, err := armcompute.NewClientFactory(subscription, cred, opts)
	if err != nil {
		return nil, err
	}
	nf, err := armnetwork.NewClientFactory(subscription, cred, opts)
	if err != nil {
		return nil, err
	}
	return &armClients{
		disks:     cf.NewDisksClient(),
		snapshots: cf.NewSnapshotsClient(),
		vms:       cf.NewVirtualMachinesClient(),
		nics:      nf.NewInterfacesClient(),
		subnets:   nf.NewSubnetsClient(),
	}, nil
}

func pollOptions() *runtime.PollUntilDoneOptions {
	return &runtime.PollUntilDoneOptions{Frequency: pollFrequency}
}

// FailoverToAzure creates an Azure VM from disks: each disk a managed disk
// imported from its VHD blob (the first the OS disk, the others data disks
// at LUN 0, 1, ...), a NIC in spec's subnet, and the VM, of spec.Size or the
// default for the source's CPUs and memory. The VM is running when it
// returns (Azure starts what it creates). progress, if not nil, is called
// before each step with a line for an operator.
//
// Invalid input is refused with an error wrapping ErrInvalidFailover before
// any call; a name already taken in Azure with one wrapping ErrExists
// before anything is created. On failure, what was created is deleted, in
// reverse order, before it returns.
//
// This has been run only against the Azure SDK's fake servers and Azurite,
// not real Azure: see the comment at the top of failover.go.
func FailoverToAzure(ctx context.Context, cred azcore.TokenCredential, opts *arm.ClientOptions, spec FailoverSpec, disks []FailoverDisk, progress func(step string)) (res FailoverResult, err error) {
	if progress == nil {
		progress = func(string) {}
	}
	p, err := check(spec, disks)
	if err != nil {
		return FailoverResult{}, err
	}
	spec = p.spec
	c, err := newARMClients(spec.Subscription, cred, opts)
	if err != nil {
		return FailoverResult{}, fmt.Errorf("failover %s: %w", spec.VMName, err)
	}
	rg := spec.ResourceGroup

	progress(fmt.Sprintf("look up subnet %s/%s in resource group %s", spec.VNet, spec.Subnet, p.vnetRG))
	sn, err := c.subnets.Get(ctx, p.vnetRG, spec.VNet, spec.Subnet, nil)
	if err != nil {
		return FailoverResult{}, fmt.Errorf("failover %s: subnet %s/%s in resource group %s: %w", spec.VMName, spec.VNet, spec.Subnet, p.vnetRG, armError(err))
	}
	if sn.ID == nil {
		return FailoverResult{}, fmt.Errorf("failover %s: subnet %s/%s: Azure returned no ID", spec.VMName, spec.VNet, spec.Subnet)
	}

	progress(fmt.Sprintf("check that the VM, NIC and disk names are free in resource group %s", rg))
	if err := c.checkFree(ctx, rg, spec.VMName, p.nicName, p.disks); err != nil {
		return FailoverResult{}, fmt.Errorf("failover %s: %w", spec.VMName, err)
	}

	// From here on, a failure deletes what was created. Each undo is
	// registered before its create call: a create that fails may still
	// leave a resource (in a failed state), and the names were free.
	var undo []func(context.Context) error
	var undoWhat []string
	defer func() {
		if err == nil {
			return
		}
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rollbackTimeout)
		defer cancel()
		// Rounds: a create whose caller gave up (ctx cancelled, a timeout)
		// may still be carried out by Azure after its resource's delete
		// found nothing; the VM then holds its disks and NIC, whose
		// deletes fail. Another round deletes the VM that appeared, then
		// what it held (a delete of what is gone succeeds).
		var left []error
		b := retry.New(time.Second, 30*time.Second)
		for round := 0; round < rollbackRounds; round++ {
			if round > 0 && retry.Sleep(rctx, b.Next()) != nil {
				break
			}
			left = nil
			for i := len(undo) - 1; i >= 0; i-- {
				progress("roll back: delete " + undoWhat[i])
				if uerr := undo[i](rctx); uerr != nil {
					left = append(left, fmt.Errorf("delete %s: %w", undoWhat[i], uerr))
				}
			}
			if len(left) == 0 {
				break
			}
		}
		if len(left) > 0 {
			err = errors.Join(err, fmt.Errorf("rollback of failover %s left resources behind: %w", spec.VMName, errors.Join(left...)))
		}
	}()

	res = FailoverResult{Subscription: spec.Subscription, ResourceGroup: rg, VMName: spec.VMName, Size: spec.Size, Test: spec.Test}
	diskIDs := make([]*string, len(p.disks))
	for i, d := range p.disks {
		role := "OS disk"
		if i > 0 {
			role = fmt.Sprintf("data disk LUN %d", i-1)
		}
		progress(fmt.Sprintf("import %s %s from %s (%d MiB)", role, d.Name, d.BlobURL, d.Size>>20))
		disk := armcompute.Disk{
			Location: to.Ptr(spec.Location),
			Tags:     p.tags,
			SKU:      &armcompute.DiskSKU{Name: to.Ptr(p.sku)},
			Properties: &armcompute.DiskProperties{
				CreationData: &armcompute.CreationData{
					CreateOption:     to.Ptr(armcompute.DiskCreateOptionImport),
					SourceURI:        to.Ptr(d.BlobURL),
					StorageAccountID: to.Ptr(d.StorageAccountID),
				},
			},
		}
		if i == 0 {
			disk.Properties.OSType = to.Ptr(p.osType)
			disk.Properties.HyperVGeneration = to.Ptr(p.gen)
		}
		name := d.Name
		undo = append(undo, func(ctx context.Context) error { return c.deleteDisk(ctx, rg, name) })
		undoWhat = append(undoWhat, "disk "+name)
		if err := ctx.Err(); err != nil { // start no create once given up
			return res, fmt.Errorf("failover %s: import disk %s: %w", spec.VMName, name, err)
		}
		poller, err := c.disks.BeginCreateOrUpdate(ctx, rg, name, disk, nil)
		if err != nil {
			return res, fmt.Errorf("failover %s: import disk %s: %w", spec.VMName, name, armError(err))
		}
		created, err := poller.PollUntilDone(ctx, pollOptions())
		if err != nil {
			return res, fmt.Errorf("failover %s: import disk %s: %w", spec.VMName, name, armError(err))
		}
		if created.ID == nil {
			return res, fmt.Errorf("failover %s: import disk %s: Azure returned no ID", spec.VMName, name)
		}
		diskIDs[i] = created.ID
		res.DiskIDs = append(res.DiskIDs, *created.ID)
	}

	progress(fmt.Sprintf("create NIC %s in subnet %s/%s", p.nicName, spec.VNet, spec.Subnet))
	ipc := &armnetwork.InterfaceIPConfigurationPropertiesFormat{
		Subnet:                    &armnetwork.Subnet{ID: sn.ID},
		Primary:                   to.Ptr(true),
		PrivateIPAllocationMethod: to.Ptr(armnetwork.IPAllocationMethodDynamic),
	}
	if spec.PrivateIP != "" {
		ipc.PrivateIPAllocationMethod = to.Ptr(armnetwork.IPAllocationMethodStatic)
		ipc.PrivateIPAddress = to.Ptr(spec.PrivateIP)
	}
	nic := armnetwork.Interface{
		Location: to.Ptr(spec.Location),
		Tags:     p.tags,
		Properties: &armnetwork.InterfacePropertiesFormat{
			IPConfigurations: []*armnetwork.InterfaceIPConfiguration{{Name: to.Ptr("ipconfig1"), Properties: ipc}},
		},
	}
	undo = append(undo, func(ctx context.Context) error { return c.deleteNIC(ctx, rg, p.nicName) })
	undoWhat = append(undoWhat, "NIC "+p.nicName)
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("failover %s: create NIC: %w", spec.VMName, err)
	}
	np, err := c.nics.BeginCreateOrUpdate(ctx, rg, p.nicName, nic, nil)
	if err != nil {
		return res, fmt.Errorf("failover %s: create NIC %s: %w", spec.VMName, p.nicName, armError(err))
	}
	createdNIC, err := np.PollUntilDone(ctx, pollOptions())
	if err != nil {
		return res, fmt.Errorf("failover %s: create NIC %s: %w", spec.VMName, p.nicName, armError(err))
	}
	if createdNIC.ID == nil {
		return res, fmt.Errorf("failover %s: create NIC %s: Azure returned no ID", spec.VMName, p.nicName)
	}
	res.NICID = *createdNIC.ID
	if cfgs := createdNIC.Properties; cfgs != nil && len(cfgs.IPConfigurations) > 0 && cfgs.IPConfigurations[0].Properties != nil {
		res.PrivateIP = deref(cfgs.IPConfigurations[0].Properties.PrivateIPAddress, "")
	}

	progress(fmt.Sprintf("create VM %s (%s, %s, %d disks)", spec.VMName, spec.Size, p.osType, len(p.disks)))
	storage := &armcompute.StorageProfile{
		OSDisk: &armcompute.OSDisk{
			Name:         to.Ptr(p.disks[0].Name),
			OSType:       to.Ptr(p.osType),
			CreateOption: to.Ptr(armcompute.DiskCreateOptionTypesAttach),
			ManagedDisk:  &armcompute.ManagedDiskParameters{ID: diskIDs[0]},
		},
	}
	for i, d := range p.disks[1:] {
		storage.DataDisks = append(storage.DataDisks, &armcompute.DataDisk{
			Lun:          to.Ptr(int32(i)),
			Name:         to.Ptr(d.Name),
			CreateOption: to.Ptr(armcompute.DiskCreateOptionTypesAttach),
			ManagedDisk:  &armcompute.ManagedDiskParameters{ID: diskIDs[i+1]},
		})
	}
	vm := armcompute.VirtualMachine{
		Location: to.Ptr(spec.Location),
		Tags:     p.tags,
		Properties: &armcompute.VirtualMachineProperties{
			HardwareProfile: &armcompute.HardwareProfile{VMSize: to.Ptr(armcompute.VirtualMachineSizeTypes(spec.Size))},
			StorageProfile:  storage,
			NetworkProfile: &armcompute.NetworkProfile{NetworkInterfaces: []*armcompute.NetworkInterfaceReference{{
				ID:         createdNIC.ID,
				Properties: &armcompute.NetworkInterfaceReferenceProperties{Primary: to.Ptr(true)},
			}}},
			// Boot diagnostics in managed storage: the serial log and
			// screenshot are what an operator has if the guest does not
			// come up on Azure's hardware.
			DiagnosticsProfile: &armcompute.DiagnosticsProfile{BootDiagnostics: &armcompute.BootDiagnostics{Enabled: to.Ptr(true)}},
		},
	}
	undo = append(undo, func(ctx context.Context) error { return c.deleteVM(ctx, rg, spec.VMName) })
	undoWhat = append(undoWhat, "VM "+spec.VMName)
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("failover %s: create VM: %w", spec.VMName, err)
	}
	vp, err := c.vms.BeginCreateOrUpdate(ctx, rg, spec.VMName, vm, &armcompute.VirtualMachinesClientBeginCreateOrUpdateOptions{IfNoneMatch: to.Ptr("*")})
	if err != nil {
		return res, fmt.Errorf("failover %s: create VM: %w", spec.VMName, armError(err))
	}
	createdVM, err := vp.PollUntilDone(ctx, pollOptions())
	if err != nil {
		return res, fmt.Errorf("failover %s: create VM: %w", spec.VMName, armError(err))
	}
	if createdVM.ID == nil {
		return res, fmt.Errorf("failover %s: create VM: Azure returned no ID", spec.VMName)
	}
	res.VMID = *createdVM.ID
	if p := createdVM.Properties; p != nil && p.VMID != nil {
		res.VMUUID = *p.VMID
	}
	progress(fmt.Sprintf("VM %s created", spec.VMName))
	return res, nil
}

// checkFree fails, wrapping ErrExists, if the VM, NIC or a disk exists.
func (c *armClients) checkFree(ctx context.Context, rg, vm, nic string, disks []FailoverDisk) error {
	taken := func(what string, err error) error {
		if err == nil {
			return fmt.Errorf("%s in resource group %s: %w", what, rg, ErrExists)
		}
		if isNotFound(err) {
			return nil
		}
		return fmt.Errorf("look up %s: %w", what, armError(err))
	}
	_, err := c.vms.Get(ctx, rg, vm, nil)
	if err := taken("VM "+vm, err); err != nil {
		return err
	}
	_, err = c.nics.Get(ctx, rg, nic, nil)
	if err := taken("NIC "+nic, err); err != nil {
		return err
	}
	for _, d := range disks {
		_, err := c.disks.Get(ctx, rg, d.Name, nil)
		if err := taken("disk "+d.Name, err); err != nil {
			return err
		}
	}
	return nil
}

// The deletions succeed if the resource is gone already: ARM answers 204,
// or 404 for a missing resource group.

func (c *armClients) deleteVM(ctx context.Context, rg, name string) error {
	p, err := c.vms.BeginDelete(ctx, rg, name, nil)
	if err == nil {
		_, err = p.PollUntilDone(ctx, pollOptions())
	}
	return deleted(err)
}

func (c *armClients) deleteNIC(ctx context.Context, rg, name string) error {
	p, err := c.nics.BeginDelete(ctx, rg, name, nil)
	if err == nil {
		_, err = p.PollUntilDone(ctx, pollOptions())
	}
	return deleted(err)
}

func (c *armClients) deleteDisk(ctx context.Context, rg, name string) error {
	p, err := c.disks.BeginDelete(ctx, rg, name, nil)
	if err == nil {
		_, err = p.PollUntilDone(ctx, pollOptions())
	}
	return deleted(err)
}

func deleted(err error) error {
	if err == nil || isNotFound(err) {
		return nil
	}
	return armError(err)
}

// DeleteFailover deletes a test failover's VM, then its NIC, then its
// managed disks; it leaves the VHD blobs, the VNet and the resource group.
// It refuses, wrapping ErrNotTest, a result not marked Test, or one whose
// resources that still exist lack the asr-test-failover tag, checking all
// before deleting any. What is gone already is skipped, so it may be
// called again after a partial failure.
func DeleteFailover(ctx context.Context, cred azcore.TokenCredential, opts *arm.ClientOptions, res FailoverResult) error {
	if !res.Test {
		return fmt.Errorf("delete failover %s: %w: only a test failover's resources are deleted here", res.VMName, ErrNotTest)
	}
	if err := checkSubscription(res.Subscription); err != nil {
		return err
	}
	type item struct {
		kind, rg, name string
	}
	var items []item
	add := func(kind, id, typ string) error {
		if id == "" {
			return nil
		}
		rid, err := arm.ParseResourceID(id)
		if err != nil || !strings.EqualFold(rid.ResourceType.String(), typ) || !strings.EqualFold(rid.SubscriptionID, res.Subscription) {
			return invalid("%s ID %q: want a %s in subscription %s", kind, id, typ, res.Subscription)
		}
		items = append(items, item{kind, rid.ResourceGroupName, rid.Name})
		return nil
	}
	if err := add("VM", res.VMID, "Microsoft.Compute/virtualMachines"); err != nil {
		return err
	}
	if err := add("NIC", res.NICID, "Microsoft.Network/networkInterfaces"); err != nil {
		return err
	}
	for _, id := range res.DiskIDs {
		if err := add("disk", id, "Microsoft.Compute/disks"); err != nil {
			return err
		}
	}
	c, err := newARMClients(res.Subscription, cred, opts)
	if err != nil {
		return fmt.Errorf("delete failover %s: %w", res.VMName, err)
	}

	// First check every resource is a test failover's.
	for _, it := range items {
		var tags map[string]*string
		var err error
		switch it.kind {
		case "VM":
			var r armcompute.VirtualMachinesClientGetResponse
			r, err = c.vms.Get(ctx, it.rg, it.name, nil)
			tags = r.Tags
		case "NIC":
			var r armnetwork.InterfacesClientGetResponse
			r, err = c.nics.Get(ctx, it.rg, it.name, nil)
			tags = r.Tags
		default:
			var r armcompute.DisksClientGetResponse
			r, err = c.disks.Get(ctx, it.rg, it.name, nil)
			tags = r.Tags
		}
		if isNotFound(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("delete failover %s: look up %s %s: %w", res.VMName, it.kind, it.name, armError(err))
		}
		if deref(tags[TagTestFailover], "") != "true" {
			return fmt.Errorf("delete failover %s: %s %s has no tag %s=true: %w", res.VMName, it.kind, it.name, TagTestFailover, ErrNotTest)
		}
	}

	var errs []error
	for _, it := range items {
		var err error
		switch it.kind {
		case "VM":
			err = c.deleteVM(ctx, it.rg, it.name)
			if err != nil {
				// The NIC and disks stay attached to a VM that is not
				// deleted: do not try them.
				return fmt.Errorf("delete failover %s: delete VM: %w", res.VMName, err)
			}
		case "NIC":
			err = c.deleteNIC(ctx, it.rg, it.name)
		default:
			err = c.deleteDisk(ctx, it.rg, it.name)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("delete %s %s: %w", it.kind, it.name, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("delete failover %s: %w", res.VMName, errors.Join(errs...))
	}
	return nil
}

func isNotFound(err error) bool {
	var re *azcore.ResponseError
	return errors.As(err, &re) && re.StatusCode == http.StatusNotFound
}

// armErr is an ARM error on one line: status, code and message, without
// the request and response dumps of azcore.ResponseError's text. It
// unwraps to the ResponseError.
type armErr struct {
	status    int
	code, msg string
	resp      *azcore.ResponseError
}

func (e *armErr) Error() string {
	s := fmt.Sprintf("Azure: %d %s", e.status, e.code)
	if e.msg != "" {
		s += ": " + e.msg
	}
	return s
}

func (e *armErr) Unwrap() error { return e.resp }

// armError shortens an ARM error; a 401 or 403 also wraps ErrARMAuth.
func armError(err error) error {
	var re *azcore.ResponseError
	if !errors.As(err, &re) {
		return err
	}
	e := &armErr{status: re.StatusCode, code: re.ErrorCode, resp: re}
	if re.RawResponse != nil {
		if body, perr := runtime.Payload(re.RawResponse); perr == nil && len(body) > 0 {
			var x struct {
				Error struct{ Code, Message string }
			}
			if json.Unmarshal(body, &x) == nil {
				e.msg, _, _ = strings.Cut(strings.TrimSpace(x.Error.Message), "\n")
				if e.code == "" {
					e.code = x.Error.Code
				}
			}
		}
	}
	if re.StatusCode == http.StatusForbidden || re.StatusCode == http.StatusUnauthorized {
		return fmt.Errorf("%w (%w)", ErrARMAuth, e)
	}
	return e
}

// ErrARMAuth is wrapped when Azure Resource Manager refuses the credential
// (401), or its identity lacks a permission (403): it must create disks,
// NICs and VMs in the resource group, join the subnet, and read the VHDs'
// storage account. Contributor on those covers it; a narrower set of roles
// has not been worked out, nor anything checked against real Azure.
var ErrARMAuth = errors.New("Azure refused the credential or its role assignments")

// deref returns *p, or def if p is nil.
func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}
