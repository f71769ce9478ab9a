package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/overlay"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/replication/retry"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Failback of a planned failover to the server's NBD exports, back to the
// original location (docs/ARCHITECTURE.md, "Failback"; an unplanned one
// is the same once its original agent is frozen and its disks compared:
// failback_compare.go):
//
//  1. Reprotect (reverse): the replica's disks are marked for a resync
//     (the original disks are about to change outside the log), every
//     export tracks the blocks written to it (a reverseMap per disk, saved
//     with each flush), the blocks the overlay holds are marked, and a
//     shipper per failover writes the marked blocks into the original
//     disks through the original agent, frozen under the failover
//     (REVERSE frames, each acknowledged once durable there).
//  2. Failback: the failed-over machine is stopped (its exports refuse
//     writes), the marked blocks are drained, every original disk is
//     compared whole with its export (SHA-256 on both sides), then the
//     agent is thawed: the on-premises machine runs with the failed-over
//     machine's final state. Cancellable until the thaw.
//  3. Reprotect (forward): the disks marked at step 1 are resynced at once
//     (a checksum compare, not a new initial copy); protection goes on.

// Directions a machine can be in (api.Machine.Direction).
const (
	dirReprotected = "reprotected" // shipping changes back to the original
	dirFailingBack = "failing-back"
	dirFailedBack  = "failed-back" // on premises again, forward resync due
)

// reverseDetail is the failover record's failback state (in its detail).
type reverseDetail struct {
	State    string    `json:"state"` // reprotected | failing-back | failed-back
	Started  time.Time `json:"started"`
	Sent     int64     `json:"sent"`     // bytes written back to the original disks
	Compared int64     `json:"compared"` // bytes compared by failback's verification
	// Forward is "" until the forward reprotect, then "done".
	Forward  string `json:"forward,omitempty"`
	Resent   int64  `json:"resent,omitempty"`   // the forward resync's bytes sent
	Resynced int64  `json:"resynced,omitempty"` // and compared
	// Unplanned is the checksum compare of an unplanned failover's
	// reprotect (failback_compare.go); nil for a planned one.
	Unplanned *compareDetail `json:"unplanned,omitempty"`
	// Alternate is the new VM of a failback to an alternate location
	// (failback_alt.go); nil for the original location.
	Alternate *altDetail `json:"alternate,omitempty"`
	// VSphere is reprotect's pass of a failover to vSphere
	// (failback_vsphere.go); nil for a failover to NBD.
	VSphere *vmReverse `json:"vsphere,omitempty"`
	// Azure is the same for a failover to Azure (failback_azure.go).
	Azure *vmReverse `json:"azure,omitempty"`
}

// vmPass is the reverse record's pass of a failover to a VM, vSphere's or
// Azure's (nil for a failover to NBD): the recovered VM's agent keeps its
// stream's figures there for either.
func (r *reverseDetail) vmPass() *vmReverse {
	if r == nil {
		return nil
	}
	if r.Azure != nil {
		return r.Azure
	}
	return r.VSphere
}

// reverseState is the server's running reverse shipments, by machine id.
type reverseState struct {
	mu   sync.Mutex
	runs map[string]*reverseRun
	// recMu serializes the read-modify-writes of reprotected failovers'
	// records (the shipper's byte count, failback's switch).
	recMu sync.Mutex
	// switchHook, for tests, runs after a failback's switch is recorded.
	switchHook func(ctx context.Context)
	// startMu makes the check for a running reprotect or failback job
	// of a machine and the start of another one atomic: a second click
	// in the console is refused, not run twice.
	startMu sync.Mutex
	// planJobs maps a running plan reprotect or failback job's id to
	// its machines' names (under startMu).
	planJobs map[string][]string
	// planOwned, at start, holds the ids of the machines a plan's
	// failback past its switch finishes (set before restoreFailovers,
	// read-only after it).
	planOwned map[string]bool
}

// failbackJobRunning returns the id of a reprotect or failback job of
// machine that is still running ("" if none). s.rv.startMu is held.
func (s *Server) failbackJobRunning(machine string) string {
	s.jobs.mu.Lock()
	jobs := make([]*job, 0, len(s.jobs.running))
	for _, j := range s.jobs.running {
		jobs = append(jobs, j)
	}
	s.jobs.mu.Unlock()
	for _, j := range jobs {
		if v := j.snapshot(); (v.Kind == "reprotect" || v.Kind == "failback") && (v.Subject == machine || slices.Contains(s.rv.planJobs[v.ID], machine)) && v.State == api.JobRunning {
			return v.ID
		}
	}
	return ""
}

// refuseFailbackRunning is the conflict of a reprotect or failback asked
// for while one of the machine runs.
func (s *Server) refuseFailbackRunning(m store.Machine) error {
	if id := s.failbackJobRunning(m.Name); id != "" {
		return errorf(http.StatusConflict, "machine %s: a reprotect or failback job is running (job %s): wait for it to end", m.Name, id)
	}
	return nil
}

