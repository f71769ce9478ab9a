package vmware

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/vmware/govmomi/vim25/types"
)

// VM is one virtual machine as asr shows and protects it. Lists of VMs
// are sorted by name (byte order), then ref. References to
// other objects are resolved to their names; a name not known yet (an
// object outside the view, or one whose update has not arrived) is "".
type VM struct {
	VCenter      string `json:"vcenter"`       // Endpoint.Name
	Ref          string `json:"ref"`           // managed object id, e.g. vm-42
	Name         string `json:"name"`          //
	BIOSUUID     string `json:"bios_uuid"`     // config.uuid, lower case
	InstanceUUID string `json:"instance_uuid"` // config.instanceUuid, lower case
	PowerState   string `json:"power_state"`   // poweredOn, poweredOff, suspended
	GuestOS      string `json:"guest_os"`      // config.guestFullName, else config.guestId
	// IPs are the addresses VMware Tools reports (guest.ipAddress first,
	// then guest.net's), empty without Tools.
	IPs           []string `json:"ips,omitempty"`
	GuestHostName string   `json:"guest_host_name,omitempty"`
	CPUs          int32    `json:"cpus"`
	MemoryMiB     int32    `json:"memory_mib"`
	Disks         []Disk   `json:"disks"` // by key
	Host          string   `json:"host"`
	Cluster       string   `json:"cluster"` // "" on a standalone host
	Folder        string   `json:"folder"`  // the parent folder's name ("" in a vApp)
	ResourcePool  string   `json:"resource_pool"`
	Datastores    []string `json:"datastores"` // names, sorted
	Networks      []string `json:"networks"`   // names, sorted
	Template      bool     `json:"template,omitempty"`
	// NICs are the network adapters, by key (what a failover recreates).
	NICs []NIC `json:"nics,omitempty"`
	// GuestID is config.guestId (GuestOS shows the full name when there
	// is one): a failover VM gets the same.
	GuestID string `json:"guest_id,omitempty"`
	// Firmware is config.firmware: "bios" or "efi" ("" if not reported).
	// A failover VM must boot the same way as its source.
	Firmware string `json:"firmware,omitempty"`
}

// NIC is one network adapter of a VM.
type NIC struct {
	Key int32 `json:"key"`
	// Type is the adapter's kind: vmxnet3, e1000, e1000e, vmxnet2,
	// vmxnet, pcnet32, sriov, vmxnet3vrdma ("" if unknown).
	Type string `json:"type"`
	// Network is the name of its network or distributed port group ("" if
	// unknown, e.g. an NSX opaque network not in the view).
	Network string `json:"network"`
	MAC     string `json:"mac,omitempty"`
}

// Disk is one virtual disk of a VM.
type Disk struct {
	Key           int32  `json:"key"`
	Label         string `json:"label"`
	CapacityBytes int64  `json:"capacity_bytes"`
	Path          string `json:"path"`       // "[datastore1] vm/vm.vmdk"
	Datastore     string `json:"datastore"`  // the path's [name]
	Controller    string `json:"controller"` // its controller's label, "SCSI controller 0"
	ControllerKey int32  `json:"controller_key"`
	Unit          int32  `json:"unit"`
	// ControllerType is the controller's kind (pvscsi, lsilogic,
	// lsilogic-sas, buslogic, nvme, sata, ide; "" if unknown) and
	// ControllerBus its bus number among the controllers of its family
	// (SCSI, NVMe, SATA, IDE): a failover recreates the same layout.
	ControllerType string `json:"controller_type,omitempty"`
	ControllerBus  int32  `json:"controller_bus"`
}

// Bounds on what one update can make the watcher hold or process. A
// vCenter is trusted to be a vCenter, but a bug or a corrupted inventory
// must not grow memory or time without limit: past these the extra items
// are dropped (maxObjects instead fails the session, since a partial
// inventory would look like deleted VMs).
const (
	// maxObjects caps the objects in the view (VMs, hosts, folders, ...):
	// well above vCenter's own limits (about 50,000 VMs, 2,500 hosts).
	maxObjects = 250_000
	// maxDevices caps the devices of one VM read (a VM has at most a few
	// hundred: 4 SCSI controllers of 64 disks, NVMe, NICs, ...).
	maxDevices = 1024
	// maxRefs caps a VM's datastores and networks, and maxIPs its
	// addresses, read.
	maxRefs = 256
	maxIPs  = 64
)

