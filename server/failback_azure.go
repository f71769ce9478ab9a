package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/asrdr/asr/azure"
)

// The Azure side of failback_vsphere.go's recoveredVM: the VM a failover
// to Azure made (failover_dest.go's failoverToAzure), its managed disks
// read through a read SAS ARM grants on each (azure.RecoveredVM), its
// power through deallocate and start (reprotect's pass, the VM running,
// reads snapshots of its disks: Azure grants no SAS on a running VM's
// disk). Run only against the Azure SDK's fake ARM servers and Azurite,
// never against real Azure (docs/ARCHITECTURE.md, "Failback").

// azureResult is what a failover to Azure recorded it made.
func azureResult(d failoverDetail) (azure.FailoverResult, error) {
	var res azure.FailoverResult
	if len(d.Azure) == 0 {
		return res, fmt.Errorf("no Azure VM recorded")
	}
	err := json.Unmarshal(d.Azure, &res)
	return res, err
}

// openAzureVM returns the VM a failover to Azure made.
func (s *Server) openAzureVM(d failoverDetail) (recoveredVM, error) {
	res, err := azureResult(d)
	if err != nil {
		return nil, err
	}
	cred, err := s.azureCredential()
	if err != nil {
		return nil, fmt.Errorf("Azure credentials: %w", err)
	}
	vm, err := azure.OpenRecoveredVM(cred, s.cfg.ARMOptions, res)
	if err != nil {
		return nil, err
	}
	return &azureVM{vm: vm, vmName: res.VMName}, nil
}

// azureVM is a failover's VM in Azure.
type azureVM struct {
	vm     *azure.RecoveredVM
	vmName string
}

func (a *azureVM) name() string   { return a.vmName }
func (a *azureVM) place() string  { return "Azure resource group " + a.vm.ResourceGroup() }
func (a *azureVM) String() string { return vmLabel(a) }

func (a *azureVM) disks(ctx context.Context) ([]recoveredDisk, error) {
	ds, err := a.vm.Disks(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]recoveredDisk, len(ds))
	for i, d := range ds {
		out[i] = recoveredDisk{name: "managed disk " + d.Name, size: d.Size, ref: d}
	}
	return out, nil
}

func (a *azureVM) open(ctx context.Context, d recoveredDisk) (io.ReadCloser, int64, error) {
	ad := d.ref.(azure.RecoveredDisk)
	// d.size may be less than the managed disk's (recoveredDisks): the
	// pass reads that much and closes.
	rc, err := a.vm.OpenDisk(ctx, ad)
	return rc, -1, err
}

func (a *azureVM) powerOff(ctx context.Context) (bool, error) { return a.vm.Deallocate(ctx) }
func (a *azureVM) powerOn(ctx context.Context) (bool, error)  { return a.vm.Start(ctx) }
func (a *azureVM) close()                                     {}