// reverseRun ships one failover's marked blocks to the original disks.
type reverseRun struct {
	failoverID string
	machineID  string
	name       string // the machine's, for the texts
	disks      []revDisk
	base       int64 // bytes sent before a restart (the record's)
	sent       atomic.Int64
	wakeCh     chan struct{}
	// cmp is the checksum compare run before shipping: an unplanned
	// failover's, or one begun again when the original agent was found
	// thawed (recompare); nil once none is needed.
	cmp   atomic.Pointer[reverseCompare]
	cmpMu sync.Mutex // serializes beginRecompare

	mu      sync.Mutex
	changed chan struct{} // closed and replaced at each acknowledged batch or error
	lastErr string

	cancel context.CancelFunc
	done   chan struct{}

	fp failbackPolicyState // failback_rpo.go
}

type revDisk struct {
	index uint32
	name  string
	be    *exportBackend
	m     *reverseMap
	// remade: its saved map was unreadable at a restart (an unplanned
	// failover's compare of this disk starts again).
	remade bool
}

func (r *reverseRun) wake() {
	select {
	case r.wakeCh <- struct{}{}:
	default:
	}
}

func (r *reverseRun) notify(errText string) {
	r.mu.Lock()
	r.lastErr = errText
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
}

func (r *reverseRun) watch() (<-chan struct{}, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changed, r.lastErr
}

// pending is the bytes not yet on the original disks; 0 for a run still
// being started (its disks are read only once it is ready).
func (r *reverseRun) pending() int64 {
	if !r.fp.ready.Load() {
		return 0
	}
	var n int64
	for _, d := range r.disks {
		n += d.m.pending()
	}
	return n + r.cmp.Load().left()
}

