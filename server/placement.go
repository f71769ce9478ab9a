package server

import (
	"context"
	"fmt"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Automatic placement (asr server --placement auto): a machine that
// registers for the first time is assigned, before its agent asks where
// to connect, to the least loaded healthy process server (leastLoaded:
// the lowest upload rate to the target, then the fewest machines; the
// built-in one included), as ASR lets the operator pick a process server
// when replication is enabled and balances by churn. A machine registered
// again keeps its assignment; later moves are asr ps switch's.

// Placements (Config.Placement).
const (
	PlacementBuiltin = "builtin"
	PlacementAuto    = "auto"
)

// checkPlacement refuses an unknown Config.Placement.
func checkPlacement(p string) error {
	switch p {
	case "", PlacementBuiltin, PlacementAuto:
		return nil
	}
	return fmt.Errorf("placement %q: want %s or %s", p, PlacementBuiltin, PlacementAuto)
}

// placeNew assigns a newly registered machine under automatic placement.
// A failure leaves it on the built-in process server (logged): the agent
// is served either way.
func (s *Server) placeNew(ctx context.Context, m store.Machine) {
	if s.cfg.Placement != PlacementAuto {
		return
	}
	name, err := s.leastLoaded(ctx)
	if err != nil {
		s.log.Warn("automatic placement: no healthy process server; the machine stays on the built-in one", "machine", m.Name, "err", err)
		return
	}
	if name == api.BuiltinProcessServer {
		return
	}
	s.pss.switchMu.Lock()
	defer s.pss.switchMu.Unlock()
	if err := s.db.Assign(ctx, m.ID, name); err != nil {
		s.log.Error("automatic placement: the assignment could not be written; the machine stays on the built-in one", "machine", m.Name, "to", name, "err", err)
		return
	}
	s.pss.mu.Lock()
	s.pss.assigned[m.ID] = name
	s.pss.mu.Unlock()
	s.raise(ctx, store.Event{MachineID: m.ID, Kind: "process-server-placement", Severity: api.SeverityInfo,
		Message: fmt.Sprintf("%s placed on process server %s (the least loaded)", m.Name, name)})
}
