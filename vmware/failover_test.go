package vmware

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/vmware/vcsim"
)

// fsim is a simulator for failover tests, with the local directory behind
// its datastore.
type fsim struct {
	sim   *vcsim.Sim
	c     *govmomi.Client
	ds    string // datastore name
	dsDir string // its directory on this machine
}

func mustFailoverSim(t testing.TB) *fsim {
	t.Helper()
	s, err := vcsim.Start("admin", testPassword)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	ctx := context.Background()
	c, err := s.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Logout(context.Background()) })
	f := find.NewFinder(c.Client, true)
	dc, err := f.DefaultDatacenter(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f.SetDatacenter(dc)
	ds, err := f.Datastore(ctx, "LocalDS_0")
	if err != nil {
		t.Fatal(err)
	}
	var mds mo.Datastore
	if err := ds.Properties(ctx, ds.Reference(), []string{"summary"}, &mds); err != nil {
		t.Fatal(err)
	}
	// The simulator's datastore URL is a local directory.
	if fi, err := os.Stat(mds.Summary.Url); err != nil || !fi.IsDir() {
		t.Fatalf("datastore url %q is not a local directory: %v", mds.Summary.Url, err)
	}
	return &fsim{sim: s, c: c, ds: "LocalDS_0", dsDir: mds.Summary.Url}
}

// mustDiskBytes is size random bytes with zero regions (a zero first
// MiB's second half, a zero run in the middle and a zero tail).
func mustDiskBytes(t testing.TB, size int64, seed uint64) []byte {
	t.Helper()
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := 0; i+8 <= len(b); i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	zero := func(from, to int64) {
		clear(b[max(0, min(from, size)):max(0, min(to, size))])
	}
	zero(512<<10, 1<<20)
	zero(size/2, size/2+300<<10)
	zero(size-64<<10, size)
	return b
}

// inventoryDisks is the inventory's reading of a VM's disks (tests name
// their FailoverDisks "disks").
var inventoryDisks = disks

func sum(b []byte) [32]byte { return sha256.Sum256(b) }

func mustFileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sum(b)
}

// descriptor is a parsed VMDK descriptor (a strict reading: the test's own,
// so the writer is not checked against itself).
type descriptor struct {
	fields  map[string]string
	extents []string
}

func mustParseDescriptor(t *testing.T, p string) descriptor {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	d := descriptor{fields: map[string]string{}}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "RW ") || strings.HasPrefix(line, "RDONLY "):
			d.extents = append(d.extents, line)
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("%s: line %q is neither a field nor an extent", p, line)
			}
			k = strings.TrimSpace(k)
			if _, dup := d.fields[k]; dup {
				t.Fatalf("%s: %s twice", p, k)
			}
			d.fields[k] = strings.Trim(strings.TrimSpace(v), `"`)
		}
	}
	return d
}

func (d descriptor) int(t *testing.T, key string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(d.fields[key], 10, 64)
	if err != nil {
		t.Fatalf("descriptor %s: %v", key, err)
	}
	return n
}

