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
	a.points.Lock()
	defer a.points.Unlock()
	a.disks.lockAll()
	defer a.disks.unlockAll()
	next := w.DurableSeq + 1
	droppedFrom, droppedTo := a.spool.First(), a.spool.Next()-1
	if err := a.spool.Reset(next); err != nil {
		return fmt.Errorf("start the new log at seq %d: %w", next, err)
	}
	a.tags.reset()
	a.lat.reset()
	a.over.reset()
	copied := map[uint32]bool{}
	for _, idx := range w.Copied {
		copied[idx] = true
	}
	sizes := map[uint32]int64{}
	for _, d := range a.disks {
		sizes[d.Index] = d.Size()
	}
	a.copies.restart(copied)
	err := a.state.startNewLog(w.DurableSeq, copied, sizes)
	if testHookNewLog != nil {
		testHookNewLog()
	}
	msg := fmt.Sprintf("the server started a new log for this agent at seq %d (it holds up to %d); the records the spool held (%d to %d) are dropped, and the disks are resynced or copied again",
		next, w.DurableSeq, droppedFrom, droppedTo)
	a.log.Warn(msg, "copied", w.Copied)
	a.events.add("new-log", msg)
	if err != nil {
		return fmt.Errorf("save the agent state for the new log: %w", err)
	}
	return nil
}
