package vmware

import (
	"fmt"
	"slices"
	"strings"

	"github.com/vmware/govmomi/vim25/types"
)

// The controller kinds asr reads and recreates: the same words as govc's
// (object.VirtualDeviceList.Type), plus "sata" for AHCI.
const (
	ControllerPVSCSI      = "pvscsi"
	ControllerLSILogic    = "lsilogic"
	ControllerLSILogicSAS = "lsilogic-sas"
	ControllerBusLogic    = "buslogic"
	ControllerNVMe        = "nvme"
	ControllerSATA        = "sata"
	ControllerIDE         = "ide"
)

// controllerKinds are the kinds a failover can create.
var controllerKinds = []string{
	ControllerPVSCSI, ControllerLSILogic, ControllerLSILogicSAS, ControllerBusLogic,
	ControllerNVMe, ControllerSATA, ControllerIDE,
}

// controllerKind is a controller's kind ("" for one asr does not know).
func controllerKind(c types.BaseVirtualController) string {
	switch c.(type) {
	case *types.ParaVirtualSCSIController:
		return ControllerPVSCSI
	case *types.VirtualLsiLogicController:
		return ControllerLSILogic
	case *types.VirtualLsiLogicSASController:
		return ControllerLSILogicSAS
	case *types.VirtualBusLogicController:
		return ControllerBusLogic
	case *types.VirtualNVMEController:
		return ControllerNVMe
	case *types.VirtualAHCIController:
		return ControllerSATA
	case *types.VirtualIDEController:
		return ControllerIDE
	}
	return ""
}

// controllerFamily groups kinds that share bus numbers: a VM has at most
// four SCSI controllers whatever their kinds.
func controllerFamily(kind string) string {
	switch kind {
	case ControllerPVSCSI, ControllerLSILogic, ControllerLSILogicSAS, ControllerBusLogic:
		return "scsi"
	}
	return kind
}

// controllerLimits are, per family, the bus numbers and the unit numbers a
// disk may use (vSphere 8's configuration maximums); the SCSI
// controller's own unit, 7, is not a disk's.
func controllerLimits(family string) (buses, units int32) {
	switch family {
	case "scsi":
		return 4, 16
	case ControllerNVMe:
		return 4, 64
	case ControllerSATA:
		return 4, 30
	case ControllerIDE:
		return 2, 2
	}
	return 0, 0
}

// newController makes a controller of a kind for a new VM's spec.
func newController(kind string, bus, key int32) (types.BaseVirtualDevice, error) {
	base := types.VirtualController{BusNumber: bus, VirtualDevice: types.VirtualDevice{Key: key}}
	scsi := types.VirtualSCSIController{VirtualController: base, SharedBus: types.VirtualSCSISharingNoSharing, ScsiCtlrUnitNumber: 7}
	switch kind {
	case ControllerPVSCSI:
		return &types.ParaVirtualSCSIController{VirtualSCSIController: scsi}, nil
	case ControllerLSILogic:
		return &types.VirtualLsiLogicController{VirtualSCSIController: scsi}, nil
	case ControllerLSILogicSAS:
		return &types.VirtualLsiLogicSASController{VirtualSCSIController: scsi}, nil
	case ControllerBusLogic:
		return &types.VirtualBusLogicController{VirtualSCSIController: scsi}, nil
	case ControllerNVMe:
		return &types.VirtualNVMEController{VirtualController: base}, nil
	case ControllerSATA:
		return &types.VirtualAHCIController{VirtualSATAController: types.VirtualSATAController{VirtualController: base}}, nil
	case ControllerIDE:
		return &types.VirtualIDEController{VirtualController: base}, nil
	}
	return nil, fmt.Errorf("unknown controller type %q (want one of %s)", kind, strings.Join(controllerKinds, ", "))
}

// The NIC kinds a failover can create. SR-IOV and PVRDMA adapters need
// the host's hardware and are not recreated.
var nicKinds = []string{"vmxnet3", "e1000e", "e1000", "vmxnet2", "vmxnet", "pcnet32"}

// nicKind is an adapter's kind ("" for one asr does not know).
func nicKind(d types.BaseVirtualDevice) string {
	switch d.(type) {
	case *types.VirtualVmxnet3Vrdma: // before VirtualVmxnet3: it embeds it
		return "vmxnet3vrdma"
	case *types.VirtualVmxnet3:
		return "vmxnet3"
	case *types.VirtualVmxnet2:
		return "vmxnet2"
	case *types.VirtualVmxnet:
		return "vmxnet"
	case *types.VirtualE1000e:
		return "e1000e"
	case *types.VirtualE1000:
		return "e1000"
	case *types.VirtualPCNet32:
		return "pcnet32"
	case *types.VirtualSriovEthernetCard:
		return "sriov"
	}
	return ""
}

// newNIC makes an adapter of a kind on a backing, with a generated MAC.
func newNIC(kind string, key int32, backing types.BaseVirtualDeviceBackingInfo) (types.BaseVirtualDevice, error) {
	card := types.VirtualEthernetCard{
		VirtualDevice: types.VirtualDevice{Key: key, Backing: backing,
			Connectable: &types.VirtualDeviceConnectInfo{StartConnected: true, AllowGuestControl: true, Connected: true}},
		AddressType: string(types.VirtualEthernetCardMacTypeGenerated),
	}
	switch kind {
	case "vmxnet3":
		return &types.VirtualVmxnet3{VirtualVmxnet: types.VirtualVmxnet{VirtualEthernetCard: card}}, nil
	case "vmxnet2":
		return &types.VirtualVmxnet2{VirtualVmxnet: types.VirtualVmxnet{VirtualEthernetCard: card}}, nil
	case "vmxnet":
		return &types.VirtualVmxnet{VirtualEthernetCard: card}, nil
	case "e1000e":
		return &types.VirtualE1000e{VirtualEthernetCard: card}, nil
	case "e1000":
		return &types.VirtualE1000{VirtualEthernetCard: card}, nil
	case "pcnet32":
		return &types.VirtualPCNet32{VirtualEthernetCard: card}, nil
	}
	return nil, fmt.Errorf("NIC type %q cannot be recreated (want one of %s)", kind, strings.Join(nicKinds, ", "))
}

func validNICKind(kind string) bool { return slices.Contains(nicKinds, kind) }
