package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/asrdr/asr/replication"
)

// The agent's side of the conversation with the process server: what each
// message means for its components (Agent implements shipHandler; the
// shipper speaks the protocol).

var _ shipHandler = (*Agent)(nil)

// hello is the Hello of a new connection: the disks (with what the server
// must resync), where the spool starts and ends, and the log id.
func (a *Agent) hello() replication.Hello {
	disks := make([]replication.DiskInfo, len(a.disks))
	for i, d := range a.disks {
		disks[i] = replication.DiskInfo{Index: d.Index, Name: d.Name, Size: d.Size(), Mode: replication.DiskModeNBD}
		if d.scan != nil {
			disks[i].Mode = replication.DiskModeScan
		}
	}
	a.state.fillDiverged(disks)
	return replication.Hello{MachineID: a.state.machineID(), AgentVersion: Version, Disks: disks,
		NextSeq: a.spool.Next(), SpoolFirst: a.spool.First(), Recovering: a.recovering, LogID: a.state.logID(), BIOSUUID: a.uuid}
}

// welcome acts on the server's answer to a Hello: a new log, a server
// ahead of the spool (after a forced shutdown), the divergences it was
// told of, what it holds durably, the machine's policy.
func (a *Agent) welcome(hello replication.Hello, w replication.Welcome) error {
	if w.NewLog {
		// Another log than the server's: never joined by number (a hold
		// of the log after an unclean stop ends first: the new log's
		// switch waits for appends that may hold a disk's lock).
		a.spool.Release()
		if err := a.startNewLog(w); err != nil {
			return err
		}
	}
	if w.DurableSeq >= a.spool.Next() {
		if !a.recovering {
			return &fatalError{fmt.Sprintf("the server holds changes up to seq %d, beyond this agent's log (%d): the agent's state is older than the server's", w.DurableSeq, a.spool.Next()-1)}
		}
		// The machine went down: the server holds records the spool lost
		// with the page cache. Go on after them (the extents they touched
		// are being resynced).
		a.log.Warn("the server holds records this agent lost in the forced shutdown; continuing after them", "server_seq", w.DurableSeq, "agent_next", a.spool.Next())
		if err := a.spool.Rebase(w.DurableSeq + 1); err != nil {
			return err
		}
	}
	// The log's numbering is known now: appends held after an unclean
	// stop with the memory log go on (afterForcedShutdown).
	a.spool.Release()
	if err := a.state.clearDiverged(hello.Disks); err != nil {
		a.log.Error("save agent state", "err", err)
	}
	if w.DurableSeq > a.spool.Acked() {
		if err := a.acked(w.DurableSeq); err != nil {
			return err
		}
	}
	if w.Policy != nil {
		a.points.setPolicy(*w.Policy)
	}
	return nil
}

// acked handles an acknowledgement: trims the spool and records the
// acknowledged initial-copy progress in the state file.
func (a *Agent) acked(seq uint64) error {
	if err := a.spool.Ack(seq); err != nil {
		return err
	}
	a.lat.acked(seq)
	return a.state.acked(seq, a.copies.acked(seq))
}

func (a *Agent) tagRequest(ctx context.Context, tr replication.TagRequest) {
	a.points.request(ctx, tr.ID, tr.App)
}

func (a *Agent) freeze(ctx context.Context, fr replication.Freeze) error { return a.fo.freeze(ctx, fr) }

func (a *Agent) thaw(fr replication.Freeze) error { return a.fo.thaw(fr) }

func (a *Agent) hold(c replication.Cut, w frameWriter) { a.groups.hold(c, w) }

func (a *Agent) cutDecision(t replication.FrameType, c replication.Cut) { a.groups.decide(t, c) }

func (a *Agent) resync(job replication.ResyncJob) error { return a.resyncer.request(job) }

func (a *Agent) want(w replication.Want) { a.resyncer.want(w) }

func (a *Agent) policy(p replication.AgentPolicy) { a.points.setPolicy(p) }

// status is the report sent every second.
func (a *Agent) status() replication.Status {
	return replication.Status{Time: time.Now().UnixNano(), SpoolBytes: a.spool.Pending(),
		OldestPending: a.spool.OldestPending(), LastSeq: a.spool.Next() - 1, Disks: a.Progress(),
		Events: a.events.take(), Resync: a.resyncer.status(), Failover: a.fo.current()}
}