// The managed object types in the view: the VMs and what their fields
// are resolved through.
var viewTypes = []string{
	"VirtualMachine", "HostSystem", "ClusterComputeResource", "ComputeResource",
	"Datastore", "Folder", "ResourcePool", "Network", "DistributedVirtualPortgroup",
	"OpaqueNetwork", "VirtualApp",
}

// vmProps are the VirtualMachine properties the filter asks for; every
// other type gives only its name and parent.
var vmProps = []string{
	"name", "parent", "resourcePool", "datastore", "network",
	"config.uuid", "config.instanceUuid", "config.guestFullName", "config.guestId",
	"config.template", "config.firmware", "config.hardware.numCPU", "config.hardware.memoryMB",
	"config.hardware.device",
	"runtime.powerState", "runtime.host",
	"guest.ipAddress", "guest.net", "guest.hostName",
	// changeVersion changes at every reconfiguration. vCenter reports
	// the changed properties too, but a peer that reports only this
	// (govmomi's simulator does so for config.uuid) must not leave the
	// model behind: a modify that changes it reads the VM whole.
	changeVersion,
}

const changeVersion = "config.changeVersion"

var otherProps = []string{"name", "parent"}

// propsOf is the property list a type is watched with.
func propsOf(kind string) []string {
	if kind == "VirtualMachine" {
		return vmProps
	}
	return otherProps
}

// inventory is the watcher's model: every object in the view with the
// properties last reported for it. Not safe for concurrent use (the
// watcher's goroutine owns it).
type inventory struct {
	objs map[string]*invObject // by managed object id
}

type invObject struct {
	ref   types.ManagedObjectReference
	props map[string]any // property path -> value as decoded by govmomi
}

func newInventory() *inventory { return &inventory{objs: make(map[string]*invObject)} }

// apply applies one object update. It returns true if the object must be
// read again whole: a change named below a watched property (an array
// element, "config.hardware.device[2000]") that the model cannot apply
// by itself.
func (inv *inventory) apply(u types.ObjectUpdate) (refetch bool, err error) {
	id := u.Obj.Value
	switch u.Kind {
	case types.ObjectUpdateKindLeave:
		delete(inv.objs, id)
		return false, nil
	case types.ObjectUpdateKindEnter:
		if _, ok := inv.objs[id]; !ok && len(inv.objs) >= maxObjects {
			return false, fmt.Errorf("the inventory has more than %d objects: not supported", maxObjects)
		}
		// An enter is the object whole: start again from nothing.
		inv.objs[id] = &invObject{ref: u.Obj, props: make(map[string]any)}
	}
	o := inv.objs[id]
	if o == nil {
		// A modify of an object never entered: read it whole.
		if len(inv.objs) >= maxObjects {
			return false, fmt.Errorf("the inventory has more than %d objects: not supported", maxObjects)
		}
		o = &invObject{ref: u.Obj, props: make(map[string]any)}
		inv.objs[id] = o
		refetch = true
	}
	watched := propsOf(u.Obj.Type)
	for _, c := range u.ChangeSet {
		if !slices.Contains(watched, c.Name) {
			refetch = true // a path below a watched property
			continue
		}
		switch c.Op {
		case types.PropertyChangeOpAssign:
			if c.Name == changeVersion && u.Kind == types.ObjectUpdateKindModify && o.props[c.Name] != c.Val {
				refetch = true
			}
			o.props[c.Name] = c.Val
		case types.PropertyChangeOpRemove, types.PropertyChangeOpIndirectRemove:
			delete(o.props, c.Name)
		default: // add: an element of the array
			refetch = true
		}
	}
	return refetch, nil
}

