package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/overlay"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/replication/retry"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Failback of an unplanned failover to the server's NBD exports
// (docs/ARCHITECTURE.md, "Failback"). The source was not frozen at the
// failover: its disks may hold writes made after the recovery point (the
// agent may have run on, or may come back later), so shipping the
// overlay's blocks is not enough. Reprotect (reverse) therefore, before
// the shipper sends anything:
//
//  1. freezes the original agent under the failover's id, as a planned
//     failover's Freeze does (guest writes refused from then on, across
//     restarts); it waits, cancellable, for an agent that is not
//     connected; then marks the replica for a resync, as the planned
//     reprotect does (after the freeze: a resync mark would fail the
//     freeze's final point);
//  2. compares each original disk with its export, block by block
//     (64 KiB, the reverse map's), by the resync's block sums
//     (REVERSE_SUM with a range, replication.BlockSum): the agent sums
//     its blocks, the server the export's, and marks the blocks that
//     differ in the reverse map; the blocks written to the export
//     meanwhile are marked by the tracking as usual;
//  3. then starts the shipper: failback goes on as for a planned one.
//
// Crash safety: the compare's progress (frozen, the offset compared up to
// on each disk) is in the failover's record, written after the reverse
// maps that hold the marks it found are saved; a restart resumes from
// there. A map lost in a restart makes its disk's compare start again
// (the agent is frozen: comparing again finds the same differences).

// compareDetail is the checksum compare's record (reverseDetail.Unplanned).
type compareDetail struct {
	Frozen bool             `json:"frozen,omitempty"`
	Done   bool             `json:"done,omitempty"`
	At     map[string]int64 `json:"at,omitempty"`   // compared up to, by disk
	Total  int64            `json:"total"`          // the disks' bytes
	Diff   map[string]int64 `json:"diff,omitempty"` // bytes found different, by disk
	// Thawed counts the times the original agent was found no longer
	// frozen under the failover (thawed by hand, its state lost,
	// reinstalled) and the compare begun again from the start; a planned
	// failover's record has a compare only from the first of them.
	Thawed int `json:"thawed,omitempty"`
}

// differ is the bytes the compare found different on every disk.
func (r compareDetail) differ() int64 {
	var n int64
	for _, v := range r.Diff {
		n += v
	}
	return n
}

// compareTestHooks, for tests, maps a machine's id to the hook called
// before each batch of its compare asks the agent for its sums. By
// machine, not by server: a compare resumed at a server's start runs
// before its Run, and the tests of the binary run in parallel.
var compareTestHooks sync.Map // string -> func(ctx context.Context, disk string, off int64)

// compareBatch is the blocks one REVERSE_SUM asks for (16 MiB of disk).
const compareBatch = 256

// compareSaveEvery bounds how often the compare's progress is recorded
// while it runs (and at each disk's end and at a stop).
const compareSaveEvery = time.Second

// reverseCompare is a reprotected unplanned failover's compare, run by
// its shipper's goroutine before the shipping.
type reverseCompare struct {
	machine string // name, for the texts
	total   int64
	frozen  chan struct{} // closed once the agent is frozen (the first time)
	frozen1 sync.Once
	done    chan struct{} // closed once every disk is compared

	mu      sync.Mutex
	rec     compareDetail
	waiting string // why it waits, "" while it runs
}

func (c *reverseCompare) snapshot() (compareDetail, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.rec
	r.At = make(map[string]int64, len(c.rec.At))
	for k, v := range c.rec.At {
		r.At[k] = v
	}
	r.Diff = make(map[string]int64, len(c.rec.Diff))
	for k, v := range c.rec.Diff {
		r.Diff[k] = v
	}
	return r, c.waiting
}

func (c *reverseCompare) compared() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var n int64
	for _, v := range c.rec.At {
		n += v
	}
	return n
}

