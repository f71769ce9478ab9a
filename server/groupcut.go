package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

// A replication group's cut across process servers. The members served
// by the built-in process server hold through it (procserver.HoldCut);
// each member on a scale-out process server takes part through a command
// of its heartbeat replies (api.PSCommandGroupCut), whose run reports the
// member's states to this server (POST /api/v1/process-servers/cuts/{id},
// a long poll answered with the decision). This server decides for all:
//
//  1. gather: every scale-out member's process server has the command and
//     its agent is connected (PSCutReady), within cutGatherWait (the
//     command reaches it with its next heartbeat's reply: up to 5 s). No
//     write is held yet.
//  2. hold: every member, on every process server, is told to hold
//     (PSCutHold; HOLD to the built-in one's agents) and must hold within
//     the cut's wait (PSCutHeld).
//  3. cut: only once every member holds is any told to tag (PSCutCut;
//     CUT): at that instant no member can complete a write, so the points
//     are one consistent cut. Each member's tag carries the cut's id,
//     recorded on its point (replication.Point.Cut).
//
// A member that cannot take part (its process server silent or refusing
// the command, its agent not connected, not holding in time, its report
// lost) fails the whole cut: every member is released (PSCutRelease;
// RELEASE), nothing is tagged, and no group point is recorded. A failure
// after the decision to cut (a member's point not made) records no group
// point either: the members' points made stay ordinary points, their Cut
// named by no group point. Every wait is bounded: the gather, the hold
// (the agents also release on their own after 5 s), each report's long
// poll (api.MaxPSCutPoll), the points by the caller's context.

// cutGatherWait bounds the gather: three heartbeat intervals.
const cutGatherWait = 3 * psHeartbeatEvery

// cutRun is a cut in progress with members on scale-out process servers:
// their states, the phase, and a channel closed at every change.
type cutRun struct {
	id  uint64
	app bool

	mu      sync.Mutex
	parts   map[string]*cutPart // by machine id: the scale-out members
	phase   string              // cutGather, then api.PSCutHold, then api.PSCutCut or api.PSCutRelease
	reason  string              // why the cut was released
	changed chan struct{}
}

// cutGather is the phase before the hold.
const cutGather = "gather"

type cutPart struct {
	ps    string
	state string // "", api.PSCutReady, api.PSCutHeld, api.PSCutFailed
	err   string
}

func newCutRun(id uint64, app bool, remote map[string]string) *cutRun {
	c := &cutRun{id: id, app: app, parts: map[string]*cutPart{}, phase: cutGather, changed: make(chan struct{})}
	for m, ps := range remote {
		c.parts[m] = &cutPart{ps: ps}
	}
	return c
}

// signal wakes every waiter; under c.mu.
func (c *cutRun) signal() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// report notes a member's state, reported by process server ps.
func (c *cutRun) report(ps string, r api.PSCutReport) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.parts[r.MachineID]
	if p == nil {
		return errorf(http.StatusNotFound, "machine %s is not a member of cut %d on a scale-out process server", r.MachineID, c.id)
	}
	if p.ps != ps {
		return errorf(http.StatusForbidden, "machine %s takes part in cut %d through process server %s, not %s", r.MachineID, c.id, p.ps, ps)
	}
	if p.state == api.PSCutFailed {
		return nil // a failure stands
	}
	p.state, p.err = r.State, r.Error
	c.signal()
	return nil
}

// decide moves the cut to phase (api.PSCutHold, api.PSCutCut or
// api.PSCutRelease, with why); a released or cut one stays so.
func (c *cutRun) decide(phase, reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.phase == api.PSCutRelease || c.phase == api.PSCutCut || c.phase == phase {
		return
	}
	c.phase, c.reason = phase, reason
	c.signal()
}

// decision is what a member in state gets now ("" and a channel closed
// at the next change while it must wait).
func (c *cutRun) decision(state string) (api.PSCutDecision, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.phase == api.PSCutRelease || state == api.PSCutFailed:
		return api.PSCutDecision{Action: api.PSCutRelease, Reason: c.reason}, nil
	case state == api.PSCutReady && c.phase == api.PSCutHold:
		return api.PSCutDecision{Action: api.PSCutHold}, nil
	case state == api.PSCutHeld && c.phase == api.PSCutCut:
		return api.PSCutDecision{Action: api.PSCutCut}, nil
	case state == api.PSCutReady && c.phase == api.PSCutCut:
		// Cannot be: the cut is decided only once every member held.
		return api.PSCutDecision{Action: api.PSCutRelease, Reason: "the cut was decided without this member"}, nil
	}
	return api.PSCutDecision{}, c.changed
}

