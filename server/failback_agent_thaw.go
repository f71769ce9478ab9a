package server

import (
	"context"
	"errors"
	"fmt"

	"github.com/asrdr/asr/store"
)

// The original agent found thawed while the agent in the recovered VM
// streams its writes (docs/ARCHITECTURE.md, "Failback", "The agent in
// the recovered VM"): thawed by hand, its frozen state lost, or
// reinstalled, its guest may have written any block of the original
// disks. Found at the first refused write (recConn.Write) or, with
// nothing to send, by checkOriginalFrozen (the policy engine's pass):
// the stream is held again, the original frozen again, the recovered
// VM's disks compared again (recompareVM, a reprotect job), and the
// stream resumed after it, as reprotect's compare lets it flow.

// run is a's failover as a reverseRun for the original agent's checks
// (thawedAfterRefusal, noteThawed).
func (a *recAgent) run() *reverseRun {
	return &reverseRun{failoverID: a.failoverID, machineID: a.machineID, name: a.machine}
}

// holdAgainLocked holds a live stream again (under a.mu): a new epoch
// whose frames are dropped until a compare begins (Admit), the records
// up to the last acknowledged noted; the record's path becomes the flat
// files' (recordHeld), so a server restarted before the compare is done
// does not take the stream as live (failback's pass compares every
// block). False if it was held already.
func (a *recAgent) holdAgainLocked() bool {
	if !a.live {
		return false
	}
	a.live, a.liveCh = false, make(chan struct{})
	a.epoch++
	a.noted, a.cmpBegun = max(a.floor, a.acked), false
	a.needsPass = "the original agent was found thawed: it is frozen again and the recovered VM's disks compared again before the stream resumes"
	a.signal()
	a.s.wg.Add(1)
	go func() { defer a.s.wg.Done(); a.s.recordHeld(a.machineID, a.failoverID) }()
	return true
}

// recompareVM begins the compare of failover a's disks again, as a
// reprotect job, after cause (the original agent found thawed): the
// failback-thawed event, the original frozen again, one compare of the
// recovered VM's disks (compareForStream), the stream live again from
// the floor the compare sets, recorded. One at a time; none while a
// reprotect or failback job of the machine runs (a failback's pass
// compares every block; one cancelled leaves the stream held until the
// next failback's pass). A compare that fails or is cancelled leaves the
// stream held until failback's pass, and its job says so.
func (s *Server) recompareVM(a *recAgent, cause error) {
	s.rv.startMu.Lock()
	defer s.rv.startMu.Unlock()
	ctx, cancel := context.WithCancel(s.ctx)
	a.mu.Lock()
	if id := s.failbackJobRunning(a.machine); a.recmp != nil || id != "" {
		if a.recmp == nil {
			a.needsPass = fmt.Sprintf("the original agent was found thawed while job %s ran: held until failback's pass compares every block", id)
		}
		a.mu.Unlock()
		cancel()
		return
	}
	a.recmp = cancel
	a.mu.Unlock()
	end := func() {
		cancel()
		a.mu.Lock()
		a.recmp = nil
		a.mu.Unlock()
	}
	_, err := s.startJob(ctx, "reprotect", a.machine, func(jctx context.Context, j *job) error {
		defer end()
		jctx, stop := context.WithCancel(jctx)
		defer context.AfterFunc(ctx, stop)()
		defer stop()
		err := s.recompareSteps(jctx, j, a, cause)
		if err != nil {
			a.mu.Lock()
			if !a.live {
				a.needsPass = "the original agent was found thawed and the compare begun again did not finish (" + err.Error() + "): held until failback's pass compares every block"
			}
			a.mu.Unlock()
		}
		return err
	})
	if err != nil {
		s.log.Error("failback: begin the compare again", "machine", a.machine, "failover", a.failoverID, "err", err)
		end()
	}
}