// left is the bytes not compared yet (0 once done).
func (c *reverseCompare) left() int64 {
	if c == nil {
		return 0
	}
	select {
	case <-c.done:
		return 0
	default:
	}
	return max(c.total-c.compared(), 1)
}

func (c *reverseCompare) setWaiting(s string) {
	c.mu.Lock()
	c.waiting = s
	c.mu.Unlock()
}

// refuseFailback says why a failback cannot start yet: the compare of
// the original disks is not finished.
func (c *reverseCompare) refuseFailback() error {
	if c.left() == 0 {
		return nil
	}
	r, w := c.snapshot()
	why := "the checksum compare of its original disks is not finished"
	if w != "" {
		why += " (" + w + ")"
	}
	if r.Thawed > 0 {
		return errorf(http.StatusConflict, "machine %s: its original agent was found thawed: it is frozen again and %s: fail back once it is done (asr failover --list --json shows its progress)", c.machine, why)
	}
	return errorf(http.StatusConflict, "machine %s: %s: fail back once asr reprotect is done", c.machine, why)
}

// newCompare returns the compare a reprotected failover still needs
// (nil: planned, or compared already), from its record; a disk whose map
// was remade at a restart is compared again from its start.
func newCompare(f store.Failover, name string, disks []revDisk) *reverseCompare {
	d := decodeDetail(f)
	if d.Reverse == nil || d.Reverse.Unplanned == nil {
		return nil
	}
	c := &reverseCompare{machine: name, frozen: make(chan struct{}), done: make(chan struct{})}
	c.rec = *d.Reverse.Unplanned
	at, diff := map[string]int64{}, map[string]int64{}
	for _, dk := range disks {
		c.total += dk.be.ov.Size()
		at[dk.name] = min(max(c.rec.At[dk.name], 0), dk.be.ov.Size())
		diff[dk.name] = max(c.rec.Diff[dk.name], 0)
		if dk.remade {
			at[dk.name], diff[dk.name] = 0, 0
			c.rec.Done = false
		}
	}
	c.rec.At, c.rec.Diff, c.rec.Total = at, diff, c.total
	if c.rec.Frozen {
		c.frozen1.Do(func() { close(c.frozen) })
	}
	if c.rec.Done {
		return nil
	}
	return c
}

// keepSourceStep is the commit's step for a failover to NBD, whose
// source stays registered for failback.
func keepSourceStep(f store.Failover) (string, string) {
	if vmFailback(f) {
		return "keep the source registered", "the original agent stays registered: reprotect freezes it and sends back only the blocks where the recovered VM's disks differ"
	}
	if unplannedFailover(f) {
		return "keep the source registered", "the original agent stays registered (not frozen: reprotect freezes it and compares its disks before sending anything back)"
	}
	return "keep the source frozen", "the original agent stays registered: reprotect sends the changes back to it"
}

// sourceFailedOverUnplanned says whether a machine's live failover is a
// committed unplanned one to NBD: its source stays registered for
// failback but is not expected to replicate (it is usually gone), so it
// gets no RPO or heartbeat alerts until the failback ends the failover.
func (s *Server) sourceFailedOverUnplanned(ctx context.Context, machineID string) bool {
	f, err := s.db.LiveFailover(ctx, machineID)
	return err == nil && f.State == store.FailoverCommitted && (reverseCandidate(f) && unplannedFailover(f) || vmFailback(f))
}

// unplannedFailover says whether a failover was made unplanned.
func unplannedFailover(f store.Failover) bool {
	req, err := failoverRequest(f)
	return err == nil && !req.Planned
}

// runCompare freezes the original agent and compares its disks with the
// exports, marking what differs; it returns when done or when ctx ends.
func (s *Server) runCompare(ctx context.Context, run *reverseRun) {
	c := run.cmp.Load()
	log := s.log.With("machine", c.machine, "failover", run.failoverID)
	defer s.saveCompare(context.WithoutCancel(ctx), run)
	for {
		if !s.freezeOriginal(ctx, run, log) {
			return
		}
		thawed, ok := s.compareDisks(ctx, run, log)
		if !ok {
			return
		}
		if !thawed {
			break
		}
	}
	c.mu.Lock()
	c.rec.Done = true
	c.mu.Unlock()
	if err := s.saveCompare(ctx, run); err != nil {
		log.Error("failback: record the compare's end", "err", err)
	}
	close(c.done)
	r, _ := c.snapshot()
	log.Info("failback: checksum compare done", "compared", c.total, "differ", r.differ())
	run.notify("")
}