// all reports whether every scale-out member is in state; failed names a
// member that failed (with why).
func (c *cutRun) all(state string) (ok bool, failed string, changed <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ok = true
	for m, p := range c.parts {
		if p.state == api.PSCutFailed {
			return false, fmt.Sprintf("machine %s on process server %s: %s", m, p.ps, p.err), c.changed
		}
		ok = ok && p.state == state
	}
	return ok, "", c.changed
}

// cuts are the cuts in progress, by id.
type cuts struct {
	mu   sync.Mutex
	runs map[uint64]*cutRun
}

func (cs *cuts) add(c *cutRun) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.runs == nil {
		cs.runs = map[uint64]*cutRun{}
	}
	cs.runs[c.id] = c
}

func (cs *cuts) remove(id uint64) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	delete(cs.runs, id)
}

func (cs *cuts) get(id uint64) *cutRun {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.runs[id]
}

// memberResult is a scale-out member's command result.
type memberResult struct {
	machine string
	r       api.PSCommandResult
	err     error
}

// cutAcross makes one cut across the members served by the built-in
// process server (local) and those on scale-out ones (remote: machine id
// -> process server), each to hold within wait; it returns the cut's id
// and every member's point, or an error and no point to record.
func (s *Server) cutAcross(ctx context.Context, local []string, remote map[string]string, app bool, wait time.Duration) (uint64, map[string]replication.Point, error) {
	if len(remote) == 0 {
		return s.ps.GroupCut(ctx, local, app, wait)
	}
	id := s.ps.NewCutID()
	run := newCutRun(id, app, remote)
	s.cuts.add(run)
	defer s.cuts.remove(id)
	// Whatever ends the cut early, the members waiting for a decision
	// are released.
	defer run.decide(api.PSCutRelease, "the cut ended")
	cctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel() // withdraws the commands not answered
		wg.Wait()
	}()
	results := make(chan memberResult, len(remote))
	for m, ps := range remote {
		cmd := api.PSCommand{Kind: api.PSCommandGroupCut, MachineID: m, Cut: &api.PSCut{ID: id, App: app, HoldWait: wait}, Timeout: api.MaxPSCommandTimeout}
		if d, ok := ctx.Deadline(); ok {
			cmd.Timeout = min(time.Until(d), cmd.Timeout)
		}
		wg.Go(func() {
			r, err := s.psCommand(cctx, ps, cmd)
			results <- memberResult{machine: m, r: r, err: err}
		})
	}
	got := map[string]memberResult{}
	// failure is why a scale-out member's result, come before the cut's
	// end, fails it.
	failure := func(mr memberResult) error {
		if mr.err != nil {
			return fmt.Errorf("machine %s: %w", mr.machine, mr.err)
		}
		if mr.r.NotConnected {
			return fmt.Errorf("machine %s on process server %s: %w", mr.machine, remote[mr.machine], procserver.ErrNotConnected)
		}
		return fmt.Errorf("machine %s on process server %s: %s", mr.machine, remote[mr.machine], mr.r.Error)
	}
	// until waits for every scale-out member in state, and done (if not
	// nil) to deliver, within d.
	until := func(state string, d time.Duration, what string) error {
		t := time.NewTimer(d)
		defer t.Stop()
		for {
			ok, failed, changed := run.all(state)
			if failed != "" {
				return errors.New(failed)
			}
			if ok {
				return nil
			}
			select {
			case <-changed:
			case mr := <-results:
				got[mr.machine] = mr
				return failure(mr)
			case <-t.C:
				return fmt.Errorf("%s within %s", what, d)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	if err := until(api.PSCutReady, cutGatherWait, "not every process server took part"); err != nil {
		run.decide(api.PSCutRelease, err.Error())
		return id, nil, fmt.Errorf("group cut %d abandoned before any hold: %w", id, err)
	}
	// The hold, on every process server at once.
	type holdResult struct {
		h   *procserver.HeldCut
		err error
	}
	localHeld := make(chan holdResult, 1)
	hctx, stopHold := context.WithCancel(cctx)
	defer stopHold()
	run.decide(api.PSCutHold, "")
	wg.Go(func() {
		h, err := s.ps.HoldCut(hctx, id, local, app, wait)
		localHeld <- holdResult{h, err}
	})
	err := until(api.PSCutHeld, wait, "not every member held its writes")
	if err != nil {
		// At once: the others wait held (the built-in one's hold, if
		// still waiting, releases its members).
		run.decide(api.PSCutRelease, err.Error())
		stopHold()
	}
	lh := <-localHeld // bounded by wait
	if err == nil && lh.err != nil {
		err = lh.err
		run.decide(api.PSCutRelease, err.Error())
	}
	if err != nil {
		if lh.h != nil {
			lh.h.Release()
		}
		return id, nil, fmt.Errorf("group cut %d abandoned, every member released, nothing tagged: %w", id, err)
	}
	// Every member holds: tag.
	run.decide(api.PSCutCut, "")
	points, err := lh.h.Cut(ctx)
	if err != nil {
		return id, nil, err
	}
	for len(got) < len(remote) {
		select {
		case mr := <-results:
			got[mr.machine] = mr
		case <-ctx.Done():
			return id, nil, fmt.Errorf("waiting for the group point's members on scale-out process servers: %w", ctx.Err())
		}
	}
	for m, mr := range got {
		if mr.err != nil || mr.r.Error != "" || mr.r.Point == nil {
			if mr.err == nil && mr.r.Error == "" {
				mr.r.Error = "no point in its result"
			}
			return id, nil, failure(mr)
		}
		// 0: an agent from before cut ids on points (its tag still
		// carried the cut's id as its request id).
		if c := mr.r.Point.Cut; c != 0 && c != id {
			return id, nil, fmt.Errorf("machine %s on process server %s: its point %s records cut %d, not %d", m, remote[m], mr.r.Point.ID, mr.r.Point.Cut, id)
		}
		points[m] = *mr.r.Point
	}
	return id, points, nil
}

// handlePSCut takes a scale-out member's state in a cut and answers the
// decision that follows it (a long poll, at most api.MaxPSCutPoll).
func (s *Server) handlePSCut(w http.ResponseWriter, r *http.Request) error {
	p, err := s.psFromCert(r.Context(), r)
	if err != nil {
		return err
	}
	id, err := strconv.ParseUint(chi.URLParam(r, "cut"), 10, 64)
	if err != nil {
		return errorf(http.StatusBadRequest, "cut id %q: want a decimal number", chi.URLParam(r, "cut"))
	}
	var rep api.PSCutReport
	if err := readJSON(r, &rep); err != nil {
		return err
	}
	switch {
	case rep.State != api.PSCutReady && rep.State != api.PSCutHeld && rep.State != api.PSCutFailed:
		return errorf(http.StatusBadRequest, "cut state %q: want %s, %s or %s", rep.State, api.PSCutReady, api.PSCutHeld, api.PSCutFailed)
	case len(rep.Error) > 4096:
		return errorf(http.StatusBadRequest, "a cut failure of %d bytes, at most 4096", len(rep.Error))
	}
	run := s.cuts.get(id)
	if run == nil {
		writeJSON(w, http.StatusOK, api.PSCutDecision{Action: api.PSCutRelease, Reason: fmt.Sprintf("no cut %d in progress (it ended)", id)})
		return nil
	}
	if err := run.report(p.Name, rep); err != nil {
		return err
	}
	t := time.NewTimer(api.MaxPSCutPoll)
	defer t.Stop()
	for {
		d, changed := run.decision(rep.State)
		if d.Action != "" {
			writeJSON(w, http.StatusOK, d)
			return nil
		}
		select {
		case <-changed:
		case <-t.C:
			writeJSON(w, http.StatusOK, api.PSCutDecision{Action: api.PSCutRelease, Reason: fmt.Sprintf("no decision within %s", api.MaxPSCutPoll)})
			return nil
		case <-r.Context().Done():
			return r.Context().Err()
		case <-s.ctx.Done():
			return errors.New("server stopping")
		}
	}
}