// vmInfo reads what the tests check of a VM.
func vmInfo(t *testing.T, c *govmomi.Client, ref string) mo.VirtualMachine {
	t.Helper()
	var m mo.VirtualMachine
	pc := property.DefaultCollector(c.Client)
	err := pc.RetrieveOne(context.Background(), types.ManagedObjectReference{Type: "VirtualMachine", Value: ref},
		[]string{"name", "config", "runtime.powerState", "runtime.host", "network", "parent"}, &m)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func netNames(t *testing.T, c *govmomi.Client, devs []types.BaseVirtualDevice) []string {
	t.Helper()
	var out []string
	for _, d := range devs {
		card, ok := d.(types.BaseVirtualEthernetCard)
		if !ok {
			continue
		}
		b, ok := card.GetVirtualEthernetCard().Backing.(*types.VirtualEthernetCardNetworkBackingInfo)
		if !ok || b.Network == nil {
			t.Fatalf("NIC backing %T", card.GetVirtualEthernetCard().Backing)
		}
		var n mo.Network
		if err := property.DefaultCollector(c.Client).RetrieveOne(context.Background(), *b.Network, []string{"name"}, &n); err != nil {
			t.Fatal(err)
		}
		out = append(out, n.Name)
	}
	return out
}

// dsEntries lists the datastore's top level.
func (s *fsim) dsEntries(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(s.dsDir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func (s *fsim) vmNames(t *testing.T) []string {
	t.Helper()
	var vms []mo.VirtualMachine
	f := find.NewFinder(s.c.Client, true)
	list, err := f.VirtualMachineList(context.Background(), "/...")
	if err != nil {
		t.Fatal(err)
	}
	var refs []types.ManagedObjectReference
	for _, v := range list {
		refs = append(refs, v.Reference())
	}
	if err := property.DefaultCollector(s.c.Client).Retrieve(context.Background(), refs, []string{"name"}, &vms); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, v := range vms {
		out = append(out, v.Name)
	}
	slices.Sort(out)
	return out
}

// progressLog records progress calls (never concurrent, by contract:
// the lock would hide overlapping calls, so it counts them).
type progressLog struct {
	mu      sync.Mutex
	calls   [][2]int64
	overlap bool
	busy    bool
}

func (p *progressLog) f(done, total int64) {
	p.mu.Lock()
	if p.busy {
		p.overlap = true
	}
	p.busy = true
	p.calls = append(p.calls, [2]int64{done, total})
	p.busy = false
	p.mu.Unlock()
}

func TestFailover(t *testing.T) {
	s := mustFailoverSim(t)
	ctx := ctxT(t)
	const mib = 1 << 20
	contents := [][]byte{
		mustDiskBytes(t, 4*mib, 1),
		mustDiskBytes(t, 3*mib+7*512, 2), // not a whole number of MiB
		mustDiskBytes(t, 2*mib, 3),
	}
	disks := []FailoverDisk{
		{Name: "disk0", Size: int64(len(contents[0])), Src: bytes.NewReader(contents[0]), Controller: "pvscsi", Bus: 0, Unit: 0},
		{Name: "disk1", Size: int64(len(contents[1])), Src: bytes.NewReader(contents[1]), Controller: "lsilogic-sas", Bus: 1, Unit: -1},
		{Name: "disk2", Size: int64(len(contents[2])), Src: bytes.NewReader(contents[2]), Controller: "nvme", Bus: 0, Unit: 3},
	}
	spec := FailoverSpec{
		VMName: "web-01 (recovered)", Datastore: s.ds, CPUs: 2, MemoryMiB: 2048,
		GuestID: "ubuntu64Guest", Firmware: "efi",
		NICs: []NIC{{Type: "vmxnet3", Network: "VM Network"}, {Type: "e1000e"}},
	}
	var pl progressLog
	res, err := FailoverToVSphere(ctx, s.c, spec, disks, pl.f)
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, b := range contents {
		total += int64(len(b))
	}
	if res.Ref == "" || res.Name != spec.VMName || res.PoweredOn || res.Bytes != total || res.Dir != "[LocalDS_0] "+spec.VMName {
		t.Fatalf("result %+v", res)
	}
	// Its BIOS UUID, as vCenter has it (lower case).
	if u := strings.ToLower(object.NewVirtualMachine(s.c.Client, types.ManagedObjectReference{Type: "VirtualMachine", Value: res.Ref}).UUID(ctx)); u == "" || res.UUID != u {
		t.Fatalf("result's BIOS UUID %q, the VM's %q", res.UUID, u)
	}

	// Progress: from 0 to the total, never backwards, never overlapping.
	if pl.overlap || len(pl.calls) < 2 || pl.calls[0] != [2]int64{0, total} || pl.calls[len(pl.calls)-1] != [2]int64{total, total} {
		t.Fatalf("progress calls %v (overlap %v)", pl.calls, pl.overlap)
	}
	for i := 1; i < len(pl.calls); i++ {
		if pl.calls[i][0] < pl.calls[i-1][0] {
			t.Fatalf("progress went back: %v", pl.calls)
		}
	}

	// The files: each flat extent is the source byte for byte; each
	// descriptor names it with the right sectors and geometry.
	dir := filepath.Join(s.dsDir, spec.VMName)
	for i, d := range disks {
		if got, want := mustFileSum(t, filepath.Join(dir, d.Name+"-flat.vmdk")), sum(contents[i]); got != want {
			t.Errorf("%s: flat file differs from the source", d.Name)
		}
		desc := mustParseDescriptor(t, filepath.Join(dir, d.Name+".vmdk"))
		sectors := d.Size / 512
		if desc.fields["createType"] != "vmfs" || desc.fields["version"] != "1" || desc.fields["parentCID"] != "ffffffff" {
			t.Errorf("%s: descriptor %v", d.Name, desc.fields)
		}
		if want := fmt.Sprintf(`RW %d VMFS "%s-flat.vmdk"`, sectors, d.Name); !slices.Equal(desc.extents, []string{want}) {
			t.Errorf("%s: extents %q, want %q", d.Name, desc.extents, want)
		}
		heads, secs, cyl := desc.int(t, "ddb.geometry.heads"), desc.int(t, "ddb.geometry.sectors"), desc.int(t, "ddb.geometry.cylinders")
		if heads != 255 || secs != 63 || cyl != max(1, sectors/(255*63)) || desc.fields["ddb.adapterType"] != "lsilogic" {
			t.Errorf("%s: geometry %d/%d/%d adapter %q", d.Name, cyl, heads, secs, desc.fields["ddb.adapterType"])
		}
		if res.Disks[i] != fmt.Sprintf("[LocalDS_0] %s/%s.vmdk", spec.VMName, d.Name) {
			t.Errorf("result disk %d: %s", i, res.Disks[i])
		}
	}

	// The VM: its hardware, read back through the inventory's own reading.
	m := vmInfo(t, s.c, res.Ref)
	if m.Name != spec.VMName || m.Config.Hardware.NumCPU != 2 || m.Config.Hardware.MemoryMB != 2048 ||
		m.Config.GuestId != "ubuntu64Guest" || m.Config.Firmware != "efi" || m.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		t.Fatalf("VM %s: cpus %d mem %d guest %s firmware %s power %s", m.Name, m.Config.Hardware.NumCPU, m.Config.Hardware.MemoryMB,
			m.Config.GuestId, m.Config.Firmware, m.Runtime.PowerState)
	}
	if !marked(m.Config.ExtraConfig) {
		t.Error("the VM lacks the failover mark")
	}
	type place struct {
		kind      string
		bus, unit int32
		path      string
		size      int64
	}
	var got []place
	for _, d := range inventoryDisks(m.Config.Hardware.Device) {
		got = append(got, place{d.ControllerType, d.ControllerBus, d.Unit, d.Path, d.CapacityBytes})
	}
	want := []place{
		{"pvscsi", 0, 0, res.Disks[0], disks[0].Size},
		{"lsilogic-sas", 1, 0, res.Disks[1], disks[1].Size},
		{"nvme", 0, 3, res.Disks[2], disks[2].Size},
	}
	slices.SortFunc(got, func(a, b place) int { return strings.Compare(a.path, b.path) })
	if !slices.Equal(got, want) {
		t.Fatalf("disks\n%+v\nwant\n%+v", got, want)
	}
	var kinds []string
	for _, d := range m.Config.Hardware.Device {
		if n := nicKind(d); n != "" {
			kinds = append(kinds, n)
		}
	}
	if !slices.Equal(kinds, []string{"vmxnet3", "e1000e"}) {
		t.Fatalf("NICs %v", kinds)
	}
	if nets := netNames(t, s.c, m.Config.Hardware.Device); !slices.Equal(nets, []string{"VM Network", "VM Network"}) {
		t.Fatalf("NIC networks %v", nets)
	}

	// A second failover of the same name is refused, and changes nothing.
	before := mustFileSum(t, filepath.Join(dir, "disk0-flat.vmdk"))
	other := []FailoverDisk{{Name: "disk0", Size: 512, Src: bytes.NewReader(make([]byte, 512))}}
	if _, err := FailoverToVSphere(ctx, s.c, spec, other, nil); !errors.Is(err, ErrExists) {
		t.Fatalf("the same name again: %v", err)
	}
	if mustFileSum(t, filepath.Join(dir, "disk0-flat.vmdk")) != before {
		t.Fatal("a refused failover changed the first one's disk")
	}

	// The cleanup: VM and folder gone; a second call finds nothing.
	if err := DeleteFailoverVM(ctx, s.c, res.Ref); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the VM's folder is still there: %v", err)
	}
	if slices.Contains(s.vmNames(t), spec.VMName) {
		t.Fatal("the VM is still there")
	}
	if err := DeleteFailoverVM(ctx, s.c, res.Ref); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleting it again: %v", err)
	}
}

