package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/vmware/govmomi"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
	"github.com/asrdr/asr/vmware"
)

// Failback to an alternate location (docs/ARCHITECTURE.md, "Failback"):
// instead of writing the changes back into the original disks, a new VM
// is made in a vCenter whose disks are a full copy of the failed-over
// disks (the point plus every write since), as ASR's alternate-location
// recovery does. The failed-over machine is stopped (its exports refuse
// writes), each export is uploaded into the datastore as a flat VMDK
// (vmware.FailoverToVSphere, the failover to vSphere's own path), each
// flat file is read back through the datastore and its SHA-256 compared
// with the export's, and only then is the failback recorded (the
// failover ends, direction failed-back, to the new VM) and the VM powered
// on. The original disks are not touched. The new VM has no asr agent:
// protecting it forward means enabling its replication from the
// inventory (asr protect --vm NAME), not asr reprotect.
//
// A failover to vSphere is copied the same way from its recovered VM
// (altSource): its asr agent, if one streams, is frozen and drained
// (freezeRecoveredAgent), the VM powered off (stopMember), and each of
// its flat files read once, in order, through vCenter (flatReader) into
// the new VM's upload, hashed as it goes; a cancel before the switch, or
// a failure, powers it on again and thaws its agent (undoMember). After
// the switch it stays powered off where it is. A failover to Azure is
// copied the same way from its VM in Azure (azureVM, failback_azure.go):
// its agent frozen and drained if one streams, the VM deallocated, each
// managed disk read once, in order, through a read SAS (revoked when the
// read ends), the first bytes of the machine's size (fitDisks: the VHD
// rounded a disk up to 1 MiB); a cancel or failure before the switch
// starts it again. This path has run only against the fake ARM and
// Azurite, never against real Azure.

// altDetail is the new VM of an alternate-location failback (in the
// failover record's reverseDetail).
type altDetail struct {
	VCenter   string `json:"vcenter"`
	Ref       string `json:"ref"`
	Name      string `json:"name"`
	Datastore string `json:"datastore"`
}

// altFailback is what the alternate-location failback keeps in the
// server: a test hook.
type altFailback struct {
	// verifiedHook, for tests, runs when an alternate-location failback
	// has verified its copy, just before its switch, with the job's
	// context and id.
	verifiedHook func(ctx context.Context, jobID string)
}

// FailbackTo fails a machine back as req says: to its original disks (the
// default: Failback) or to a new VM in a vCenter (req.Alternate).
func (s *Server) FailbackTo(ctx context.Context, machine string, req api.FailbackRequest) (api.Job, error) {
	if !req.Alternate {
		if req.VSphere != nil || req.VMName != "" {
			return api.Job{}, errorf(http.StatusBadRequest, "a vCenter, datastore or VM name is for a failback to an alternate location (--alternate); the original location takes none")
		}
		return s.Failback(ctx, machine)
	}
	return s.failbackAlternate(ctx, machine, req)
}

// alternateName is the default name of an alternate-location failback's
// VM.
func alternateName(m store.Machine, src *vmware.VM) string {
	name := m.Name
	if src != nil && src.Name != "" {
		name = src.Name
	}
	return name + "-failback"
}

