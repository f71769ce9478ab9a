package server

import (
	"context"
	"time"

	"github.com/asrdr/asr/replication/procserver"
)

// SetResyncHook sets the hook that the starts of resyncs and the passes of
// the resync loop call (see resyncHook). Call it before Run.
func SetResyncHook(s *Server, hook func(event string)) { s.resyncTestHook = hook }

// LoopTicks counts the passes of the loop that starts resyncs and
// schedules scrubs.
func LoopTicks(s *Server) int64 { return s.loopTicks.Load() }

// ProcessServerForTest is the server's process server, for tests that
// watch replication without the vault database.
func (s *Server) ProcessServerForTest() *procserver.Server { return s.ps }

// SetDiscoveryTiming shortens the vCenter discoveries' retry schedule and
// update wait. Call it before Run.
func SetDiscoveryTiming(s *Server, minBackoff, maxBackoff, maxWait time.Duration) {
	s.vc.minBackoff, s.vc.maxBackoff, s.vc.maxWait = minBackoff, maxBackoff, maxWait
}

// AlertPasses counts the passes of the alert loop (each an engine pass
// and an outbox flush).
func AlertPasses(s *Server) int64 { return s.alerts.passes.Load() }

// SetOutboxBackoff sets the backoff between the sends of a failing alert
// notice. Call it before Run.
func SetOutboxBackoff(s *Server, min, max time.Duration) {
	s.alerts.outbox.minBackoff, s.alerts.outbox.maxBackoff = min, max
}

// SetFailbackSwitchHook sets the hook a failback calls once its switch is
// recorded, before the thaw, with the server's context.
func SetFailbackSwitchHook(s *Server, hook func(ctx context.Context)) { s.rv.switchHook = hook }

// SetFailbackCompareHook sets the hook the checksum compares of a
// machine (by id) call before each batch, on every server of the test
// binary (a restarted one too); nil removes it.
func SetFailbackCompareHook(machineID string, hook func(ctx context.Context, disk string, off int64)) {
	if hook == nil {
		compareTestHooks.Delete(machineID)
		return
	}
	compareTestHooks.Store(machineID, hook)
}

// SetNonceTTL changes how long s's registration challenges live (a test
// whose flood of challenges outlasts the 5 minutes on a loaded machine).
func SetNonceTTL(s *Server, d time.Duration) {
	s.nonces.mu.Lock()
	defer s.nonces.mu.Unlock()
	s.nonces.ttl = d
}
