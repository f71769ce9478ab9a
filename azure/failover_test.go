package azure

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	azfake "github.com/Azure/azure-sdk-for-go/sdk/azcore/fake"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/compute/armcompute/v8"

	"github.com/asrdr/asr/azure/fakearm"
)

func init() {
	// The fakes answer at once; the SDK allows a polling interval under a
	// second only in tests.
	pollFrequency = time.Millisecond
}

const (
	testSub = fakearm.Subscription
	testRG  = "dr-rg"
)

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

func mustFailover(t *testing.T, f *fakearm.ARM, spec FailoverSpec, disks []FailoverDisk) (FailoverResult, []string) {
	t.Helper()
	var steps []string
	res, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.Options(), spec, disks, func(s string) { steps = append(steps, s) })
	if err != nil {
		t.Fatalf("FailoverToAzure: %v\nsteps:\n%s", err, strings.Join(steps, "\n"))
	}
	return res, steps
}

// checkFailover checks what a successful failover of spec and disks left
// in f: the disks imported from their blobs in order, the OS disk first,
// the NIC in the subnet, the VM with the size, NIC and disks.
func checkFailover(t *testing.T, f *fakearm.ARM, spec FailoverSpec, disks []FailoverDisk, res FailoverResult, wantSize string) {
	t.Helper()
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
		k := res.DiskIDs[i]
		d, ok := f.Disk(k)
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

	vm, ok := f.VM(res.VMID)
	if !ok || res.VMID != f.ID(spec.ResourceGroup, "Microsoft.Compute/virtualMachines", spec.VMName) {
		t.Fatalf("VM %s (%s) does not exist", spec.VMName, res.VMID)
	}
	wantTag("VM", vm.Tags)
	if id := deref(vm.Properties.VMID, ""); id == "" || res.VMUUID != id {
		t.Errorf("the result's VM UUID %q, ARM's vmId %q", res.VMUUID, id)
	}
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
	nic, ok := f.NIC(res.NICID)
	if !ok {
		t.Fatalf("NIC %s does not exist", res.NICID)
	}
	wantTag("NIC", nic.Tags)
	vnetRG := spec.VNetResourceGroup
	if vnetRG == "" {
		vnetRG = spec.ResourceGroup
	}
	wantSubnet := f.ID(vnetRG, "Microsoft.Network/virtualNetworks", spec.VNet+"/subnets/"+spec.Subnet)
	if got := deref(nic.Properties.IPConfigurations[0].Properties.Subnet.ID, ""); got != wantSubnet {
		t.Errorf("NIC in subnet %s, want %s", got, wantSubnet)
	}
	if res.PrivateIP == "" {
		t.Errorf("no private IP in the result")
	}
}

func TestFailover(t *testing.T) {
	f := fakearm.New(t)
	spec, disks := testSpec(), testDisks()
	disks[1].Name = "web01-data"
	res, steps := mustFailover(t, f, spec, disks)
	checkFailover(t, f, spec, disks, res, "Standard_D4s_v3")

	// Disks first, OS disk first, then the NIC, then the VM.
	want := []string{"PUT disks/web01-osdisk", "PUT disks/web01-data", "PUT disks/web01-datadisk-1", "PUT nics/web01-nic", "PUT vms/web01"}
	if got := f.Writes(); !slices.Equal(got, want) {
		t.Errorf("writes %v, want %v", got, want)
	}
	if len(steps) < 5 || !strings.Contains(steps[len(steps)-1], "created") {
		t.Errorf("progress: %q", steps)
	}

	// A second failover of the same names is refused before it creates
	// anything, and leaves the first alone.
	before := f.Resources()
	writes := len(f.Writes())
	if _, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.Options(), spec, disks, nil); !errors.Is(err, ErrExists) {
		t.Fatalf("second failover: %v, want ErrExists", err)
	}
	if got := f.Resources(); !slices.Equal(got, before) || len(f.Writes()) != writes {
		t.Fatalf("the refused failover changed things: %v, writes %v", got, f.Writes()[writes:])
	}

	// Not a test failover: DeleteFailover refuses it and calls nothing.
	calls := f.Calls()
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.Options(), res); !errors.Is(err, ErrNotTest) {
		t.Fatalf("DeleteFailover of a failover: %v, want ErrNotTest", err)
	}
	if f.Calls() != calls {
		t.Fatalf("DeleteFailover of a failover made %d calls", f.Calls()-calls)
	}
	// Nor does it take a result marked Test whose resources are not.
	res.Test = true
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.Options(), res); !errors.Is(err, ErrNotTest) {
		t.Fatalf("DeleteFailover of a failover relabelled as a test: %v, want ErrNotTest", err)
	}
	if got := f.Resources(); !slices.Equal(got, before) {
		t.Fatalf("DeleteFailover refused but changed things: %v", got)
	}
}

func TestTestFailover(t *testing.T) {
	f := fakearm.New(t)
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
	vm, _ := f.VM(f.ID(testRG, "Microsoft.Compute/virtualMachines", "web01-test"))
	if deref(vm.Tags["owner"], "") != "dr-team" {
		t.Errorf("VM tags %v: the spec's are missing", vm.Tags)
	}

	// DeleteFailover removes everything, VM first, and again is a no-op.
	before := len(f.Writes())
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.Options(), res); err != nil {
		t.Fatal(err)
	}
	if got := f.Resources(); len(got) != 0 {
		t.Fatalf("left after DeleteFailover: %v", got)
	}
	want := []string{"DELETE vms/web01-test", "DELETE nics/web01-test-nic", "DELETE disks/web01-test-osdisk"}
	if got := f.Writes()[before:]; !slices.Equal(got, want) {
		t.Errorf("deletes %v, want %v", got, want)
	}
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.Options(), res); err != nil {
		t.Fatalf("DeleteFailover again: %v", err)
	}
}