// TestFailoverControllers recreates each controller kind, IDE and SATA
// disks with the ATA geometry.
func TestFailoverControllers(t *testing.T) {
	s := mustFailoverSim(t)
	ctx := ctxT(t)
	var disks []FailoverDisk
	for i, kind := range controllerKinds {
		b := mustDiskBytes(t, 1<<20, uint64(10+i))
		disks = append(disks, FailoverDisk{Name: "d-" + kind, Size: int64(len(b)), Src: bytes.NewReader(b), Controller: kind, Bus: 0, Unit: -1})
	}
	// Four SCSI kinds share the SCSI buses: give each its own.
	for i := range disks[:4] {
		disks[i].Bus = int32(i)
	}
	res, err := FailoverToVSphere(ctx, s.c, FailoverSpec{VMName: "kinds", Datastore: s.ds, CPUs: 1, MemoryMiB: 512}, disks, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = DeleteFailoverVM(context.Background(), s.c, res.Ref) })
	m := vmInfo(t, s.c, res.Ref)
	byPath := make(map[string]Disk)
	for _, d := range inventoryDisks(m.Config.Hardware.Device) {
		byPath[d.Path] = d
	}
	for i, d := range disks {
		got := byPath[res.Disks[i]]
		if got.ControllerType != d.Controller || got.ControllerBus != d.Bus {
			t.Errorf("%s: on %q bus %d, want %q bus %d", d.Name, got.ControllerType, got.ControllerBus, d.Controller, d.Bus)
		}
		desc := mustParseDescriptor(t, filepath.Join(s.dsDir, "kinds", d.Name+".vmdk"))
		wantAdapter, wantHeads := "lsilogic", "255"
		switch d.Controller {
		case "buslogic":
			wantAdapter = "buslogic"
		case "ide", "sata":
			wantAdapter, wantHeads = "ide", "16"
		}
		if desc.fields["ddb.adapterType"] != wantAdapter || desc.fields["ddb.geometry.heads"] != wantHeads {
			t.Errorf("%s: adapter %q heads %q", d.Name, desc.fields["ddb.adapterType"], desc.fields["ddb.geometry.heads"])
		}
	}
}