// compareDisks compares every disk from where the record says; ok is
// false when ctx ended. thawed: the agent refused a request, not frozen
// under the failover any more (thawed by hand, its state lost): the
// original may have changed since, so the record starts again (frozen
// false, nothing compared; the blocks marked stay marked) and the caller
// freezes it again.
func (s *Server) compareDisks(ctx context.Context, run *reverseRun, log *slog.Logger) (thawed, ok bool) {
	c := run.cmp.Load()
	backoff := retry.New(500*time.Millisecond, 5*time.Second)
	buf := make([]byte, overlay.BlockSize)
	lastSave := time.Now()
	for _, d := range run.disks {
		size := d.be.ov.Size()
		c.mu.Lock()
		off := c.rec.At[d.name]
		c.mu.Unlock()
		if off < size {
			log.Info("failback: checksum compare", "disk", d.name, "from", off, "size", size)
		}
		for off < size {
			if ctx.Err() != nil {
				return false, false
			}
			if h, ok := compareTestHooks.Load(run.machineID); ok {
				h.(func(ctx context.Context, disk string, off int64))(ctx, d.name, off)
			}
			sums, osize, err := s.ps.ReverseBlockSums(ctx, run.machineID, run.failoverID, d.index, off, overlay.BlockSize, compareBatch)
			if err == nil && osize != size {
				err = fmt.Errorf("the original disk %s is %d bytes, the failed-over one %d", d.name, osize, size)
			}
			if err != nil {
				if ctx.Err() != nil {
					return false, false
				}
				if errors.Is(err, procserver.ErrReverseRefused) && s.agentThawed(run) {
					c.mu.Lock()
					c.rec.Frozen = false
					c.rec.Thawed++
					for k := range c.rec.At {
						c.rec.At[k], c.rec.Diff[k] = 0, 0
					}
					c.mu.Unlock()
					if err := s.saveCompare(ctx, run); err != nil {
						log.Error("failback: record the compare's restart", "err", err)
					}
					s.noteThawed(ctx, run, "its disks were compared", err)
					return true, true
				}
				why := fmt.Sprintf("compare disk %s at %d: %v", d.name, off, err)
				if errors.Is(err, procserver.ErrNotConnected) {
					why = fmt.Sprintf("waiting for the original agent of machine %s to connect", c.machine)
				}
				log.Warn("failback: checksum compare; trying again", "disk", d.name, "err", err)
				c.setWaiting(why)
				run.notify(why)
				retry.Sleep(ctx, backoff.Next())
				continue
			}
			differ, err := compareSums(d, off, sums, buf)
			if err != nil {
				// The overlay is the server's own: logged, tried again.
				log.Error("failback: read the failed-over disk", "disk", d.name, "err", err)
				c.setWaiting(err.Error())
				run.notify(err.Error())
				retry.Sleep(ctx, backoff.Next())
				continue
			}
			backoff.Reset()
			off = min(off+int64(len(sums))*overlay.BlockSize, size)
			c.mu.Lock()
			c.rec.At[d.name] = off
			c.rec.Diff[d.name] += differ
			c.waiting = ""
			c.mu.Unlock()
			if time.Since(lastSave) > compareSaveEvery || off == size {
				if err := s.saveCompare(ctx, run); err != nil {
					log.Error("failback: record the compare's progress", "err", err)
				}
				lastSave = time.Now()
			}
			run.notify("")
		}
	}
	return false, true
}

