package vmware

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// FailoverDisk is one disk of a failover VM: its contents are written to
// the datastore as a flat VMDK and attached at the same place (controller
// kind, bus, unit) as on the source.
type FailoverDisk struct {
	// Name is the protected disk's name, e.g. "disk0": the files are
	// NAME.vmdk and NAME-flat.vmdk in the VM's folder. Letters, digits,
	// '.', '_' and '-', starting with a letter or digit; unique (case
	// aside) within a failover.
	Name string
	// Size is the disk's size in bytes, a multiple of 512.
	Size int64
	// Src holds exactly Size bytes: the recovery point's contents. It is
	// read once, in order, in pieces of at most 32 KiB.
	Src io.ReaderAt
	// Controller is the controller kind (ControllerPVSCSI, ...; "" is
	// pvscsi), Bus its bus number among its family's controllers (the
	// inventory's Disk.ControllerType and ControllerBus) and Unit the
	// disk's unit on it (Disk.Unit); -1 takes the first free unit.
	Controller string
	Bus, Unit  int32
}

// FailoverSpec is the VM a failover creates.
type FailoverSpec struct {
	// VMName names the new VM and its folder on the datastore. Refused if
	// a VM of that name exists in the data center, or the folder does.
	// At most 80 characters: letters, digits, space and ._-+()@, not
	// starting with a space or a dot.
	VMName string
	// Datacenter is the data center's name or path; "" is the only one.
	Datacenter string
	// Datastore receives the VM's files (required).
	Datastore string
	// Host and Pool place the VM (a host name, a resource pool name or
	// inventory path); both "" is the root pool of the first cluster,
	// else of the first standalone host. A Host alone uses its root pool.
	Host, Pool string
	// Folder is the VM folder (a name or an inventory path, e.g.
	// "/DC0/vm/DR/web") the VM is registered in; "" is the data center's
	// VM folder. A folder that is not a VM folder is refused.
	Folder string
	// Network is the network every NIC is attached to; "" keeps each
	// NIC's own network (NIC.Network), and "VM Network" for a NIC without
	// one.
	Network string
	// Isolated (a test failover) attaches every NIC to an isolated
	// network instead: the port group IsolatedNetwork ("" is
	// DefaultIsolatedNetwork) on the VM's host, on the standard vSwitch
	// IsolatedSwitch that has no uplink, both created if missing and
	// reused afterwards (never removed: other test VMs may use them).
	// The VM is placed on that host (Host, else the first connected host
	// of the pool's cluster that mounts the datastore).
	Isolated        bool
	IsolatedNetwork string
	PowerOn         bool
	// CPUs, MemoryMiB (a multiple of 4), GuestID (config.guestId, ""
	// is otherGuest64) and Firmware ("bios", "efi"; "" is the host's
	// default, BIOS) copy the source's.
	CPUs      int32
	MemoryMiB int32
	GuestID   string
	Firmware  string
	// NICs are the source's adapters: the same number of the same types
	// (NIC.Type) are created, with new MAC addresses.
	NICs []NIC
}

// FailoverResult is the VM a failover created.
type FailoverResult struct {
	Ref       string   // managed object id, e.g. vm-42 (DeleteFailoverVM's argument)
	Name      string   //
	Dir       string   // its folder, "[datastore1] NAME"
	Disks     []string // the descriptors' datastore paths, in the order of the disks
	Networks  []string // each NIC's network
	Host      string   // the host it was placed on ("" if vCenter chose)
	UUID      string   // its BIOS UUID (config.uuid, lower case)
	PoweredOn bool
	Bytes     int64 // the disks' bytes written
}

// DefaultIsolatedNetwork is the port group of test failovers; IsolatedSwitch
// the standard vSwitch without uplink it is created on.
const (
	DefaultIsolatedNetwork = "asr-test-failover"
	IsolatedSwitch         = "asr-isolated"
)

// failoverMarker is the extraConfig key that marks a VM asr's failover
// created: DeleteFailoverVM destroys no other VM.
const failoverMarker = "asr.failover"

// Conditions a caller branches on (an HTTP boundary maps them: bad
// request, not found, conflict).
var (
	ErrInvalidFailover = errors.New("invalid failover request")
	ErrNotFound        = errors.New("not found")
	ErrExists          = errors.New("already exists")
	ErrNotFailoverVM   = errors.New("not a VM created by asr's failover")
)

