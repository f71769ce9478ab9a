package procserver

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/replication"
)

// connectGrace is how long a point request waits for a disconnected agent.
const connectGrace = 20 * time.Second

// newLogWait bounds how long an agent's new log waits for the old one to be
// applied before the agent is told to try again (within the 30 s the
// server gives a Hello's answer). Server.newLogWait holds it (tests shorten
// it).
const newLogWait = 15 * time.Second

// tryAgainError is a refusal that goes away by itself: the agent is told
// to try again soon, not that an operator must act.
type tryAgainError struct{ err error }

func (e *tryAgainError) Error() string { return e.err.Error() }
func (e *tryAgainError) Unwrap() error { return e.err }

// logJoin is how an agent's log joins what the server holds.
type logJoin int

const (
	joinGoesOn logJoin = iota // the same log: the agent sends from durable + 1
	joinGap                   // the same log after a sequence gap: it goes on from the agent's first record
	joinNewLog                // another log: it starts after durable, never joined by number
)

// joinLog decides how an agent's log (its Hello) joins what the server
// holds: the catalog entry cat and the cache's durable seq (everything
// appended, synced). docs/PROTOCOL.md, Session, says why each case is so.
func joinLog(h *replication.Hello, cat *replication.MachineCatalog, durable uint64) (logJoin, error) {
	if durable > 0 { // with nothing held, any log starts here
		switch {
		case h.LogID == "" && cat.LogEnded != "":
			return 0, fmt.Errorf("the machine's log ended (%s) and this agent (version %s) cannot start a new one: upgrade the agent", cat.LogEnded, h.AgentVersion)
		case h.LogID == "":
			// An agent from before log ids: the numbers are all there is.
		case cat.LogEnded != "", cat.LogID != "" && cat.LogID != h.LogID:
			return joinNewLog, nil
		case cat.LogStart > 0 && h.SpoolFirst < cat.LogStart:
			// This log started at LogStart but the agent's spool is still
			// numbered as before: it never applied the Welcome that
			// started it (the connection broke first). Start it again.
			return joinNewLog, nil
		}
	}
	// The agent holds [SpoolFirst, NextSeq); the server holds up to durable.
	if h.SpoolFirst > durable+1 {
		// Changes the server acknowledged are gone from its cache (lost or
		// damaged): accepted, and the applier meets the gap and marks the
		// disks for resync.
		return joinGap, nil
	}
	if h.NextSeq <= durable && h.NextSeq > 0 && !h.Recovering {
		return 0, fmt.Errorf("the server holds changes up to seq %d but the agent's log ends at %d: the agent lost its state; re-register it (a resync follows)", durable, h.NextSeq-1)
	}
	return joinGoesOn, nil
}

// session is a machine's agent connection: attaching a new one (and
// deciding how its log joins what the server holds), detaching it,
// acknowledging, and the agent's last status. mu guards the connection;
// attachMu serializes attaching, disconnecting and the end of a log, each
// of which decides from the catalog's log.
type session struct {
	id         string
	log        *slog.Logger
	cache      *cache
	rep        *replica
	policyFor  func(machineID string) *replication.AgentPolicy
	newLogWait *atomic.Int64

	attachMu sync.Mutex
	retired  string // under attachMu: why no connection is attached any more (retire)
	// retiredErr is what an attach is refused with once retired.
	retiredErr error

	mu       sync.Mutex
	conn     *agentConn // the connection; acknowledged only once ready
	ready    bool       // conn's Welcome is decided: acknowledgements may go to it
	ackSent  uint64
	ackAt    time.Time
	status   replication.Status
	statusAt time.Time
	statusCh chan struct{} // closed and replaced at each status report
	attached chan struct{} // closed and replaced when a connection becomes ready
}

func newSession(id string, log *slog.Logger, c *cache, rep *replica, newLogWait *atomic.Int64) *session {
	return &session{id: id, log: log, cache: c, rep: rep, newLogWait: newLogWait, attached: make(chan struct{}),
		statusCh: make(chan struct{})}
}