// beginRecompare begins the compare of a reprotected failover's disks
// again from the start, after a refusal (cause) from an original agent
// found no longer frozen under the failover while its changes were sent
// or verified: the guest may have written the original disks while
// thawed. The compare's record says so (Thawed; saved after the maps,
// so a restart resumes it: newCompare), a warning event names the
// machine, and the shipper, woken, freezes the agent again and compares
// (runCompare) before it sends anything more; pending counts the bytes
// not compared meanwhile, so a failback's drain waits for it. The blocks
// marked stay marked. A compare under way already is left alone.
func (s *Server) beginRecompare(ctx context.Context, run *reverseRun, cause error) {
	run.cmpMu.Lock()
	old := run.cmp.Load()
	if old.left() > 0 {
		run.cmpMu.Unlock()
		return
	}
	thawed := 0
	if old != nil {
		r, _ := old.snapshot()
		thawed = r.Thawed
	} else if f, err := s.db.LiveFailover(ctx, run.machineID); err == nil && f.ID == run.failoverID {
		if d := decodeDetail(f); d.Reverse != nil && d.Reverse.Unplanned != nil {
			thawed = d.Reverse.Unplanned.Thawed
		}
	}
	c := &reverseCompare{machine: run.name, frozen: make(chan struct{}), done: make(chan struct{})}
	c.rec = compareDetail{At: map[string]int64{}, Diff: map[string]int64{}, Thawed: thawed + 1}
	for _, d := range run.disks {
		c.total += d.be.ov.Size()
		c.rec.At[d.name], c.rec.Diff[d.name] = 0, 0
	}
	c.rec.Total = c.total
	run.cmp.Store(c)
	run.cmpMu.Unlock()
	if err := s.saveCompare(ctx, run); err != nil {
		s.log.Error("failback: record the compare begun again", "machine", run.name, "err", err)
	}
	s.noteThawed(ctx, run, "its changes were sent back", cause)
	run.notify(fmt.Sprintf("the original agent of machine %s was found thawed: frozen again, its disks compared again from the start", run.name))
	run.wake()
}

// noteThawed raises the warning event of an original agent found thawed
// (when: what the server was doing).
func (s *Server) noteThawed(ctx context.Context, run *reverseRun, when string, cause error) {
	name := run.name
	if name == "" {
		name = run.cmp.Load().machine
	}
	s.log.Warn("failback: the original agent is not frozen any more: frozen again, compared again from the start", "machine", name, "failover", run.failoverID, "err", cause)
	s.raise(context.WithoutCancel(ctx), store.Event{MachineID: run.machineID, Severity: "warning", Kind: "failback-thawed",
		Message: fmt.Sprintf("the original agent of machine %s was found no longer frozen under failover %s while %s (thawed by hand, its state lost or reinstalled: %v): it is frozen again and its disks compared again from the start; what the original guest wrote meanwhile is replaced by the failed-over state", name, run.failoverID, when, cause)})
}

// thawedAfterRefusal says whether a refusal (err) came from an original
// agent no longer frozen under the run's failover, waiting (bounded) for
// a status report newer than the refusal: the agent reports one every
// second, and the last one may predate its thaw.
func (s *Server) thawedAfterRefusal(ctx context.Context, run *reverseRun, err error) bool {
	if !errors.Is(err, procserver.ErrReverseRefused) || ctx.Err() != nil {
		return false
	}
	at := time.Now()
	deadline := time.NewTimer(5 * time.Second)
	defer deadline.Stop()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		if st, ok := s.ps.Stats(run.machineID); !ok || !st.Connected || st.StatusAt.After(at) {
			return s.agentThawed(run)
		}
		select {
		case <-ctx.Done():
			return false
		case <-deadline.C:
			return s.agentThawed(run)
		case <-t.C:
		}
	}
}

// agentThawed says whether the agent, connected, reports that it is not
// frozen under the run's failover.
func (s *Server) agentThawed(run *reverseRun) bool {
	st, ok := s.ps.Stats(run.machineID)
	return ok && st.Connected && !st.StatusAt.IsZero() && st.LastStatus.Failover != run.failoverID
}