// FailoverError is a failed failover: the step that failed, and whether
// what it had made is gone.
type FailoverError struct {
	VM   string
	Step string // validate, isolated network, upload DISK, create VM, power on
	Err  error
	// Cleanup is why what the failover made could not all be removed
	// (nil if it was, or nothing was made); Leftover then says what an
	// operator must remove.
	Cleanup  error
	Leftover string
}

func (e *FailoverError) Error() string {
	s := fmt.Sprintf("failover %s: %s: %v", e.VM, e.Step, e.Err)
	if e.Cleanup != nil {
		s += fmt.Sprintf(" (cleanup failed: %v; remove %s by hand)", e.Cleanup, e.Leftover)
	}
	return s
}

func (e *FailoverError) Unwrap() error { return e.Err }

// cleanupTimeout bounds the removal of a failed failover's VM and files,
// which runs even when the caller's context is done.
const cleanupTimeout = 5 * time.Minute

// FailoverToVSphere creates a VM from recovered disk contents: it uploads
// each disk to the datastore over vCenter's /folder endpoint (a "vmfs"
// descriptor and its flat extent, streamed), creates the VM in the data
// center's VM folder with the source's CPUs, memory, guest, firmware,
// controllers, disks (the uploaded files) and NICs, and powers it on if
// asked. The request is checked first (names, sizes, layout, the
// datastore, host, pool and networks, no VM or folder of the name):
// nothing is made for a refused one. A failure later removes the VM and
// the folder. Errors are *FailoverError; errors.Is finds
// ErrInvalidFailover, ErrNotFound and ErrExists. progress (may be nil) is
// called with the bytes uploaded so far and the total, never
// concurrently.
func FailoverToVSphere(ctx context.Context, c *govmomi.Client, spec FailoverSpec, disks []FailoverDisk, progress func(done, total int64)) (FailoverResult, error) {
	fail := func(step string, err error) error { return &FailoverError{VM: spec.VMName, Step: step, Err: err} }
	layout, err := checkFailover(spec, disks)
	if err != nil {
		return FailoverResult{}, fail("validate", err)
	}
	f := &failover{c: c, spec: spec, disks: layout, progress: progress}
	if err := f.resolve(ctx); err != nil {
		return FailoverResult{}, fail("validate", err)
	}
	step, err := f.run(ctx)
	if err == nil {
		return f.res, nil
	}
	fe := &FailoverError{VM: spec.VMName, Step: step, Err: err}
	if cerr := f.cleanup(ctx); cerr != nil {
		fe.Cleanup, fe.Leftover = cerr, f.leftover()
	}
	return FailoverResult{}, fe
}

// placedDisk is a disk with its place on the new VM.
type placedDisk struct {
	FailoverDisk
	family string
}

