package agent

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// Planned failover (FREEZE, THAW; docs/PROTOCOL.md). On FREEZE the agent
// refuses every guest change on every disk from then on (EROFS, which the
// NBD server sends as EPERM; reads and flushes still work), waits for the
// changes in flight to complete (each one logged), and appends the tag
// record of the final point: every change the guest was told had
// completed is before it, and nothing can come after it. The freeze is
// saved in the state file before the first write is refused, so an agent
// restarted before the THAW stays frozen: the source must not diverge from
// the replica the machine fails over to.

// errFrozen is what a guest change gets while the machine is frozen for
// a planned failover.
var errFrozen = syscall.EROFS

// failoverPoll is how often a freeze looks whether the initial copy or an
// overflow's catch-up has ended (no point can be made before).
const failoverPoll = 100 * time.Millisecond

// failover is the agent's part of a planned failover: the frozen flag the
// disks check, the freeze's ID (saved in the state file), and the
// goroutines that make the final points.
type failover struct {
	log    *slog.Logger
	spool  *spool.Spool
	disks  diskSet
	state  *stateStore
	points *points // its lock is held while the final point is tagged
	events *eventQueue
	// ready reports whether a point can be made yet: every disk copied,
	// no overflow being caught up (the server makes no point until then).
	ready func() bool
	// scanPass, if set, reads the scan-mode disks whole before the tag:
	// the agent cannot stop their writes (the guest writes them directly).
	scanPass func() error

	// frozen is checked by every disk under its change lock (Disk.frozen).
	frozen atomic.Bool

	mu sync.Mutex // guards what follows; serializes freezes and thaws
	id string     // the failover frozen under, "" if none
	// runCtx is the context of the failover's final points; thawed
	// cancels it (nil: no point was asked for since the freeze).
	runCtx context.Context
	thawed context.CancelFunc

	rt *routines // the final points being made
}

func newFailover(parent context.Context, log *slog.Logger, sp *spool.Spool, disks diskSet, st *stateStore, pts *points, events *eventQueue) *failover {
	f := &failover{log: log, spool: sp, disks: disks, state: st, points: pts, events: events,
		ready: func() bool { return true }, rt: newRoutines(parent)}
	if id := st.failover(); id != "" {
		// Frozen before a restart: the writes stay refused until THAW.
		f.id = id
		f.frozen.Store(true)
		log.Warn("frozen for a planned failover: guest writes are refused until the server thaws the machine", "failover", id)
	}
	for _, d := range disks {
		d.frozen = &f.frozen
	}
	return f
}

// start does nothing: freezes start when the server asks.
func (f *failover) start() {}

// Close stops the final points being made (the freeze itself stays).
func (f *failover) Close() { f.rt.Close() }

// current returns the ID of the failover the agent is frozen under, or "".
func (f *failover) current() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.id
}

// freeze carries out the server's FREEZE: from its return every guest
// change is refused; the final point (request id fr.Req) is made on a
// goroutine of its own, as the receiver must not wait for the changes in
// flight or the initial copy. ctx is the session's. An error means the
// machine could not be frozen (the state file could not be written): the
// writes go on and no point is made.
func (f *failover) freeze(ctx context.Context, fr replication.Freeze) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.id != fr.ID {
		// Saved before the first refusal: a restart must find it.
		if err := f.state.setFailover(fr.ID); err != nil {
			f.events.add("failover-freeze-failed", fmt.Sprintf("planned failover %s: the freeze could not be saved, writes go on: %v", fr.ID, err))
			return fmt.Errorf("save the freeze of planned failover %s: %w", fr.ID, err)
		}
		if f.thawed != nil {
			f.thawed() // the final points of the failover this one replaces
			f.thawed = nil
		}
		f.id = fr.ID
		f.frozen.Store(true)
		f.log.Warn("frozen for a planned failover: guest writes are refused from now on", "failover", fr.ID)
		f.events.add("failover-frozen", fmt.Sprintf("planned failover %s: guest writes are refused until the machine is thawed", fr.ID))
	}
	if f.thawed == nil {
		// A THAW (or another failover) cancels the final points.
		f.runCtx, f.thawed = context.WithCancel(f.rt.ctx)
	}
	// Frozen under this ID already (a repeated FREEZE): only tag again.
	f.startPoint(ctx, f.runCtx, fr)
	return nil
}

func (f *failover) startPoint(sess, run context.Context, fr replication.Freeze) {
	f.rt.Go(func() {
		seq, err := f.finalPoint(run, fr)
		switch {
		case err != nil && run.Err() == nil && sess.Err() == nil:
			f.log.Error("final point of the planned failover", "failover", fr.ID, "err", err)
			f.events.add("failover-point-failed", fmt.Sprintf("planned failover %s: no final point: %v", fr.ID, err))
		case err == nil:
			f.log.Info("final point of the planned failover tagged", "failover", fr.ID, "tag", replication.FailoverTag(fr.ID), "seq", seq)
		}
	})
}

// finalPoint waits until a point can be made, then tags it once every
// change in flight has completed, and returns the tag record's sequence
// number. The tag is appended while every disk's change lock is held and
// the machine still frozen under fr.ID, so the point is exactly what the
// source holds from then on.
func (f *failover) finalPoint(ctx context.Context, fr replication.Freeze) (uint64, error) {
	if !f.ready() {
		t := time.NewTicker(failoverPoll)
		defer t.Stop()
		for !f.ready() {
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-t.C:
			}
		}
	}
	f.points.Lock()
	defer f.points.Unlock()
	if f.scanPass != nil && f.disks.hasScan() {
		if err := f.scanPass(); err != nil {
			return 0, err
		}
	}
	// Every change holds its disk's lock from its check of the flag to
	// its completion (logged and written): with every lock taken, none is
	// in flight, and every later one finds the machine frozen.
	f.disks.lockAll()
	defer f.disks.unlockAll()
	if f.current() != fr.ID || ctx.Err() != nil {
		return 0, fmt.Errorf("planned failover %s: thawed before its final point", fr.ID)
	}
	// Make the source's last state durable too (the guest may not have
	// flushed): after the failover it is what a failback compares with.
	if err := f.disks.syncAll(f.spool); err != nil {
		return 0, fmt.Errorf("flush the disks: %w", err)
	}
	return f.points.tagSeq(fr.Req, false, 0)
}

// thaw carries out the server's THAW: the failover is cancelled and guest
// writes are allowed again. A THAW naming another failover than the one
// the agent is frozen under changes nothing (logged). An error means the
// thaw could not be saved: the machine stays frozen.
func (f *failover) thaw(fr replication.Freeze) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.id == "" {
		return nil
	}
	if f.id != fr.ID {
		f.log.Warn("thaw of another planned failover than the one this machine is frozen under: stays frozen", "failover", f.id, "thaw", fr.ID)
		f.events.add("failover-thaw-refused", fmt.Sprintf("thaw of planned failover %s refused: the machine is frozen under %s", fr.ID, f.id))
		return nil
	}
	if err := f.state.setFailover(""); err != nil {
		return fmt.Errorf("save the thaw of planned failover %s: %w", fr.ID, err)
	}
	f.frozen.Store(false)
	if f.thawed != nil {
		f.thawed()
	}
	f.id, f.runCtx, f.thawed = "", nil, nil
	f.log.Info("thawed: the planned failover was cancelled, guest writes are allowed again", "failover", fr.ID)
	f.events.add("failover-thawed", fmt.Sprintf("planned failover %s cancelled: guest writes are allowed again", fr.ID))
	return nil
}