// replace sets an object's properties to what a retrieve returned.
func (inv *inventory) replace(oc types.ObjectContent) {
	o := inv.objs[oc.Obj.Value]
	if o == nil {
		return // left meanwhile
	}
	o.props = make(map[string]any, len(oc.PropSet))
	for _, p := range oc.PropSet {
		o.props[p.Name] = p.Val
	}
}

// name is the name of the object with id ref ("" if unknown).
func (inv *inventory) name(ref *types.ManagedObjectReference) string {
	if ref == nil {
		return ""
	}
	if o := inv.objs[ref.Value]; o != nil {
		s, _ := o.props["name"].(string)
		return s
	}
	return ""
}

// vms resolves every VirtualMachine into a VM, sorted by name then ref.
func (inv *inventory) vms(vcenter string) []VM {
	var out []VM
	for _, o := range inv.objs {
		if o.ref.Type == "VirtualMachine" {
			out = append(out, inv.vm(vcenter, o))
		}
	}
	sortVMs(out)
	return out
}

func sortVMs(vms []VM) {
	slices.SortFunc(vms, func(a, b VM) int {
		return cmp.Or(cmp.Compare(a.Name, b.Name), cmp.Compare(a.Ref, b.Ref))
	})
}

func (inv *inventory) vm(vcenter string, o *invObject) VM {
	p := o.props
	v := VM{
		VCenter:       vcenter,
		Ref:           o.ref.Value,
		Name:          str(p["name"]),
		BIOSUUID:      strings.ToLower(str(p["config.uuid"])),
		InstanceUUID:  strings.ToLower(str(p["config.instanceUuid"])),
		GuestOS:       cmp.Or(str(p["config.guestFullName"]), str(p["config.guestId"])),
		GuestHostName: str(p["guest.hostName"]),
		Disks:         []Disk{},
		Datastores:    []string{},
		Networks:      []string{},
	}
	if ps, ok := p["runtime.powerState"].(types.VirtualMachinePowerState); ok {
		v.PowerState = string(ps)
	}
	v.CPUs, _ = p["config.hardware.numCPU"].(int32)
	v.MemoryMiB, _ = p["config.hardware.memoryMB"].(int32)
	v.Template, _ = p["config.template"].(bool)
	v.Firmware = str(p["config.firmware"])
	v.GuestID = str(p["config.guestId"])

	host := ref(p["runtime.host"])
	v.Host = inv.name(host)
	if host != nil {
		if h := inv.objs[host.Value]; h != nil {
			if parent := ref(h.props["parent"]); parent != nil && parent.Type == "ClusterComputeResource" {
				v.Cluster = inv.name(parent)
			}
		}
	}
	if parent := ref(p["parent"]); parent != nil && parent.Type == "Folder" {
		v.Folder = inv.name(parent) // a VM in a vApp has no folder
	}
	v.ResourcePool = inv.name(ref(p["resourcePool"]))
	v.Datastores = inv.names(p["datastore"])
	v.Networks = inv.names(p["network"])
	v.IPs = ips(p["guest.ipAddress"], p["guest.net"])
	if devs, ok := p["config.hardware.device"].(types.ArrayOfVirtualDevice); ok {
		v.Disks = disks(devs.VirtualDevice)
		v.NICs = inv.nics(devs.VirtualDevice)
	}
	return v
}