// failbackAlternate checks the request (the failover, the vCenter and
// the destination, through vCenter: nothing is stopped for a request
// that cannot be carried out) and starts the job.
func (s *Server) failbackAlternate(ctx context.Context, machine string, req api.FailbackRequest) (api.Job, error) {
	vt := req.VSphere
	switch {
	case vt == nil || vt.VCenter == "":
		return api.Job{}, errorf(http.StatusBadRequest, "a failback to an alternate location needs the vCenter that makes the new VM (--vcenter)")
	case vt.Datastore == "":
		return api.Job{}, errorf(http.StatusBadRequest, "a failback to an alternate location needs the datastore of the new VM's disks (--datastore)")
	case vt.PowerOn:
		return api.Job{}, errorf(http.StatusBadRequest, "power_on is not taken: the new VM is powered on once its disks are verified")
	}
	m, err := s.db.MachineByName(ctx, machine)
	if errors.Is(err, store.ErrNotFound) {
		return api.Job{}, errorf(http.StatusNotFound, "no machine named %q", machine)
	}
	if err != nil {
		return api.Job{}, err
	}
	f, ex, err := s.alternateFailover(ctx, m)
	if err != nil {
		return api.Job{}, err
	}
	src := s.sourceVM(ctx, m)
	name := req.VMName
	if name == "" {
		name = alternateName(m, src)
	}
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var fds []vmware.FailoverDisk
	if ex != nil {
		fds = exportDisks(ex.disks, nil)
	} else if fds, err = s.recoveredSizes(cctx, m, f); err != nil {
		return api.Job{}, err
	}
	spec, disks := vsphereVM(src, name, *vt, false, false, fds)
	c, err := s.vcenterClient(cctx, vt.VCenter)
	if err != nil {
		return api.Job{}, err
	}
	err = vmware.CheckFailover(cctx, c, spec, disks)
	c.Logout(context.WithoutCancel(cctx))
	if err != nil {
		return api.Job{}, vsphereError(err)
	}
	// One reprotect or failback job of a machine at a time, whichever
	// location (the check and the start under the same lock).
	s.rv.startMu.Lock()
	defer s.rv.startMu.Unlock()
	if err := s.refuseFailbackRunning(m); err != nil {
		return api.Job{}, err
	}
	// Checked again: a job that ended during the vCenter's check may
	// have changed the failover.
	if f2, ex2, err := s.alternateFailover(ctx, m); err != nil {
		return api.Job{}, err
	} else if f2.ID != f.ID || ex2 != ex {
		return api.Job{}, errorf(http.StatusConflict, "machine %s: its failover changed during the check; try again", m.Name)
	}
	return s.startJob(ctx, "failback", m.Name, func(ctx context.Context, j *job) error {
		return s.runFailbackAlternate(ctx, j, f, m, ex, src, *vt, name)
	})
}

// alternateFailover is the failover an alternate-location failback takes
// (a live failover to NBD or vSphere, committed, not failing back or
// failed back) and its exports (nil for a failover to vSphere).
func (s *Server) alternateFailover(ctx context.Context, m store.Machine) (store.Failover, *exported, error) {
	f, err := s.db.LiveFailover(ctx, m.ID)
	if errors.Is(err, store.ErrNotFound) {
		return f, nil, errorf(http.StatusConflict, "machine %s has no failover to fail back", m.Name)
	} else if err != nil {
		return f, nil, err
	}
	toVM := (f.Dest == api.ToVSphere || f.Dest == api.ToAzure) && vmFailback(f)
	if f.Kind != api.FailoverReal || f.Dest != api.ToNBD && !toVM {
		return f, nil, errorf(http.StatusConflict, "machine %s: failback to an alternate location is done for failovers to the server's NBD exports, to vSphere or to Azure (this one is %s to %s)", m.Name, kindWord(f.Kind), f.Dest)
	}
	if f.State != store.FailoverCommitted {
		return f, nil, errorf(http.StatusConflict, "machine %s's failover is %s: commit it first (asr failover --commit), then fail back", m.Name, f.State)
	}
	if d := decodeDetail(f); d.Reverse != nil && d.Reverse.State != dirReprotected {
		return f, nil, errorf(http.StatusConflict, "machine %s is %s already", m.Name, d.Reverse.State)
	}
	if toVM {
		return f, nil, nil
	}
	s.fo.mu.Lock()
	ex := s.fo.byMachine[m.ID]
	s.fo.mu.Unlock()
	if ex == nil || ex.failoverID != f.ID {
		return f, nil, errorf(http.StatusConflict, "machine %s: its failover's exports are not served (is the server starting?)", m.Name)
	}
	return f, ex, nil
}