// attach makes cc the machine's connection (ending an older one) and
// decides how the agent's log joins what the server holds; a new log is
// recorded in the catalog before the Welcome names it.
func (s *session) attach(ctx context.Context, cc *agentConn, h *replication.Hello) (replication.Welcome, error) {
	if h.LogID != "" && !validID(h.LogID) {
		return replication.Welcome{}, fmt.Errorf("log id %.80q: want up to 64 hex digits", h.LogID)
	}
	s.attachMu.Lock()
	defer s.attachMu.Unlock()
	if s.retired != "" {
		return replication.Welcome{}, s.retiredErr
	}
	var cat replication.MachineCatalog
	err := s.rep.with(func(a *replication.Applier) error {
		err := a.EnsureDisks(ctx, h.Disks)
		cat = a.Machine()
		return err
	})
	if err != nil {
		return replication.Welcome{}, err
	}
	cc.disks = map[uint32]int64{}
	for _, d := range cat.Disks {
		cc.disks[d.Index] = d.Size
	}
	s.replaceWith(cc)
	w, err := s.join(cc, h, &cat)
	// cc's reader has not started and the old connection can append nothing
	// more: the durable sequence number stays w.DurableSeq meanwhile.
	if err == nil && w.NewLog {
		// The old log is applied to its end first (its tags make their
		// points), so that the disks are marked, and the resyncs due
		// follow the new log, before the agent can be asked for anything.
		if werr := s.rep.waitApplied(ctx, s.cache, w.DurableSeq, time.Duration(s.newLogWait.Load())); werr != nil {
			err = &tryAgainError{fmt.Errorf("this agent's log is a new one, which starts once the server has applied the old one: %v", werr)}
		}
	}
	if err == nil {
		err = s.rep.with(func(a *replication.Applier) error {
			var err error
			switch {
			case w.NewLog:
				why := cat.LogEnded
				if why == "" {
					why = "re-registered, or its state was lost"
				}
				start := w.DurableSeq + 1
				reason := fmt.Sprintf("the agent started a new log at seq %d (%s)", start, why)
				s.log.Warn("the agent's log is a new one: it starts after the server's durable seq, and the disks will be resynced",
					"log_id", h.LogID, "previous_log_id", cat.LogID, "seq", start, "agent_spool_first", h.SpoolFirst, "agent_next_seq", h.NextSeq)
				w.Copied, err = a.StartLog(ctx, h.LogID, start, reason)
			case h.LogID != "" && (cat.LogID != h.LogID || cat.LogEnded != ""):
				err = a.AdoptLog(ctx, h.LogID)
			}
			return err
		})
	}
	if err != nil {
		s.drop(cc)
		return replication.Welcome{}, err
	}
	if s.policyFor != nil {
		w.Policy = s.policyFor(s.id)
	}
	s.mu.Lock()
	if s.conn == cc {
		s.ready, s.ackSent, s.ackAt = true, w.DurableSeq, time.Now()
		close(s.attached)
		s.attached = make(chan struct{})
	}
	s.mu.Unlock()
	return w, nil
}

// join takes the cache over for cc and decides how the agent's log joins
// what the server holds: it goes on (the same log id, or an agent that has
// none; after a sequence gap, from the agent's first record), or it is a
// new log. cat is the catalog entry.
func (s *session) join(cc *agentConn, h *replication.Hello, cat *replication.MachineCatalog) (replication.Welcome, error) {
	// From here the old connection (if any) can append nothing more, and
	// all it appended is durable, so the Welcome names everything held.
	epoch, durable, err := s.cache.takeOver()
	if err != nil {
		return replication.Welcome{}, err
	}
	cc.epoch = epoch
	how, err := joinLog(h, cat, durable)
	switch {
	case err != nil:
		return replication.Welcome{}, err
	case how == joinNewLog:
		// Never joined by sequence number: the new log starts after what
		// the server holds, all of which stays and is applied (it was
		// acknowledged to the old agent).
		return replication.Welcome{DurableSeq: durable, NewLog: true}, nil
	case how == joinGap:
		s.log.Warn("sequence gap: changes lost between the server and the agent; the disks will be resynced",
			"lost_from", durable+1, "lost_to", h.SpoolFirst-1)
		if err := s.cache.skipTo(epoch, h.SpoolFirst-1); err != nil {
			return replication.Welcome{}, err
		}
		durable = h.SpoolFirst - 1
	}
	return replication.Welcome{DurableSeq: durable}, nil
}

// replaceWith makes cc the connection; the old one (if any) is ended.
func (s *session) replaceWith(cc *agentConn) {
	s.mu.Lock()
	old := s.conn
	s.conn, s.ready = cc, false
	s.mu.Unlock()
	if old != nil {
		old.log.Info("replaced by a new connection")
		s.end(old)
	}
}