// checkFailover checks what can be checked without the vCenter and
// returns the disks with their kinds and units settled.
func checkFailover(spec FailoverSpec, disks []FailoverDisk) ([]placedDisk, error) {
	invalid := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidFailover, fmt.Sprintf(format, a...))
	}
	if err := checkVMName(spec.VMName); err != nil {
		return nil, invalid("%v", err)
	}
	if spec.Datastore == "" {
		return nil, invalid("no datastore")
	}
	if spec.CPUs < 1 || spec.CPUs > 768 {
		return nil, invalid("%d CPUs (want 1 to 768)", spec.CPUs)
	}
	if spec.MemoryMiB < 4 || spec.MemoryMiB%4 != 0 {
		return nil, invalid("memory %d MiB (want a positive multiple of 4)", spec.MemoryMiB)
	}
	switch spec.Firmware {
	case "", "bios", "efi":
	default:
		return nil, invalid("firmware %q (want bios or efi)", spec.Firmware)
	}
	if spec.Isolated && spec.Network != "" {
		return nil, invalid("an isolated failover takes no network (its NICs go on the isolated one)")
	}
	if spec.IsolatedNetwork != "" && !spec.Isolated {
		return nil, invalid("an isolated network named without isolated")
	}
	if len(spec.NICs) > 10 {
		return nil, invalid("%d NICs (a VM has at most 10)", len(spec.NICs))
	}
	for i, n := range spec.NICs {
		if !validNICKind(n.Type) {
			return nil, invalid("NIC %d: type %q cannot be recreated (want one of %s)", i, n.Type, strings.Join(nicKinds, ", "))
		}
	}
	if len(disks) == 0 {
		return nil, invalid("no disks")
	}
	if len(disks) > 256 {
		return nil, invalid("%d disks (at most 256)", len(disks))
	}
	type bus struct {
		family string
		n      int32
	}
	kinds := make(map[bus]string)
	used := make(map[bus][]int32)
	names := make(map[string]bool)
	out := make([]placedDisk, len(disks))
	for i, d := range disks {
		if err := checkDiskName(d.Name); err != nil {
			return nil, invalid("disk %d: %v", i, err)
		}
		if names[strings.ToLower(d.Name)] {
			return nil, invalid("disk %s: two disks of that name", d.Name)
		}
		names[strings.ToLower(d.Name)] = true
		if d.Size <= 0 || d.Size%512 != 0 {
			return nil, invalid("disk %s: size %d (want a positive multiple of 512)", d.Name, d.Size)
		}
		if d.Src == nil {
			return nil, invalid("disk %s: no source", d.Name)
		}
		d.Controller = cmp.Or(d.Controller, ControllerPVSCSI)
		if !slices.Contains(controllerKinds, d.Controller) {
			return nil, invalid("disk %s: unknown controller type %q (want one of %s)", d.Name, d.Controller, strings.Join(controllerKinds, ", "))
		}
		fam := controllerFamily(d.Controller)
		buses, units := controllerLimits(fam)
		if d.Bus < 0 || d.Bus >= buses {
			return nil, invalid("disk %s: %s bus %d (want 0 to %d)", d.Name, d.Controller, d.Bus, buses-1)
		}
		if d.Unit < -1 || d.Unit >= units || (fam == "scsi" && d.Unit == 7) {
			return nil, invalid("disk %s: unit %d on %s (want -1 or 0 to %d, not the SCSI controller's 7)", d.Name, d.Unit, d.Controller, units-1)
		}
		b := bus{fam, d.Bus}
		if k, ok := kinds[b]; ok && k != d.Controller {
			return nil, invalid("disk %s: %s bus %d is already a %s controller", d.Name, fam, d.Bus, k)
		}
		kinds[b] = d.Controller
		if d.Unit >= 0 {
			if slices.Contains(used[b], d.Unit) {
				return nil, invalid("disk %s: %s %d:%d holds another disk", d.Name, d.Controller, d.Bus, d.Unit)
			}
			used[b] = append(used[b], d.Unit)
		}
		out[i] = placedDisk{FailoverDisk: d, family: fam}
	}
	// Then the free units, in the disks' order.
	for i := range out {
		d := &out[i]
		if d.Unit >= 0 {
			continue
		}
		b := bus{d.family, d.Bus}
		_, units := controllerLimits(d.family)
		for u := range units {
			if !slices.Contains(used[b], u) && (d.family != "scsi" || u != 7) {
				d.Unit = u
				break
			}
		}
		if d.Unit < 0 {
			return nil, invalid("disk %s: no free unit on %s bus %d", d.Name, d.Controller, d.Bus)
		}
		used[b] = append(used[b], d.Unit)
	}
	return out, nil
}

// checkVMName accepts names that are safe as a datastore folder name and
// are not escaped by vCenter ('%', '/', '\' are).
func checkVMName(name string) error {
	if name == "" {
		return errors.New("no VM name")
	}
	if len([]rune(name)) > 80 {
		return fmt.Errorf("VM name %q: longer than 80 characters", name)
	}
	if name[0] == ' ' || name[0] == '.' || strings.HasSuffix(name, " ") {
		return fmt.Errorf("VM name %q: starts with a space or a dot, or ends with a space", name)
	}
	for _, r := range name {
		if !unicode.IsLetter(r) && !unicode.IsDigit(r) && !strings.ContainsRune(" ._-+()@", r) {
			return fmt.Errorf("VM name %q: character %q not allowed (letters, digits, space and ._-+()@)", name, r)
		}
	}
	return nil
}

func checkDiskName(name string) error {
	if name == "" || len(name) > 64 {
		return fmt.Errorf("disk name %q: want 1 to 64 characters", name)
	}
	for i, r := range name {
		ok := r < unicode.MaxASCII && (unicode.IsLetter(r) || unicode.IsDigit(r) || (i > 0 && strings.ContainsRune("._-", r)))
		if !ok {
			return fmt.Errorf("disk name %q: letters, digits, '.', '_' and '-' only, starting with a letter or digit", name)
		}
	}
	return nil
}