// runFailbackAlternate is the job: stop, copy, verify (cancellable until
// here: the failed-over machine runs on), record, power on.
func (s *Server) runFailbackAlternate(ctx context.Context, j *job, f store.Failover, m store.Machine, ex *exported, src *vmware.VM, vt api.VSphereTarget, name string) error {
	start := time.Now()
	j.setCancellable(true)
	as := &altSource{ex: ex}
	if ex == nil {
		as.sm = &switchMember{m: m, f: f, toVM: true}
	}
	defer as.close()
	c, err := s.vcenterClient(ctx, vt.VCenter)
	if err != nil {
		return err
	}
	defer c.Logout(context.WithoutCancel(ctx))
	res, err := s.copyToAlternate(ctx, j, c, m, as, src, vt, name)
	if err != nil {
		s.undoSource(ctx, j, as) // the failed-over machine runs on
		return err
	}
	if s.fb.verifiedHook != nil {
		s.fb.verifiedHook(ctx, j.id)
	}
	// The switch: the failback is recorded, the failover ends. A cancel
	// that came before it undoes the copy.
	j.setCancellable(false)
	if ctx.Err() != nil {
		s.undoAlternate(ctx, j, c, as, f, m, res)
		return ctx.Err()
	}
	gone := "; the exports and overlays go"
	if ex == nil {
		gone = "; the recovered VM stays " + stoppedWord(as.sm.vm)
	}
	done := j.step(m.Name+": end the failover", "record the failback to "+vt.VCenter+"/"+res.Name+gone)
	f, frozen, err := s.recordAlternate(ctx, f, m, vt, res)
	done("", err)
	if err != nil {
		s.undoAlternate(ctx, j, c, as, f, m, res)
		return err
	}
	if ex != nil {
		if err := s.unexport(m.ID, f.ID, true); err != nil {
			s.log.Warn("failback: remove the exports", "machine", m.Name, "failover", f.ID, "err", err)
		}
	} else {
		s.recAgents.end(m.ID)
	}
	vm := vt.VCenter + "/" + res.Name
	lines := []string{fmt.Sprintf("failed back to a new VM: %s (%s) in %s, %d bytes copied and verified", vm, res.Ref, res.Dir, res.Bytes)}
	done = j.step(m.Name+": power on", fmt.Sprintf("VM %s through vCenter %s", res.Name, vt.VCenter))
	pctx, pcancel := s.boundedCtx(ctx)
	_, err = vmware.PowerOn(pctx, c, res.Ref)
	pcancel()
	if err != nil {
		done("", err)
		lines = append(lines, fmt.Sprintf("VM %s could not be powered on (%v): its disks hold the failed-over machine's final state; power it on in vCenter", vm, err))
	} else {
		done("powered on", nil)
	}
	lines = append(lines, fmt.Sprintf("forward protection: the new VM has no asr agent; enable replication of %s from the inventory (asr protect --vm %s ...) to protect it", res.Name, res.Name))
	if frozen {
		lines = append(lines, fmt.Sprintf("the original machine's agent stays frozen (its disks refuse writes; they are not the failed-back state): remove it with asr unprotect --machine %s", m.Name))
	}
	if as.sm != nil {
		lines = append(lines, fmt.Sprintf("the recovered %s stays %s: remove it there once the new VM runs", as.sm.vm, stoppedWord(as.sm.vm)))
	}
	s.raise(context.WithoutCancel(ctx), store.Event{MachineID: m.ID, Severity: "info", Kind: "failed-back",
		Message: fmt.Sprintf("failed back from failover %s to a new VM %s (%s), %d bytes copied and verified; it has no agent: enable its replication from the inventory to protect it", f.ID, vm, res.Ref, res.Bytes)})
	j.setResult(lines, time.Since(start))
	return nil
}

// stoppedWord says how a recovered VM is left stopped.
func stoppedWord(vm recoveredVM) string {
	if _, ok := vm.(*azureVM); ok {
		return "deallocated"
	}
	return "powered off"
}

// altSource is the failed-over machine an alternate-location failback
// copies: its exports (a failover to NBD) or its recovered VM (a
// failover to vSphere or Azure: sm, and its disks once stopped).
type altSource struct {
	ex      *exported
	sm      *switchMember
	readers []*flatReader
}

// close ends the recovered VM's reads and its client.
func (as *altSource) close() {
	for _, r := range as.readers {
		r.Close()
	}
	if as.sm != nil {
		as.sm.close()
	}
}

// stopSource stops the failed-over machine: its exports refuse writes
// (and are flushed), or its recovered VM's agent is frozen and drained
// and the VM powered off (stopMember), then its disks listed.
func (s *Server) stopSource(ctx context.Context, j *job, m store.Machine, as *altSource) error {
	if as.sm != nil {
		if err := s.stopMember(ctx, j, as.sm); err != nil {
			return err
		}
		disks, err := s.recoveredDisks(ctx, j, as.sm.vm, m)
		as.sm.disks = disks
		return err
	}
	done := j.step(m.Name+": stop the failed-over machine", "its exports refuse writes from now on")
	var err error
	for _, e := range as.ex.disks {
		e.be.stopped.Store(true)
	}
	for _, e := range as.ex.disks {
		if ferr := e.be.Flush(); ferr != nil && err == nil {
			err = ferr
		}
	}
	done("writes refused; flushed", err)
	return err
}