func (r *reverseRun) saveMaps() error {
	var first error
	for _, d := range r.disks {
		if err := d.m.save(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func revPath(dataDir, failoverID, disk string) string {
	return filepath.Join(failoverDir(dataDir, failoverID), disk+".rev")
}

// failoverRequest returns the request a failover was made by.
func failoverRequest(f store.Failover) (api.FailoverRequest, error) {
	var req api.FailoverRequest
	d := decodeDetail(f)
	if len(d.Request) == 0 {
		return req, fmt.Errorf("failover %s: no request recorded", f.ID)
	}
	err := json.Unmarshal(d.Request, &req)
	return req, err
}

// reverseCandidate is a failover failback can run for: to NBD (an
// unplanned one is compared first: failback_compare.go).
func reverseCandidate(f store.Failover) bool {
	_, err := failoverRequest(f)
	return err == nil && f.Kind == api.FailoverReal && f.Dest == api.ToNBD
}

// Reprotect reprotects a machine in the direction it needs: after a
// committed planned failover to NBD, toward the original disks (reverse);
// after a failback, forward again (a resync of the disks).
func (s *Server) Reprotect(ctx context.Context, machine string) (api.Job, error) {
	m, err := s.db.MachineByName(ctx, machine)
	if errors.Is(err, store.ErrNotFound) {
		return api.Job{}, errorf(http.StatusNotFound, "no machine named %q", machine)
	}
	if err != nil {
		return api.Job{}, err
	}
	s.rv.startMu.Lock()
	defer s.rv.startMu.Unlock()
	if err := s.refuseFailbackRunning(m); err != nil {
		return api.Job{}, err
	}
	if f, err := s.db.LiveFailover(ctx, m.ID); err == nil {
		return s.reprotectReverse(ctx, m, f)
	} else if !errors.Is(err, store.ErrNotFound) {
		return api.Job{}, err
	}
	f, ok, err := s.lastFailback(ctx, m.ID)
	if err != nil {
		return api.Job{}, err
	}
	if !ok {
		return api.Job{}, errorf(http.StatusConflict, "machine %s has nothing to reprotect: no committed failover and no failback waiting for forward protection", m.Name)
	}
	if err := refuseForwardAlternate(m, f); err != nil {
		return api.Job{}, err
	}
	return s.reprotectForward(ctx, m, f)
}

// lastFailback returns the machine's newest failover if it was failed
// back and is not protected forward yet.
func (s *Server) lastFailback(ctx context.Context, machineID string) (store.Failover, bool, error) {
	f, err := s.db.LatestFailover(ctx, machineID)
	if errors.Is(err, store.ErrNotFound) {
		return f, false, nil
	}
	if err != nil {
		return f, false, err
	}
	d := decodeDetail(f)
	return f, d.Reverse != nil && d.Reverse.State == dirFailedBack && d.Reverse.Forward == "", nil
}

func (s *Server) reprotectReverse(ctx context.Context, m store.Machine, f store.Failover) (api.Job, error) {
	if vmFailback(f) {
		return s.reprotectVM(ctx, m, f)
	}
	if err := s.refuseReprotectReverse(ctx, m, f); err != nil {
		return api.Job{}, err
	}
	if unplannedFailover(f) {
		return s.reprotectUnplanned(ctx, m, f)
	}
	return s.startJob(ctx, "reprotect", m.Name, func(ctx context.Context, j *job) error {
		sent, err := s.reprotectReverseSteps(ctx, j, m, f)
		if err != nil {
			return err
		}
		j.setResult([]string{fmt.Sprintf("reprotected: %d bytes sent to the original disks", sent)}, 0)
		return nil
	})
}

// refuseReprotectReverse says why a machine's live failover f cannot be
// reprotected toward its original disks (nil if it can).
func (s *Server) refuseReprotectReverse(ctx context.Context, m store.Machine, f store.Failover) error {
	if f.Kind == api.FailoverTest {
		return errorf(http.StatusConflict, "machine %s has a test failover (%s): a test failover is cleaned up (asr failover --cleanup), never failed back", m.Name, f.ID)
	}
	if !reverseCandidate(f) {
		return errorf(http.StatusConflict, "machine %s: failback is done for failovers to the server's NBD exports (this one is %s to %s); the others are not supported yet", m.Name, kindWord(f.Kind), f.Dest)
	}
	if f.State != store.FailoverCommitted {
		return errorf(http.StatusConflict, "machine %s's failover is %s: commit it first (asr failover --commit), then reprotect", m.Name, f.State)
	}
	if unplannedFailover(f) {
		return nil // reprotectUnplanned checks the rest
	}
	if d := decodeDetail(f); d.Reverse != nil {
		return errorf(http.StatusConflict, "machine %s is %s already", m.Name, d.Reverse.State)
	}
	return s.refuseResyncRunning(ctx, m)
}

// reprotectReverseSteps are a reverse reprotect's steps in job j: the
// replica marked for a resync, the changes tracked and a first pass sent.
// It returns the bytes sent.
func (s *Server) reprotectReverseSteps(ctx context.Context, j *job, m store.Machine, f store.Failover) (int64, error) {
	done := j.step(m.Name+": mark the replica", "the original disks change outside the log: the replica is resynced after failback")
	err := s.ps.WithApplier(ctx, m.ID, func(a *replication.Applier) error {
		return a.MarkResync(ctx, -1, fmt.Sprintf("failback of failover %s writes the original disks", f.ID))
	})
	done("marked for a resync", err)
	if err != nil {
		return 0, err
	}
	done = j.step(m.Name+": track changes", "the blocks written since the failover")
	run, err := s.startReverse(f, m, true)
	if err != nil {
		done("", err)
		return 0, err
	}
	d := decodeDetail(f)
	d.Reverse = &reverseDetail{State: dirReprotected, Started: s.now()}
	f.Detail = encodeDetail(d)
	if err = s.db.UpdateFailover(ctx, f); err != nil {
		done("", err)
		s.stopReverse(m.ID)
		return 0, err
	}
	done(fmt.Sprintf("%d bytes to send", run.pending()), nil)
	err = s.waitDrained(ctx, j, m.Name+": first pass", "send the changes to the original disks", run)
	if err != nil {
		return 0, err
	}
	s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "reprotected",
		Message: fmt.Sprintf("failover %s reprotected: changes go back to the original disks (%d bytes sent)", f.ID, run.total())})
	return run.total(), nil
}

// startReverse installs the reverse maps on a failover's exports and
// starts its shipper. fresh marks every block the overlays hold (the
// first reprotect); otherwise the saved maps are loaded (a restart), or
// the overlays' blocks marked where a map is missing or unreadable.
func (s *Server) startReverse(f store.Failover, m store.Machine, fresh bool) (run *reverseRun, err error) {
	s.fo.mu.Lock()
	ex := s.fo.byMachine[m.ID]
	s.fo.mu.Unlock()
	if ex == nil || ex.failoverID != f.ID {
		return nil, fmt.Errorf("failover %s of machine %s is not exported", f.ID, m.Name)
	}
	mc, err := s.cat.Machine(s.ctx, m.ID)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(s.ctx)
	run = &reverseRun{failoverID: f.ID, machineID: m.ID, name: m.Name, wakeCh: make(chan struct{}, 1), changed: make(chan struct{}),
		done: make(chan struct{}), cancel: cancel}
	if d := decodeDetail(f); d.Reverse != nil {
		run.base = d.Reverse.Sent
	}
	// Claimed first: one run per machine, whoever asks at the same time.
	s.rv.mu.Lock()
	if s.rv.runs == nil {
		s.rv.runs = map[string]*reverseRun{}
	}
	if s.rv.runs[m.ID] != nil {
		s.rv.mu.Unlock()
		cancel()
		return nil, errorf(http.StatusConflict, "machine %s is being reprotected already", m.Name)
	}
	s.rv.runs[m.ID] = run
	s.rv.mu.Unlock()
	defer func() {
		if err != nil { // nothing tracked: the exports as they were
			for _, e := range ex.disks {
				e.be.rev.Store(nil)
			}
			s.rv.mu.Lock()
			delete(s.rv.runs, m.ID)
			s.rv.mu.Unlock()
			cancel()
			close(run.done)
			run = nil
		}
	}()
	for _, e := range ex.disks {
		i := slices.IndexFunc(mc.Disks, func(d replication.CatalogDisk) bool { return d.Name == e.disk })
		if i < 0 {
			return run, fmt.Errorf("disk %s unknown to the catalog", e.disk)
		}
		path := revPath(s.cfg.DataDir, f.ID, e.disk)
		var rm *reverseMap
		if !fresh {
			var lerr error
			if rm, lerr = loadReverseMap(path, e.ov.Size(), run.wake); lerr != nil {
				s.log.Warn("failback map unreadable: every block the failed-over disk holds is sent again", "machine", m.Name, "disk", e.disk, "err", lerr)
				rm = nil
			}
		}
		remade := !fresh && rm == nil
		if rm == nil {
			rm = newReverseMap(path, e.ov.Size(), run.wake)
			// Tracked first, then listed: a write between the two is
			// marked by one or the other.
			e.be.rev.Store(rm)
			if err = e.ov.Blocks(func(off int64) error { rm.mark(off, 1); return nil }); err != nil {
				return run, err
			}
			rm.backdate(f.CreatedAt) // written since the failover
			if err = rm.save(); err != nil {
				return run, err
			}
		} else {
			e.be.rev.Store(rm)
		}
		rm.setClock(s.now)
		run.disks = append(run.disks, revDisk{index: mc.Disks[i].Index, name: e.disk, be: e.be, m: rm, remade: remade})
	}
	run.cmp.Store(newCompare(f, m.Name, run.disks))
	run.fp.ready.Store(true) // its disks may be read from now on (failback_rpo.go)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(run.done)
		s.shipReverse(ctx, run) // a compare due first: nothing is sent before it is done
	}()
	return run, nil
}