// recompareSteps are recompareVM's job.
func (s *Server) recompareSteps(ctx context.Context, j *job, a *recAgent, cause error) error {
	j.setCancellable(true)
	m, err := s.db.Machine(ctx, a.machineID)
	if err != nil {
		return err
	}
	f, err := s.db.LiveFailover(ctx, m.ID)
	if err == nil && f.ID != a.failoverID {
		err = fmt.Errorf("machine %s: failover %s is not live any more", m.Name, a.failoverID)
	}
	if err != nil {
		return err
	}
	s.noteThawed(ctx, a.run(), "the agent in the recovered VM "+a.vm+" sent its writes back", cause)
	log := s.log.With("machine", m.Name, "failover", f.ID)
	if err := s.freezeForVM(ctx, j, m, f, log); err != nil {
		return err
	}
	vm, err := s.openRecoveredVM(ctx, f)
	if err != nil {
		return err
	}
	defer vm.close()
	disks, err := s.recoveredDisks(ctx, j, vm, m)
	if err != nil {
		return err
	}
	p, err := s.compareForStream(ctx, j, vm, m, f, disks, a, true)
	if err != nil {
		return err
	}
	s.rv.recMu.Lock()
	cur, err := s.db.LiveFailover(ctx, m.ID)
	if err == nil && cur.ID != f.ID {
		err = fmt.Errorf("machine %s: failover %s is not live any more", m.Name, f.ID)
	}
	if err == nil {
		cd := decodeDetail(cur)
		if cd.Reverse == nil || cd.Reverse.VSphere == nil {
			err = fmt.Errorf("machine %s: failover %s is not reprotected any more", m.Name, f.ID)
		} else {
			cd.Reverse.Sent += p.sent
			v := *cd.Reverse.VSphere
			v.Path, v.From, v.Log = pathAgent, p.from, p.log
			cd.Reverse.VSphere = &v
			cur.Detail = encodeDetail(cd)
			err = s.db.UpdateFailover(ctx, cur)
		}
	}
	s.rv.recMu.Unlock()
	if err != nil {
		return err
	}
	a.kickSave()
	j.setResult([]string{
		fmt.Sprintf("compared again after the original agent was found thawed: %d bytes compared, %d differ, %d bytes sent to the original disks", p.compared, p.differ, p.sent),
		fmt.Sprintf("path: the asr agent in VM %s ships its writes to the original disks as they happen again", a.vm),
	}, 0)
	return nil
}

// compareForStream is one checksum pass over the recovered VM's disks
// (compareVM) that lets the recovered agent's stream ra flow once done:
// a compare begun in the stream's epoch (after its Welcome, and after
// the frames it dropped); one welcomed again meanwhile dropped records
// the compare may have missed: compared again. Without ra, or (unless
// always) with no agent connected at its start, the path is the flat
// files' (failback's pass).
func (s *Server) compareForStream(ctx context.Context, j *job, vm recoveredVM, m store.Machine, f store.Failover, disks []recoveredDisk, ra *recAgent, always bool) (vmPass, error) {
	for {
		var epoch uint64
		agent := false
		if ra != nil {
			epoch, agent = ra.beginCompare()
			agent = agent || always
		}
		p, err := s.compareVM(ctx, j, m.Name+": compare and send",
			fmt.Sprintf("block sums of the original disks against those of %s: only the blocks that differ are sent", vm),
			vm, m, f, disks, false)
		if err != nil {
			return p, err
		}
		if !agent {
			p.path = pathVCenter
			return p, nil
		}
		if floor, logID, ok := ra.goLive(epoch); ok {
			p.path, p.from, p.log, p.agent = pathAgent, floor, logID, ra.uuid
			return p, nil
		}
	}
}

// checkOriginalFrozen checks, for each machine whose recovered agent's
// stream is live and writes nothing now, that the original agent's
// last status (read after the stream went live) still says it is frozen
// under the failover: a thaw is found without a write (the policy
// engine's pass calls it). One found thawed is handled as a refused
// write is.
func (s *Server) checkOriginalFrozen(ms []store.Machine) {
	for _, m := range ms {
		a := s.recAgents.liveOf(m.ID)
		if a == nil || s.failbackRunning(m.Name) {
			continue
		}
		st, ok := s.ps.Stats(m.ID)
		if !ok || !st.Connected || st.StatusAt.IsZero() || st.LastStatus.Failover == a.failoverID {
			continue
		}
		if !a.wmu.TryLock() {
			continue // a write is under way: a refusal says it
		}
		a.mu.Lock()
		held := !a.freezing && st.StatusAt.After(a.liveAt) && a.holdAgainLocked()
		a.mu.Unlock()
		a.wmu.Unlock()
		if held {
			s.recompareVM(a, fmt.Errorf("its status says it is not frozen under failover %s (%w)", a.failoverID, errThawedIdle))
		}
	}
}

// errThawedIdle marks a thaw found by checkOriginalFrozen.
var errThawedIdle = errors.New("found with nothing to send")

// failbackRunning says whether a reprotect or failback job of machine
// runs (failbackJobRunning under s.rv.startMu).
func (s *Server) failbackRunning(machine string) bool {
	s.rv.startMu.Lock()
	defer s.rv.startMu.Unlock()
	return s.failbackJobRunning(machine) != ""
}