// TestFailoverIsolated powers on a test failover on the isolated network:
// the port group is made once, on a vSwitch without uplink, and reused.
func TestFailoverIsolated(t *testing.T) {
	s := mustFailoverSim(t)
	ctx := ctxT(t)
	b := mustDiskBytes(t, 2<<20, 7)
	var refs []string
	for _, name := range []string{"test-a", "test-b"} {
		spec := FailoverSpec{VMName: name, Datastore: s.ds, CPUs: 1, MemoryMiB: 1024, Isolated: true, PowerOn: true,
			NICs: []NIC{{Type: "vmxnet3", Network: "VM Network"}, {Type: "e1000"}}}
		res, err := FailoverToVSphere(ctx, s.c, spec, []FailoverDisk{{Name: "disk0", Size: int64(len(b)), Src: bytes.NewReader(b)}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		refs = append(refs, res.Ref)
		m := vmInfo(t, s.c, res.Ref)
		if !res.PoweredOn || m.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
			t.Fatalf("%s: power %s", name, m.Runtime.PowerState)
		}
		if nets := netNames(t, s.c, m.Config.Hardware.Device); !slices.Equal(nets, []string{DefaultIsolatedNetwork, DefaultIsolatedNetwork}) {
			t.Fatalf("%s: NIC networks %v", name, nets)
		}
		if !slices.Equal(res.Networks, []string{DefaultIsolatedNetwork, DefaultIsolatedNetwork}) || res.Host == "" {
			t.Fatalf("%s: result %+v", name, res)
		}
		// The VM runs on the host whose port group it uses.
		host := object.NewHostSystem(s.c.Client, *m.Runtime.Host)
		ns, err := host.ConfigManager().NetworkSystem(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var mns mo.HostNetworkSystem
		if err := ns.Properties(ctx, ns.Reference(), []string{"networkInfo"}, &mns); err != nil {
			t.Fatal(err)
		}
		var pgs []string
		for _, pg := range mns.NetworkInfo.Portgroup {
			if pg.Spec.Name == DefaultIsolatedNetwork {
				pgs = append(pgs, pg.Spec.VswitchName)
			}
		}
		if !slices.Equal(pgs, []string{IsolatedSwitch}) {
			t.Fatalf("%s: isolated port groups on the VM's host: %v", name, pgs)
		}
		for _, vs := range mns.NetworkInfo.Vswitch {
			if vs.Name == IsolatedSwitch && (len(vs.Pnic) > 0 || vs.Spec.Bridge != nil) {
				t.Fatalf("%s has an uplink: %+v", IsolatedSwitch, vs)
			}
		}
	}
	// Cleanup powers the VM off first.
	for _, ref := range refs {
		if err := DeleteFailoverVM(ctx, s.c, ref); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"test-a", "test-b"} {
		if slices.Contains(s.vmNames(t), name) || slices.Contains(s.dsEntries(t), name) {
			t.Fatalf("%s is left", name)
		}
	}
}

// TestFailoverRefused: a bad request fails validation with nothing made.
func TestFailoverRefused(t *testing.T) {
	s := mustFailoverSim(t)
	ctx := ctxT(t)
	if err := os.Mkdir(filepath.Join(s.dsDir, "leftover"), 0o700); err != nil {
		t.Fatal(err)
	}
	disk := func() FailoverDisk {
		return FailoverDisk{Name: "disk0", Size: 1 << 20, Src: bytes.NewReader(make([]byte, 1<<20))}
	}
	good := FailoverSpec{VMName: "new", Datastore: s.ds, CPUs: 1, MemoryMiB: 512, NICs: []NIC{{Type: "vmxnet3"}}}
	tests := []struct {
		name  string
		spec  func(*FailoverSpec)
		disks func([]FailoverDisk) []FailoverDisk
		is    error
	}{
		{"existing VM", func(s *FailoverSpec) { s.VMName = "DC0_H0_VM0" }, nil, ErrExists},
		{"existing folder", func(s *FailoverSpec) { s.VMName = "leftover" }, nil, ErrExists},
		{"unknown datastore", func(s *FailoverSpec) { s.Datastore = "nope" }, nil, ErrNotFound},
		{"no datastore", func(s *FailoverSpec) { s.Datastore = "" }, nil, ErrInvalidFailover},
		{"unknown host", func(s *FailoverSpec) { s.Host = "esx-nope" }, nil, ErrNotFound},
		{"unknown pool", func(s *FailoverSpec) { s.Pool = "/DC0/host/DC0_C0/Resources/nope" }, nil, ErrNotFound},
		{"unknown network", func(s *FailoverSpec) { s.Network = "nope" }, nil, ErrNotFound},
		{"unknown folder", func(s *FailoverSpec) { s.Folder = "/DC0/vm/nope" }, nil, ErrNotFound},
		{"not a VM folder", func(s *FailoverSpec) { s.Folder = "/DC0/host" }, nil, ErrNotFound},
		{"unknown NIC network", func(s *FailoverSpec) { s.NICs = []NIC{{Type: "e1000", Network: "gone"}} }, nil, ErrNotFound},
		{"host outside the pool", func(s *FailoverSpec) { s.Host, s.Pool = "DC0_H0", "/DC0/host/DC0_C0/Resources" }, nil, ErrInvalidFailover},
		{"name with a slash", func(s *FailoverSpec) { s.VMName = "a/b" }, nil, ErrInvalidFailover},
		{"name with a percent", func(s *FailoverSpec) { s.VMName = "a%b" }, nil, ErrInvalidFailover},
		{"dot name", func(s *FailoverSpec) { s.VMName = ".." }, nil, ErrInvalidFailover},
		{"no name", func(s *FailoverSpec) { s.VMName = "" }, nil, ErrInvalidFailover},
		{"no CPU", func(s *FailoverSpec) { s.CPUs = 0 }, nil, ErrInvalidFailover},
		{"odd memory", func(s *FailoverSpec) { s.MemoryMiB = 1023 }, nil, ErrInvalidFailover},
		{"firmware", func(s *FailoverSpec) { s.Firmware = "uefi" }, nil, ErrInvalidFailover},
		{"SR-IOV NIC", func(s *FailoverSpec) { s.NICs = []NIC{{Type: "sriov"}} }, nil, ErrInvalidFailover},
		{"isolated with a network", func(s *FailoverSpec) { s.Isolated, s.Network = true, "VM Network" }, nil, ErrInvalidFailover},
		{"no disks", nil, func([]FailoverDisk) []FailoverDisk { return nil }, ErrInvalidFailover},
		{"disk name", nil, func(d []FailoverDisk) []FailoverDisk { d[0].Name = "../x"; return d }, ErrInvalidFailover},
		{"disk names clash", nil, func(d []FailoverDisk) []FailoverDisk {
			e := disk()
			e.Name, e.Unit = "DISK0", 1
			return append(d, e)
		}, ErrInvalidFailover},
		{"size", nil, func(d []FailoverDisk) []FailoverDisk { d[0].Size = 1000; return d }, ErrInvalidFailover},
		{"no source", nil, func(d []FailoverDisk) []FailoverDisk { d[0].Src = nil; return d }, ErrInvalidFailover},
		{"controller", nil, func(d []FailoverDisk) []FailoverDisk { d[0].Controller = "scsi9"; return d }, ErrInvalidFailover},
		{"SCSI unit 7", nil, func(d []FailoverDisk) []FailoverDisk { d[0].Unit = 7; return d }, ErrInvalidFailover},
		{"IDE bus 2", nil, func(d []FailoverDisk) []FailoverDisk { d[0].Controller, d[0].Bus = "ide", 2; return d }, ErrInvalidFailover},
		{"same unit", nil, func(d []FailoverDisk) []FailoverDisk {
			e := disk()
			e.Name = "disk1"
			return append(d, e)
		}, ErrInvalidFailover},
		{"two kinds on a bus", nil, func(d []FailoverDisk) []FailoverDisk {
			e := disk()
			e.Name, e.Controller, e.Unit = "disk1", "lsilogic", 1
			return append(d, e)
		}, ErrInvalidFailover},
	}
	vmsBefore, filesBefore := s.vmNames(t), s.dsEntries(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := good
			spec.NICs = slices.Clone(good.NICs)
			if tt.spec != nil {
				tt.spec(&spec)
			}
			disks := []FailoverDisk{disk()}
			if tt.disks != nil {
				disks = tt.disks(disks)
			}
			_, err := FailoverToVSphere(ctx, s.c, spec, disks, nil)
			var fe *FailoverError
			if !errors.Is(err, tt.is) || !errors.As(err, &fe) || fe.Step != "validate" {
				t.Fatalf("got %v, want %v at validate", err, tt.is)
			}
			t.Log(err)
		})
	}
	if vms, files := s.vmNames(t), s.dsEntries(t); !slices.Equal(vms, vmsBefore) || !slices.Equal(files, filesBefore) {
		t.Fatalf("refused failovers made something: VMs %v -> %v, files %v -> %v", vmsBefore, vms, filesBefore, files)
	}
}