// stopReverse stops a machine's shipper and waits for it.
func (s *Server) stopReverse(machineID string) {
	s.rv.mu.Lock()
	run := s.rv.runs[machineID]
	delete(s.rv.runs, machineID)
	s.rv.mu.Unlock()
	if run != nil {
		run.cancel()
		<-run.done
		for _, d := range run.disks {
			d.be.rev.Store(nil)
		}
	}
}

func (s *Server) reverseRunOf(machineID string) *reverseRun {
	s.rv.mu.Lock()
	defer s.rv.mu.Unlock()
	return s.rv.runs[machineID]
}

// reverseBatch is the blocks one batch sends (one REVERSE frame each run
// of contiguous blocks, at most replication.MaxReverseData).
const reverseBatch = replication.MaxReverseData / overlay.BlockSize

// shipReverse sends the marked blocks until ctx ends: a batch of each
// disk in turn, each acknowledged durable before the next; a failure
// marks the batch again and retries with backoff.
func (s *Server) shipReverse(ctx context.Context, run *reverseRun) {
	log := s.log.With("machine", run.machineID, "failover", run.failoverID)
	backoff := retry.New(500*time.Millisecond, 5*time.Second)
	buf := make([]byte, replication.MaxReverseData)
	lastSave := time.Now()
	defer func() {
		// A stop: what was acknowledged is saved (what was in flight is
		// dirty again), and the bytes sent recorded.
		if err := run.saveMaps(); err != nil {
			log.Error("failback: save the maps", "err", err)
		}
		s.saveSent(context.WithoutCancel(ctx), run)
	}()
	for ctx.Err() == nil {
		if run.cmp.Load().left() > 0 {
			// A compare is due (an unplanned failover's, or one begun
			// again after a thaw): nothing is sent before it is done.
			s.runCompare(ctx, run)
			continue
		}
		sent := false
		var failed error
		for _, d := range run.disks {
			blocks := d.m.take(reverseBatch)
			if len(blocks) == 0 {
				continue
			}
			sent = true
			n, err := s.sendBlocks(ctx, run, d, blocks, buf)
			if err != nil {
				d.m.fail(blocks)
				failed = err
				break
			}
			d.m.done(blocks)
			run.sent.Add(n)
		}
		if failed != nil {
			if ctx.Err() != nil {
				return
			}
			if errors.Is(failed, procserver.ErrReverseRefused) && s.agentThawed(run) {
				// Thawed by hand, its state lost, reinstalled: the guest
				// may have written the original disks since. Frozen
				// again and compared again from the start (above).
				s.beginRecompare(ctx, run, failed)
				continue
			}
			log.Warn("failback: sending to the original disks failed; trying again", "err", failed)
			run.notify(failed.Error())
			retry.Sleep(ctx, backoff.Next())
			continue
		}
		if sent {
			backoff.Reset()
			if time.Since(lastSave) > time.Second {
				if err := run.saveMaps(); err != nil {
					log.Error("failback: save the maps", "err", err)
				}
				lastSave = time.Now()
			}
			run.notify("")
			continue
		}
		// Idle: everything marked is on the original disks.
		if err := run.saveMaps(); err != nil {
			log.Error("failback: save the maps", "err", err)
		}
		s.saveSent(ctx, run)
		s.reverseIdle(ctx, run) // a reverse point (failback_rpo.go)
		lastSave = time.Now()
		run.notify("")
		select {
		case <-ctx.Done():
			return
		case <-run.wakeCh:
		}
	}
}

// saveSent records the bytes sent so far in the failover's record.
func (s *Server) saveSent(ctx context.Context, run *reverseRun) {
	s.rv.recMu.Lock()
	defer s.rv.recMu.Unlock()
	f, err := s.db.LiveFailover(ctx, run.machineID)
	if err != nil || f.ID != run.failoverID {
		return
	}
	d := decodeDetail(f)
	if d.Reverse == nil || d.Reverse.State != dirReprotected || d.Reverse.Sent == run.total() {
		return
	}
	d.Reverse.Sent = run.total()
	f.Detail = encodeDetail(d)
	if err := s.db.UpdateFailover(ctx, f); err != nil {
		s.log.Error("failback: record the bytes sent", "machine", run.machineID, "err", err)
	}
}

func (r *reverseRun) total() int64 { return r.base + r.sent.Load() }