// compareSums compares the agent's sums of the blocks from off with the
// export's and marks those that differ; it returns their bytes.
func compareSums(d revDisk, off int64, sums []replication.Hash, buf []byte) (int64, error) {
	size := d.be.ov.Size()
	var differ int64
	for i, want := range sums {
		bo := off + int64(i)*overlay.BlockSize
		p := buf[:min(overlay.BlockSize, size-bo)]
		if err := d.be.ov.ReadAt(p, bo); err != nil {
			return 0, fmt.Errorf("read disk %s at %d: %w", d.name, bo, err)
		}
		if replication.BlockSum(p) != want {
			d.m.mark(bo, int64(len(p)))
			differ += int64(len(p))
		}
	}
	return differ, nil
}

// freezeOriginal freezes the original agent under the failover (waiting
// for it to connect) and marks the replica for a resync; false: ctx ended.
func (s *Server) freezeOriginal(ctx context.Context, run *reverseRun, log *slog.Logger) bool {
	c := run.cmp.Load()
	backoff := retry.New(time.Second, 10*time.Second)
	c.mu.Lock()
	frozen := c.rec.Frozen
	c.mu.Unlock()
	if frozen {
		return true
	}
	waitText := fmt.Sprintf("waiting for the original agent of machine %s to connect", c.machine)
	for ctx.Err() == nil {
		// Frozen already (an earlier reprotect, or a freeze whose final
		// point failed: the agent stays frozen all the same)?
		frozen := false
		if st, ok := s.ps.Stats(run.machineID); ok && st.Connected && st.LastStatus.Failover == run.failoverID {
			frozen = true
		} else if _, err := s.ps.Freeze(ctx, run.machineID, run.failoverID); err == nil {
			frozen = true
		} else if ctx.Err() != nil {
			return false
		} else if errors.Is(err, procserver.ErrNotConnected) {
			c.setWaiting(waitText)
			run.notify(waitText)
		} else {
			why := fmt.Sprintf("freeze the original agent of machine %s: %v", c.machine, err)
			log.Warn("failback: freeze the original; trying again", "err", err)
			c.setWaiting(why)
			run.notify(why)
		}
		if frozen {
			err := s.ps.WithApplier(ctx, run.machineID, func(a *replication.Applier) error {
				return a.MarkResync(ctx, -1, fmt.Sprintf("failback of failover %s writes the original disks", run.failoverID))
			})
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				return false
			}
			why := fmt.Sprintf("mark the replica of machine %s for a resync: %v", c.machine, err)
			c.setWaiting(why)
			run.notify(why)
		}
		retry.Sleep(ctx, backoff.Next())
	}
	if ctx.Err() != nil {
		return false
	}
	c.mu.Lock()
	c.rec.Frozen = true
	c.waiting = ""
	c.mu.Unlock()
	if err := s.saveCompare(ctx, run); err != nil {
		log.Warn("failback: record the freeze", "err", err)
	}
	c.frozen1.Do(func() { close(c.frozen) })
	log.Info("failback: the original agent is frozen: checksum compare")
	run.notify("")
	return true
}

// saveCompare records the compare's progress in the failover's record,
// after saving the maps that hold the blocks it marked.
func (s *Server) saveCompare(ctx context.Context, run *reverseRun) error {
	if err := run.saveMaps(); err != nil {
		return err
	}
	rec, _ := run.cmp.Load().snapshot()
	s.rv.recMu.Lock()
	defer s.rv.recMu.Unlock()
	f, err := s.db.LiveFailover(ctx, run.machineID)
	if err != nil || f.ID != run.failoverID {
		return err
	}
	d := decodeDetail(f)
	if d.Reverse == nil || d.Reverse.State != dirReprotected || d.Reverse.Unplanned == nil && rec.Thawed == 0 {
		return nil
	}
	d.Reverse.Unplanned = &rec
	f.Detail = encodeDetail(d)
	return s.db.UpdateFailover(ctx, f)
}