// failover is one run: what it resolved, then what it made.
type failover struct {
	c        *govmomi.Client
	spec     FailoverSpec
	disks    []placedDisk
	progress func(done, total int64)

	dc       *object.Datacenter
	folders  *object.DatacenterFolders
	vmFolder *object.Folder // where the VM is registered (Folder, or the VM folder)
	ds       *object.Datastore
	pool     *object.ResourcePool
	host     *object.HostSystem // nil: vCenter chooses
	hostName string
	nets     []object.NetworkReference // per NIC; filled at run when isolated
	netNames []string

	mu          sync.Mutex // progress: done, reported, the callback
	done, total int64
	reported    int64

	madeDir bool                   // an upload began: the folder may exist
	vm      *object.VirtualMachine // created
	res     FailoverResult
}

// resolve finds the data center, datastore, placement and networks, and
// checks that neither a VM nor a folder of the name exists.
func (f *failover) resolve(ctx context.Context) error {
	s := f.spec
	fd := find.NewFinder(f.c.Client, false)
	var err error
	if s.Datacenter == "" {
		f.dc, err = fd.DefaultDatacenter(ctx)
	} else {
		f.dc, err = fd.Datacenter(ctx, s.Datacenter)
	}
	if err != nil {
		return findError("datacenter", s.Datacenter, err)
	}
	fd.SetDatacenter(f.dc)
	if f.folders, err = f.dc.Folders(ctx); err != nil {
		return fmt.Errorf("datacenter folders: %w", err)
	}
	f.vmFolder = f.folders.VmFolder
	if s.Folder != "" {
		if f.vmFolder, err = vmFolder(ctx, fd, s.Folder); err != nil {
			return err
		}
	}
	if f.ds, err = fd.Datastore(ctx, s.Datastore); err != nil {
		return findError("datastore", s.Datastore, err)
	}
	if err := f.place(ctx, fd); err != nil {
		return err
	}
	if !s.Isolated {
		byName := make(map[string]object.NetworkReference)
		for _, n := range s.NICs {
			name := cmp.Or(s.Network, n.Network, "VM Network")
			if byName[name] == nil {
				if byName[name], err = fd.Network(ctx, name); err != nil {
					return findError("network", name, err)
				}
			}
			f.nets = append(f.nets, byName[name])
			f.netNames = append(f.netNames, name)
		}
	}

	// The name: no VM of it anywhere in the data center (vCenter would
	// allow one in another folder, an operator would not tell them
	// apart), no folder of it on the datastore (an upload would
	// overwrite its files).
	m := view.NewManager(f.c.Client)
	v, err := m.CreateContainerView(ctx, f.dc.Reference(), []string{"VirtualMachine"}, true)
	if err != nil {
		return fmt.Errorf("list VMs: %w", err)
	}
	defer v.Destroy(context.WithoutCancel(ctx))
	var vms []mo.VirtualMachine
	if err := v.Retrieve(ctx, []string{"VirtualMachine"}, []string{"name"}, &vms); err != nil {
		return fmt.Errorf("list VMs: %w", err)
	}
	for _, vm := range vms {
		if vm.Name == s.VMName {
			return fmt.Errorf("%w: a VM named %q (%s)", ErrExists, s.VMName, vm.Self.Value)
		}
	}
	exists, err := dsExists(ctx, f.ds, s.VMName)
	if err != nil {
		return fmt.Errorf("datastore %s: %w", s.Datastore, err)
	}
	if exists {
		return fmt.Errorf("%w: folder %s on the datastore (left by an earlier VM? remove it or choose another name)", ErrExists, f.ds.Path(s.VMName))
	}
	return nil
}

// place resolves the resource pool and host.
// vmFolder finds a VM folder by name or inventory path: a folder whose
// children may be virtual machines.
func vmFolder(ctx context.Context, fd *find.Finder, name string) (*object.Folder, error) {
	folder, err := fd.Folder(ctx, name)
	if err != nil {
		return nil, findError("VM folder", name, err)
	}
	var mf mo.Folder
	if err := folder.Properties(ctx, folder.Reference(), []string{"childType"}, &mf); err != nil {
		return nil, fmt.Errorf("folder %s: %w", name, err)
	}
	if !slices.Contains(mf.ChildType, "VirtualMachine") {
		return nil, fmt.Errorf("%w: folder %s holds %s, not virtual machines", ErrNotFound, name, strings.Join(mf.ChildType, ", "))
	}
	return folder, nil
}