// sendBlocks sends blocks (in runs of contiguous ones) and returns the
// bytes sent.
func (s *Server) sendBlocks(ctx context.Context, run *reverseRun, d revDisk, blocks []int64, buf []byte) (int64, error) {
	slices.Sort(blocks)
	size := d.be.ov.Size()
	var total int64
	for i := 0; i < len(blocks); {
		j := i + 1
		for j < len(blocks) && blocks[j] == blocks[j-1]+1 {
			j++
		}
		off := blocks[i] * overlay.BlockSize
		end := min((blocks[j-1]+1)*overlay.BlockSize, size)
		p := buf[:end-off]
		if err := d.be.ov.ReadAt(p, off); err != nil {
			return total, fmt.Errorf("read disk %s at %d: %w", d.name, off, err)
		}
		if err := s.ps.ReverseWrite(ctx, run.machineID, run.failoverID, d.index, off, p); err != nil {
			return total, fmt.Errorf("disk %s at %d: %w", d.name, off, err)
		}
		total += int64(len(p))
		i = j
	}
	return total, nil
}

// waitDrained runs a job step until nothing is marked (every block
// written is on the original disks), with the bytes left as progress.
func (s *Server) waitDrained(ctx context.Context, j *job, name, detail string, run *reverseRun) error {
	start := run.pending()
	j.update(api.JobStep{Name: name, State: "running", Detail: detail, Total: start})
	for {
		ch, lastErr := run.watch()
		left := run.pending()
		if left == 0 {
			if err := run.saveMaps(); err != nil {
				j.update(api.JobStep{Name: name, State: "failed", Detail: err.Error()})
				return err
			}
			j.update(api.JobStep{Name: name, State: "done", Detail: fmt.Sprintf("%d bytes sent", run.total()), Total: start, Done: start})
			return nil
		}
		d := detail
		if c := run.cmp.Load(); c.left() > 0 {
			// A compare first (an unplanned failover's, or one begun
			// again: the original agent was found thawed).
			rec, waiting := c.snapshot()
			if rec.Thawed > 0 {
				d += fmt.Sprintf(" (the original agent was found thawed (%d times): frozen again, its disks compared again from the start: %d of %d bytes compared", rec.Thawed, c.compared(), c.total)
			} else {
				d += fmt.Sprintf(" (the original disks are compared first: %d of %d bytes compared", c.compared(), c.total)
			}
			if waiting != "" {
				d += "; " + waiting
			}
			d += ")"
		} else if lastErr != "" {
			d = detail + " (retrying: " + lastErr + ")"
		}
		j.update(api.JobStep{Name: name, State: "running", Detail: d, Total: max(start, left), Done: max(start-left, 0)})
		select {
		case <-ch:
		case <-ctx.Done():
			j.update(api.JobStep{Name: name, State: "failed", Detail: ctx.Err().Error()})
			return ctx.Err()
		}
	}
}

// Failback returns a reprotected machine to its original disks: the
// failed-over machine is stopped, its last changes drained and verified,
// and the original machine thawed.
func (s *Server) Failback(ctx context.Context, machine string) (api.Job, error) {
	m, err := s.db.MachineByName(ctx, machine)
	if errors.Is(err, store.ErrNotFound) {
		return api.Job{}, errorf(http.StatusNotFound, "no machine named %q", machine)
	}
	if err != nil {
		return api.Job{}, err
	}
	s.rv.startMu.Lock()
	defer s.rv.startMu.Unlock()
	if err := s.refuseFailbackRunning(m); err != nil {
		return api.Job{}, err
	}
	if f, err := s.db.LiveFailover(ctx, m.ID); err == nil && vmFailback(f) {
		return s.failbackVM(ctx, m, f)
	}
	f, run, err := s.failbackReady(ctx, m, "--machine "+m.Name)
	if err != nil {
		return api.Job{}, err
	}
	if err := s.refuseGroupAlone(ctx, m); err != nil {
		return api.Job{}, err
	}
	return s.startJob(ctx, "failback", m.Name, func(ctx context.Context, j *job) error {
		start := time.Now()
		j.setCancellable(true)
		err := s.failbackSteps(ctx, j, &f, m, run)
		if err != nil {
			for _, d := range run.disks {
				d.be.stopped.Store(false) // the failed-over machine runs on
			}
			return err
		}
		if s.rv.switchHook != nil {
			s.rv.switchHook(s.ctx)
		}
		if s.ctx.Err() != nil {
			// The server stops: past the switch, the next start thaws.
			return fmt.Errorf("the server stopped after the switch: the failback is finished at its next start")
		}
		lines, err := s.finishFailback(ctx, j, f, m)
		if err != nil {
			// Past the switch: finished in the background (or at the
			// next start), never undone.
			s.finishLater(f, m)
		}
		j.setResult(lines, time.Since(start))
		return err
	})
}

// failbackReady returns a machine's reprotected failover and its shipper,
// or why it cannot fail back (again names the flag that reprotects it).
func (s *Server) failbackReady(ctx context.Context, m store.Machine, again string) (store.Failover, *reverseRun, error) {
	f, err := s.db.LiveFailover(ctx, m.ID)
	if errors.Is(err, store.ErrNotFound) {
		return f, nil, errorf(http.StatusConflict, "machine %s has no failover to fail back", m.Name)
	} else if err != nil {
		return f, nil, err
	}
	d := decodeDetail(f)
	if d.Reverse == nil {
		return f, nil, errorf(http.StatusConflict, "machine %s is not reprotected: run asr reprotect %s first", m.Name, again)
	}
	run := s.reverseRunOf(m.ID)
	if run == nil || !run.fp.ready.Load() {
		return f, nil, errorf(http.StatusConflict, "machine %s: its changes are not being sent back (is the server starting?)", m.Name)
	}
	if d.Reverse.State != dirReprotected {
		return f, nil, errorf(http.StatusConflict, "machine %s is %s already", m.Name, d.Reverse.State)
	}
	if err := run.cmp.Load().refuseFailback(); err != nil {
		return f, nil, err
	}
	return f, run, nil
}

