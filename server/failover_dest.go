package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/azure"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/drill"
	"github.com/asrdr/asr/store"
	"github.com/asrdr/asr/vmware"
)

// The destinations of a failover besides the NBD exports (failover.go):
// a verified drill in QEMU, a VM in a vCenter, a VM in Azure; and the
// planned failover's last point.

// sourceVM is the inventory's VM linked to a machine (same BIOS UUID, one
// VM): where a recovered machine takes its CPUs, memory and devices from.
// nil when the machine is not linked.
func (s *Server) sourceVM(ctx context.Context, m store.Machine) *vmware.VM {
	if m.BIOSUUID == "" {
		return nil
	}
	rows, err := s.db.VMsWithUUIDs(ctx, []string{m.BIOSUUID})
	if err != nil || len(rows) != 1 {
		return nil
	}
	var vm vmware.VM
	if json.Unmarshal([]byte(rows[0].Data), &vm) != nil {
		return nil
	}
	return &vm
}

// vcenterClient logs in to a registered vCenter (its pinned certificate).
func (s *Server) vcenterClient(ctx context.Context, name string) (*govmomi.Client, error) {
	v, err := s.db.VCenter(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return nil, errorf(http.StatusNotFound, "no vCenter named %q is registered", name)
	}
	if err != nil {
		return nil, err
	}
	pw, err := s.openPassword(v)
	if err != nil {
		return nil, err
	}
	return vmware.Connect(ctx, vmware.Endpoint{Name: v.Name, URL: v.URL, User: v.User, Password: pw, Thumbprint: v.Thumbprint})
}

// plannedPoint is a planned failover's last point: the agent refuses every
// new write, drains what it acknowledged and takes the point
// (procserver.Freeze); then the source VM is shut down through its vCenter
// when the machine is linked to one. The job may be cancelled until the
// point is taken: the agent is thawed and the source runs on.
func (s *Server) plannedPoint(ctx context.Context, j *job, m store.Machine, id string) (replication.Point, error) {
	j.setCancellable(true)
	done := j.step(m.Name+": freeze", "the source refuses new writes; what it acknowledged drains into a last point")
	if st, ok := s.ps.Stats(m.ID); !ok || !st.Connected {
		// Freeze would wait for the agent to come back: say so at once.
		err := fmt.Errorf("the agent of %s is not connected: a planned failover needs the source running (run an unplanned failover instead): %w", m.Name, procserver.ErrNotConnected)
		done("", err)
		return replication.Point{}, err
	}
	p, err := s.ps.Freeze(ctx, m.ID, id)
	if err != nil {
		done("", err)
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if terr := s.ps.Thaw(tctx, m.ID, id); terr != nil && !errors.Is(terr, procserver.ErrNotConnected) {
			s.log.Warn("thaw after a failed planned failover", "machine", m.Name, "err", terr)
		}
		if errors.Is(err, procserver.ErrNotConnected) {
			return p, fmt.Errorf("the agent of %s is not connected: a planned failover needs the source running (run an unplanned failover instead): %w", m.Name, err)
		}
		return p, err
	}
	j.setCancellable(false)
	done(fmt.Sprintf("last point %s (seq %d): no acknowledged write is after it", p.ID, p.Seq), nil)
	if vm := s.sourceVM(ctx, m); vm != nil {
		done := j.step(m.Name+": shut down", fmt.Sprintf("VM %s through vCenter %s", vm.Name, vm.VCenter))
		err := s.shutDownVM(ctx, vm)
		done("powered off", err)
		if err != nil {
			// The source refuses writes already: the point is final
			// whatever the VM does, so the failover goes on.
			s.raise(ctx, store.Event{MachineID: m.ID, Severity: "warning", Kind: "failover-shutdown",
				Message: fmt.Sprintf("planned failover: VM %s could not be shut down (%v); its disks refuse writes, shut it down by hand", vm.Name, err)})
		}
	}
	return p, nil
}

