package procserver

import (
	"context"
	"fmt"
	"time"

	"github.com/asrdr/asr/replication"
)

// GroupCut makes one consistent recovery point across the given machines
// (a replication group): every agent holds its write completions, then all
// tag at once and release. It returns each machine's point once all are
// durable on the target. If a member cannot hold in time, the cut is
// abandoned (every member releases) and nothing is tagged.
func (s *Server) GroupCut(ctx context.Context, machineIDs []string, app bool, holdWait time.Duration) (map[string]replication.Point, error) {
	id := s.reqID.Add(1)
	type member struct {
		m     *machine
		cc    *agentConn
		held  <-chan struct{}
		point <-chan pointResult
	}
	var ms []member
	defer func() {
		for _, mb := range ms {
			mb.m.points.forget(id)
		}
	}()
	for _, mid := range machineIDs {
		s.mu.Lock()
		m, ok := s.machines[mid]
		s.mu.Unlock()
		if !ok {
			return nil, fmt.Errorf("machine %s: %w", mid, ErrNotConnected)
		}
		cc := m.sess.current()
		if cc == nil {
			return nil, fmt.Errorf("machine %s: %w", mid, ErrNotConnected)
		}
		ms = append(ms, member{m: m, cc: cc, held: m.points.wantHeld(id), point: m.points.want(id)})
	}
	send := func(t replication.FrameType) {
		f, _ := replication.JSONFrame(t, replication.Cut{ID: id, App: app})
		for _, mb := range ms {
			select {
			case mb.cc.out <- f:
			case <-mb.cc.replaced:
			case <-time.After(5 * time.Second):
			}
		}
	}
	send(replication.FrameHold)
	timeout := time.NewTimer(holdWait)
	defer timeout.Stop()
	for _, mb := range ms {
		select {
		case <-mb.held:
		case <-timeout.C:
			send(replication.FrameRelease)
			return nil, fmt.Errorf("machine %s did not hold its writes within %s; the group cut was abandoned", mb.m.id, holdWait)
		case <-ctx.Done():
			send(replication.FrameRelease)
			return nil, ctx.Err()
		}
	}
	send(replication.FrameCut)
	points := map[string]replication.Point{}
	for _, mb := range ms {
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
