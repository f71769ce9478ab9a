package procserver

import (
	"context"
	"fmt"
	"time"

	"github.com/asrdr/asr/replication"
)

// Planned failover (docs/PROTOCOL.md, FREEZE and THAW): the agent refuses
// every guest write from the FREEZE on and tags a final point that holds
// every write the guest was told had completed; the process server applies
// it like any tag and answers the caller once the point is in the catalog.

// Freeze freezes machineID's source for planned failover id (a name that
// follows replication.ValidFreezeID): from the agent's receipt of FREEZE
// no guest write completes, and the point returned, once it is applied
// and recorded in the catalog, holds every write acknowledged to the guest
// before. The machine stays frozen (also across agent restarts) until
// Thaw. Freeze is idempotent: called again with the same id it makes
// another point, equal to the first. A connection that ends before the
// point comes is followed by FREEZE again on the agent's next connection,
// until ctx ends. ErrNotConnected: the agent is not connected (within
// connectGrace); an error from the applier (no point: the initial copy or
// a resync is not complete) leaves the machine frozen.
func (s *Server) Freeze(ctx context.Context, machineID, id string) (replication.Point, error) {
	if !replication.ValidFreezeID(id) {
		return replication.Point{}, fmt.Errorf("planned failover id %q: want %s", id, replication.MachineNameRule)
	}
	m, err := s.knownMachine(machineID)
	if err != nil {
		return replication.Point{}, err
	}
	return m.freeze(ctx, id, s.reqID.Add(1))
}

// Thaw cancels planned failover id of machineID: the agent allows guest
// writes again. It returns once a status report the agent sent after the
// THAW says it is not frozen under id; an error if it is frozen under
// another failover (whose THAW must name it). ErrNotConnected: the agent
// is not connected, or its connection ended before it answered (it may
// or may not have thawed: call Thaw again).
func (s *Server) Thaw(ctx context.Context, machineID, id string) error {
	if !replication.ValidFreezeID(id) {
		return fmt.Errorf("planned failover id %q: want %s", id, replication.MachineNameRule)
	}
	m, err := s.knownMachine(machineID)
	if err != nil {
		return err
	}
	return m.thaw(ctx, id)
}

// knownMachine returns an open machine, ErrNotConnected if it never
// connected since the server started, ErrRemoved if its protection ended.
func (s *Server) knownMachine(machineID string) (*machine, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.removedErr(machineID); err != nil {
		return nil, err
	}
	m, ok := s.machines[machineID]
	if !ok {
		return nil, fmt.Errorf("machine %s has never connected: %w", machineID, ErrNotConnected)
	}
	return m, nil
}

func (m *machine) freeze(ctx context.Context, id string, req uint64) (replication.Point, error) {
	f, err := replication.JSONFrame(replication.FrameFreeze, replication.Freeze{ID: id, Req: req})
	if err != nil {
		return replication.Point{}, err
	}
	ch := m.points.want(req)
	defer m.points.forget(req)
	var prev *agentConn
	for {
		cc := m.sess.waitNewConn(ctx, connectGrace, prev)
		if cc == nil {
			if ctx.Err() != nil {
				return replication.Point{}, fmt.Errorf("planned failover %s: %w", id, ctx.Err())
			}
			return replication.Point{}, fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
		}
		prev = cc
		select {
		case cc.out <- f:
		case <-cc.done:
			continue // ask the next connection
		case r := <-ch: // the tag of an earlier FREEZE was applied
			return r.p, r.err
		case <-ctx.Done():
			return replication.Point{}, fmt.Errorf("planned failover %s: %w", id, ctx.Err())
		}
		m.log.Info("planned failover: freeze sent", "failover", id, "req", req)
		select {
		case r := <-ch:
			if r.err != nil {
				return r.p, fmt.Errorf("planned failover %s: %w", id, r.err)
			}
			m.log.Info("planned failover: final point", "failover", id, "point", r.p.ID, "tag", replication.FailoverTag(id))
			return r.p, nil
		case <-cc.done:
			// The agent may have tagged already (its tag record then
			// makes the point when it arrives); a new FREEZE with the same
			// request id makes another one, equal, whichever comes first.
		case <-ctx.Done():
			return replication.Point{}, fmt.Errorf("waiting for the final point of planned failover %s: %w", id, ctx.Err())
		}
	}
}

func (m *machine) thaw(ctx context.Context, id string) error {
	f, err := replication.JSONFrame(replication.FrameThaw, replication.Freeze{ID: id})
	if err != nil {
		return err
	}
	cc := m.sess.waitConn(ctx, connectGrace)
	if cc == nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	}
	sent := time.Now()
	select {
	case cc.out <- f:
	case <-cc.done:
		return fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	case <-ctx.Done():
		return ctx.Err()
	}
	for {
		st, at, changed := m.sess.lastStatus()
		if at.After(sent) && st.Failover != id {
			if st.Failover != "" {
				return fmt.Errorf("machine %s is frozen under planned failover %s, not %s", m.id, st.Failover, id)
			}
			m.log.Info("planned failover: thawed", "failover", id)
			return nil
		}
		select {
		case <-changed:
		case <-cc.done:
			return fmt.Errorf("machine %s: the connection ended before the agent reported the thaw: %w", m.id, ErrNotConnected)
		case <-ctx.Done():
			return fmt.Errorf("waiting for the thaw of planned failover %s: %w", id, ctx.Err())
		}
	}
}