// shutDownVM shuts a VM down: a guest shutdown when VMware Tools run,
// else a power-off; it returns once the VM is off.
func (s *Server) shutDownVM(ctx context.Context, vm *vmware.VM) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	c, err := s.vcenterClient(ctx, vm.VCenter)
	if err != nil {
		return err
	}
	defer c.Logout(context.WithoutCancel(ctx))
	o := object.NewVirtualMachine(c.Client, types.ManagedObjectReference{Type: "VirtualMachine", Value: vm.Ref})
	st, err := o.PowerState(ctx)
	if err != nil || st == types.VirtualMachinePowerStatePoweredOff {
		return err
	}
	if o.ShutdownGuest(ctx) == nil {
		gctx, gcancel := context.WithTimeout(ctx, 2*time.Minute)
		err := o.WaitForPowerState(gctx, types.VirtualMachinePowerStatePoweredOff)
		gcancel()
		if err == nil {
			return nil
		}
	}
	t, err := o.PowerOff(ctx)
	if err != nil {
		return err
	}
	return t.Wait(ctx)
}

// drill boots the exported machine in QEMU in an isolated network
// namespace and checks the boot condition.
func (s *Server) drill(ctx context.Context, j *job, f store.Failover, m store.Machine, exports []api.Export, req api.FailoverRequest) (*api.DrillResult, error) {
	o := drill.Options{Logger: s.log.With("machine", m.Name, "job", j.id)}
	for _, e := range exports {
		o.Disks = append(o.Disks, drill.Disk{Name: e.Disk, Socket: s.fo.sockPath, Export: m.Name + "/" + e.Disk})
	}
	if vm := s.sourceVM(ctx, m); vm != nil {
		o.CPUs, o.MemoryMiB = int(vm.CPUs), int(vm.MemoryMiB)
	}
	if req.BootCheck != "" {
		o.BootCheck = regexp.MustCompile(req.BootCheck) // checked at the request
	}
	o.TCPPort = req.BootPort
	o.Timeout = time.Duration(req.BootTimeout * float64(time.Second))
	logDir := filepath.Join(s.cfg.DataDir, "drills")
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		return nil, err
	}
	o.LogPath = filepath.Join(logDir, j.id+"-"+m.Name+".console")
	o.Accel = os.Getenv("ASR_DRILL_ACCEL") // tests pin tcg; "" chooses
	what := []string{}
	if req.BootCheck != "" {
		what = append(what, fmt.Sprintf("console matches %q", req.BootCheck))
	}
	if req.BootPort != 0 {
		what = append(what, fmt.Sprintf("port %d answers", req.BootPort))
	}
	done := j.step(m.Name+": boot", "QEMU in an isolated network until "+strings.Join(what, " and "))
	res, err := drill.Boot(ctx, o)
	if err != nil {
		done("", err)
		return nil, err
	}
	r := &api.DrillResult{Passed: res.Passed, BootTime: res.BootTime.Seconds(), Accel: res.Accel, Reason: res.Reason, Console: res.ConsoleTail}
	if res.Passed {
		done(fmt.Sprintf("passed: booted in %.1fs (%s), console in %s", r.BootTime, r.Accel, o.LogPath), nil)
		s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "drill-passed",
			Message: fmt.Sprintf("drill passed: point %s booted in %.1fs (%s)", f.PointID, r.BootTime, r.Accel)})
	} else {
		done("", errors.New(res.Reason)) // the step's state says failed
		s.raise(ctx, store.Event{MachineID: m.ID, Severity: "error", Kind: "drill-failed",
			Message: fmt.Sprintf("drill failed: point %s did not boot: %s (console in %s)", f.PointID, firstLine(res.Reason), o.LogPath)})
	}
	return r, nil
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// recoveredName is the name of a VM a failover creates.
func recoveredName(m store.Machine, src *vmware.VM, test bool) string {
	name := m.Name
	if src != nil && src.Name != "" {
		name = src.Name
	}
	if test {
		return name + "-test"
	}
	return name + "-recovered"
}

