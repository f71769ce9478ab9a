package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"time"

	"github.com/vmware/govmomi"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/overlay"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/replication/retry"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
	"github.com/asrdr/asr/vmware"
)

// Failback of a committed failover to vSphere or to Azure, to the
// original location (docs/ARCHITECTURE.md, "Failback"). The failover made
// a VM from the point, in a registered vCenter (its disks flat VMDKs in a
// datastore) or in Azure (managed disks, failback_azure.go); the
// recovered machine runs there. Both are a recoveredVM: its disks read in
// order, and a power off and on. The original machine's agent stayed
// registered at the commit. The failed-over state is read where it is
// (vSphere: through vCenter's /folder endpoint, the datastore's flat
// files; Azure: through a read SAS ARM grants on each managed disk), and
// never copied whole to the original:
//
//   - Reprotect (reverse): the original agent is frozen under the
//     failover (failback_compare.go's freezeOriginal: waits, cancellable,
//     for an agent not connected; the replica is marked for a resync),
//     then one checksum pass: each recovered disk is read once, in order,
//     its 64 KiB blocks' sums (replication.BlockSum) compared with the
//     original's (REVERSE_SUM with a range), and only the blocks that
//     differ sent to the original agent as REVERSE frames, each
//     acknowledged once durable on the original disk. The recovered VM
//     runs on meanwhile: its pass reads a disk in use, which is fine,
//     since failback's pass is the one that counts.
//   - Failback: the recovered VM is powered off (vSphere) or deallocated
//     (Azure) (the recovered machine stopped: nothing it wrote after is lost, there is
//     nothing after), the same pass again (only what changed since
//     reprotect differs), each disk's SHA-256 taken as it is read;
//     then the original disks' SHA-256 (REVERSE_SUM) must equal them. The
//     switch and its end are the NBD failback's (recordSwitch,
//     finishFailback: thaw, the linked VM powered on, the failover ended).
//     Cancellable until the switch: the recovered VM is powered on again.
//
// Crash safety: the passes write nothing but the original disks, frozen,
// and failback's pass with the recovered VM off is complete by itself and
// verified whole, so a pass cut short by a stop is simply run again; the
// record says reprotected only once reprotect's pass is done, and
// failing-back only once failback's is verified (a restart past that
// finishes it: restoreReverse). Without an asr agent in the recovered
// VM (failback_agent.go: it ships the writes as they happen, and is
// frozen and drained before failback's power-off), the recovered
// machine's writes between reprotect and failback are found by
// failback's pass, and there is no reverse RPO.

// vmReverse is the reverse record of a failover to a VM
// (reverseDetail.VSphere or .Azure): reprotect's checksum pass.
type vmReverse struct {
	Compared int64 `json:"compared"` // bytes compared by reprotect's pass
	Differ   int64 `json:"differ"`   // bytes found different (and sent)
	// Path is how the recovered VM's writes after reprotect reach the
	// original disks: pathAgent (its agent ships them as they happen,
	// failback_agent.go) or pathVCenter ("" before it: failback's pass
	// finds them).
	Path string `json:"path,omitempty"`
	// From and Log, with pathAgent: the agent's records up to From (in
	// its log Log) were on the recovered disks before reprotect's
	// compare and are never written to the original (failback_agent.go).
	From uint64 `json:"from,omitempty"`
	Log  string `json:"log,omitempty"`
	// Streamed and Acked: the bytes the agent's stream wrote to the
	// original disks and the last of its records acknowledged (in Log),
	// saved at most every second while it writes and at the server's
	// stop (saveStream), so a restart keeps failback's total and tells
	// the agent the right resend point.
	Streamed int64  `json:"streamed,omitempty"`
	Acked    uint64 `json:"acked,omitempty"`
}

// vmFailback says whether f is a real failover to vSphere or Azure whose
// VM is recorded: failback to the original location reads that VM's
// disks.
func vmFailback(f store.Failover) bool {
	if f.Kind != api.FailoverReal {
		return false
	}
	d := decodeDetail(f)
	switch f.Dest {
	case api.ToVSphere:
		return d.VSphere != nil && d.VSphere.Ref != ""
	case api.ToAzure:
		res, err := azureResult(d)
		return err == nil && res.VMID != "" && !res.Test
	}
	return false
}

