package procserver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/asrdr/asr/replication"
)

// ErrRemoved is returned (wrapped) for a machine whose protection ended
// (Remove, Config.Removed): the process server never opens it again.
var ErrRemoved = errors.New("the machine's protection ended")

// Remove ends the process server's part in a machine's protection (asr
// unprotect). From its start the machine is never opened again (an agent
// that connects is refused with ErrRemoved, whatever Authorize says; so
// are requests that would open it); its connection is closed at once and a
// connection being attached refused; point requests waiting for it fail;
// its compares stop. With drain, everything its cache holds (all that was
// acknowledged to the agent, and what was appended after) is sealed and
// applied to the replica first, so the replica that is kept holds every
// acknowledged write and the points its tags make; without drain the cache
// is discarded (the replica is to be deleted). Then the machine's goroutines
// stop, its replica disks close, and its cache directory is removed.
//
// Remove is idempotent and finishes a removal cut short: a machine that is
// not open (the server restarted after the removal began, Config.Removed)
// but whose cache directory is left is opened for the drain alone (never
// reachable by a connection), or its directory removed without drain. If
// the drain fails (ctx ends, the target is out of reach) the machine stays
// as it is, without its connection, and a later Remove goes on from there.
func (s *Server) Remove(ctx context.Context, id string, drain bool) error {
	if !validID(id) {
		return fmt.Errorf("invalid machine id %q", id)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("process server closing")
	}
	s.removed[id] = true
	m := s.machines[id]
	delete(s.failed, id)
	s.mu.Unlock()
	dir := filepath.Join(s.cfg.CacheDir, id)
	if m == nil {
		if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if drain {
			// Opened here only: not in s.machines, so no connection or
			// request reaches it.
			om, err := openMachine(ctx, s, id, "")
			if err != nil {
				return fmt.Errorf("open machine %s to apply what its cache holds: %w", id, err)
			}
			if err := om.retire(ctx, true); err != nil {
				om.close()
				return err
			}
		}
	} else {
		if err := m.retire(ctx, drain); err != nil {
			return err
		}
		s.mu.Lock()
		if s.machines[id] == m {
			delete(s.machines, id)
		}
		s.mu.Unlock()
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove the cache of machine %s: %w", id, err)
	}
	return nil
}

// removedErr is why machine id may not be opened, or nil. Caller holds mu.
func (s *Server) removedErr(id string) error {
	if s.removed[id] {
		return fmt.Errorf("machine %s: %w", id, ErrRemoved)
	}
	return nil
}

// isRemoved reports whether machine id's protection ended.
func (s *Server) isRemoved(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.removed[id]
}

// retire stops everything of the machine (see Remove): the session first,
// so nothing more is appended, then, with drain, the cache is sealed and
// applied whole; then its parts close and its cache's bytes leave the
// total. On an error before the parts close, the machine goes on applying
// and a later retire goes on from there.
func (m *machine) retire(ctx context.Context, drain bool) error {
	reason := "the machine's protection ended (unprotected)"
	return m.retireFor(ctx, drain, reason, fmt.Errorf("%s: %w", reason, ErrRemoved))
}

// retireFor is retire with the reason the agent is told, and the error
// waiting point requests and later attaches get.
func (m *machine) retireFor(ctx context.Context, drain bool, reason string, pointErr error) error {
	if err := m.sess.retire(ctx, reason, pointErr); err != nil {
		return err
	}
	m.points.fail(pointErr)
	m.cmp.close()
	if drain {
		if err := m.cache.sealAll(); err != nil {
			return fmt.Errorf("seal the cache of machine %s before applying it: %w", m.id, err)
		}
		if err := m.drain(ctx); err != nil {
			return err
		}
		m.log.Info("the cache is applied whole: the replica holds every acknowledged change", "applied_seq", m.rep.appliedSeq())
	}
	err := m.close()
	m.cache.uncount()
	return err
}

