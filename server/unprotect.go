package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Unprotect ends the protection of a machine (its name or id), as an
// operator disables replication in ASR:
//
//  1. The machine is marked unprotected in the vault database first
//     (store.SetUnprotected): its client certificate is revoked (no serial
//     matches any more), it leaves its replication group, and from here
//     its agent is refused with the reason (authorizeAgent), which the
//     machine shows as its last error; registering its name again is
//     refused while the row is kept (handleRegister).
//  2. The process server removes it (procserver.Server.Remove): its
//     connection is closed, requests waiting on it fail, and its cache is
//     applied whole first (without deleteReplica: the kept replica holds
//     every acknowledged write) or discarded (with it); the cache files go.
//  3. Its resync rows and verify jobs end.
//  4. Without deleteReplica that is all: the replica disks, their
//     snapshots (the recovery points), the kept segments and the catalog
//     entries stay on the target, so recovery and the points listing work
//     as before; the machine stays listed, in state "unprotected". Its
//     points are frozen: retention pruning, RPO alerts, resync scheduling
//     and scrubs skip it. With deleteReplica, everything of the machine
//     on the target is deleted (replication.Catalog.DeleteMachine), then
//     its row with its disks, points, resyncs and events.
//
// Every step is idempotent and the mark comes first, so a removal cut
// short (a crash, a drain that ran out of time, a disk held open by a
// recovery) is finished by the next start of the server or by calling
// Unprotect again. Unprotecting an unprotected machine again without
// deleteReplica is a no-op; with it, it deletes. Once a deletion was asked
// for, only another deletion finishes it.
func (s *Server) Unprotect(ctx context.Context, machine string, deleteReplica bool) error {
	m, err := s.db.MachineByName(ctx, machine)
	if errors.Is(err, store.ErrNotFound) {
		return errorf(http.StatusNotFound, "no machine named %q (a machine unprotected with --delete-replica is gone)", machine)
	} else if err != nil {
		return err
	}
	if f, err := s.db.LiveFailover(ctx, m.ID); err == nil && deleteReplica {
		return errorf(http.StatusConflict, "machine %s has a live %s (%s) that runs from its replica: clean it up (or fail back) before deleting the replica", m.Name, kindWord(f.Kind), f.State)
	}
	if s.reverseRunOf(m.ID) != nil {
		return errorf(http.StatusConflict, "machine %s is reprotected (failback in progress): fail it back first", m.Name)
	}
	// The removal (drain, deletion) is the built-in process server's:
	// a machine on a scale-out one comes back first, handed over (or
	// taken back when that process server is gone; failover_ps.go).
	if err := s.toBuiltin(ctx, nil, m, false, "to be unprotected"); err != nil {
		return err
	}
	// The switch lock until the machine is marked: no switch slips in.
	s.pss.switchMu.Lock()
	if ps := s.assignedTo(m.ID); ps != "" {
		s.pss.switchMu.Unlock()
		return errorf(http.StatusConflict, "machine %s was switched to process server %s meanwhile: unprotect it again; nothing was changed", m.Name, ps)
	}
	if m.Unprotected() && m.DeleteReplica && !deleteReplica {
		s.pss.switchMu.Unlock()
		return errorf(http.StatusConflict, "the deletion of machine %s's replica was started (unprotected at %s) and is not finished: run unprotect --delete-replica again to finish it",
			m.Name, m.UnprotectedAt.UTC().Format(time.RFC3339))
	}
	if !m.Unprotected() || (deleteReplica && !m.DeleteReplica) {
		if err := s.db.SetUnprotected(ctx, m.ID, s.now(), deleteReplica); err != nil {
			s.pss.switchMu.Unlock()
			return err
		}
		s.log.Warn("machine unprotected: its agent is refused from now on", "machine", m.ID, "name", m.Name, "delete_replica", deleteReplica)
	}
	s.pss.switchMu.Unlock()
	s.noteUnprotected(m.ID, false)
	return s.finishUnprotect(ctx, m.ID, m.Name, deleteReplica)
}