// undoSource lets the failed-over machine run on: its exports writable
// again, or its recovered VM powered on again and its agent thawed.
func (s *Server) undoSource(ctx context.Context, j *job, as *altSource) {
	if as.sm != nil {
		s.undoMember(ctx, j, as.sm)
		return
	}
	for _, e := range as.ex.disks {
		e.be.stopped.Store(false)
	}
}

// sourceDisks are the stopped source's disks as the new VM's (Name, Size,
// Src), each reader wrapped by wrap.
func (s *Server) sourceDisks(ctx context.Context, m store.Machine, as *altSource, wrap func(i int, r io.ReaderAt) io.ReaderAt) []vmware.FailoverDisk {
	if as.ex != nil {
		return exportDisks(as.ex.disks, wrap)
	}
	mds := machineDisks(m)
	fds := make([]vmware.FailoverDisk, len(as.sm.disks))
	for i, d := range as.sm.disks {
		r := &flatReader{ctx: ctx, vm: as.sm.vm, d: d}
		as.readers = append(as.readers, r)
		fds[i] = vmware.FailoverDisk{Name: mds[i].Name, Size: d.size, Src: wrap(i, r)}
	}
	return fds
}

// sumSource is disk i's SHA-256, read whole again (its sum taken during
// the upload is not the disk's: not read once in order).
func (s *Server) sumSource(ctx context.Context, as *altSource, i int) (string, error) {
	if as.ex != nil {
		return overlaySum(ctx, as.ex.disks[i].ov)
	}
	d := as.sm.disks[i]
	rc, size, err := as.sm.vm.open(ctx, d)
	if err != nil {
		return "", err
	}
	defer rc.Close()
	if size >= 0 && size != d.size {
		return "", fmt.Errorf("the content of %s is %d bytes, the disk %d", d.name, size, d.size)
	}
	h := sha256.New()
	if n, err := io.Copy(h, io.LimitReader(rc, d.size)); err != nil || n != d.size {
		return "", fmt.Errorf("read %s (%d of %d bytes): %v", d.name, n, d.size, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// recoveredSizes lists the disks of failover f's recovered VM as a new
// VM's (Name and Size; a source never read), to check the request.
func (s *Server) recoveredSizes(ctx context.Context, m store.Machine, f store.Failover) ([]vmware.FailoverDisk, error) {
	vm, err := s.openRecoveredVM(ctx, f)
	if err != nil {
		return nil, err
	}
	defer vm.close()
	disks, err := vm.disks(ctx)
	if err != nil {
		return nil, fmt.Errorf("the recovered %s: %w", vm, err)
	}
	mds := machineDisks(m)
	if len(disks) != len(mds) {
		return nil, errorf(http.StatusConflict, "the recovered VM %s has %d disks, machine %s %d: its disks were changed since the failover; a failback needs them as the failover made them", vm.name(), len(disks), m.Name, len(mds))
	}
	fitDisks(vm, m, disks)
	fds := make([]vmware.FailoverDisk, len(disks))
	for i, d := range disks {
		fds[i] = vmware.FailoverDisk{Name: mds[i].Name, Size: d.size, Src: notRead{}}
	}
	return fds, nil
}

// notRead is the source of a disk only checked (vmware.CheckFailover).
type notRead struct{}

func (notRead) ReadAt([]byte, int64) (int, error) {
	return 0, errors.New("a disk only checked is not read")
}

// flatReader reads a recovered VM's disk as vmware.FailoverDisk's Src
// wants it: once, in order (each read where the last ended), opened at
// the first read; a read elsewhere is an error.
type flatReader struct {
	ctx context.Context
	vm  recoveredVM
	d   recoveredDisk

	mu   sync.Mutex
	rc   io.ReadCloser
	next int64
	err  error // the first error: every read after it fails too
}

func (r *flatReader) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err != nil {
		return 0, r.err
	}
	n, err := r.read(p, off)
	r.err = err
	return n, err
}

func (r *flatReader) read(p []byte, off int64) (int, error) {
	if off != r.next || off+int64(len(p)) > r.d.size {
		return 0, fmt.Errorf("%s: a read of %d bytes at %d, not in order (next %d) or past its %d bytes", r.d.name, len(p), off, r.next, r.d.size)
	}
	if r.rc == nil {
		rc, size, err := r.vm.open(r.ctx, r.d)
		if err != nil {
			return 0, err
		}
		r.rc = rc
		if size >= 0 && size != r.d.size {
			return 0, fmt.Errorf("the content of %s is %d bytes, the disk %d", r.d.name, size, r.d.size)
		}
	}
	n, err := io.ReadFull(r.rc, p)
	r.next += int64(n)
	if err != nil {
		return n, fmt.Errorf("read %s at %d (%d of %d bytes): %w", r.d.name, off, n, len(p), err)
	}
	return n, nil
}

// Close ends the read, if begun.
func (r *flatReader) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.rc == nil {
		return nil
	}
	err := r.rc.Close()
	r.rc = nil
	return err
}

// copyToAlternate stops the failed-over machine, makes the VM (powered
// off) with a copy of each of its disks, and verifies each flat file
// read back through the datastore against its source. A failure removes
// the VM.
func (s *Server) copyToAlternate(ctx context.Context, j *job, c *govmomi.Client, m store.Machine, as *altSource, src *vmware.VM, vt api.VSphereTarget, name string) (vmware.FailoverResult, error) {
	if err := s.stopSource(ctx, j, m, as); err != nil {
		return vmware.FailoverResult{}, err
	}
	// Each disk is hashed as it is uploaded (read once, in order).
	var sums []*seqSum
	fds := s.sourceDisks(ctx, m, as, func(i int, r io.ReaderAt) io.ReaderAt {
		sums = append(sums, &seqSum{r: r, h: sha256.New()})
		return sums[i]
	})
	spec, disks := vsphereVM(src, name, vt, false, false, fds)
	res, err := s.createVSphereVM(ctx, j, c, m, vt.VCenter, spec, disks)
	for _, r := range as.readers {
		r.Close()
	}
	if err != nil {
		return res, err
	}
	if err := s.verifyAlternate(ctx, j, c, m, as, fds, sums, res); err != nil {
		dctx, dcancel := s.boundedCtx(ctx)
		derr := vmware.DeleteFailoverVM(dctx, c, res.Ref)
		dcancel()
		if derr != nil {
			err = fmt.Errorf("%w (and removing VM %s failed: %v; remove it and its folder %s by hand)", err, res.Name, derr, res.Dir)
		}
		return res, err
	}
	return res, nil
}

// verifyAlternate compares each flat file, read back through the
// datastore, with its source disk (SHA-256).
func (s *Server) verifyAlternate(ctx context.Context, j *job, c *govmomi.Client, m store.Machine, as *altSource, fds []vmware.FailoverDisk, sums []*seqSum, res vmware.FailoverResult) error {
	name := m.Name + ": verify"
	detail := "read each flat file back from the datastore, compare with the failed-over disk (SHA-256)"
	j.update(api.JobStep{Name: name, State: "running", Detail: detail, Total: res.Bytes})
	fail := func(err error) error {
		j.update(api.JobStep{Name: name, State: "failed", Detail: err.Error()})
		return err
	}
	got, err := vmware.SumFlatExtents(ctx, c, "", res, func(done, total int64) {
		j.update(api.JobStep{Name: name, State: "running", Detail: detail, Total: total, Done: done})
	})
	if err != nil {
		return fail(err)
	}
	if len(got) != len(fds) {
		return fail(fmt.Errorf("%d flat files read back for %d disks", len(got), len(fds)))
	}
	for i, d := range fds {
		want, ok := sums[i].sum(d.Size)
		if !ok { // not read once in order: read the disk again
			if want, err = s.sumSource(ctx, as, i); err != nil {
				return fail(err)
			}
		}
		if got[i].SHA256 != want || got[i].Size != d.Size {
			return fail(fmt.Errorf("disk %s: %s (sha256 %s, %d bytes) differs from the failed-over disk (sha256 %s, %d bytes)", d.Name, got[i].Path, got[i].SHA256, got[i].Size, want, d.Size))
		}
	}
	j.update(api.JobStep{Name: name, State: "done", Detail: fmt.Sprintf("%d bytes read back: equal", res.Bytes), Total: res.Bytes, Done: res.Bytes})
	return nil
}

// recordAlternate records the failback done: the shipper to the original
// disks (if reprotected) stops, the failover ends, direction failed-back
// to the new VM. It returns the record and whether the original agent
// stays frozen: a planned failover's is, and so is a reprotected one's.
func (s *Server) recordAlternate(ctx context.Context, f store.Failover, m store.Machine, vt api.VSphereTarget, res vmware.FailoverResult) (store.Failover, bool, error) {
	ctx = context.WithoutCancel(ctx)
	s.stopReverse(m.ID)
	s.rv.recMu.Lock()
	defer s.rv.recMu.Unlock()
	cur, err := s.db.LiveFailover(ctx, m.ID)
	if err != nil {
		return f, false, err
	}
	if cur.ID != f.ID {
		return f, false, fmt.Errorf("machine %s's failover changed during the failback (%s, was %s)", m.Name, cur.ID, f.ID)
	}
	req, _ := failoverRequest(cur)
	d := decodeDetail(cur)
	reprotected := d.Reverse != nil
	r := &reverseDetail{Started: s.now()}
	if reprotected {
		r.Started, r.Sent, r.VSphere = d.Reverse.Started, d.Reverse.Sent, d.Reverse.VSphere
	}
	r.State, r.Compared = dirFailedBack, res.Bytes
	r.Alternate = &altDetail{VCenter: vt.VCenter, Ref: res.Ref, Name: res.Name, Datastore: vt.Datastore}
	d.Reverse = r
	cur.Detail = encodeDetail(d)
	cur.State = store.FailoverEnded
	if err := s.db.UpdateFailover(ctx, cur); err != nil {
		return f, false, err
	}
	return cur, req.Planned || reprotected, nil
}

// undoAlternate, after a cancel at the switch or a failed record, removes
// the new VM and lets the failed-over machine run on (a failover to NBD
// shipping to the original disks again if it was reprotected and its
// shipper stopped).
func (s *Server) undoAlternate(ctx context.Context, j *job, c *govmomi.Client, as *altSource, f store.Failover, m store.Machine, res vmware.FailoverResult) {
	dctx, dcancel := s.boundedCtx(ctx)
	err := vmware.DeleteFailoverVM(dctx, c, res.Ref)
	dcancel()
	ctx = context.WithoutCancel(ctx)
	if err != nil {
		s.log.Error("failback: remove the new VM (cancelled at the switch, or not recorded)", "machine", m.Name, "vm", res.Name, "err", err)
	}
	s.undoSource(ctx, j, as)
	if as.ex == nil {
		return
	}
	if cur, err := s.db.LiveFailover(ctx, m.ID); err == nil && cur.ID == f.ID && s.reverseRunOf(m.ID) == nil {
		if d := decodeDetail(cur); d.Reverse != nil && d.Reverse.State == dirReprotected {
			if _, err := s.startReverse(cur, m, false); err != nil {
				s.log.Error("failback: resume sending changes back", "machine", m.Name, "err", err)
			}
		}
	}
}

// refuseForwardAlternate refuses the forward reprotect of a machine
// failed back to a new VM: that VM has no agent.
func refuseForwardAlternate(m store.Machine, f store.Failover) error {
	d := decodeDetail(f)
	if d.Reverse == nil || d.Reverse.Alternate == nil {
		return nil
	}
	a := d.Reverse.Alternate
	return errorf(http.StatusConflict, "machine %s was failed back to a new VM, %s/%s (alternate location), which has no asr agent: enable its replication from the inventory (asr protect --vm %s ...); the original machine's agent is not the failed-back state (asr unprotect --machine %s removes it)", m.Name, a.VCenter, a.Name, a.Name, m.Name)
}

// alternateVM is the new VM of a failover's alternate-location failback
// (VCENTER/NAME), "" if none.
func alternateVM(r *reverseDetail) string {
	if r == nil || r.Alternate == nil {
		return ""
	}
	return r.Alternate.VCenter + "/" + r.Alternate.Name
}

// seqSum hashes what is read through it while the reads come in order,
// each where the last ended (as vmware.FailoverDisk's Src is read).
type seqSum struct {
	r io.ReaderAt

	mu     sync.Mutex
	h      hash.Hash
	next   int64
	broken bool // a read out of order: the sum is not the disk's
}

func (s *seqSum) ReadAt(p []byte, off int64) (int, error) {
	n, err := s.r.ReadAt(p, off)
	s.mu.Lock()
	defer s.mu.Unlock()
	if off != s.next || err != nil {
		s.broken = true
	} else {
		s.h.Write(p[:n])
		s.next += int64(n)
	}
	return n, err
}

// sum is the SHA-256 of the first size bytes, if they were read once, in
// order, and nothing else.
func (s *seqSum) sum(size int64) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken || s.next != size {
		return "", false
	}
	return hex.EncodeToString(s.h.Sum(nil)), true
}

// readFailbackRequest reads a failback request; an empty body is the
// original location.
func readFailbackRequest(r *http.Request) (api.FailbackRequest, error) {
	var req api.FailbackRequest
	if r.ContentLength == 0 {
		return req, nil
	}
	err := readJSON(r, &req)
	return req, err
}