// drain waits until the applier has applied every sealed segment of the
// cache (nothing is appended any more).
func (m *machine) drain(ctx context.Context) error {
	for {
		progress := m.rep.progressed()
		if _, ok := m.cache.next(); !ok {
			return nil
		}
		m.rep.kick()
		select {
		case <-progress:
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			msg := m.rep.lastErr()
			if msg == "" {
				msg = "none"
			}
			return fmt.Errorf("applying the cache of machine %s (applied up to seq %d; last apply error: %s): %w", m.id, m.rep.appliedSeq(), msg, ctx.Err())
		}
	}
}

// openRemovedPoint opens a point of a machine whose protection ended for
// reading through its checksums, from the target directly: the machine
// has no applier any more. The reader holds its own disk handles, closed
// with it.
func (s *Server) openRemovedPoint(ctx context.Context, machineID string, p replication.Point, disk string, accept bool) (*replication.CheckedReader, error) {
	cat := s.cfg.Catalog
	mc, err := cat.Machine(ctx, machineID)
	if err != nil {
		return nil, err
	}
	for _, d := range mc.Disks {
		if d.Name != disk {
			continue
		}
		rd, err := cat.T.OpenDisk(ctx, replication.DiskKey(machineID, d.Index), 0)
		if err != nil {
			return nil, fmt.Errorf("open the replica of disk %s: %w", disk, err)
		}
		var sums replication.ReplicaDisk
		if p.Sums {
			if sums, err = cat.T.OpenDisk(ctx, replication.SumKey(machineID, d.Index), 0); err != nil {
				rd.Close()
				return nil, fmt.Errorf("open the checksums of disk %s: %w", disk, err)
			}
		}
		cr, err := replication.OpenPointDisk(ctx, mc, p, d.Index, rd, sums, accept)
		if err != nil {
			rd.Close()
			if sums != nil {
				sums.Close()
			}
			return nil, err
		}
		cr.CloseAlso(rd)
		if sums != nil {
			cr.CloseAlso(sums)
		}
		return cr, nil
	}
	return nil, fmt.Errorf("machine %s has no disk %q: %w", mc.Name, disk, replication.ErrNotFound)
}

// Release hands a machine over to another process server (a switch): its
// agent's connection is closed, everything its cache holds (all that was
// acknowledged) is sealed and applied to the replica, then the machine
// closes, which releases its lease on the target after the last write, and
// its cache directory goes. Unlike Remove, the machine may be opened again
// later, once Config.Serves says this process server serves it again.
// Meanwhile it is not opened (the caller has changed what Serves says
// first). A machine not open whose cache directory is left (a restart) is
// opened for the drain alone. If the drain fails (ctx ends, the target is
// out of reach) the machine stays open without its connection, and a later
// Release goes on from there.
func (s *Server) Release(ctx context.Context, id string) error {
	if !validID(id) {
		return fmt.Errorf("invalid machine id %q", id)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("process server closing")
	}
	if s.handing[id] {
		s.mu.Unlock()
		return fmt.Errorf("machine %s is being handed over already", id)
	}
	s.handing[id] = true
	m := s.machines[id]
	delete(s.failed, id)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.handing, id)
		s.mu.Unlock()
	}()
	reason, pointErr := "the machine moved to another process server: ask the configuration server where", fmt.Errorf("machine %s moved to another process server", id)
	dir := filepath.Join(s.cfg.CacheDir, id)
	if m == nil {
		if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		om, err := openMachine(ctx, s, id, "")
		if err != nil {
			return fmt.Errorf("open machine %s to apply what its cache holds: %w", id, err)
		}
		if err := om.retireFor(ctx, true, reason, pointErr); err != nil {
			om.close()
			return err
		}
	} else {
		if err := m.retireFor(ctx, true, reason, pointErr); err != nil {
			return err
		}
		s.mu.Lock()
		if s.machines[id] == m {
			delete(s.machines, id)
		}
		s.mu.Unlock()
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove the cache of machine %s: %w", id, err)
	}
	return nil
}