// names resolves an array of references to their sorted, known names.
func (inv *inventory) names(val any) []string {
	out := []string{}
	refs, _ := val.(types.ArrayOfManagedObjectReference)
	for i := range refs.ManagedObjectReference {
		if i == maxRefs {
			break
		}
		if n := inv.name(&refs.ManagedObjectReference[i]); n != "" {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// disks are a VM's virtual disks, by key, with their controllers'
// labels. Only the first maxDevices devices are read.
func disks(devs []types.BaseVirtualDevice) []Disk {
	devs = devs[:min(len(devs), maxDevices)]
	labels := make(map[int32]string)
	ctrls := make(map[int32]types.BaseVirtualController)
	for _, d := range devs {
		if c, ok := d.(types.BaseVirtualController); ok {
			dev := d.GetVirtualDevice()
			labels[dev.Key] = label(dev)
			ctrls[dev.Key] = c
		}
	}
	out := []Disk{}
	for _, d := range devs {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		dk := Disk{
			Key:           disk.Key,
			Label:         label(&disk.VirtualDevice),
			CapacityBytes: disk.CapacityInBytes,
			ControllerKey: disk.ControllerKey,
			Controller:    labels[disk.ControllerKey],
		}
		if c := ctrls[disk.ControllerKey]; c != nil {
			dk.ControllerType = controllerKind(c)
			dk.ControllerBus = c.GetVirtualController().BusNumber
		}
		if dk.CapacityBytes == 0 {
			dk.CapacityBytes = disk.CapacityInKB * 1024 // before vSphere 5.5
		}
		if disk.UnitNumber != nil {
			dk.Unit = *disk.UnitNumber
		}
		if fb, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
			dk.Path = fb.GetVirtualDeviceFileBackingInfo().FileName
			dk.Datastore = datastoreOfPath(dk.Path)
		}
		out = append(out, dk)
	}
	slices.SortFunc(out, func(a, b Disk) int { return cmp.Compare(a.Key, b.Key) })
	return out
}

// nics are a VM's network adapters, by key, with their networks' names.
// Only the first maxDevices devices are read.
func (inv *inventory) nics(devs []types.BaseVirtualDevice) []NIC {
	var out []NIC
	for _, d := range devs[:min(len(devs), maxDevices)] {
		card, ok := d.(types.BaseVirtualEthernetCard)
		if !ok {
			continue
		}
		e := card.GetVirtualEthernetCard()
		n := NIC{Key: e.Key, Type: nicKind(d), MAC: e.MacAddress}
		switch b := e.Backing.(type) {
		case *types.VirtualEthernetCardNetworkBackingInfo:
			n.Network = cmp.Or(inv.name(b.Network), b.DeviceName)
		case *types.VirtualEthernetCardDistributedVirtualPortBackingInfo:
			n.Network = inv.name(&types.ManagedObjectReference{Type: "DistributedVirtualPortgroup", Value: b.Port.PortgroupKey})
		}
		// An NSX opaque network's backing names it by its id, not its
		// object: left "" (the model holds only names and parents).
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b NIC) int { return cmp.Compare(a.Key, b.Key) })
	return out
}

// datastoreOfPath is the name in a datastore path's brackets:
// "[datastore1] vm/vm.vmdk" -> "datastore1" ("" if there is none).
func datastoreOfPath(p string) string {
	if !strings.HasPrefix(p, "[") {
		return ""
	}
	end := strings.IndexByte(p, ']')
	if end < 0 {
		return ""
	}
	return p[1:end]
}

func label(d *types.VirtualDevice) string {
	if d.DeviceInfo == nil {
		return ""
	}
	return d.DeviceInfo.GetDescription().Label
}

// ips are guest.ipAddress, then each NIC's addresses, without repeats,
// at most maxIPs.
func ips(primary, nets any) []string {
	var out []string
	add := func(ip string) {
		if ip != "" && len(out) < maxIPs && !slices.Contains(out, ip) {
			out = append(out, ip)
		}
	}
	add(str(primary))
	if n, ok := nets.(types.ArrayOfGuestNicInfo); ok {
		for i, nic := range n.GuestNicInfo {
			if i == maxDevices {
				break
			}
			for _, ip := range nic.IpAddress {
				add(ip)
			}
			if nic.IpConfig != nil {
				for _, ip := range nic.IpConfig.IpAddress {
					add(ip.IpAddress)
				}
			}
		}
	}
	return out
}

func str(v any) string {
	s, _ := v.(string)
	return s
}

func ref(v any) *types.ManagedObjectReference {
	switch r := v.(type) {
	case types.ManagedObjectReference:
		return &r
	case *types.ManagedObjectReference:
		return r
	}
	return nil
}