// failingReader fails at an offset (a recovery point that cannot be read).
type failingReader struct {
	r   io.ReaderAt
	at  int64
	err error
}

func (f failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.at {
		n := max(0, f.at-off)
		copy(p, make([]byte, n))
		return int(n), f.err
	}
	return f.r.ReadAt(p, off)
}

// cancelingReader cancels the failover's context at an offset.
type cancelingReader struct {
	r      io.ReaderAt
	at     int64
	cancel context.CancelFunc
	once   sync.Once
}

func (c *cancelingReader) ReadAt(p []byte, off int64) (int, error) {
	if off >= c.at {
		c.once.Do(c.cancel)
	}
	return c.r.ReadAt(p, off)
}

// shortReader holds fewer bytes than the disk's size.
type shortReader struct{ b []byte }

func (s shortReader) ReadAt(p []byte, off int64) (int, error) {
	return bytes.NewReader(s.b).ReadAt(p, off)
}

// TestFailoverCleanup: a failure after the checks (a source that fails
// or is short mid-way, a canceled context, a VM vCenter refuses) leaves
// neither files nor a VM, and says which step failed.
func TestFailoverCleanup(t *testing.T) {
	s := mustFailoverSim(t)
	b0, b1 := mustDiskBytes(t, 3<<20, 21), mustDiskBytes(t, 5<<20, 22)
	errSrc := errors.New("segment 42: checksum mismatch")
	tests := []struct {
		name   string
		refuse string // a method the simulator fails
		src1   func(cancel context.CancelFunc) io.ReaderAt
		step   string
		is     error
	}{
		{"source error", "", func(context.CancelFunc) io.ReaderAt {
			return failingReader{r: bytes.NewReader(b1), at: 2<<20 + 100, err: errSrc}
		}, "upload disk1", errSrc},
		{"short source", "", func(context.CancelFunc) io.ReaderAt { return shortReader{b1[:4<<20]} }, "upload disk1", io.ErrUnexpectedEOF},
		{"canceled", "", func(cancel context.CancelFunc) io.ReaderAt {
			return &cancelingReader{r: bytes.NewReader(b1), at: 1 << 20, cancel: cancel}
		}, "upload disk1", context.Canceled},
		// vCenter refuses the VM (the disks are uploaded by then), or
		// its power-on (the VM exists by then): injected faults.
		{"VM refused", "CreateVM_Task", func(context.CancelFunc) io.ReaderAt { return bytes.NewReader(b1) }, "create VM", nil},
		{"power-on refused", "PowerOnVM_Task", func(context.CancelFunc) io.ReaderAt { return bytes.NewReader(b1) }, "power on", nil},
	}
	vmsBefore, filesBefore := s.vmNames(t), s.dsEntries(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(ctxT(t))
			defer cancel()
			disks := []FailoverDisk{
				{Name: "disk0", Size: int64(len(b0)), Src: bytes.NewReader(b0)},
				{Name: "disk1", Size: int64(len(b1)), Src: tt.src1(cancel), Unit: 1},
			}
			if tt.refuse != "" {
				svc := s.sim.Model.Service
				svc.AddFaultRule(&simulator.FaultInjectionRule{MethodName: tt.refuse, ObjectType: "*", ObjectName: "*",
					Probability: 1, FaultType: simulator.FaultTypeInvalidState, Message: "injected", Enabled: true})
				defer svc.ClearFaultRules()
			}
			spec := FailoverSpec{VMName: "broken", Datastore: s.ds, CPUs: 1, MemoryMiB: 512, PowerOn: true, NICs: []NIC{{Type: "vmxnet3"}}}
			_, err := FailoverToVSphere(ctx, s.c, spec, disks, nil)
			var fe *FailoverError
			if !errors.As(err, &fe) || fe.Step != tt.step || (tt.is != nil && !errors.Is(err, tt.is)) || fe.Cleanup != nil {
				t.Fatalf("got %v, want a failure at %s (%v) cleaned up", err, tt.step, tt.is)
			}
			t.Log(err)
			if vms, files := s.vmNames(t), s.dsEntries(t); !slices.Equal(vms, vmsBefore) || !slices.Equal(files, filesBefore) {
				t.Fatalf("left behind: VMs %v -> %v, files %v -> %v", vmsBefore, vms, filesBefore, files)
			}
		})
	}
}

