package procserver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/asrdr/asr/replication"
)

// A replication group's cut, in two steps so that one coordinator (the
// configuration server) can cut members on several process servers: every
// member holds its write completions (HoldCut), and only once all of them,
// on every process server, hold does any tag (HeldCut.Cut); otherwise all
// release (HeldCut.Release). The cut's id is the request id of every
// member's tag and is recorded on its point (replication.Point.Cut).

// ErrCutIDInUse is HoldCut's refusal of a cut id a machine already waits
// on (a point request or another cut): the coordinator tries another id.
var ErrCutIDInUse = errors.New("cut id already in use on this machine")

// NewCutID is a fresh cut id of this process server's request ids (those
// of a configuration server's cuts across process servers too).
func (s *Server) NewCutID() uint64 { return s.reqID.Add(1) }

// HeldCut is a group cut whose members (on this process server) hold
// their writes: Cut tags them, Release lets them go. One of the two must
// be called.
type HeldCut struct {
	id  uint64
	app bool
	ms  []cutMember
}

type cutMember struct {
	m     *machine
	cc    *agentConn
	point <-chan pointResult
}

// HoldCut asks the given machines' agents to hold their write completions
// for cut id (HOLD) and waits until each says it holds (HELD), at most
// holdWait. If one does not (not connected, too slow, ctx ended), every
// member is released (RELEASE) and nothing is tagged. The agents release
// on their own when no decision comes within their hold's time box
// (agent.holdTimeout, 5 s).
func (s *Server) HoldCut(ctx context.Context, id uint64, machineIDs []string, app bool, holdWait time.Duration) (*HeldCut, error) {
	h := &HeldCut{id: id, app: app}
	var helds []<-chan struct{}
	for _, mid := range machineIDs {
		s.mu.Lock()
		m, ok := s.machines[mid]
		s.mu.Unlock()
		if !ok {
			h.forget()
			return nil, fmt.Errorf("machine %s: %w", mid, ErrNotConnected)
		}
		cc := m.sess.current()
		if cc == nil {
			h.forget()
			return nil, fmt.Errorf("machine %s: %w", mid, ErrNotConnected)
		}
		held, point, ok := m.points.wantCut(id)
		if !ok {
			h.forget()
			return nil, fmt.Errorf("machine %s, cut %d: %w", mid, id, ErrCutIDInUse)
		}
		h.ms = append(h.ms, cutMember{m: m, cc: cc, point: point})
		helds = append(helds, held)
	}
	h.send(replication.FrameHold)
	timeout := time.NewTimer(holdWait)
	defer timeout.Stop()
	for i, held := range helds {
		select {
		case <-held:
		case <-timeout.C:
			h.Release()
			return nil, fmt.Errorf("machine %s did not hold its writes within %s; the group cut was abandoned", h.ms[i].m.id, holdWait)
		case <-ctx.Done():
			h.Release()
			return nil, ctx.Err()
		}
	}
	return h, nil
}

// send sends frame t of the cut to every member (a member whose
// connection is gone, or whose queue stays full for 5 s, misses it: its
// agent releases on its own).
func (h *HeldCut) send(t replication.FrameType) {
	f, _ := replication.JSONFrame(t, replication.Cut{ID: h.id, App: h.app})
	for _, mb := range h.ms {
		select {
		case mb.cc.out <- f:
		case <-mb.cc.replaced:
		case <-time.After(5 * time.Second):
		}
	}
}

func (h *HeldCut) forget() {
	for _, mb := range h.ms {
		mb.m.points.forget(h.id)
	}
}

// Release abandons the cut: every member releases its writes, nothing is
// tagged.
func (h *HeldCut) Release() {
	h.send(replication.FrameRelease)
	h.forget()
}

// Cut has every member tag (CUT) and returns each one's point once all
// are durable on the target (by machine id; those made so far with an
// error).
func (h *HeldCut) Cut(ctx context.Context) (map[string]replication.Point, error) {
	defer h.forget()
	h.send(replication.FrameCut)
	points := map[string]replication.Point{}
	for _, mb := range h.ms {
		select {
		case r := <-mb.point:
			if r.err != nil {
				return points, fmt.Errorf("machine %s: %w", mb.m.id, r.err)
			}
			points[mb.m.id] = r.p
		case <-ctx.Done():
			return points, fmt.Errorf("waiting for the group point: %w", ctx.Err())
		}
	}
	return points, nil
}

// GroupCut makes one consistent recovery point across the given machines
// (a replication group on this process server alone): HoldCut, then Cut.
// It returns the cut's id and each machine's point once all are durable
// on the target. If a member cannot hold in time, the cut is abandoned
// (every member releases) and nothing is tagged.
func (s *Server) GroupCut(ctx context.Context, machineIDs []string, app bool, holdWait time.Duration) (uint64, map[string]replication.Point, error) {
	id := s.NewCutID()
	h, err := s.HoldCut(ctx, id, machineIDs, app, holdWait)
	if err != nil {
		return id, nil, err
	}
	points, err := h.Cut(ctx)
	return id, points, err
}
