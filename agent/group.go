package agent

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
)

// Replication groups: the server makes one cut across all machines of a
// group. Each agent holds its write completions (it takes every disk's
// change lock, so no change can be logged or reach a disk), says so (HELD),
// and waits; when every member holds, the server says CUT and each agent
// tags its stream and releases. No write can complete on any member between
// the first hold and the last tag, so a write that depends on another
// machine's completed write is never in the cut without it.

// holdTimeout bounds how long the guest's writes stay held, from the moment
// they stop (sending HELD included) to the server's decision: a cut that
// does not come in time is abandoned and the writes go on.
const holdTimeout = 5 * time.Second

// groupCuts is the agent's part in the group cuts: the cuts being held,
// and the goroutines that hold them.
type groupCuts struct {
	log    *slog.Logger
	disks  diskSet
	points *points // its lock is held during a cut; it tags and quiesces
	events *eventQueue

	mu   sync.Mutex // guards cuts
	cuts map[uint64]chan replication.FrameType
	// holds measures how long cuts held the guest's writes.
	holds latency
	// holdTimeout is how long a cut waits for the server's decision.
	holdTimeout time.Duration

	rt *routines // the cuts being held
}

func newGroupCuts(parent context.Context, log *slog.Logger, disks diskSet, pts *points, events *eventQueue) *groupCuts {
	return &groupCuts{log: log, disks: disks, points: pts, events: events,
		cuts: map[uint64]chan replication.FrameType{}, holdTimeout: holdTimeout, rt: newRoutines(parent)}
}

// start does nothing: cuts start when the server asks (hold).
func (g *groupCuts) start() {}

// Close waits for the cuts being held (which end at once: their context is
// cancelled).
func (g *groupCuts) Close() { g.rt.Close() }

// hold starts the server's HOLD for cut c on its own goroutine: it sends
// HELD on w once the writes are held, and waits for the decision.
func (g *groupCuts) hold(c replication.Cut, w frameWriter) {
	g.rt.Go(func() { g.run(c, w) })
}

// run runs one cut on this machine. It sends HELD on w when holding.
func (g *groupCuts) run(c replication.Cut, w frameWriter) {
	g.points.Lock()
	defer g.points.Unlock()
	ctx := g.rt.ctx
	ch := make(chan replication.FrameType, 1)
	g.mu.Lock()
	g.cuts[c.ID] = ch
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		delete(g.cuts, c.ID)
		g.mu.Unlock()
	}()
	ran := false
	hold := func(app bool) error {
		ran = true
		f, err := replication.JSONFrame(replication.FrameHeld, c)
		if err != nil {
			return err
		}
		g.disks.lockAll()
		held := time.Now()
		defer func() {
			g.disks.unlockAll()
			g.holds.observe(time.Since(held))
		}()
		// The time box counts from the moment the writes stop, the sending
		// of HELD included: on a slow link HELD queues behind a DATA frame
		// (up to 4 MiB, under a one-minute write deadline), and the guest's
		// writes must not wait for it. A HELD still being sent when the box
		// closes reaches the server late; its CUT then finds no cut here.
		box := time.NewTimer(g.holdTimeout)
		defer box.Stop()
		sent := make(chan error, 1)
		if !g.rt.Go(func() { sent <- w.write(&f) }) {
			return ctx.Err()
		}
		for {
			select {
			case err := <-sent:
				if err != nil {
					return fmt.Errorf("send held: %w", err)
				}
				sent = nil
			case t := <-ch:
				if t == replication.FrameCut {
					// The cut's id on the tag, marked as a cut's:
					// every member's point records it (Point.Cut).
					_, err := g.points.tagSeq(c.ID, app, replication.FlagCut)
					return err
				}
				return fmt.Errorf("cut %d abandoned by the server", c.ID)
			case <-box.C:
				return fmt.Errorf("no cut within %s of holding the writes: released them", g.holdTimeout)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	var err error
	if c.App {
		if reason := g.points.quiesce(func() error { return hold(true) }); reason != "" {
			if !ran {
				// The freeze failed before the hold: take part with a
				// crash-consistent member point.
				g.events.add("freeze-failed", "group point: application-consistent preparation failed, this machine's part is crash-consistent: "+reason)
				err = hold(false)
			} else {
				err = fmt.Errorf("%s", reason)
			}
		}
	} else {
		err = hold(false)
	}
	if err != nil && ctx.Err() == nil {
		g.log.Warn("group cut", "cut", c.ID, "err", err)
	}
}

// decide delivers the server's CUT or RELEASE for a cut being held.
func (g *groupCuts) decide(t replication.FrameType, c replication.Cut) {
	g.mu.Lock()
	ch := g.cuts[c.ID]
	g.mu.Unlock()
	if ch != nil {
		select {
		case ch <- t:
		default:
		}
	}
}