func (f *failover) place(ctx context.Context, fd *find.Finder) error {
	s := f.spec
	var err error
	if s.Host != "" {
		if f.host, err = fd.HostSystem(ctx, s.Host); err != nil {
			return findError("host", s.Host, err)
		}
	}
	switch {
	case s.Pool != "":
		if f.pool, err = fd.ResourcePool(ctx, s.Pool); err != nil {
			return findError("resource pool", s.Pool, err)
		}
	case f.host != nil:
		if f.pool, err = f.host.ResourcePool(ctx); err != nil {
			return fmt.Errorf("host %s: resource pool: %w", s.Host, err)
		}
	default:
		var cr *object.ComputeResource
		clusters, err := fd.ClusterComputeResourceList(ctx, "*")
		if err == nil && len(clusters) > 0 {
			cr = &clusters[0].ComputeResource
		} else {
			crs, err := fd.ComputeResourceList(ctx, "*")
			if err != nil || len(crs) == 0 {
				return fmt.Errorf("%w: no cluster or host in the datacenter", ErrNotFound)
			}
			cr = crs[0]
		}
		if f.pool, err = cr.ResourcePool(ctx); err != nil {
			return fmt.Errorf("%s: resource pool: %w", cr.Name(), err)
		}
	}

	// The pool's cluster or host: its hosts are where the VM may run.
	var pool mo.ResourcePool
	if err := f.pool.Properties(ctx, f.pool.Reference(), []string{"owner"}, &pool); err != nil {
		return fmt.Errorf("resource pool %s: %w", f.pool.Name(), err)
	}
	var owner mo.ComputeResource
	if err := f.pool.Properties(ctx, pool.Owner, []string{"host"}, &owner); err != nil {
		return fmt.Errorf("resource pool %s: owner: %w", f.pool.Name(), err)
	}
	var ds mo.Datastore
	if err := f.ds.Properties(ctx, f.ds.Reference(), []string{"host"}, &ds); err != nil {
		return fmt.Errorf("datastore %s: %w", f.spec.Datastore, err)
	}
	mounts := func(h types.ManagedObjectReference) bool {
		return slices.ContainsFunc(ds.Host, func(m types.DatastoreHostMount) bool { return m.Key == h })
	}
	if f.host != nil {
		if !slices.Contains(owner.Host, f.host.Reference()) {
			return fmt.Errorf("%w: host %s is not in resource pool %s's cluster", ErrInvalidFailover, s.Host, f.pool.Name())
		}
		if !mounts(f.host.Reference()) {
			return fmt.Errorf("%w: host %s does not mount datastore %s", ErrInvalidFailover, s.Host, s.Datastore)
		}
		f.hostName = s.Host
		return nil
	}
	if !s.Isolated {
		return nil // vCenter (DRS) chooses
	}
	// An isolated port group is a host's: choose the host.
	var hosts []mo.HostSystem
	if len(owner.Host) > 0 {
		pc := property.DefaultCollector(f.c.Client)
		if err := pc.Retrieve(ctx, owner.Host, []string{"name", "runtime"}, &hosts); err != nil {
			return fmt.Errorf("hosts of %s: %w", f.pool.Name(), err)
		}
	}
	slices.SortFunc(hosts, func(a, b mo.HostSystem) int { return cmp.Compare(a.Name, b.Name) })
	for _, h := range hosts {
		if h.Runtime.ConnectionState == types.HostSystemConnectionStateConnected && !h.Runtime.InMaintenanceMode && mounts(h.Self) {
			f.host, f.hostName = object.NewHostSystem(f.c.Client, h.Self), h.Name
			return nil
		}
	}
	return fmt.Errorf("%w: no connected host of %s mounts datastore %s", ErrNotFound, f.pool.Name(), s.Datastore)
}

// findError marks a finder's not-found as ErrNotFound.
func findError(what, name string, err error) error {
	if name == "" {
		what = "default " + what
	} else {
		what = fmt.Sprintf("%s %q", what, name)
	}
	var nf *find.NotFoundError
	var dnf *find.DefaultNotFoundError
	if errors.As(err, &nf) || errors.As(err, &dnf) {
		return fmt.Errorf("%s: %w", what, ErrNotFound)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// dsExists reports whether a file or folder is at the datastore's root.
func dsExists(ctx context.Context, ds *object.Datastore, name string) (bool, error) {
	_, err := ds.Stat(ctx, name)
	var nf object.DatastoreNoSuchFileError
	var nd object.DatastoreNoSuchDirectoryError
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &nf), errors.As(err, &nd), types.IsFileNotFound(err):
		return false, nil
	}
	return false, err
}