// failoverToVSphere writes the recovered disks to a datastore and creates
// the VM (vmware.FailoverToVSphere).
func (s *Server) failoverToVSphere(ctx context.Context, j *job, f store.Failover, m store.Machine, p replication.Point, plan *replication.TimePlan, req api.FailoverRequest, d failoverDetail) (failoverDetail, []string, error) {
	vt := req.VSphere
	c, err := s.vcenterClient(ctx, vt.VCenter)
	if err != nil {
		return d, nil, err
	}
	defer c.Logout(context.WithoutCancel(ctx))
	ex, err := s.openRecovered(ctx, f, m, p, plan)
	if err != nil {
		return d, nil, err
	}
	defer func() {
		ex.close()
		os.RemoveAll(failoverDir(s.cfg.DataDir, f.ID))
	}()
	src := s.sourceVM(ctx, m)
	spec, disks := vsphereVM(src, recoveredName(m, src, req.Test), *vt, req.Test, !req.Test || vt.PowerOn, exportDisks(ex.disks, nil))
	res, err := s.createVSphereVM(ctx, j, c, m, vt.VCenter, spec, disks)
	if err != nil {
		return d, nil, err
	}
	d.VM = vt.VCenter + "/" + res.Name
	d.VSphere = &vsphereDetail{VCenter: vt.VCenter, Ref: res.Ref, Name: res.Name, UUID: res.UUID}
	return d, []string{fmt.Sprintf("%s %s %s", m.Name, d.VM, res.Ref)}, nil
}

// vsphereVM is the VM a failover to vSphere (or an alternate-location
// failback) makes of a machine's disks (each its Name, Size and Src): the
// source VM's CPUs, memory, guest, firmware and NICs when the machine is
// linked to one (src), each disk at its place on the source when they are
// as many (else the first free unit).
func vsphereVM(src *vmware.VM, name string, vt api.VSphereTarget, isolated, powerOn bool, disks []vmware.FailoverDisk) (vmware.FailoverSpec, []vmware.FailoverDisk) {
	spec := vmware.FailoverSpec{VMName: name, Datastore: vt.Datastore, Host: vt.Host, Pool: vt.Pool, Folder: vt.Folder,
		Network: vt.Network, Isolated: isolated, PowerOn: powerOn, CPUs: 1, MemoryMiB: 1024}
	var srcDisks []vmware.Disk
	if src != nil {
		spec.CPUs, spec.MemoryMiB, spec.GuestID, spec.Firmware, spec.NICs = src.CPUs, src.MemoryMiB, src.GuestID, src.Firmware, src.NICs
		srcDisks = src.Disks
	}
	if len(spec.NICs) == 0 {
		spec.NICs = []vmware.NIC{{Type: "vmxnet3"}}
	}
	disks = slices.Clone(disks)
	for i := range disks {
		fd := &disks[i]
		fd.Controller, fd.Bus, fd.Unit = "", 0, -1
		// The source's disks in device order match the protected disks
		// in index order when they are as many: each keeps its controller.
		if len(srcDisks) == len(disks) {
			fd.Controller, fd.Bus, fd.Unit = srcDisks[i].ControllerType, srcDisks[i].ControllerBus, srcDisks[i].Unit
		}
	}
	return spec, disks
}

// exportDisks are a failover's exported disks as a new VM's (vsphereVM);
// wrap, if not nil, wraps each disk's reader (disk i of exs).
func exportDisks(exs []*export, wrap func(i int, r io.ReaderAt) io.ReaderAt) []vmware.FailoverDisk {
	disks := make([]vmware.FailoverDisk, len(exs))
	for i, e := range exs {
		var r io.ReaderAt = overlayReader{e.ov}
		if wrap != nil {
			r = wrap(i, r)
		}
		disks[i] = vmware.FailoverDisk{Name: e.disk, Size: e.ov.Size(), Src: r}
	}
	return disks
}

// vsphereError maps the errors of a request made wrong to 400.
func vsphereError(err error) error {
	if errors.Is(err, vmware.ErrInvalidFailover) || errors.Is(err, vmware.ErrNotFound) || errors.Is(err, vmware.ErrExists) {
		return errorf(http.StatusBadRequest, "%v", err)
	}
	return err
}

