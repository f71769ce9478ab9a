package server

import (
	"context"
	"fmt"
	"time"

	"github.com/asrdr/asr/store"
	"github.com/asrdr/asr/vmware"
)

// vcenterStepTimeout bounds a failback's vCenter calls that run past a
// cancel (a power-on, the removal of a VM).
const vcenterStepTimeout = 5 * time.Minute

// boundedCtx is ctx without its cancel, bounded by vcenterStepTimeout and
// ended when the server stops (a silent vCenter never holds a stop up).
func (s *Server) boundedCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), vcenterStepTimeout)
	stop := context.AfterFunc(s.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

// powerOnOriginal, at an original-location failback's switch (the drain
// and the compare done, the agent thawed), powers the on-premises VM on
// through its vCenter when the machine is linked to one (sourceVM: the
// inventory's VM of its BIOS UUID) and it is off: the planned failover
// shut it down. j is nil when a restart finishes the failback. A failure
// does not undo anything (the data is back on the original disks): the
// step fails, a warning event is raised, and the returned line says what
// to do; "" when the VM runs (or the machine has no linked VM).
func (s *Server) powerOnOriginal(ctx context.Context, j *job, m store.Machine) string {
	vm := s.sourceVM(ctx, m)
	if vm == nil {
		return ""
	}
	done := func(string, error) {}
	if j != nil {
		done = j.step(m.Name+": power on VM", fmt.Sprintf("VM %s through vCenter %s, if it is off", vm.Name, vm.VCenter))
	}
	ctx, cancel := s.boundedCtx(ctx)
	defer cancel()
	c, err := s.vcenterClient(ctx, vm.VCenter)
	var on bool
	if err == nil {
		on, err = vmware.PowerOn(ctx, c, vm.Ref)
		c.Logout(ctx)
	}
	if err != nil {
		err = fmt.Errorf("VM %s could not be powered on through vCenter %s (%v): its disks hold the failed-back state and accept writes; power it on in vCenter", vm.Name, vm.VCenter, err)
		done("", err)
		s.raise(context.WithoutCancel(ctx), store.Event{MachineID: m.ID, Severity: "warning", Kind: "failback-power-on", Message: err.Error()})
		return err.Error()
	}
	if on {
		done("powered on", nil)
	} else {
		done("running already", nil)
	}
	return ""
}