// failbackSteps stops the failed-over machine, drains and verifies:
// everything up to the switch, any of which a cancel undoes.
func (s *Server) failbackSteps(ctx context.Context, j *job, f *store.Failover, m store.Machine, run *reverseRun) error {
	if err := stopFailedOver(j, m, run); err != nil {
		return err
	}
	if err := s.waitDrained(ctx, j, m.Name+": drain", "send the last changes to the original disks", run); err != nil {
		return err
	}
	compared, err := s.verifyOriginal(ctx, j, *f, m, run)
	if err != nil {
		return err
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	// The switch: from here the failback goes on (also after a restart).
	j.setCancellable(false)
	sw := &switchMember{m: m, run: run, compared: compared}
	if err := s.recordSwitch(ctx, []*switchMember{sw}, nil); err != nil {
		return err
	}
	*f = sw.f
	return nil
}

// stopFailedOver stops a failed-over machine: its exports refuse writes
// and what they hold is flushed. A failback that does not reach its
// switch lets them accept writes again.
func stopFailedOver(j *job, m store.Machine, run *reverseRun) error {
	done := j.step(m.Name+": stop the failed-over machine", "its exports refuse writes from now on")
	var err error
	for _, d := range run.disks {
		d.be.stopped.Store(true)
	}
	for _, d := range run.disks {
		if e := d.be.Flush(); e != nil && err == nil {
			err = e
		}
	}
	done("writes refused; flushed", err)
	return err
}

// verifyOriginal compares every original disk of a drained machine with
// its export, whole (SHA-256 on both sides); it returns the bytes
// compared. An original agent found thawed meanwhile (a refusal) is
// frozen again, its disks compared again and the differences sent
// (beginRecompare, then the drain again), and the verify run again.
func (s *Server) verifyOriginal(ctx context.Context, j *job, f store.Failover, m store.Machine, run *reverseRun) (int64, error) {
	for {
		compared, err := s.verifyOnce(ctx, j, f, m, run)
		if err == nil || ctx.Err() != nil || !s.thawedAfterRefusal(ctx, run, err) {
			return compared, err
		}
		s.beginRecompare(ctx, run, err)
		if err := s.waitDrained(ctx, j, m.Name+": drain", "the original agent was found thawed: frozen again, its disks compared again, the differences sent", run); err != nil {
			return 0, err
		}
	}
}

// verifyOnce is one verification of verifyOriginal.
func (s *Server) verifyOnce(ctx context.Context, j *job, f store.Failover, m store.Machine, run *reverseRun) (int64, error) {
	var compared int64
	verify := m.Name + ": verify"
	total := int64(0)
	for _, d := range run.disks {
		total += d.be.ov.Size()
	}
	j.update(api.JobStep{Name: verify, State: "running", Detail: "compare the original disks with the failed-over ones (SHA-256)", Total: total})
	for _, d := range run.disks {
		want, err := overlaySum(ctx, d.be.ov)
		if err != nil {
			j.update(api.JobStep{Name: verify, State: "failed", Detail: err.Error()})
			return 0, err
		}
		got, size, err := s.ps.ReverseSum(ctx, m.ID, f.ID, d.index)
		if err == nil && (got != want || size != d.be.ov.Size()) {
			err = fmt.Errorf("disk %s: the original (sha256 %s, %d bytes) differs from the failed-over disk (sha256 %s, %d bytes)", d.name, got, size, want, d.be.ov.Size())
		}
		if err != nil {
			j.update(api.JobStep{Name: verify, State: "failed", Detail: err.Error()})
			return 0, err
		}
		compared += size
		j.update(api.JobStep{Name: verify, State: "running", Detail: "compare the original disks with the failed-over ones (SHA-256)", Total: total, Done: compared})
	}
	j.update(api.JobStep{Name: verify, State: "done", Detail: fmt.Sprintf("%d bytes compared: equal", compared), Total: total, Done: compared})
	return compared, nil
}

// switchMember is a machine a failback switches back: its failover, its
// shipper and the bytes its verification compared; recordSwitch sets f to
// its updated record.
type switchMember struct {
	m        store.Machine
	run      *reverseRun
	compared int64
	f        store.Failover

	// A failover to vSphere or Azure (failback_vsphere.go): its recovered
	// VM (opened by stopMember), whether the failback powered it off, its
	// bytes sent before (reprotect's), and the last pass (drainMember).
	toVM       bool
	vm         recoveredVM
	vmOff      bool
	sentBefore int64
	disks      []recoveredDisk
	pass       vmPass
	rec        recFreeze // the recovered VM's agent frozen before the stop (failback_agent.go)
}

// recordSwitch records the switch of stopped, drained and verified
// machines (failing-back), all in one transaction: from here their
// failback goes on, also after a restart. pf, for a plan's (or group's)
// failback, is its progress past the switch, recorded in the same
// transaction (failback_plan.go).
func (s *Server) recordSwitch(ctx context.Context, ms []*switchMember, pf *store.PlanFailback) error {
	ctx = context.WithoutCancel(ctx)
	s.rv.recMu.Lock()
	defer s.rv.recMu.Unlock()
	fs := make([]store.Failover, len(ms))
	for i, sm := range ms {
		cur, err := s.db.LiveFailover(ctx, sm.m.ID)
		if err != nil {
			return err
		}
		d := decodeDetail(cur)
		if d.Reverse == nil {
			return fmt.Errorf("machine %s: failover %s is not reprotected", sm.m.Name, cur.ID)
		}
		d.Reverse.State, d.Reverse.Sent, d.Reverse.Compared = dirFailingBack, sm.run.total(), sm.compared
		cur.Detail = encodeDetail(d)
		fs[i] = cur
	}
	var err error
	if pf != nil {
		err = s.db.SwitchFailovers(ctx, fs, *pf)
	} else {
		err = s.db.UpdateFailovers(ctx, fs)
	}
	if err != nil {
		return err
	}
	for i, sm := range ms {
		sm.f = fs[i]
	}
	return nil
}

// finishFailback thaws the original machine and ends the failover: its
// exports and overlays go. Run by the failback job after the switch, and
// at start for a failback a stop cut short after it.
func (s *Server) finishFailback(ctx context.Context, j *job, f store.Failover, m store.Machine) ([]string, error) {
	// Past the switch a cancel of the job no longer stops it, a stop of
	// the server does: the thaw may wait on an agent that does not answer,
	// and the next start finishes it (restoreReverse).
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)()
	step := func(name, detail string) func(string, error) {
		if j == nil {
			return func(string, error) {}
		}
		return j.step(name, detail)
	}
	done := step(m.Name+": power on", "thaw the original machine: its disks accept writes again")
	err := s.ps.Thaw(ctx, m.ID, f.ID)
	done("thawed", err)
	if err != nil {
		return nil, err
	}
	powerNote := s.powerOnOriginal(ctx, j, m)
	done = step(m.Name+": end the failover", "its exports and overlays go")
	s.stopReverse(m.ID)
	s.recAgents.end(m.ID)
	err = s.unexport(m.ID, f.ID, true)
	if err == nil {
		d := decodeDetail(f)
		d.Reverse.State = dirFailedBack
		f.Detail = encodeDetail(d)
		f.State = store.FailoverEnded
		err = s.db.UpdateFailover(ctx, f)
	}
	done("", err)
	if err != nil {
		return nil, err
	}
	d := decodeDetail(f)
	s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "failed-back",
		Message: fmt.Sprintf("failed back from failover %s: %d bytes sent, %d compared; run asr reprotect --machine %s to protect it again", f.ID, d.Reverse.Sent, d.Reverse.Compared, m.Name)})
	lines := []string{fmt.Sprintf("failed back: %d bytes sent, %d bytes compared", d.Reverse.Sent, d.Reverse.Compared)}
	if powerNote != "" {
		lines = append(lines, powerNote)
	}
	return lines, nil
}