// createVSphereVM uploads the disks to the datastore and creates the VM
// (vmware.FailoverToVSphere), as a job step with the bytes uploaded.
func (s *Server) createVSphereVM(ctx context.Context, j *job, c *govmomi.Client, m store.Machine, vcenter string, spec vmware.FailoverSpec, disks []vmware.FailoverDisk) (vmware.FailoverResult, error) {
	step := fmt.Sprintf("%s: create VM in %s", m.Name, vcenter)
	detail := fmt.Sprintf("upload %d disks to %s, create %s", len(disks), spec.Datastore, spec.VMName)
	j.update(api.JobStep{Name: step, State: "running", Detail: detail})
	res, err := vmware.FailoverToVSphere(ctx, c, spec, disks, func(done, total int64) {
		j.update(api.JobStep{Name: step, State: "running", Detail: detail, Done: done, Total: total})
	})
	if err != nil {
		j.update(api.JobStep{Name: step, State: "failed", Detail: err.Error()})
		return res, vsphereError(err)
	}
	state := "powered off"
	if res.PoweredOn {
		state = "powered on"
	}
	where := "" // vCenter placed it when no host was named
	if res.Host != "" {
		where = " on " + res.Host
	}
	j.update(api.JobStep{Name: step, State: "done", Detail: fmt.Sprintf("VM %s (%s)%s, %s, networks %s", res.Name, res.Ref, where, state, strings.Join(slices.Compact(slices.Sorted(slices.Values(res.Networks))), ",")),
		Done: res.Bytes, Total: res.Bytes})
	return res, nil
}

// overlayReader reads an overlay as an io.ReaderAt.
type overlayReader struct {
	ov interface{ ReadAt([]byte, int64) error }
}

