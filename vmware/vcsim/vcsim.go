// Package vcsim runs govmomi's vCenter simulator (simulator.VPX) in
// process over TLS, as the vCenter of `asr demo` and of the tests: a real
// SOAP endpoint with a data center, hosts, a cluster, datastores, networks
// and VMs. It has no guest operations (tools report no IP unless a test
// sets one) and no changed-block tracking; asr uses neither of them.
package vcsim

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// Sim is a running simulator.
type Sim struct {
	Model *simulator.Model
	// URL is the SDK URL (without user information); User and Password
	// log in; Thumbprint is the SHA-256 of its certificate, as vCenter
	// shows it (colon-separated upper-case hex).
	URL, User, Password, Thumbprint string

	mu     sync.Mutex
	server *simulator.Server
	gate   *logoutGate // its SDK's Logout held behind its long polls
}

// The simulator's Model.Create appends to a package variable of govmomi
// (simulator.EvalLicense, in LicenseManager.init) that every simulator
// reads whenever an entity is added to its inventory (a host, a VM): in
// one process, a simulator created while another adds a VM is a data
// race, which go test -race reports (govmomi v0.56.0). A test package
// that runs simulators side by side calls Prepare first, from TestMain:
// the models are created there, before any runs, and Start takes one.
var pool struct {
	sync.Mutex
	prepared bool
	models   []*simulator.Model
}

// Prepare creates n simulator models for Start to take, one after the
// other and before any simulator runs. After it, Start fails once all n
// are taken rather than create one beside running simulators.
func Prepare(n int) error {
	pool.Lock()
	defer pool.Unlock()
	for range n {
		m := simulator.VPX()
		if err := m.Create(); err != nil {
			return fmt.Errorf("vCenter simulator: %w", err)
		}
		pool.models = append(pool.models, m)
	}
	pool.prepared = true
	return nil
}

// Discard removes the prepared models that no Start took (their
// datastore directories).
func Discard() {
	pool.Lock()
	defer pool.Unlock()
	for _, m := range pool.models {
		m.Remove()
	}
	pool.models = nil
}

// newModel returns a prepared model, or creates one where none were
// prepared.
func newModel() (*simulator.Model, error) {
	pool.Lock()
	defer pool.Unlock()
	if pool.prepared {
		if len(pool.models) == 0 {
			return nil, errors.New("vCenter simulator: every model vcsim.Prepare made is taken; prepare more (one created beside running simulators races on govmomi's EvalLicense)")
		}
		m := pool.models[len(pool.models)-1]
		pool.models = pool.models[:len(pool.models)-1]
		return m, nil
	}
	m := simulator.VPX()
	if err := m.Create(); err != nil {
		return nil, fmt.Errorf("vCenter simulator: %w", err)
	}
	return m, nil
}

// Start creates the inventory of a small vCenter (simulator.VPX: one data
// center, a cluster and a standalone host, a few VMs), or takes one
// Prepare made, and serves it over TLS on 127.0.0.1. The password is the
// one to log in with.
func Start(user, password string) (*Sim, error) {
	m, err := newModel()
	if err != nil {
		return nil, err
	}
	m.Service.TLS = new(tls.Config) // the simulator's own localhost certificate
	m.Service.Context.Map.AddHandler(detachDevices{m.Service.Context.Map})
	m.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(user, password)}
	s := &Sim{Model: m, User: user, Password: password, gate: newLogoutGate()}
	s.sdkMux()
	s.serve()
	return s, nil
}

// sdkMux gives the simulator a new mux with the SDK's paths behind the
// logout gate (logoutgate.go). The simulator registers its other
// handlers on it as it starts (NewServer), and the SDK's only once per
// model (RegisterSDK, called here first, on the mux being replaced), so
// a mux made anew for each start holds each once.
func (s *Sim) sdkMux() {
	svc := s.Model.Service
	path := svc.Context.Map.Path
	svc.RegisterSDK(svc.Context.Map, path+"/vimService")
	sdk := s.gate.wrap(svc.ServeSDK)
	mux := http.NewServeMux()
	mux.HandleFunc(path, sdk)
	mux.HandleFunc(path+"/vimService", sdk)
	svc.ServeMux = mux
}

