package agent

import (
	"fmt"

	"github.com/asrdr/asr/replication"
)

// A new log. Sequence numbers mean something only within one log, named by
// the log id in the agent's state. When the server does not know the
// agent's log id (the agent registered again, or lost its state) it never
// joins the agent's records to what it holds by number: it answers the
// Hello with a Welcome that starts a new log after the last record it holds
// durably, and resyncs the disks. The agent then drops its whole spool and
// numbers its records from there. No guest write is lost in the switch:
// writes logged before it are covered by the resync (whose start record
// comes after the switch) or by the disk's new initial copy; writes after it
// are in the new log.

// testHookNewLog, when set, runs at the switch, while every disk's change
// lock is held (tests capture the disks as the new log starts from them).
var testHookNewLog func()

// startNewLog switches to the new log a Welcome starts: the spool is
// emptied and numbered from w.DurableSeq+1; the disks in w.Copied (their
// replica is complete or being resynced) are not copied again, the others
// are copied again from the start; what referred to the dropped numbers
// (progress marks, tag marks, latency samples, an overflow, a resync in
// progress) is forgotten; the state is saved. It holds every disk's change
// lock (and the point lock), so no change is in flight meanwhile. It runs
// before the session's sender starts.
func (a *Agent) startNewLog(w replication.Welcome) error {
	a.pointMu.Lock()
	defer a.pointMu.Unlock()
	for _, d := range a.disks {
		d.mu.Lock()
	}
	defer func() {
		for i := len(a.disks) - 1; i >= 0; i-- {
			a.disks[i].mu.Unlock()
		}
	}()
	next := w.DurableSeq + 1
	droppedFrom, droppedTo := a.spool.First(), a.spool.Next()-1
	if err := a.spool.Reset(next); err != nil {
		return fmt.Errorf("start the new log at seq %d: %w", next, err)
	}
	a.progMu.Lock()
	a.prog = nil
	a.progMu.Unlock()
	a.tagMu.Lock()
	a.tagSeqs = nil
	a.tagMu.Unlock()
	a.lat.reset()
	if a.over != nil {
		a.over.reset()
	}
	copied := map[uint32]bool{}
	for _, idx := range w.Copied {
		copied[idx] = true
	}
	sizes := map[uint32]int64{}
	for _, d := range a.disks {
		cursor := int64(0)
		if copied[d.Index] {
			cursor = d.Size()
		}
		sizes[d.Index] = d.Size()
		a.cursors[d.Index].Store(cursor)
		a.done[d.Index].Store(copied[d.Index])
	}
	a.copyGen.Add(1)
	a.stMu.Lock()
	a.st.Acked = w.DurableSeq
	for i := range a.st.Disks {
		ds := &a.st.Disks[i]
		ds.Done, ds.Cursor = copied[ds.Index], 0
		if ds.Done {
			ds.Cursor = sizes[ds.Index]
		}
	}
	// A resync the server asked for belongs to the old log: the new log's
	// resync replaces it.
	a.st.Resync, a.st.Overflow = nil, false
	err := a.st.save(a.cfg.StateDir)
	a.stMu.Unlock()
	if testHookNewLog != nil {
		testHookNewLog()
	}
	select {
	case a.copyWake <- struct{}{}:
	default:
	}
	msg := fmt.Sprintf("the server started a new log for this agent at seq %d (it holds up to %d); the records the spool held (%d to %d) are dropped, and the disks are resynced or copied again",
		next, w.DurableSeq, droppedFrom, droppedTo)
	a.log.Warn(msg, "copied", w.Copied)
	a.event("new-log", msg)
	if err != nil {
		return fmt.Errorf("save the agent state for the new log: %w", err)
	}
	return nil
}