func (r overlayReader) ReadAt(p []byte, off int64) (int, error) {
	if err := r.ov.ReadAt(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// removeVSphereVM destroys the VM a failover created (and its files).
func (s *Server) removeVSphereVM(ctx context.Context, d *failoverDetail) error {
	if d.VSphere == nil {
		return nil
	}
	c, err := s.vcenterClient(ctx, d.VSphere.VCenter)
	if err != nil {
		return err
	}
	defer c.Logout(context.WithoutCancel(ctx))
	err = vmware.DeleteFailoverVM(ctx, c, d.VSphere.Ref)
	if errors.Is(err, vmware.ErrNotFound) {
		err = nil // removed already
	}
	return err
}

// azureCredential is the ARM credential: the configured one (tests), else
// azidentity's default chain (environment, managed identity, Azure CLI)
// in the cloud of ARMOptions.
func (s *Server) azureCredential() (azcore.TokenCredential, error) {
	if s.cfg.ARMCredential != nil {
		return s.cfg.ARMCredential, nil
	}
	return azure.NewCredential(s.cfg.ARMOptions)
}

// azureVMName makes a machine name an Azure VM name (no underscores).
func azureVMName(name string) string {
	return strings.Trim(strings.ReplaceAll(name, "_", "-"), "-.")
}

// failoverToAzure writes each recovered disk as a fixed VHD, uploads it as
// a page blob into the vault's storage account (the azure:// target), and
// creates managed disks from the blobs, a NIC and a VM through ARM
// (azure.FailoverToAzure). This path has run only against the Azure
// SDK's fake servers and Azurite, not against real Azure.
func (s *Server) failoverToAzure(ctx context.Context, j *job, f store.Failover, m store.Machine, p replication.Point, plan *replication.TimePlan, req api.FailoverRequest, d failoverDetail) (failoverDetail, []string, error) {
	az, ok := s.target.(*azure.Target)
	if !ok {
		return d, nil, errorf(http.StatusBadRequest, "failover to Azure imports the disks from the vault's storage account: the server's target must be azure:// (it is %s)", s.target)
	}
	cred, err := s.azureCredential()
	if err != nil {
		return d, nil, fmt.Errorf("Azure credentials: %w", err)
	}
	at := req.Azure
	src := s.sourceVM(ctx, m)
	spec := azure.FailoverSpec{Subscription: at.Subscription, ResourceGroup: at.ResourceGroup, Location: at.Location,
		VNet: at.VNet, Subnet: at.Subnet, Size: at.Size, VMName: azureVMName(recoveredName(m, src, req.Test)),
		OSType: azure.OSTypeFromGuest(""), CPUs: 2, MemoryMiB: 4096, Test: req.Test}
	if src != nil {
		spec.OSType = azure.OSTypeFromGuest(src.GuestOS)
		spec.CPUs, spec.MemoryMiB = src.CPUs, src.MemoryMiB
		if src.Firmware == "efi" {
			spec.HyperVGeneration = "V2"
		}
	}
	ex, err := s.openRecovered(ctx, f, m, p, plan)
	if err != nil {
		return d, nil, err
	}
	defer func() {
		ex.close()
		os.RemoveAll(failoverDir(s.cfg.DataDir, f.ID))
	}()
	var disks []azure.FailoverDisk
	for _, e := range ex.disks {
		done := j.step(m.Name+": upload "+e.disk, "a fixed VHD page blob in "+s.target.String())
		img := filepath.Join(failoverDir(s.cfg.DataDir, f.ID), e.disk+".img")
		blob := fmt.Sprintf("failover/%s-%s-%s.vhd", m.Name, f.ID, e.disk)
		n, err := writeVHD(ctx, overlayReader{e.ov}, e.ov.Size(), img)
		var sent int64
		if err == nil {
			sent, err = az.UploadVHD(ctx, n, blob)
			os.Remove(n)
		}
		var fd azure.FailoverDisk
		if err == nil {
			fd, err = az.FailoverDisk(ctx, spec, blob, "")
		}
		done(fmt.Sprintf("%s: %d bytes sent", blob, sent), err)
		if err != nil {
			return d, nil, err
		}
		disks = append(disks, fd)
	}
	step := m.Name + ": create VM in Azure"
	j.update(api.JobStep{Name: step, State: "running", Detail: fmt.Sprintf("%s in %s/%s", spec.VMName, at.ResourceGroup, at.Location)})
	res, err := azure.FailoverToAzure(ctx, cred, s.cfg.ARMOptions, spec, disks, func(what string) {
		j.update(api.JobStep{Name: step, State: "running", Detail: what})
	})
	if err != nil {
		j.update(api.JobStep{Name: step, State: "failed", Detail: err.Error()})
		if errors.Is(err, azure.ErrInvalidFailover) || errors.Is(err, azure.ErrExists) {
			err = errorf(http.StatusBadRequest, "%v", err)
		}
		return d, nil, err
	}
	j.update(api.JobStep{Name: step, State: "done", Detail: fmt.Sprintf("VM %s (%s), NIC %s, %d managed disks", res.VMName, res.Size, res.PrivateIP, len(res.DiskIDs))})
	d.Azure, _ = json.Marshal(res)
	d.VM = "azure/" + res.ResourceGroup + "/" + res.VMName
	return d, []string{fmt.Sprintf("%s %s %s", m.Name, d.VM, res.VMID)}, nil
}

// writeVHD writes a disk as a fixed VHD file (a sparse raw image, then the
// footer) and returns its path.
func writeVHD(ctx context.Context, r io.ReaderAt, size int64, img string) (string, error) {
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return "", err
	}
	_, err = replication.WriteImage(ctx, r, size, f)
	if err == nil {
		err = f.Truncate(size)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(img)
		return "", err
	}
	path, _, err := replication.ConvertToVHD(img)
	return path, err
}

// removeAzureVM deletes a test failover's VM, NIC and managed disks.
func (s *Server) removeAzureVM(ctx context.Context, d *failoverDetail) error {
	if len(d.Azure) == 0 {
		return nil
	}
	var res azure.FailoverResult
	if err := json.Unmarshal(d.Azure, &res); err != nil {
		return err
	}
	if !res.Test {
		return nil // a failover's VM is the machine now
	}
	cred, err := s.azureCredential()
	if err != nil {
		return err
	}
	return azure.DeleteFailover(ctx, cred, s.cfg.ARMOptions, res)
}