// overlaySum is the SHA-256 of a failed-over disk as its export reads.
func overlaySum(ctx context.Context, ov *overlay.Overlay) (string, error) {
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < ov.Size(); off += int64(len(buf)) {
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		p := buf[:min(int64(len(buf)), ov.Size()-off)]
		if err := ov.ReadAt(p, off); err != nil {
			return "", err
		}
		h.Write(p)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// reprotectForward resyncs the disks the failback marked, at once, and
// waits until the machine is protected again.
func (s *Server) reprotectForward(ctx context.Context, m store.Machine, f store.Failover) (api.Job, error) {
	if err := refuseUnprotected(m, "a reprotect"); err != nil {
		return api.Job{}, err
	}
	return s.startJob(ctx, "reprotect", m.Name, func(ctx context.Context, j *job) error {
		compared, sent, err := s.reprotectForwardSteps(ctx, j, m, f)
		if err != nil {
			return err
		}
		j.setResult([]string{fmt.Sprintf("protected again: %d bytes compared, %d sent", compared, sent)}, 0)
		return nil
	})
}

// reprotectForwardSteps resyncs a failed-back machine's disks in job j
// and records it protected forward; it returns the bytes compared and sent.
func (s *Server) reprotectForwardSteps(ctx context.Context, j *job, m store.Machine, f store.Failover) (compared, sent int64, err error) {
	// One disk at a time: the agent runs one resync job at once.
	for _, disk := range m.Disks {
		c, sn, err := s.resyncDisk(ctx, j, m, disk)
		if err != nil {
			return 0, 0, err
		}
		compared, sent = compared+c, sent+sn
	}
	d := decodeDetail(f)
	d.Reverse.Forward, d.Reverse.Resynced, d.Reverse.Resent = "done", compared, sent
	f.Detail = encodeDetail(d)
	if err := s.db.UpdateFailover(ctx, f); err != nil {
		return 0, 0, err
	}
	s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "reprotected",
		Message: fmt.Sprintf("protected forward again after failback of failover %s", f.ID)})
	return compared, sent, nil
}