// recoveredVM is the VM a committed failover made, where the recovered
// machine runs (vcenterVM, azureVM): what failback reads and stops.
type recoveredVM interface {
	// name is the VM's name; place says where it is ("vCenter vc1",
	// "Azure resource group RG"); String is "VM NAME in PLACE".
	name() string
	place() string
	String() string
	// disks lists its disks in the failover's order (the machine's disks
	// by index).
	disks(ctx context.Context) ([]recoveredDisk, error)
	// open opens a disk for reading in order, with its size (-1: not
	// known); Close must be called.
	open(ctx context.Context, d recoveredDisk) (io.ReadCloser, int64, error)
	// powerOff stops the VM and waits; false: it was off already.
	powerOff(ctx context.Context) (bool, error)
	// powerOn starts it again (a failback that did not switch).
	powerOn(ctx context.Context) (bool, error)
	close()
}

// recoveredDisk is one disk of a recoveredVM: a name for an operator,
// its size, and the implementation's own reference.
type recoveredDisk struct {
	name string
	size int64
	ref  any
}

// openRecoveredVM returns the VM failover f made (vmFailback(f) holds).
func (s *Server) openRecoveredVM(ctx context.Context, f store.Failover) (recoveredVM, error) {
	d := decodeDetail(f)
	if f.Dest == api.ToAzure {
		return s.openAzureVM(d)
	}
	c, err := s.vcenterClient(ctx, d.VSphere.VCenter)
	if err != nil {
		return nil, err
	}
	return &vcenterVM{c: c, v: d.VSphere}, nil
}

// vcenterVM is a failover's VM in vCenter.
type vcenterVM struct {
	c *govmomi.Client
	v *vsphereDetail
}

func (vm *vcenterVM) name() string   { return vm.v.Name }
func (vm *vcenterVM) place() string  { return "vCenter " + vm.v.VCenter }
func (vm *vcenterVM) String() string { return vmLabel(vm) }

// vmLabel is a recoveredVM's String.
func vmLabel(vm recoveredVM) string { return fmt.Sprintf("VM %s in %s", vm.name(), vm.place()) }

func (vm *vcenterVM) disks(ctx context.Context) ([]recoveredDisk, error) {
	ds, err := vmware.RecoveredDisks(ctx, vm.c, vm.v.Ref)
	if err != nil {
		return nil, err
	}
	out := make([]recoveredDisk, len(ds))
	for i, d := range ds {
		out[i] = recoveredDisk{name: d.Descriptor, size: d.Size, ref: d}
	}
	return out, nil
}

func (vm *vcenterVM) open(ctx context.Context, d recoveredDisk) (io.ReadCloser, int64, error) {
	return vmware.OpenFlat(ctx, vm.c, d.ref.(vmware.RecoveredDisk))
}

func (vm *vcenterVM) powerOff(ctx context.Context) (bool, error) {
	return vmware.PowerOff(ctx, vm.c, vm.v.Ref)
}

func (vm *vcenterVM) powerOn(ctx context.Context) (bool, error) {
	return vmware.PowerOn(ctx, vm.c, vm.v.Ref)
}

func (vm *vcenterVM) close() { vm.c.Logout(context.Background()) }

// vmPass is what one checksum pass did.
type vmPass struct {
	compared, differ, sent int64
	sums                   []string // each recovered disk's SHA-256, in m.Disks order
	path                   string   // reprotect's: pathAgent or pathVCenter
	from                   uint64   // with pathAgent: the stream's floor (recAgent.floor)
	log                    string   // and the agent's log
	agent                  string   // and the agent's BIOS UUID
}

// vmStepTimeout bounds the power-on of a recovered VM when a failback is
// cancelled or fails.
const vmStepTimeout = vcenterStepTimeout

// refuseReprotectVM says why a machine's live failover to a VM cannot be
// reprotected toward its original disks (nil if it can).
func (s *Server) refuseReprotectVM(ctx context.Context, m store.Machine, f store.Failover) error {
	if f.State != store.FailoverCommitted {
		return errorf(http.StatusConflict, "machine %s's failover is %s: commit it first (asr failover --commit), then reprotect", m.Name, f.State)
	}
	if d := decodeDetail(f); d.Reverse != nil {
		return errorf(http.StatusConflict, "machine %s is %s already", m.Name, d.Reverse.State)
	}
	if m.Unprotected() {
		return errorf(http.StatusConflict, "machine %s is unprotected (its failover was committed before failback of failovers to %s kept the original agent registered): failback needs the original agent", m.Name, f.Dest)
	}
	return s.refuseResyncRunning(ctx, m)
}