// run makes the VM; it returns the failed step.
func (f *failover) run(ctx context.Context) (string, error) {
	s := f.spec
	if s.Isolated && len(s.NICs) > 0 { // without NICs there is nothing to isolate
		name := cmp.Or(s.IsolatedNetwork, DefaultIsolatedNetwork)
		net, err := isolatedNetwork(ctx, f.c, f.dc, f.host, f.hostName, name)
		if err != nil {
			return "isolated network", err
		}
		for range s.NICs {
			f.nets = append(f.nets, net)
			f.netNames = append(f.netNames, name)
		}
	}

	for _, d := range f.disks {
		f.total += d.Size
	}
	f.report(true)
	f.res = FailoverResult{Name: s.VMName, Dir: f.ds.Path(s.VMName), Networks: f.netNames, Host: f.hostName}
	for _, d := range f.disks {
		if err := f.upload(ctx, d); err != nil {
			return "upload " + d.Name, err
		}
		f.res.Disks = append(f.res.Disks, f.ds.Path(s.VMName+"/"+d.Name+".vmdk"))
	}
	f.res.Bytes = f.total

	if err := f.create(ctx); err != nil {
		return "create VM", err
	}
	// Its BIOS UUID: what the asr agent in it reports (failback tells
	// that agent from the original machine's by it).
	var mvm mo.VirtualMachine
	if err := f.vm.Properties(ctx, f.vm.Reference(), []string{"config.uuid"}, &mvm); err != nil {
		return "read the VM's BIOS UUID", err
	}
	if mvm.Config != nil {
		f.res.UUID = strings.ToLower(mvm.Config.Uuid)
	}
	if s.PowerOn {
		t, err := f.vm.PowerOn(ctx)
		if err == nil {
			err = t.Wait(ctx)
		}
		if err != nil {
			return "power on", err
		}
		f.res.PoweredOn = true
	}
	return "", nil
}

// expectContinue bounds the wait for a server's 100 Continue before an
// upload's body is sent anyway.
const expectContinue = 30 * time.Second

// upload writes a disk's flat extent, then its descriptor: a descriptor
// on the datastore means its extent is whole.
func (f *failover) upload(ctx context.Context, d placedDisk) error {
	f.madeDir = true
	dir := f.spec.VMName
	flat := d.Name + "-flat.vmdk"
	r := &diskReader{src: d.Src, size: d.Size, onRead: f.add}
	p := soap.DefaultUpload
	p.ContentLength = d.Size
	// The body follows the server's 100 Continue, so the server has made
	// the file (and its folder) before a byte is sent: a source that fails
	// mid-disk aborts an upload the server has begun, and the cleanup that
	// follows cannot be overtaken by a late start of it recreating the
	// folder. A server that does not answer 100 Continue gets the body
	// after expectContinue.
	p.Headers = map[string]string{"Expect": "100-continue"}
	if t := f.c.Client.DefaultTransport(); t != nil && t.ExpectContinueTimeout < expectContinue {
		t.ExpectContinueTimeout = expectContinue
	}
	if err := f.ds.Upload(ctx, r, dir+"/"+flat, &p); err != nil {
		if serr := r.srcErr(); serr != nil {
			return fmt.Errorf("read the source: %w", serr)
		}
		return fmt.Errorf("%s: %w", flat, err)
	}
	// An upload that was cut short but answered 200 must not pass.
	fi, err := f.ds.Stat(ctx, dir+"/"+flat)
	if err != nil {
		return fmt.Errorf("%s: %w", flat, err)
	}
	if n := fi.GetFileInfo().FileSize; n != d.Size {
		return fmt.Errorf("%s: the datastore holds %d bytes of %d", flat, n, d.Size)
	}

	desc := vmdkDescriptor(d.Name, d.Size, d.Controller)
	p = soap.DefaultUpload
	p.ContentLength = int64(len(desc))
	if err := f.ds.Upload(ctx, bytes.NewReader(desc), dir+"/"+d.Name+".vmdk", &p); err != nil {
		return fmt.Errorf("%s.vmdk: %w", d.Name, err)
	}
	return nil
}

func (f *failover) add(n int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.done += n
	f.reportLocked(false)
}

func (f *failover) report(force bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reportLocked(force)
}

// progressStep spaces progress calls (a call per 32 KiB read would be
// tens of thousands a GiB).
const progressStep = 4 << 20