// reprotectUnplanned reprotects a committed unplanned failover to NBD:
// the tracking and the record first, then (in the shipper's goroutine)
// the freeze of the original and the checksum compare, then the first
// pass. The job may be cancelled while it waits for the original agent:
// nothing was written to the original disks, and the failover is as it
// was. Run again while the compare has not ended (its job was cancelled
// by a restart, say), it follows the compare under way, cancellable the
// same way.
func (s *Server) reprotectUnplanned(ctx context.Context, m store.Machine, f store.Failover) (api.Job, error) {
	var run *reverseRun
	if d := decodeDetail(f); d.Reverse != nil {
		run = s.reverseRunOf(m.ID)
		if d.Reverse.Unplanned == nil || d.Reverse.State != dirReprotected || run == nil || run.failoverID != f.ID || run.cmp.Load().left() == 0 {
			return api.Job{}, errorf(http.StatusConflict, "machine %s is %s already", m.Name, d.Reverse.State)
		}
	} else if err := s.refuseResyncRunning(ctx, m); err != nil {
		return api.Job{}, err
	}
	return s.startJob(ctx, "reprotect", m.Name, func(ctx context.Context, j *job) error {
		compared, differ, sent, err := s.reprotectUnplannedSteps(ctx, j, m, f, run)
		if err != nil {
			return err
		}
		j.setResult([]string{fmt.Sprintf("reprotected: %d bytes compared, %d differ, %d bytes sent to the original disks", compared, differ, sent)}, 0)
		return nil
	})
}

// reprotectUnplannedSteps are an unplanned failover's reprotect in job j:
// run (nil: not started yet) started, the original frozen (the job
// cancellable while it waits: a cancel takes the reprotect back), the
// disks compared, the first pass sent. It returns the bytes compared,
// found different and sent.
func (s *Server) reprotectUnplannedSteps(ctx context.Context, j *job, m store.Machine, f store.Failover, run *reverseRun) (compared, differ, sent int64, err error) {
	j.setCancellable(true)
	if run == nil {
		if run, err = s.startUnplanned(ctx, j, m, f); err != nil {
			return 0, 0, 0, err
		}
	}
	c := run.cmp.Load()
	if err := s.waitCompare(ctx, j, run, m.Name+": freeze the original",
		fmt.Sprintf("waits for the original agent of machine %s to connect and stop writing its disks", m.Name), c.frozen, false); err != nil {
		if s.ctx.Err() == nil && errors.Is(err, context.Canceled) {
			// Cancelled: back to failed over (a restart resumes instead).
			s.undoUnplanned(context.WithoutCancel(ctx), m, f.ID)
		}
		return 0, 0, 0, err
	}
	j.setCancellable(false)
	if err := s.waitCompare(ctx, j, run, m.Name+": compare",
		"block sums of the original disks against the failed-over state: only the blocks that differ are sent", c.done, true); err != nil {
		return 0, 0, 0, err
	}
	rec, _ := c.snapshot()
	if err := s.waitDrained(ctx, j, m.Name+": first pass", "send the changes to the original disks", run); err != nil {
		return 0, 0, 0, err
	}
	s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "reprotected",
		Message: fmt.Sprintf("failover %s (unplanned) reprotected: %d bytes compared, %d differed; %d bytes sent to the original disks", f.ID, c.total, rec.differ(), run.total())})
	return c.total, rec.differ(), run.total(), nil
}