// refuseResyncRunning refuses a reprotect while a disk of m is resynced.
func (s *Server) refuseResyncRunning(ctx context.Context, m store.Machine) error {
	for _, d := range m.Disks {
		if r, err := s.db.Resync(ctx, m.ID, d.Index); err == nil && r.State == store.ResyncRunning {
			return errorf(http.StatusConflict, "disk %s of machine %s is being resynced: reprotect once it is done", d.Name, m.Name)
		}
	}
	return nil
}

// reprotectVM reprotects a committed failover to vSphere or Azure toward
// the original disks.
func (s *Server) reprotectVM(ctx context.Context, m store.Machine, f store.Failover) (api.Job, error) {
	if err := s.refuseReprotectVM(ctx, m, f); err != nil {
		return api.Job{}, err
	}
	return s.startJob(ctx, "reprotect", m.Name, func(ctx context.Context, j *job) error {
		j.setCancellable(true)
		p, vm, err := s.reprotectVMSteps(ctx, j, m, f)
		if err != nil {
			return err
		}
		next := fmt.Sprintf("VM %s runs on; no asr agent in it is connected, so its writes from now on are found and sent by asr failback --machine %s (which powers it off first)", vm, m.Name)
		if p.path == pathAgent {
			next = fmt.Sprintf("path: the asr agent in VM %s (BIOS UUID %s) ships its writes to the original disks as they happen", vm, p.agent)
		}
		j.setResult([]string{
			fmt.Sprintf("reprotected: %d bytes compared, %d differ, %d bytes sent to the original disks", p.compared, p.differ, p.sent),
			next,
		}, 0)
		return nil
	})
}

// reprotectVMSteps are the reprotect of a failover to a VM in job j (which
// may be cancelled throughout): the original frozen, one checksum pass,
// the record. It returns the pass and the VM's name.
func (s *Server) reprotectVMSteps(ctx context.Context, j *job, m store.Machine, f store.Failover) (vmPass, string, error) {
	log := s.log.With("machine", m.Name, "failover", f.ID)
	if err := s.freezeForVM(ctx, j, m, f, log); err != nil {
		return vmPass{}, "", err
	}
	// Still cancellable: a pass cut short wrote only some blocks of
	// the frozen original, which failback's pass makes whole; the
	// original stays frozen until failback (or asr unprotect).
	vm, err := s.openRecoveredVM(ctx, f)
	if err != nil {
		return vmPass{}, "", err
	}
	defer vm.close()
	disks, err := s.recoveredDisks(ctx, j, vm, m)
	if err != nil {
		return vmPass{}, "", err
	}
	// The agent in the recovered VM, connected: its writes are held
	// from its Welcome until this compare (begun after it) is done, then
	// shipped as they happen; one welcomed again meanwhile dropped
	// records the compare may have missed: compare again.
	ra := s.recAgents.of(m.ID, f.ID)
	var p vmPass
	agentDone := false
	if ra != nil && f.Dest == api.ToAzure {
		// Azure: the agent compares its disks itself
		// (failback_agent_resync.go); the SAS path if it cannot.
		p, agentDone, err = s.resyncThroughAgent(ctx, j, m, f, ra)
		if err != nil && !errors.Is(err, errAgentPathLost) {
			return p, "", err
		}
	}
	if !agentDone {
		p, err = s.compareForStream(ctx, j, vm, m, f, disks, ra, false)
		if err != nil {
			return p, "", err
		}
	}
	s.rv.recMu.Lock()
	cur, err := s.db.LiveFailover(ctx, m.ID)
	if err == nil && cur.ID != f.ID {
		err = fmt.Errorf("machine %s: failover %s is not live any more", m.Name, f.ID)
	}
	if err == nil {
		cd := decodeDetail(cur)
		sent := p.sent
		if agentDone {
			sent = 0 // sent by the agent's stream: counted in its Streamed
		}
		cd.Reverse = &reverseDetail{State: dirReprotected, Started: s.now(), Sent: sent}
		pass := &vmReverse{Compared: p.compared, Differ: p.differ, Path: p.path, From: p.from, Log: p.log}
		if f.Dest == api.ToAzure {
			cd.Reverse.Azure = pass
		} else {
			cd.Reverse.VSphere = pass
		}
		cur.Detail = encodeDetail(cd)
		err = s.db.UpdateFailover(ctx, cur)
	}
	s.rv.recMu.Unlock()
	if err != nil {
		return p, "", err
	}
	if ra != nil {
		ra.kickSave() // the stream's writes since goLive
	}
	s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "reprotected",
		Message: fmt.Sprintf("failover %s (to %s) reprotected: %d bytes compared, %d differed and were sent to the original disks", f.ID, vm, p.compared, p.differ)})
	return p, vm.name(), nil
}