func (f *failover) reportLocked(force bool) {
	if f.progress == nil {
		return
	}
	if force || f.done == f.total || f.done-f.reported >= progressStep {
		f.reported = f.done
		f.progress(f.done, f.total)
	}
}

// create creates the VM with the uploaded disks attached.
func (f *failover) create(ctx context.Context) error {
	s := f.spec
	dsRef := f.ds.Reference()
	var changes []types.BaseVirtualDeviceConfigSpec
	add := func(d types.BaseVirtualDevice) {
		changes = append(changes, &types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: d})
	}

	// Controllers first (the disks name their keys), by family and bus.
	type ctl struct {
		kind string
		bus  int32
	}
	var ctls []ctl
	for _, d := range f.disks {
		c := ctl{d.Controller, d.Bus}
		if !slices.Contains(ctls, c) {
			ctls = append(ctls, c)
		}
	}
	slices.SortFunc(ctls, func(a, b ctl) int {
		return cmp.Or(cmp.Compare(controllerFamily(a.kind), controllerFamily(b.kind)), cmp.Compare(a.bus, b.bus))
	})
	keys := make(map[ctl]int32)
	for i, c := range ctls {
		key := int32(-100 - i) // temporary keys: negative, unique in the spec
		dev, err := newController(c.kind, c.bus, key)
		if err != nil {
			return err
		}
		keys[c] = key
		add(dev)
	}
	for i, d := range f.disks {
		unit := d.Unit
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           int32(-1000 - i),
				ControllerKey: keys[ctl{d.Controller, d.Bus}],
				UnitNumber:    &unit,
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					DiskMode: string(types.VirtualDiskModePersistent),
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{
						FileName:  f.res.Disks[i],
						Datastore: &dsRef,
					},
				},
			},
			CapacityInBytes: d.Size,
			CapacityInKB:    d.Size / 1024,
		}
		add(disk) // no FileOperation: the file exists
	}
	for i, n := range s.NICs {
		backing, err := f.nets[i].EthernetCardBackingInfo(ctx)
		if err != nil {
			return fmt.Errorf("NIC %d on %s: %w", i, f.netNames[i], err)
		}
		dev, err := newNIC(n.Type, int32(-2000-i), backing)
		if err != nil {
			return err
		}
		add(dev)
	}

	cs := types.VirtualMachineConfigSpec{
		Name:         s.VMName,
		GuestId:      cmp.Or(s.GuestID, string(types.VirtualMachineGuestOsIdentifierOtherGuest64)),
		NumCPUs:      s.CPUs,
		MemoryMB:     int64(s.MemoryMiB),
		Firmware:     s.Firmware,
		Annotation:   "Created by asr failover.",
		Files:        &types.VirtualMachineFileInfo{VmPathName: f.ds.Path(s.VMName + "/" + s.VMName + ".vmx")},
		DeviceChange: changes,
		ExtraConfig:  []types.BaseOptionValue{&types.OptionValue{Key: failoverMarker, Value: "true"}},
	}
	task, err := f.vmFolder.CreateVM(ctx, cs, f.pool, f.host)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx)
	if info != nil {
		// A VM registered before the task failed is still removed.
		if ref, ok := info.Result.(types.ManagedObjectReference); ok {
			f.vm = object.NewVirtualMachine(f.c.Client, ref)
			f.res.Ref = ref.Value
		}
	}
	if err != nil {
		return err
	}
	if f.vm == nil {
		return errors.New("the task returned no VM")
	}
	return nil
}