// TestDeleteFailoverVMRefusesOthers: only a VM the failover made is
// destroyed.
func TestDeleteFailoverVMRefusesOthers(t *testing.T) {
	s := mustFailoverSim(t)
	ctx := ctxT(t)
	vm, err := vcsim.FindVM(ctx, s.c, "DC0_H0_VM0")
	if err != nil {
		t.Fatal(err)
	}
	if err := DeleteFailoverVM(ctx, s.c, vm.Reference().Value); !errors.Is(err, ErrNotFailoverVM) {
		t.Fatalf("deleting a VM asr did not make: %v", err)
	}
	if !slices.Contains(s.vmNames(t), "DC0_H0_VM0") {
		t.Fatal("the VM is gone")
	}
	if err := DeleteFailoverVM(ctx, s.c, "vm-999999"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("an unknown ref: %v", err)
	}
}

func TestCheckFailoverUnits(t *testing.T) {
	d := func(name, kind string, bus, unit int32) FailoverDisk {
		return FailoverDisk{Name: name, Size: 512, Src: bytes.NewReader(nil), Controller: kind, Bus: bus, Unit: unit}
	}
	var disks []FailoverDisk
	for i := range 9 { // 0-6, then 8, 9: never the controller's 7
		disks = append(disks, d(fmt.Sprintf("s%d", i), "", 0, -1))
	}
	disks = append(disks, d("fixed", "pvscsi", 0, 10), d("ide", "ide", 1, -1), d("ide2", "ide", 1, -1))
	got, err := checkFailover(FailoverSpec{VMName: "x", Datastore: "ds", CPUs: 1, MemoryMiB: 4}, disks)
	if err != nil {
		t.Fatal(err)
	}
	var units []int32
	for _, g := range got {
		units = append(units, g.Unit)
	}
	if want := []int32{0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 0, 1}; !slices.Equal(units, want) || got[0].Controller != "pvscsi" {
		t.Fatalf("units %v, want %v", units, want)
	}
	// A third IDE disk on one bus has no unit.
	if _, err := checkFailover(FailoverSpec{VMName: "x", Datastore: "ds", CPUs: 1, MemoryMiB: 4},
		append(disks, d("ide3", "ide", 1, -1))); !errors.Is(err, ErrInvalidFailover) {
		t.Fatalf("a third IDE disk on a bus: %v", err)
	}
}