// freezeForVM freezes the original agent under the failover and
// marks the replica for a resync, as an unplanned failover's reprotect
// does (freezeOriginal), as the job's step; cancellable while it waits.
func (s *Server) freezeForVM(ctx context.Context, j *job, m store.Machine, f store.Failover, log *slog.Logger) error {
	run := &reverseRun{failoverID: f.ID, machineID: m.ID, changed: make(chan struct{})}
	run.cmp.Store(&reverseCompare{machine: m.Name, frozen: make(chan struct{}), done: make(chan struct{})})
	fctx, cancel := context.WithCancel(ctx)
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		s.freezeOriginal(fctx, run, log)
	}()
	err := s.waitCompare(ctx, j, run, m.Name+": freeze the original",
		fmt.Sprintf("waits for the original agent of machine %s to connect and stop writing its disks", m.Name), run.cmp.Load().frozen, false)
	cancel()
	<-ended
	return err
}

// recoveredDisks returns the recovered VM's disks, one per protected
// disk in m.Disks' order, as a job step.
func (s *Server) recoveredDisks(ctx context.Context, j *job, vm recoveredVM, m store.Machine) ([]recoveredDisk, error) {
	done := j.step(m.Name+": find VM "+vm.name(), fmt.Sprintf("the disks of %s", vm))
	disks, err := vm.disks(ctx)
	if err == nil && len(disks) != len(m.Disks) {
		err = fmt.Errorf("VM %s has %d disks, machine %s %d: its disks were changed since the failover; failback needs them as the failover made them", vm.name(), len(disks), m.Name, len(m.Disks))
	}
	if err != nil {
		err = fmt.Errorf("the recovered %s: %w", vm, err)
		done("", err)
		return nil, err
	}
	fitDisks(vm, m, disks)
	names := make([]string, len(disks))
	for i, d := range disks {
		names[i] = d.name
	}
	done(fmt.Sprintf("%d disks: %v", len(disks), names), nil)
	return disks, nil
}

// fitDisks sizes a recovered VM's disks (as many as m's) as the
// machine's: a VHD's size is a multiple of 1 MiB, so a failover to Azure
// rounded a disk up, and the machine's disk is the first md.Size bytes.
// What the recovered guest wrote past them has no room on the original.
func fitDisks(vm recoveredVM, m store.Machine, disks []recoveredDisk) {
	if _, ok := vm.(*azureVM); !ok {
		return
	}
	for i, md := range machineDisks(m) {
		if d := &disks[i]; d.size > md.Size && d.size == alignUp(md.Size, replication.VHDAlign) {
			d.size = md.Size
		}
	}
}

// alignUp rounds n up to a multiple of a.
func alignUp(n, a int64) int64 { return (n + a - 1) / a * a }

// machineDisks is m.Disks in index order (the failover's disk order).
func machineDisks(m store.Machine) []store.Disk {
	ds := slices.Clone(m.Disks)
	slices.SortFunc(ds, func(a, b store.Disk) int { return int(a.Index) - int(b.Index) })
	return ds
}