// cleanup removes the VM and the folder a failed run made.
func (f *failover) cleanup(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	var errs []error
	if f.vm != nil {
		if err := destroyVM(ctx, f.vm); err != nil {
			errs = append(errs, fmt.Errorf("destroy VM %s: %w", f.res.Ref, err))
		}
	}
	if f.madeDir {
		if err := deleteDir(ctx, f.c, f.dc, f.ds, f.spec.VMName); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (f *failover) leftover() string {
	s := fmt.Sprintf("folder %s", f.ds.Path(f.spec.VMName))
	if f.vm != nil {
		s = fmt.Sprintf("VM %s (%s) and %s", f.spec.VMName, f.res.Ref, s)
	}
	return s
}

// destroyVM powers a VM off (if on) and destroys it.
func destroyVM(ctx context.Context, vm *object.VirtualMachine) error {
	state, err := vm.PowerState(ctx)
	if err != nil {
		return err
	}
	if state != types.VirtualMachinePowerStatePoweredOff {
		t, err := vm.PowerOff(ctx)
		if err == nil {
			err = t.Wait(ctx)
		}
		if err != nil && !fault.IsAlreadyPoweredOffError(err) {
			return fmt.Errorf("power off: %w", err)
		}
	}
	t, err := vm.Destroy(ctx)
	if err == nil {
		err = t.Wait(ctx)
	}
	return err
}

// deleteDir deletes a folder at the datastore's root, if it is there.
func deleteDir(ctx context.Context, c *govmomi.Client, dc *object.Datacenter, ds *object.Datastore, dir string) error {
	if dir == "" || dir == "." || strings.Contains(dir, "/") {
		return fmt.Errorf("refusing to delete %q on %s: not a folder at its root", dir, ds.Name())
	}
	exists, err := dsExists(ctx, ds, dir)
	if err != nil {
		return fmt.Errorf("look for folder %s: %w", ds.Path(dir), err)
	}
	if !exists {
		return nil // gone with the VM
	}
	fm := object.NewFileManager(c.Client)
	t, err := fm.DeleteDatastoreFile(ctx, ds.Path(dir), dc)
	if err == nil {
		err = t.Wait(ctx)
	}
	if err != nil && !types.IsFileNotFound(err) {
		return fmt.Errorf("delete folder %s: %w", ds.Path(dir), err)
	}
	return nil
}

// DeleteFailoverVM removes a VM that FailoverToVSphere created (ref is
// FailoverResult.Ref): it powers it off, destroys it and deletes its
// folder on the datastore. A VM without the failover's mark is refused
// (ErrNotFailoverVM); a ref that names no VM is ErrNotFound. The isolated
// port group stays (other test VMs may use it).
func DeleteFailoverVM(ctx context.Context, c *govmomi.Client, ref string) error {
	vm := object.NewVirtualMachine(c.Client, types.ManagedObjectReference{Type: "VirtualMachine", Value: ref})
	var m mo.VirtualMachine
	err := vm.Properties(ctx, vm.Reference(), []string{"name", "parent", "config.files.vmPathName", "config.extraConfig"}, &m)
	if err != nil {
		if fault.Is(err, &types.ManagedObjectNotFound{}) {
			return fmt.Errorf("delete VM %s: %w", ref, ErrNotFound)
		}
		return fmt.Errorf("delete VM %s: %w", ref, err)
	}
	if m.Config == nil || !marked(m.Config.ExtraConfig) {
		return fmt.Errorf("delete VM %s (%s): %w", ref, m.Name, ErrNotFailoverVM)
	}
	var vmx object.DatastorePath
	if !vmx.FromString(m.Config.Files.VmPathName) {
		return fmt.Errorf("delete VM %s: unreadable path %q", ref, m.Config.Files.VmPathName)
	}
	dc, err := datacenterOf(ctx, c, m.Parent)
	if err != nil {
		return fmt.Errorf("delete VM %s: %w", ref, err)
	}
	fd := find.NewFinder(c.Client, false)
	fd.SetDatacenter(dc)
	ds, err := fd.Datastore(ctx, vmx.Datastore)
	if err != nil {
		return fmt.Errorf("delete VM %s: %w", ref, findError("datastore", vmx.Datastore, err))
	}
	if err := destroyVM(ctx, vm); err != nil {
		return fmt.Errorf("delete VM %s: %w", ref, err)
	}
	if err := deleteDir(ctx, c, dc, ds, path.Dir(vmx.Path)); err != nil {
		return fmt.Errorf("delete VM %s: %w", ref, err)
	}
	return nil
}

func marked(opts []types.BaseOptionValue) bool {
	for _, o := range opts {
		if v := o.GetOptionValue(); v.Key == failoverMarker && v.Value == "true" {
			return true
		}
	}
	return false
}

// datacenterOf walks up from an entity to its data center.
func datacenterOf(ctx context.Context, c *govmomi.Client, ref *types.ManagedObjectReference) (*object.Datacenter, error) {
	pc := property.DefaultCollector(c.Client)
	for i := 0; ref != nil && i < 64; i++ {
		if ref.Type == "Datacenter" {
			return object.NewDatacenter(c.Client, *ref), nil
		}
		var e mo.ManagedEntity
		if err := pc.RetrieveOne(ctx, *ref, []string{"parent"}, &e); err != nil {
			return nil, fmt.Errorf("datacenter of the VM: %w", err)
		}
		ref = e.Parent
	}
	return nil, errors.New("the VM is in no datacenter")
}