// finishUnprotect does the removal of a machine marked unprotected (see
// Unprotect, steps 2 to 4). One removal runs at a time.
func (s *Server) finishUnprotect(ctx context.Context, id, name string, deleteReplica bool) error {
	s.unprotectMu.Lock()
	defer s.unprotectMu.Unlock()
	if err := s.ps.Remove(ctx, id, !deleteReplica); err != nil {
		return fmt.Errorf("unprotect machine %s: stop its replication: %w (run unprotect again to finish)", name, err)
	}
	// What the drain applied (points, disk states) reaches the database
	// before the rows below are settled.
	if err := s.mirror.sync(ctx); err != nil {
		return fmt.Errorf("unprotect machine %s: %w (run unprotect again to finish)", name, err)
	}
	s.resyncMu.Lock()
	err := s.db.DeleteResyncs(ctx, id)
	s.resyncMu.Unlock()
	if err != nil {
		return fmt.Errorf("unprotect machine %s: end its resyncs: %w (run unprotect again to finish)", name, err)
	}
	if !deleteReplica {
		s.log.Info("machine unprotected; its replica and recovery points are kept on the target", "machine", id, "name", name)
		return nil
	}
	if err := s.cat.DeleteMachine(ctx, id); err != nil {
		return fmt.Errorf("unprotect machine %s: delete its replica from %s: %w (run unprotect --delete-replica again to finish)", name, s.target, err)
	}
	s.noteUnprotected(id, true) // the mirror writes nothing more of it
	if err := s.db.DeleteMachine(ctx, id); err != nil {
		return fmt.Errorf("unprotect machine %s: %w (run unprotect --delete-replica again to finish)", name, err)
	}
	s.bytesMu.Lock()
	delete(s.bytesShown, id) // what views showed of a machine that is gone
	s.bytesMu.Unlock()
	s.log.Info("machine unprotected; its replica, recovery points and records are deleted", "machine", id, "name", name)
	return nil
}

// finishUnprotects finishes, at start, the removals of machines marked
// unprotected (a removal cut short by a stop). A failure is logged; the
// next start or the operator's unprotect tries again.
func (s *Server) finishUnprotects(ms []store.Machine) {
	for _, m := range ms {
		if s.ctx.Err() != nil {
			return
		}
		if err := s.finishUnprotect(s.ctx, m.ID, m.Name, m.DeleteReplica); err != nil && s.ctx.Err() == nil {
			s.log.Error("finishing the unprotect of a machine", "machine", m.ID, "name", m.Name, "err", err)
		}
	}
}

// noteUnprotected records in memory that machine id is unprotected (gone:
// its row is being deleted), for the paths that must not wait on the
// database (the mirror).
func (s *Server) noteUnprotected(id string, gone bool) {
	s.unprotMu.Lock()
	s.unprot[id] = s.unprot[id] || gone
	s.unprotMu.Unlock()
}

// unprotected reports whether machine id is unprotected, and whether its
// row is being deleted.
func (s *Server) unprotected(id string) (unprotected, gone bool) {
	s.unprotMu.Lock()
	defer s.unprotMu.Unlock()
	gone, unprotected = s.unprot[id]
	return unprotected, gone
}

// refuseUnprotected refuses an operation (what) that needs machine m's
// protection.
func refuseUnprotected(m store.Machine, what string) error {
	if !m.Unprotected() {
		return nil
	}
	return errorf(http.StatusConflict, "machine %s is unprotected (since %s): %s needs a protected machine; its recovery points can still be listed and recovered",
		m.Name, m.UnprotectedAt.UTC().Format(time.RFC3339), what)
}

// unprotectedReason is the refusal an unprotected machine's agent gets.
func unprotectedReason(m store.Machine) string {
	return fmt.Sprintf("machine %s is unprotected (replication disabled at %s): its agent is refused and its certificate revoked; uninstall the agent, or, to protect the machine again, unprotect it with --delete-replica (or register it under another name)",
		m.Name, m.UnprotectedAt.UTC().Format(time.RFC3339))
}

func (s *Server) handleUnprotect(w http.ResponseWriter, r *http.Request) error {
	var req api.UnprotectRequest
	if r.ContentLength != 0 {
		if err := readJSON(r, &req); err != nil {
			return err
		}
	}
	name := chi.URLParam(r, "machine")
	if err := s.Unprotect(r.Context(), name, req.DeleteReplica); err != nil {
		return err
	}
	out := api.UnprotectJSON{Machine: name, State: api.StateUnprotected}
	if req.DeleteReplica {
		out.State = api.StateDeleted
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}