// serving orders the simulators' NewServer calls: each rewrites the
// ".uri" option values that every model of the process shares with
// govmomi's templates (govmomi v0.56.0), a data race between two that
// start at once.
var serving sync.Mutex

func (s *Sim) serve() {
	serving.Lock()
	srv := s.Model.Service.NewServer()
	serving.Unlock()
	u := *srv.URL
	u.User = nil
	sum := sha256.Sum256(srv.Certificate().Raw)
	hexes := make([]string, len(sum))
	for i, b := range sum {
		hexes[i] = fmt.Sprintf("%02X", b)
	}
	s.mu.Lock()
	s.server, s.URL, s.Thumbprint = srv, u.String(), strings.Join(hexes, ":")
	s.mu.Unlock()
}

// Stop stops serving (a vCenter outage); the inventory is kept.
func (s *Sim) Stop() {
	s.mu.Lock()
	srv := s.server
	s.server = nil
	s.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// Restart serves the same inventory again, on the same address and with
// the same certificate, after Stop. (The simulator registers its handlers
// on its mux as it starts and cannot twice on one: it gets a new mux, with
// the SDK's paths, which it registers only once.)
func (s *Sim) Restart() {
	s.sdkMux()
	s.serve()
}

// Close stops the simulator for good.
func (s *Sim) Close() {
	s.Stop()
	s.Model.Remove()
}

// Client logs in (trusting the simulator's certificate), for callers that
// change the inventory.
func (s *Sim) Client(ctx context.Context) (*govmomi.Client, error) {
	u, err := url.Parse(s.URL)
	if err != nil {
		return nil, err
	}
	u.User = url.UserPassword(s.User, s.Password)
	return govmomi.NewClient(ctx, u, true)
}

// VMSpec is a VM to create.
type VMSpec struct {
	Name      string
	BIOSUUID  string  // "" lets the simulator choose
	CPUs      int32   // default 1
	MemoryMiB int32   // default 1024
	Disks     []int64 // capacities in bytes, on SCSI controller 0
	PowerOn   bool
	GuestOS   string // guest id, default otherLinux64Guest
}

// CreateVM creates a VM in the data center's first cluster, on its first
// datastore, with a NIC on "VM Network".
func (s *Sim) CreateVM(ctx context.Context, c *govmomi.Client, spec VMSpec) (*object.VirtualMachine, error) {
	f := find.NewFinder(c.Client, true)
	dc, err := f.DefaultDatacenter(ctx)
	if err != nil {
		return nil, err
	}
	f.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, err
	}
	clusters, err := f.ClusterComputeResourceList(ctx, "*")
	if err != nil || len(clusters) == 0 {
		return nil, fmt.Errorf("no cluster: %v", err)
	}
	pool, err := clusters[0].ResourcePool(ctx)
	if err != nil {
		return nil, err
	}
	dss, err := f.DatastoreList(ctx, "*")
	if err != nil || len(dss) == 0 {
		return nil, fmt.Errorf("no datastore: %v", err)
	}
	ds := dss[0]
	net, err := f.Network(ctx, "VM Network")
	if err != nil {
		return nil, err
	}
	if spec.CPUs == 0 {
		spec.CPUs = 1
	}
	if spec.MemoryMiB == 0 {
		spec.MemoryMiB = 1024
	}
	if spec.GuestOS == "" {
		spec.GuestOS = string(types.VirtualMachineGuestOsIdentifierOtherLinux64Guest)
	}
	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return nil, err
	}
	devices = append(devices, scsi)
	ctrl := scsi.(types.BaseVirtualController)
	for i, size := range spec.Disks {
		disk := devices.CreateDisk(ctrl, ds.Reference(), ds.Path(fmt.Sprintf("%s/%s_%d.vmdk", spec.Name, spec.Name, i)))
		disk.CapacityInBytes = size
		disk.CapacityInKB = size / 1024
		devices = append(devices, disk)
	}
	backing, err := net.EthernetCardBackingInfo(ctx)
	if err != nil {
		return nil, err
	}
	nic, err := devices.CreateEthernetCard("vmxnet3", backing)
	if err != nil {
		return nil, err
	}
	devices = append(devices, nic)
	deviceChange, err := devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	if err != nil {
		return nil, err
	}
	for _, dc := range deviceChange {
		if d, ok := dc.GetVirtualDeviceConfigSpec().Device.(*types.VirtualDisk); ok && d != nil {
			dc.GetVirtualDeviceConfigSpec().FileOperation = types.VirtualDeviceConfigSpecFileOperationCreate
		}
	}
	cs := types.VirtualMachineConfigSpec{Name: spec.Name, Uuid: spec.BIOSUUID, NumCPUs: spec.CPUs, MemoryMB: int64(spec.MemoryMiB),
		GuestId: spec.GuestOS, DeviceChange: deviceChange,
		Files: &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", ds.Name())}}
	task, err := folders.VmFolder.CreateVM(ctx, cs, pool, nil)
	if err != nil {
		return nil, err
	}
	info, err := task.WaitForResult(ctx)
	if err != nil {
		return nil, fmt.Errorf("create VM %s: %w", spec.Name, err)
	}
	vm := object.NewVirtualMachine(c.Client, info.Result.(types.ManagedObjectReference))
	if spec.PowerOn {
		t, err := vm.PowerOn(ctx)
		if err != nil {
			return nil, err
		}
		if err := t.Wait(ctx); err != nil {
			return nil, fmt.Errorf("power on %s: %w", spec.Name, err)
		}
	}
	return vm, nil
}