// TestFailoverRollback: a failure at the VM step deletes the NIC and the
// disks (and the VM, if Azure created it), in reverse order.
func TestFailoverRollback(t *testing.T) {
	for _, fail := range []string{"put", "provision"} {
		t.Run(fail, func(t *testing.T) {
			f := fakearm.New(t)
			f.VMFail = fail
			var steps []string
			_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.Options(), testSpec(), testDisks(), func(s string) { steps = append(steps, s) })
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
			if got := f.Resources(); len(got) != 0 {
				t.Fatalf("left after the rollback: %v", got)
			}
			want := []string{"PUT disks/web01-osdisk", "PUT disks/web01-datadisk-0", "PUT disks/web01-datadisk-1", "PUT nics/web01-nic", "PUT vms/web01",
				"DELETE vms/web01", "DELETE nics/web01-nic", "DELETE disks/web01-datadisk-1", "DELETE disks/web01-datadisk-0", "DELETE disks/web01-osdisk"}
			if got := f.Writes(); !slices.Equal(got, want) {
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
	f := fakearm.New(t)
	ctx, cancel := context.WithCancel(t.Context())
	_, err := FailoverToAzure(ctx, &azfake.TokenCredential{}, f.Options(), testSpec(), testDisks(), func(s string) {
		if strings.HasPrefix(s, "create VM") {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
	if got := f.Resources(); len(got) != 0 {
		t.Fatalf("left after a cancelled failover: %v", got)
	}
}

// TestFailoverRollbackLateCreate: a VM create answered with an error but
// carried out after the rollback's delete of the VM found nothing (the VM
// then holds the disks and NIC, whose deletes fail) is cleaned up by the
// rollback's next round.
func TestFailoverRollbackLateCreate(t *testing.T) {
	f := fakearm.New(t)
	f.VMFail = "late"
	_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.Options(), testSpec(), testDisks(), nil)
	if err == nil || strings.Contains(err.Error(), "left resources behind") {
		t.Fatalf("err %v, want the VM's failure and a complete rollback", err)
	}
	if got := f.Resources(); len(got) != 0 {
		t.Fatalf("left after a late VM create: %v", got)
	}
	if n := strings.Count(strings.Join(f.Writes(), " "), "DELETE vms/"); n < 2 {
		t.Errorf("the VM was deleted %d times, want a second round after it appeared: %v", n, f.Writes())
	}
}

// TestFailoverImportRefused: a disk Azure cannot import stops the failover
// there, and the disks before it are deleted.
func TestFailoverImportRefused(t *testing.T) {
	f := fakearm.New(t)
	f.ImportCheck = func(_ context.Context, uri, _ string) (int64, error) {
		if strings.HasSuffix(uri, "-1.vhd") {
			return 0, errors.New("not a VHD")
		}
		return 1 << 20, nil
	}
	if _, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.Options(), testSpec(), testDisks(), nil); err == nil || !strings.Contains(err.Error(), "import disk web01-datadisk-0") {
		t.Fatalf("err %v, want the import of web01-datadisk-0 failing", err)
	}
	if got := f.Resources(); len(got) != 0 {
		t.Fatalf("left: %v", got)
	}
}

func TestFailoverMissingSubnet(t *testing.T) {
	f := fakearm.New(t)
	spec := testSpec()
	spec.Subnet = "nope"
	_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.Options(), spec, testDisks(), nil)
	if !isNotFound(err) || !strings.Contains(err.Error(), "subnet dr-vnet/nope") {
		t.Fatalf("err %v, want a not-found subnet", err)
	}
	if len(f.Writes()) != 0 {
		t.Fatalf("writes: %v", f.Writes())
	}
}

func TestFailoverForbidden(t *testing.T) {
	f := fakearm.New(t)
	spec := testSpec()
	spec.Subnet = "forbidden"
	_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.Options(), spec, testDisks(), nil)
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
			f := fakearm.New(t)
			spec, disks := testSpec(), testDisks()
			if tt.spec != nil {
				tt.spec(&spec)
			}
			if tt.disks != nil {
				disks = tt.disks(disks)
			}
			_, err := FailoverToAzure(t.Context(), &azfake.TokenCredential{}, f.Options(), spec, disks, nil)
			if !errors.Is(err, ErrInvalidFailover) || !strings.Contains(err.Error(), tt.errHas) {
				t.Fatalf("err %v, want ErrInvalidFailover saying %q", err, tt.errHas)
			}
			if n := f.Calls(); n != 0 {
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
	f := fakearm.New(t)
	res := FailoverResult{Subscription: testSub, ResourceGroup: testRG, VMName: "x", Test: true,
		VMID: "/subscriptions/" + testSub + "/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/x"}
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.Options(), res); !errors.Is(err, ErrInvalidFailover) {
		t.Fatalf("a NIC's ID as the VM's: %v", err)
	}
	res.VMID = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/x"
	if err := DeleteFailover(t.Context(), &azfake.TokenCredential{}, f.Options(), res); !errors.Is(err, ErrInvalidFailover) {
		t.Fatalf("a VM in another subscription: %v", err)
	}
	if f.Calls() != 0 {
		t.Fatalf("%d calls", f.Calls())
	}
}