func TestVMDKDescriptorGeometry(t *testing.T) {
	tests := []struct {
		size          int64
		kind, adapter string
		cyl, heads    int64
	}{
		{10 << 30, "pvscsi", "lsilogic", 1305, 255},
		{10 << 30, "buslogic", "buslogic", 1305, 255},
		{10 << 30, "ide", "ide", 16383, 16}, // capped
		{100 << 20, "sata", "ide", 203, 16},
		{512, "nvme", "lsilogic", 1, 255}, // at least one cylinder
	}
	for _, tt := range tests {
		p := filepath.Join(t.TempDir(), "d.vmdk")
		if err := os.WriteFile(p, vmdkDescriptor("d", tt.size, tt.kind), 0o600); err != nil {
			t.Fatal(err)
		}
		desc := mustParseDescriptor(t, p)
		if desc.fields["ddb.adapterType"] != tt.adapter || desc.int(t, "ddb.geometry.cylinders") != tt.cyl ||
			desc.int(t, "ddb.geometry.heads") != tt.heads || desc.int(t, "ddb.geometry.sectors") != 63 {
			t.Errorf("%d %s: %v", tt.size, tt.kind, desc.fields)
		}
		if want := fmt.Sprintf(`RW %d VMFS "d-flat.vmdk"`, tt.size/512); !slices.Equal(desc.extents, []string{want}) {
			t.Errorf("%d: extents %q", tt.size, desc.extents)
		}
	}
}