// compareVM is one checksum pass over every recovered disk: read in
// order, each batch of blocks' sums compared with the
// original's, the blocks that differ written to the original (each
// acknowledged durable). withSum also takes each disk's SHA-256. An
// original agent found thawed (a refusal; thawed by hand, its state
// lost) is frozen again and the pass run again from the start: the
// guest may have written any block of the original meanwhile.
func (s *Server) compareVM(ctx context.Context, j *job, name, detail string, vm recoveredVM, m store.Machine, f store.Failover, disks []recoveredDisk, withSum bool) (vmPass, error) {
	var sent int64 // by the passes cut short
	for {
		p, err := s.compareVMOnce(ctx, j, name, detail, vm, m, f, disks, withSum)
		p.sent += sent
		if err == nil || !s.refreezeVM(ctx, j, m, f, err) {
			return p, err
		}
		sent = p.sent
	}
}

// refreezeVM, after err from the original agent, says whether it was a
// refusal from an agent no longer frozen under failover f; if so, the
// agent is frozen again (freezeForVM, the job's step) and a warning event
// raised; false also when that freeze ends with ctx.
func (s *Server) refreezeVM(ctx context.Context, j *job, m store.Machine, f store.Failover, err error) bool {
	run := &reverseRun{failoverID: f.ID, machineID: m.ID, name: m.Name}
	if !s.thawedAfterRefusal(ctx, run, err) {
		return false
	}
	s.noteThawed(ctx, run, "its disks were compared with the recovered VM's", err)
	return s.freezeForVM(ctx, j, m, f, s.log.With("machine", m.Name, "failover", f.ID)) == nil
}

func (s *Server) compareVMOnce(ctx context.Context, j *job, name, detail string, vm recoveredVM, m store.Machine, f store.Failover, disks []recoveredDisk, withSum bool) (vmPass, error) {
	var p vmPass
	var total int64
	for _, d := range disks {
		total += d.size
	}
	waiting := ""
	show := func(state string) {
		st := api.JobStep{Name: name, State: state, Total: total, Done: p.compared,
			Detail: fmt.Sprintf("%s (%d bytes differ, %d sent)", detail, p.differ, p.sent)}
		if waiting != "" {
			st.Detail += " (" + waiting + ")"
		}
		j.update(st)
	}
	fail := func(err error) (vmPass, error) {
		j.update(api.JobStep{Name: name, State: "failed", Total: total, Done: p.compared, Detail: err.Error()})
		return p, err
	}
	show("running")
	buf := make([]byte, compareBatch*overlay.BlockSize)
	for i, md := range machineDisks(m) {
		rd := disks[i]
		rc, size, err := vm.open(ctx, rd)
		if err != nil {
			return fail(err)
		}
		var h hash.Hash
		if withSum {
			h = sha256.New()
		}
		n, err := s.compareFlat(ctx, m, f, md, rd, rc, size, buf, h, &p, func(w string) { waiting = w; show("running") })
		if cerr := rc.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fail(err)
		}
		if withSum {
			p.sums = append(p.sums, hex.EncodeToString(h.Sum(nil)))
		}
		s.log.Info("failback: disk compared", "machine", m.Name, "disk", md.Name, "bytes", n)
	}
	j.update(api.JobStep{Name: name, State: "done", Total: total, Done: p.compared,
		Detail: fmt.Sprintf("%d bytes compared, %d differ, %d bytes sent", p.compared, p.differ, p.sent)})
	return p, nil
}

