package agent

import (
	"fmt"
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

// holdTimeout bounds how long the guest's writes stay held: a cut that does
// not come in time is abandoned and the writes go on.
const holdTimeout = 5 * time.Second

// groupCut runs one cut on this machine. It sends HELD on s when holding.
func (a *Agent) groupCut(c replication.Cut, s *shipSession) {
	a.pointMu.Lock()
	defer a.pointMu.Unlock()
	ch := make(chan replication.FrameType, 1)
	a.cutMu.Lock()
	a.cuts[c.ID] = ch
	a.cutMu.Unlock()
	defer func() {
		a.cutMu.Lock()
		delete(a.cuts, c.ID)
		a.cutMu.Unlock()
	}()
	ran := false
	hold := func(app bool) error {
		ran = true
		for _, d := range a.disks {
			d.mu.Lock()
		}
		held := time.Now()
		defer func() {
			for i := len(a.disks) - 1; i >= 0; i-- {
				a.disks[i].mu.Unlock()
			}
			a.holds.observe(time.Since(held))
		}()
		f, err := replication.JSONFrame(replication.FrameHeld, c)
		if err != nil {
			return err
		}
		if err := s.write(&f); err != nil {
			return fmt.Errorf("send held: %w", err)
		}
		select {
		case t := <-ch:
			if t == replication.FrameCut {
				return a.tag(c.ID, app)
			}
			return fmt.Errorf("cut %d abandoned by the server", c.ID)
		case <-time.After(holdTimeout):
			return fmt.Errorf("no cut within %s: released the writes", holdTimeout)
		case <-a.ctx.Done():
			return a.ctx.Err()
		}
	}
	var err error
	if c.App {
		if reason := a.quiesce(func() error { return hold(true) }); reason != "" {
			if !ran {
				// The freeze failed before the hold: take part with a
				// crash-consistent member point.
				a.event("freeze-failed", "group point: application-consistent preparation failed, this machine's part is crash-consistent: "+reason)
				err = hold(false)
			} else {
				err = fmt.Errorf("%s", reason)
			}
		}
	} else {
		err = hold(false)
	}
	if err != nil && a.ctx.Err() == nil {
		a.log.Warn("group cut", "cut", c.ID, "err", err)
	}
}

// cutDecision delivers the server's CUT or RELEASE for a cut being held.
func (a *Agent) cutDecision(t replication.FrameType, c replication.Cut) {
	a.cutMu.Lock()
	ch := a.cuts[c.ID]
	a.cutMu.Unlock()
	if ch != nil {
		select {
		case ch <- t:
		default:
		}
	}
}