// startUnplanned records an unplanned failover's reprotect and starts
// its run (tracking, then freeze and compare, then shipping).
func (s *Server) startUnplanned(ctx context.Context, j *job, m store.Machine, f store.Failover) (*reverseRun, error) {
	done := j.step(m.Name+": track changes", "the blocks written since the failover")
	// Recorded first: the run reads it, and a restart resumes it.
	s.rv.recMu.Lock()
	d := decodeDetail(f)
	d.Reverse = &reverseDetail{State: dirReprotected, Started: s.now(), Unplanned: &compareDetail{}}
	f.Detail = encodeDetail(d)
	err := s.db.UpdateFailover(ctx, f)
	s.rv.recMu.Unlock()
	if err != nil {
		done("", err)
		return nil, err
	}
	run, err := s.startReverse(f, m, true)
	if err != nil {
		done("", err)
		s.undoUnplanned(context.WithoutCancel(ctx), m, f.ID)
		return nil, err
	}
	done("tracked; the original disks are compared before anything is sent", nil)
	return run, nil
}

// waitCompare runs a job step until ch closes, with the compare's
// progress (bytes compared, when progress) and why it waits.
func (s *Server) waitCompare(ctx context.Context, j *job, run *reverseRun, name, detail string, ch <-chan struct{}, progress bool) error {
	c := run.cmp.Load()
	for {
		changed, _ := run.watch()
		rec, waiting := c.snapshot()
		st := api.JobStep{Name: name, State: "running", Detail: detail}
		if progress {
			st.Total, st.Done = c.total, c.compared()
			st.Detail = fmt.Sprintf("%s (%d bytes differ so far)", detail, rec.differ())
		}
		select {
		case <-ch:
			st.State = "done"
			if progress {
				st.Detail = fmt.Sprintf("%d bytes compared, %d differ", c.total, rec.differ())
				st.Done = c.total
			}
			j.update(st)
			return nil
		default:
		}
		if waiting != "" {
			st.Detail += " (" + waiting + ")"
		}
		j.update(st)
		select {
		case <-ch:
		case <-changed:
		case <-ctx.Done():
			j.update(api.JobStep{Name: name, State: "failed", Detail: ctx.Err().Error()})
			return ctx.Err()
		}
	}
}

// undoUnplanned takes back a reprotect that wrote nothing to the
// original disks: the tracking stops, the record says failed over again.
func (s *Server) undoUnplanned(ctx context.Context, m store.Machine, failoverID string) {
	s.stopReverse(m.ID)
	s.rv.recMu.Lock()
	defer s.rv.recMu.Unlock()
	f, err := s.db.LiveFailover(ctx, m.ID)
	if err != nil || f.ID != failoverID {
		return
	}
	d := decodeDetail(f)
	if d.Reverse == nil {
		return
	}
	d.Reverse = nil
	f.Detail = encodeDetail(d)
	if err := s.db.UpdateFailover(ctx, f); err != nil {
		s.log.Error("failback: undo a cancelled reprotect", "machine", m.Name, "err", err)
		return
	}
	s.fo.mu.Lock()
	ex := s.fo.byMachine[m.ID]
	s.fo.mu.Unlock()
	if ex != nil {
		for _, e := range ex.disks {
			os.Remove(revPath(s.cfg.DataDir, failoverID, e.disk))
		}
	}
}

// checksumView is the API's form of a compare: the live one's, else the
// record's.
func (s *Server) checksumView(f store.Failover, r *reverseDetail) *api.FailbackChecksum {
	if r.Unplanned == nil {
		return nil
	}
	rec, waiting := *r.Unplanned, ""
	if run := s.reverseRunOf(f.MachineID); run != nil && run.failoverID == f.ID {
		if c := run.cmp.Load(); c != nil {
			rec, waiting = c.snapshot()
			if c.left() == 0 {
				rec.Done = true
			}
		}
	}
	v := &api.FailbackChecksum{State: "comparing", Total: rec.Total, Differ: rec.differ(), Waiting: waiting, Thawed: rec.Thawed}
	for _, n := range rec.At {
		v.Compared += n
	}
	switch {
	case rec.Done:
		v.State = "done"
		v.Compared = max(v.Compared, rec.Total)
	case !rec.Frozen:
		v.State = "waiting-for-agent"
	}
	return v
}