// drop ends cc, which never became the machine's connection (its attach
// failed).
func (s *session) drop(cc *agentConn) {
	s.mu.Lock()
	if s.conn == cc {
		s.conn, s.ready = nil, false
	}
	s.mu.Unlock()
	s.cache.fence(cc.epoch)
}

// end ends a connection: it can append nothing more, and its reader stops
// at once.
func (s *session) end(cc *agentConn) {
	s.cache.fence(cc.epoch)
	cc.replace()
}

// detach is the end of cc's reader.
func (s *session) detach(cc *agentConn) {
	s.mu.Lock()
	if s.conn == cc {
		s.conn, s.ready = nil, false
	}
	s.mu.Unlock()
	s.end(cc)
	close(cc.stopped)
}

// disconnect ends the machine's agent connection, if any, and waits until
// its reader stopped: from then on nothing it sends is used.
func (s *session) disconnect(ctx context.Context, reason string) error {
	s.attachMu.Lock() // a connection being attached is either not there yet or detached in the end
	s.mu.Lock()
	cc := s.conn
	s.conn, s.ready = nil, false
	s.mu.Unlock()
	s.attachMu.Unlock()
	if cc == nil {
		return nil
	}
	cc.log.Warn("agent connection closed", "reason", reason)
	s.end(cc)
	select {
	case <-cc.stopped:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the agent connection of machine %s to stop: %w", s.id, ctx.Err())
	}
}

// retire ends the session for good (the machine's protection ended): the
// connection is closed as by disconnect, and no connection is attached
// any more.
func (s *session) retire(ctx context.Context, reason string, refusal error) error {
	s.attachMu.Lock()
	s.retired, s.retiredErr = reason, refusal
	s.attachMu.Unlock()
	return s.disconnect(ctx, reason)
}

// kick ends the connection after the cache failed to sync or seal: the
// agent sends again from the last acknowledgement (or, with the cache
// broken, is refused until a restart).
func (s *session) kick() {
	s.mu.Lock()
	cc := s.conn
	s.mu.Unlock()
	if cc != nil {
		s.end(cc)
	}
}

// ack acknowledges seq to the connection, if it changed, and at least
// every few seconds while idle so the agent knows the link is alive. An
// older seq than the connection's Welcome named is never sent.
func (s *session) ack(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil || !s.ready {
		return
	}
	seq = max(seq, s.ackSent)
	if seq != s.ackSent || time.Since(s.ackAt) > 5*time.Second {
		s.conn.ack(seq)
		s.ackSent, s.ackAt = seq, time.Now()
	}
}

// current returns the connection once its Welcome is decided, or nil.
func (s *session) current() *agentConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.ready {
		return nil
	}
	return s.conn
}

// waitConn returns the connection, giving an agent that is reconnecting
// (after a restart of either side) up to grace to come back.
func (s *session) waitConn(ctx context.Context, grace time.Duration) *agentConn {
	return s.waitNewConn(ctx, grace, nil)
}

// waitNewConn is waitConn for a connection other than prev (one that
// ended, whose reader may not have detached yet).
func (s *session) waitNewConn(ctx context.Context, grace time.Duration, prev *agentConn) *agentConn {
	t := time.NewTimer(grace)
	defer t.Stop()
	for {
		s.mu.Lock()
		cc, ready, attached := s.conn, s.ready, s.attached
		s.mu.Unlock()
		if ready && cc != prev {
			return cc
		}
		if ready {
			// prev is still attached: wait for its end, then for the next.
			select {
			case <-cc.stopped:
				continue
			case <-t.C:
				return nil
			case <-ctx.Done():
				return nil
			}
		}
		select {
		case <-attached:
		case <-t.C:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

func (s *session) setStatus(st replication.Status) {
	s.mu.Lock()
	s.status, s.statusAt = st, time.Now()
	close(s.statusCh)
	s.statusCh = make(chan struct{})
	s.mu.Unlock()
}

// lastStatus returns the agent's last status report, when it came, and a
// channel closed at the next one.
func (s *session) lastStatus() (replication.Status, time.Time, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status, s.statusAt, s.statusCh
}

// stats fills in the connection's part of a machine's figures.
func (s *session) stats(st *MachineStats) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st.Connected = s.conn != nil
	st.LastStatus, st.StatusAt = s.status, s.statusAt
}

// endLog records that the machine's log ended (Supersede).
func (s *session) endLog(ctx context.Context, reason string) error {
	s.attachMu.Lock()
	defer s.attachMu.Unlock()
	return s.rep.with(func(a *replication.Applier) error { return a.EndLog(ctx, reason) })
}