// compareFlat compares one recovered disk (r, size bytes; -1 unknown)
// with original disk md, sending the blocks that differ; it returns the
// bytes read.
func (s *Server) compareFlat(ctx context.Context, m store.Machine, f store.Failover, md store.Disk, rd recoveredDisk, r io.Reader, size int64, buf []byte, h hash.Hash, p *vmPass, wait func(string)) (int64, error) {
	if size >= 0 && size != rd.size {
		return 0, fmt.Errorf("the content of %s is %d bytes, the disk %d", rd.name, size, rd.size)
	}
	var off int64
	for off < rd.size {
		if err := ctx.Err(); err != nil {
			return off, err
		}
		want := min(int64(len(buf)), rd.size-off)
		got, err := io.ReadFull(r, buf[:want])
		if err != nil {
			return off, fmt.Errorf("read %s at %d (%d of %d bytes): %w", rd.name, off, got, want, err)
		}
		chunk := buf[:want]
		if h != nil {
			h.Write(chunk)
		}
		count := int((want + overlay.BlockSize - 1) / overlay.BlockSize)
		var sums []replication.Hash
		var osize int64
		err = s.retryOriginal(ctx, m, wait, func() error {
			var err error
			sums, osize, err = s.ps.ReverseBlockSums(ctx, m.ID, f.ID, md.Index, off, overlay.BlockSize, count)
			return err
		})
		if err != nil {
			return off, fmt.Errorf("block sums of original disk %s at %d: %w", md.Name, off, err)
		}
		if osize != rd.size {
			return off, fmt.Errorf("the original disk %s is %d bytes, the recovered one (%s) %d", md.Name, osize, rd.name, rd.size)
		}
		if len(sums) != count {
			return off, fmt.Errorf("original disk %s: %d block sums for %d blocks", md.Name, len(sums), count)
		}
		// Runs of contiguous differing blocks, at most MaxReverseData each.
		var runStart, runEnd int64 = -1, -1
		flush := func() error {
			if runStart < 0 {
				return nil
			}
			data := chunk[runStart:runEnd]
			at := off + runStart
			runStart, runEnd = -1, -1
			err := s.retryOriginal(ctx, m, wait, func() error {
				return s.ps.ReverseWrite(ctx, m.ID, f.ID, md.Index, at, data)
			})
			if err != nil {
				return fmt.Errorf("write original disk %s at %d: %w", md.Name, at, err)
			}
			p.sent += int64(len(data))
			return nil
		}
		for k, sum := range sums {
			bs := int64(k) * overlay.BlockSize
			be := min(bs+overlay.BlockSize, want)
			if replication.BlockSum(chunk[bs:be]) == sum {
				if err := flush(); err != nil {
					return off, err
				}
				continue
			}
			p.differ += be - bs
			if runStart >= 0 && (runEnd != bs || be-runStart > replication.MaxReverseData) {
				if err := flush(); err != nil {
					return off, err
				}
			}
			if runStart < 0 {
				runStart = bs
			}
			runEnd = be
		}
		if err := flush(); err != nil {
			return off, err
		}
		off += want
		p.compared += want
		wait("")
	}
	return off, nil
}

// retryOriginal runs a request to the original agent, again with backoff
// while the agent is not connected (saying so through wait); a refusal
// (not frozen under the failover: thawed by hand, its state lost) ends
// the pass: the original may have taken writes.
func (s *Server) retryOriginal(ctx context.Context, m store.Machine, wait func(string), fn func() error) error {
	b := retry.New(500*time.Millisecond, 5*time.Second)
	for {
		err := fn()
		if err == nil || ctx.Err() != nil {
			return err
		}
		if errors.Is(err, procserver.ErrReverseRefused) {
			return fmt.Errorf("%w (is the original agent still frozen under the failover? run asr reprotect --machine %s again to freeze it)", err, m.Name)
		}
		why := fmt.Sprintf("waiting for the original agent of machine %s: %v", m.Name, err)
		if errors.Is(err, procserver.ErrNotConnected) {
			why = fmt.Sprintf("waiting for the original agent of machine %s to connect", m.Name)
		}
		wait(why)
		retry.Sleep(ctx, b.Next())
	}
}

// failbackVMReady says why a failover to a VM cannot fail back (nil if it
// can); again names the flag that reprotects it.
func failbackVMReady(m store.Machine, f store.Failover, again string) error {
	d := decodeDetail(f)
	if d.Reverse == nil {
		return errorf(http.StatusConflict, "machine %s is not reprotected: run asr reprotect %s first", m.Name, again)
	}
	if d.Reverse.State != dirReprotected || d.Reverse.VSphere == nil && d.Reverse.Azure == nil {
		return errorf(http.StatusConflict, "machine %s is %s already", m.Name, d.Reverse.State)
	}
	return nil
}

// failbackVM fails a reprotected failover to vSphere or Azure back to the
// original disks.
func (s *Server) failbackVM(ctx context.Context, m store.Machine, f store.Failover) (api.Job, error) {
	if err := failbackVMReady(m, f, "--machine "+m.Name); err != nil {
		return api.Job{}, err
	}
	if err := s.refuseGroupAlone(ctx, m); err != nil {
		return api.Job{}, err
	}
	return s.startJob(ctx, "failback", m.Name, func(ctx context.Context, j *job) error {
		start := time.Now()
		j.setCancellable(true)
		sm := newVMMember(m, f)
		defer sm.close()
		if err := s.failbackVMSteps(ctx, j, sm); err != nil {
			return err
		}
		if s.rv.switchHook != nil {
			s.rv.switchHook(s.ctx)
		}
		if s.ctx.Err() != nil {
			return fmt.Errorf("the server stopped after the switch: the failback is finished at its next start")
		}
		lines, err := s.finishFailback(ctx, j, sm.f, m)
		if err != nil {
			s.finishLater(sm.f, m)
		}
		if sm.rec.froze {
			lines = append(lines, lastPassLine(sm))
		}
		lines = append(lines, fmt.Sprintf("the recovered VM %s stays powered off in %s: remove it there once the original machine runs", sm.vm.name(), sm.vm.place()))
		j.setResult(lines, time.Since(start))
		return err
	})
}