// resyncDisk resyncs one disk at once and waits until it is protected;
// it returns the bytes compared and sent (the done record's).
func (s *Server) resyncDisk(ctx context.Context, j *job, m store.Machine, disk store.Disk) (int64, int64, error) {
	name := m.Name + ": resync " + disk.Name
	detail := "compare the disk with the replica (checksums), send the differences"
	j.update(api.JobStep{Name: name, State: "running", Detail: detail})
	fail := func(err error) (int64, int64, error) {
		j.update(api.JobStep{Name: name, State: "failed", Detail: err.Error()})
		return 0, 0, err
	}
	if _, err := s.RequestResync(ctx, m, disk.Name); err != nil {
		return fail(err)
	}
	var compared, sent int64
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		mm, err := s.db.Machine(ctx, m.ID)
		if err != nil {
			return fail(err)
		}
		protected := false
		for _, d := range mm.Disks {
			if d.Index == disk.Index {
				protected = d.State == replication.StateProtected
			}
		}
		r, err := s.db.Resync(ctx, m.ID, disk.Index)
		if err == nil {
			if r.State == store.ResyncFailed {
				return fail(fmt.Errorf("resync of disk %s failed: %s", disk.Name, r.LastError))
			}
			compared, sent = max(compared, r.Compared), max(sent, r.Sent)
		} else if !errors.Is(err, store.ErrNotFound) {
			return fail(err)
		}
		if protected && errors.Is(err, store.ErrNotFound) {
			// The row goes with the done record, whose figures the
			// catalog keeps.
			if mc, err := s.cat.Machine(ctx, m.ID); err == nil {
				if cd, ok := mc.Disk(disk.Index); ok && cd.LastResyncCompared > 0 {
					compared, sent = cd.LastResyncCompared, cd.LastResyncSent
				}
			}
			j.update(api.JobStep{Name: name, State: "done", Detail: fmt.Sprintf("protected again: %d bytes compared, %d sent", compared, sent), Total: disk.Size, Done: disk.Size})
			return compared, sent, nil
		}
		j.update(api.JobStep{Name: name, State: "running", Detail: fmt.Sprintf("%s: %d bytes compared, %d sent", detail, compared, sent), Total: disk.Size, Done: compared})
		select {
		case <-ctx.Done():
			return fail(ctx.Err())
		case <-t.C:
		}
	}
}

// restoreReverse, at start, resumes the shipping of a reprotected
// failover (its exports are served again by then) and finishes a
// failback stopped after its switch.
func (s *Server) restoreReverse(ctx context.Context, f store.Failover, m store.Machine) {
	d := decodeDetail(f)
	if d.Reverse == nil {
		return
	}
	switch d.Reverse.State {
	case dirReprotected:
		if vmFailback(f) {
			return // nothing runs between reprotect and failback
		}
		if _, err := s.startReverse(f, m, false); err != nil {
			s.log.Error("failback: resume sending changes back", "machine", m.Name, "failover", f.ID, "err", err)
		}
	case dirFailingBack:
		// Past the switch: the exports stay stopped and the thaw goes on.
		s.fo.mu.Lock()
		if ex := s.fo.byMachine[m.ID]; ex != nil {
			for _, e := range ex.disks {
				e.be.stopped.Store(true)
			}
		}
		s.fo.mu.Unlock()
		if s.rv.planOwned[m.ID] {
			return // its plan's failback job goes on (resumePlanFailbacks)
		}
		s.finishLater(f, m)
	}
}

// finishLater finishes a failback past its switch in the background,
// retrying with backoff until it is done or the server stops.
func (s *Server) finishLater(f store.Failover, m store.Machine) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		b := retry.New(time.Second, 30*time.Second)
		for s.ctx.Err() == nil {
			retry.Sleep(s.ctx, b.Next())
			cur, err := s.db.LiveFailover(s.ctx, m.ID)
			if err != nil || cur.ID != f.ID {
				return // finished meanwhile
			}
			if _, err := s.finishFailback(s.ctx, nil, cur, m); err == nil {
				return
			} else {
				s.log.Warn("failback: finishing after the switch", "machine", m.Name, "failover", f.ID, "err", err)
			}
		}
	}()
}

// directionOf is a machine's direction for the API: "" (protected as
// usual), failed-over, reprotected, failing-back, failed-back.
func (s *Server) directionOf(ctx context.Context, machineID string) string {
	if f, err := s.db.LiveFailover(ctx, machineID); err == nil {
		if f.Kind != api.FailoverReal {
			return ""
		}
		if d := decodeDetail(f); d.Reverse != nil {
			return d.Reverse.State
		}
		return "failed-over"
	}
	if _, ok, _ := s.lastFailback(ctx, machineID); ok {
		return dirFailedBack
	}
	return ""
}

func (s *Server) handleReprotect(w http.ResponseWriter, r *http.Request) error {
	m, err := s.findMachine(r.Context(), r)
	if err != nil {
		return err
	}
	j, err := s.Reprotect(r.Context(), m.Name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}

func (s *Server) handleFailback(w http.ResponseWriter, r *http.Request) error {
	m, err := s.findMachine(r.Context(), r)
	if err != nil {
		return err
	}
	req, err := readFailbackRequest(r)
	if err != nil {
		return err
	}
	j, err := s.FailbackTo(r.Context(), m.Name, req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}