// FindVM finds a VM by name.
func FindVM(ctx context.Context, c *govmomi.Client, name string) (*object.VirtualMachine, error) {
	f := find.NewFinder(c.Client, true)
	dc, err := f.DefaultDatacenter(ctx)
	if err != nil {
		return nil, err
	}
	f.SetDatacenter(dc)
	return f.VirtualMachine(ctx, name)
}

// SetUUID gives a VM another BIOS UUID (as cloning without a new UUID
// does).
func SetUUID(ctx context.Context, vm *object.VirtualMachine, uuid string) error {
	t, err := vm.Reconfigure(ctx, types.VirtualMachineConfigSpec{Uuid: uuid})
	if err != nil {
		return err
	}
	return t.Wait(ctx)
}

// detachDevices is a listener on the simulator's inventory (a
// RegisterObject handler). It mends a data race inside govmomi's simulator
// (v0.56.0): a VM's task that changes its devices (ReconfigVM_Task,
// Destroy_Task and RelocateVM_Task run configureDevices) removes a device
// from the VM's device list in place, while a WaitForUpdatesEx response
// may hold that same list (a change's value goes to the property
// collectors uncopied) and is marshalled outside any lock. go test -race
// reported it under load: the discovery watcher's response against
// Destroy_Task. As such a task is registered, before it runs, the listener
// wraps its body: under the VM's lock, which the task holds as it runs,
// the VM is first given a copy of its device list, so the task changes a
// list that no response holds. (The simulator copies the list the same way
// before a power operation, its cloneDevice.)
type detachDevices struct {
	m *simulator.Registry
}

func (detachDevices) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "AsrDetachDevices", Value: "vcsim"}
}

func (d detachDevices) PutObject(_ *simulator.Context, o mo.Reference) {
	t, ok := o.(*simulator.Task)
	if !ok || t.Info.Entity == nil || t.Execute == nil {
		return
	}
	switch t.Info.DescriptionId {
	case "VirtualMachine.reconfigVm", "VirtualMachine.destroy", "VirtualMachine.relocateVm":
	default:
		return
	}
	vm, ok := d.m.Get(*t.Info.Entity).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	run := t.Execute
	t.Execute = func(t *simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if vm.Config != nil {
			vm.Config.Hardware.Device = slices.Clone(vm.Config.Hardware.Device)
		}
		return run(t)
	}
}

func (detachDevices) UpdateObject(*simulator.Context, mo.Reference, []types.PropertyChange) {}

func (detachDevices) RemoveObject(*simulator.Context, types.ManagedObjectReference) {}
