package server

import (
	"context"
	"fmt"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// A failover of a machine served by a scale-out process server: the
// exports, VMs and drills read the replica in this process, so the
// machine comes back to the built-in process server first, as a step of
// the failover's job. When its process server answers, that is a switch
// (SwitchProcessServer: its cache applied to the replica, then handed
// over; nothing acknowledged is lost). When it does not (the site or host
// of the process server is down: the usual reason to fail over), a test or
// unplanned failover takes the assignment back at once, as --auto-switch
// does: its point is on the target already, and what that process server
// acknowledged and did not apply is resynced if the source comes back. A
// planned failover needs the hand-over (its last point must hold every
// write), so it is refused then.

// psAlive reports whether a scale-out process server's last heartbeat is
// recent.
func (s *Server) psAlive(name string) (bool, time.Time) {
	s.pss.mu.Lock()
	b := s.pss.last[name]
	s.pss.mu.Unlock()
	return !b.at.IsZero() && s.now().Sub(b.at) <= s.cfg.PSHeartbeatLost, b.at
}

// toBuiltin brings m back to the built-in process server (see above),
// for why ("for the failover", "to be unprotected"); a machine already
// there is left as it is. needHandOver refuses the take-back. j, if not
// nil, gets a step.
func (s *Server) toBuiltin(ctx context.Context, j *job, m store.Machine, needHandOver bool, why string) error {
	ps := s.assignedTo(m.ID)
	if ps == "" {
		return nil
	}
	done := func(string, error) {}
	if j != nil {
		done = j.step(m.Name+": to the built-in process server", "from process server "+ps+", "+why)
	}
	planned := needHandOver
	if alive, _ := s.psAlive(ps); alive || planned {
		_, err := s.SwitchProcessServer(ctx, m.Name, api.BuiltinProcessServer)
		if err != nil && planned && !alive {
			err = fmt.Errorf("%w; a planned failover needs its process server's hand-over (every acknowledged write in its last point): start process server %s again, or fail over unplanned", err, ps)
		}
		done("handed over", err)
		return err
	}
	s.pss.switchMu.Lock()
	err := s.takeBackLocked(ctx, m.ID, m.Name, ps, api.BuiltinProcessServer, "taken back "+why)
	s.pss.switchMu.Unlock()
	done("taken back: process server "+ps+" sends no heartbeat", err)
	return err
}

// takeBackLocked assigns a machine of a silent scale-out process server to
// process server to (a scale-out one's name or api.BuiltinProcessServer)
// without a hand-over (an event says how: "switched automatically",
// "taken back for a failover"). s.pss.switchMu is held.
func (s *Server) takeBackLocked(ctx context.Context, id, name, from, to, how string) error {
	newPS, dest := to, "process server "+to
	if to == api.BuiltinProcessServer {
		newPS, dest = "", "the built-in one"
	}
	if err := s.db.Assign(ctx, id, newPS); err != nil {
		return err
	}
	s.pss.mu.Lock()
	if newPS == "" {
		delete(s.pss.assigned, id)
	} else {
		s.pss.assigned[id] = newPS
	}
	last := s.pss.last[from].at
	s.pss.mu.Unlock()
	since := "none since this server started"
	if !last.IsZero() {
		since = "none since " + last.UTC().Format(time.RFC3339)
	}
	s.raise(ctx, store.Event{MachineID: id, Kind: "process-server-switch", Severity: api.SeverityWarning,
		Message: fmt.Sprintf("%s %s from process server %s (no heartbeat: %s) to %s; changes its cache acknowledged and did not apply are resynced",
			name, how, from, since, dest)})
	return nil
}
