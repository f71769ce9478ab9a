package agent

import (
	"context"
	"fmt"
	"sort"
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
	if a.divergeFirst {
		// After a forced shutdown the server may hold records the spool
		// lost, under the numbers of the records logged since: appends
		// wait until the Welcome says (handshakeEnded at the latest), and
		// the ranges of every spooled change are resynced.
		a.spool.Hold()
		a.helloHold = true
		if err := a.divergeSpooled(); err != nil {
			a.log.Error("read the spool after a forced shutdown: every disk is resynced", "err", err)
			a.state.update(func(st *state) {
				for i := range st.Disks {
					st.Disks[i].Diverged, st.Disks[i].DivergedRanges = "forced shutdown of the machine (the spool could not be read: the whole disk is at risk)", nil
				}
			})
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
		// The records in the spool are numbered as records the server
		// holds: the Rebase drops them. Their ranges were marked for a
		// resync in the Hello (hello, divergeSpooled), and the spool has
		// taken no append since.
		if err := a.spool.Rebase(w.DurableSeq + 1); err != nil {
			return err
		}
	}
	a.divergeFirst = false
	// The log's numbering is known now: appends held after an unclean
	// stop with the memory log go on (afterForcedShutdown).
	a.spool.Release()
	a.helloHold = false
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

// divergeSpooled marks, durably, the 4 MiB extents of every change this
// run logged (the repair's re-logged ones among them) for a resync: after a forced shutdown the server may hold
// other records under their numbers (the spool lost its tail with the
// page cache), and the guest's writes logged since this start, before the
// server's Welcome, would be dropped with them by the Rebase. The caller
// holds the spool (no append until the Welcome).
func (a *Agent) divergeSpooled() error {
	// The records of the run before the crash that the spool kept are
	// the server's too, under the same numbers: only this run's count.
	first, next := max(a.spool.First(), a.runFirst), a.spool.Next()
	if first >= next {
		return nil
	}
	rd, err := a.spool.NewReader(first)
	if err != nil {
		return err
	}
	defer rd.Close()
	extents := map[alKey]bool{}
	var buf []byte
	for seq := first; seq < next; {
		b, at, n, err := rd.Next(a.ctx, buf[:0], 4<<20, 0)
		if err != nil {
			return err
		}
		if n == 0 {
			break // records appended and not completed: the Rebase refuses
		}
		recs, err := replication.DecodeRecords(b, at, n)
		if err != nil {
			return fmt.Errorf("spool records from %d: %w", at, err)
		}
		for _, r := range recs {
			if r.Length == 0 || r.Kind == replication.KindTag || r.Kind == replication.KindProgress {
				continue
			}
			for e := r.Offset / alExtent; e <= (r.End()-1)/alExtent; e++ {
				extents[alKey{r.Disk, e}] = true
			}
		}
		seq, buf = at+uint64(n), b
	}
	if len(extents) == 0 {
		return nil
	}
	perDisk := map[uint32][]replication.Range{}
	for k := range extents {
		perDisk[k.disk] = append(perDisk[k.disk], replication.Range{Off: int64(k.extent) * alExtent, Len: alExtent})
	}
	return a.state.update(func(st *state) {
		for i := range st.Disks {
			ds := &st.Disks[i]
			rs := perDisk[ds.Index]
			if len(rs) == 0 || ds.Diverged != "" && len(ds.DivergedRanges) == 0 {
				continue // nothing here, or the whole disk is marked already
			}
			rs = append(rs, ds.DivergedRanges...)
			sort.Slice(rs, func(i, j int) bool { return rs[i].Off < rs[j].Off })
			ds.DivergedRanges = coalesce(rs, replication.MaxDivergedRanges)
			ds.Diverged = fmt.Sprintf("forced shutdown of the machine: %d extents of 4 MiB with changes in the spool", len(perDisk[ds.Index]))
		}
	})
}

// handshakeEnded ends the hold of the spool a Hello took (hello), if the
// session ended before its Welcome did.
func (a *Agent) handshakeEnded() {
	if a.helloHold {
		a.helloHold = false
		a.spool.Release()
	}
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