// patternReader is size bytes of a repeated random MiB: a large disk
// without holding it in memory.
type patternReader struct{ block []byte }

func (p patternReader) ReadAt(b []byte, off int64) (int, error) {
	n := 0
	for n < len(b) {
		i := (off + int64(n)) % int64(len(p.block))
		n += copy(b[n:], p.block[i:])
	}
	return n, nil
}

// BenchmarkFailoverUpload256MiB is a whole failover of one 256 MiB disk
// into the simulator (upload over HTTPS /folder, VM creation) and its
// removal; the throughput is the disk's bytes over the failover's time.
func BenchmarkFailoverUpload256MiB(b *testing.B) {
	s := mustFailoverSim(b)
	ctx := context.Background()
	const size = 256 << 20
	src := patternReader{mustDiskBytes(b, 1<<20, 99)}
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		spec := FailoverSpec{VMName: fmt.Sprintf("bench-%d", i), Datastore: s.ds, CPUs: 1, MemoryMiB: 512}
		res, err := FailoverToVSphere(ctx, s.c, spec, []FailoverDisk{{Name: "disk0", Size: size, Src: src}}, nil)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := DeleteFailoverVM(ctx, s.c, res.Ref); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// TestFailoverNetworkAndPlacement: Network sends every NIC to a
// distributed port group; Host and Pool place the VM.
func TestFailoverNetworkAndPlacement(t *testing.T) {
	s := mustFailoverSim(t)
	ctx := ctxT(t)
	b := mustDiskBytes(t, 1<<20, 5)
	// A VM folder of the operator's: /DC0/vm/DR/web.
	dc, err := find.NewFinder(s.c.Client).Datacenter(ctx, "DC0")
	if err != nil {
		t.Fatal(err)
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dr, err := folders.VmFolder.CreateFolder(ctx, "DR")
	if err != nil {
		t.Fatal(err)
	}
	web, err := dr.CreateFolder(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	spec := FailoverSpec{VMName: "placed", Datastore: s.ds, CPUs: 1, MemoryMiB: 512, Network: "DC0_DVPG0",
		Host: "DC0_C0_H1", Pool: "/DC0/host/DC0_C0/Resources", Folder: "/DC0/vm/DR/web",
		NICs: []NIC{{Type: "vmxnet3", Network: "VM Network"}, {Type: "e1000"}}}
	res, err := FailoverToVSphere(ctx, s.c, spec, []FailoverDisk{{Name: "disk0", Size: int64(len(b)), Src: bytes.NewReader(b)}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	m := vmInfo(t, s.c, res.Ref)
	var host mo.HostSystem
	if err := property.DefaultCollector(s.c.Client).RetrieveOne(ctx, *m.Runtime.Host, []string{"name"}, &host); err != nil {
		t.Fatal(err)
	}
	if host.Name != "DC0_C0_H1" || res.Host != "DC0_C0_H1" {
		t.Fatalf("on host %s (result %q), want DC0_C0_H1", host.Name, res.Host)
	}
	if m.Parent == nil || *m.Parent != web.Reference() {
		t.Fatalf("VM in folder %v, want %v (/DC0/vm/DR/web)", m.Parent, web.Reference())
	}
	var pgs []string
	for _, d := range m.Config.Hardware.Device {
		if card, ok := d.(types.BaseVirtualEthernetCard); ok {
			bk, ok := card.GetVirtualEthernetCard().Backing.(*types.VirtualEthernetCardDistributedVirtualPortBackingInfo)
			if !ok {
				t.Fatalf("NIC backing %T, want a distributed port", card.GetVirtualEthernetCard().Backing)
			}
			var pg mo.DistributedVirtualPortgroup
			ref := types.ManagedObjectReference{Type: "DistributedVirtualPortgroup", Value: bk.Port.PortgroupKey}
			if err := property.DefaultCollector(s.c.Client).RetrieveOne(ctx, ref, []string{"name"}, &pg); err != nil {
				t.Fatal(err)
			}
			pgs = append(pgs, pg.Name)
		}
	}
	if !slices.Equal(pgs, []string{"DC0_DVPG0", "DC0_DVPG0"}) || !slices.Equal(res.Networks, pgs) {
		t.Fatalf("NICs on %v (result %v)", pgs, res.Networks)
	}
	if err := DeleteFailoverVM(ctx, s.c, res.Ref); err != nil {
		t.Fatal(err)
	}
}