// failbackVMSteps stops the recovered VM, sends its last changes and
// verifies, and records the switch; before the switch a failure or a
// cancel powers the recovered VM on again.
func (s *Server) failbackVMSteps(ctx context.Context, j *job, sm *switchMember) (err error) {
	defer func() {
		if err != nil {
			s.undoMember(ctx, j, sm)
		}
	}()
	for _, step := range []func(context.Context, *job, *switchMember) error{s.stopMember, s.drainMember, s.verifyMember} {
		if err := step(ctx, j, sm); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	j.setCancellable(false)
	return s.recordSwitch(ctx, []*switchMember{sm}, nil)
}

// newVMMember is a reprotected failover to a VM as a failback's member.
func newVMMember(m store.Machine, f store.Failover) *switchMember {
	return &switchMember{m: m, f: f, toVM: true, sentBefore: decodeDetail(f).Reverse.Sent}
}

// The member steps of a failback (failbackVMSteps, a plan's or group's):
// stop the failed-over machine, drain (send its last changes), verify the
// original disks, and, before the switch, undo the stop. For a failover
// to NBD they act on its exports and its shipper; for one to a VM, on the
// recovered VM (powered off, one checksum pass, SHA-256 compared).

// stopMember stops a member's failed-over machine.
func (s *Server) stopMember(ctx context.Context, j *job, sm *switchMember) error {
	if !sm.toVM {
		return stopFailedOver(j, sm.m, sm.run)
	}
	if sm.vm == nil {
		vm, err := s.openRecoveredVM(ctx, sm.f)
		if err != nil {
			return fmt.Errorf("machine %s: the recovered VM: %w", sm.m.Name, err)
		}
		sm.vm = vm
	}
	if err := s.resyncHeldAgent(ctx, j, sm); err != nil {
		return err
	}
	if err := s.freezeRecoveredAgent(ctx, j, sm); err != nil {
		return err
	}
	if err := s.verifyRecoveredAgent(ctx, j, sm); err != nil {
		return err
	}
	done := j.step(sm.m.Name+": stop the recovered VM", fmt.Sprintf("power off %s: the failed-over machine writes nothing more", sm.vm))
	off, err := sm.vm.powerOff(ctx)
	if err != nil {
		done("", err)
		return err
	}
	sm.vmOff = off
	done(map[bool]string{true: "powered off", false: "off already"}[off], nil)
	return nil
}

// drainMember waits until every change of a stopped member is on its
// original disks.
func (s *Server) drainMember(ctx context.Context, j *job, sm *switchMember) error {
	if !sm.toVM {
		return s.waitDrained(ctx, j, sm.m.Name+": drain", "send the last changes to the original disks", sm.run)
	}
	if sm.rec.sums != nil {
		return s.passByAgent(ctx, j, sm)
	}
	if !sm.rec.drained {
		if err := s.drainRecoveredAgent(ctx, j, sm.m, sm.f); err != nil {
			return err
		}
	}
	disks, err := s.recoveredDisks(ctx, j, sm.vm, sm.m)
	if err != nil {
		return err
	}
	p, err := s.compareVM(ctx, j, sm.m.Name+": send the last changes",
		"block sums of the original disks against the stopped VM's: the blocks that differ are sent", sm.vm, sm.m, sm.f, disks, true)
	if err != nil {
		return err
	}
	sm.disks, sm.pass = disks, p
	return nil
}

// verifyMember compares every original disk of a drained member with its
// failed-over state, whole (SHA-256 on both sides).
func (s *Server) verifyMember(ctx context.Context, j *job, sm *switchMember) error {
	if !sm.toVM {
		c, err := s.verifyOriginal(ctx, j, sm.f, sm.m, sm.run)
		sm.compared = c
		return err
	}
	m, p := sm.m, sm.pass
	verify := m.Name + ": verify"
	j.update(api.JobStep{Name: verify, State: "running", Detail: "compare the original disks with the recovered VM's (SHA-256)", Total: p.compared})
	var compared int64
	for i := 0; i < len(sm.disks); i++ {
		md := machineDisks(m)[i]
		var got string
		var size int64
		err := s.retryOriginal(ctx, m, func(string) {}, func() error {
			var err error
			got, size, err = s.ps.ReverseSum(ctx, m.ID, sm.f.ID, md.Index)
			return err
		})
		if err == nil && (got != p.sums[i] || size != sm.disks[i].size) {
			err = fmt.Errorf("disk %s: the original (sha256 %s, %d bytes) differs from the recovered VM's %s (sha256 %s, %d bytes)", md.Name, got, size, sm.disks[i].name, p.sums[i], sm.disks[i].size)
		}
		if err != nil && s.refreezeVM(ctx, j, m, sm.f, err) {
			// Thawed since the pass: frozen again, the pass run again
			// (the recovered VM is off: it finds what the original
			// guest wrote), then every disk verified again.
			np, perr := s.compareVM(ctx, j, m.Name+": send the last changes",
				"the original agent was found thawed: block sums of the original disks against the stopped VM's again, the blocks that differ sent", sm.vm, m, sm.f, sm.disks, true)
			if perr == nil {
				np.sent += p.sent
				sm.pass, p, compared, i = np, np, 0, -1
				continue
			}
			err = perr
		}
		if err != nil {
			j.update(api.JobStep{Name: verify, State: "failed", Detail: err.Error()})
			return err
		}
		compared += size
		j.update(api.JobStep{Name: verify, State: "running", Detail: "compare the original disks with the recovered VM's (SHA-256)", Total: p.compared, Done: compared})
	}
	j.update(api.JobStep{Name: verify, State: "done", Detail: fmt.Sprintf("%d bytes compared: equal", compared), Total: p.compared, Done: compared})
	sm.compared = p.compared
	// The recovered VM's agent's stream counts as sent too.
	streamed := s.streamedOf(sm.f)
	sm.run = &reverseRun{base: sm.sentBefore + p.sent + streamed} // the bytes sent, for the switch's record
	return nil
}

// undoMember lets a member's failed-over machine run on after a failback
// that did not switch: its exports writable again, or its recovered VM
// powered on again (if the failback powered it off).
func (s *Server) undoMember(ctx context.Context, j *job, sm *switchMember) {
	if !sm.toVM {
		if sm.run != nil {
			for _, d := range sm.run.disks {
				d.be.stopped.Store(false)
			}
		}
		return
	}
	defer s.thawRecoveredAgent(j, sm)
	if !sm.vmOff || sm.vm == nil {
		return
	}
	m, vm := sm.m, sm.vm
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), vmStepTimeout)
	defer cancel()
	undo := j.step(m.Name+": power the recovered VM on again", "the failback did not switch: the failed-over machine runs on")
	_, perr := vm.powerOn(pctx)
	undo("powered on", perr)
	if perr != nil {
		s.raise(pctx, store.Event{MachineID: m.ID, Severity: "warning", Kind: "failback-power-on",
			Message: fmt.Sprintf("failback of %s did not switch, and its recovered %s could not be powered on again (%v): power it on there", m.Name, vm, perr)})
	}
	sm.vmOff = false
}

// close releases a member's recovered VM client.
func (sm *switchMember) close() {
	if sm.vm != nil {
		sm.vm.close()
	}
}

// lastPassLine says what failback's pass over the stopped VM's disks
// sent after the recovered agent's freeze, and whether its stream was
// drained first.
func lastPassLine(sm *switchMember) string {
	if sm.rec.sums != nil {
		return "no pass over the stopped VM's disks: its agent, frozen and drained, showed each disk equal to the original (SHA-256) before the stop"
	}
	l := fmt.Sprintf("the last pass over the stopped VM's disks sent %d bytes", sm.pass.sent)
	if sm.rec.drained {
		l += " (its agent was frozen and drained before the power-off)"
	}
	return l
}
