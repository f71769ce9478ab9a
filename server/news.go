package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/store"
)

// The process server's callbacks (procserver.Config). They run on its
// replication path, so each only notes its news for the mirror
// (mirror.go) and returns; writeNews writes it.

func (s *Server) onState(m replication.MachineCatalog) {
	s.mirror.note(m.ID, &news{state: &m})
}

func (s *Server) onPoint(id string, p replication.Point) {
	s.mirror.note(id, &news{points: []replication.Point{p}})
}

func (s *Server) onConnect(id string, h replication.Hello) {
	modes := map[string]string{}
	for _, d := range h.Disks {
		if d.Mode != "" {
			modes[d.Name] = d.Mode
		}
	}
	var mj string
	if len(modes) > 0 {
		b, _ := json.Marshal(modes)
		mj = string(b)
	}
	s.mirror.note(id, &news{contact: &contact{version: h.AgentVersion, uuid: h.BIOSUUID, modes: mj, touch: true, setErr: true}})
}

// onRefused shows why an agent was turned away on its machine.
func (s *Server) onRefused(id, reason string) {
	s.mirror.note(id, &news{contact: &contact{err: reason, setErr: true}})
}

// onStatus notes the events and the resync progress an agent reports.
func (s *Server) onStatus(id string, st replication.Status) {
	n := &news{}
	if st.Resync != nil {
		n.resyncs = map[uint32]replication.ResyncStatus{st.Resync.Disk: *st.Resync}
	}
	for _, e := range st.Events {
		n.events = append(n.events, store.Event{Time: time.Unix(0, e.Time), MachineID: id, Severity: "warning", Kind: e.Kind, Message: e.Message})
	}
	s.mirror.note(id, n)
}

// onQuarantine raises an event for a cached segment that failed
// verification: it was moved aside, never applied, and the machine's disks
// are marked for resync.
func (s *Server) onQuarantine(id, path, reason string) {
	s.noteEvent(store.Event{MachineID: id, Severity: "error", Kind: "segment-quarantined",
		Message: fmt.Sprintf("%s; it was moved to %s for inspection, and the disks are resynced from the source", reason, path)})
}

// onCacheState raises an event when the cache disk's free space crosses a
// threshold (warning under 30%, critical under 25%) or recovers.
func (s *Server) onCacheState(state string, free, total uint64) {
	sev, msg := "info", "the process server's cache disk has room again"
	pct := 100 * float64(free) / float64(max(total, 1))
	switch state {
	case procserver.CacheWarning:
		sev, msg = "warning", fmt.Sprintf("the process server's cache disk is %.0f%% free (warning under 30%%)", pct)
	case procserver.CacheCritical:
		sev, msg = "error", fmt.Sprintf("the process server's cache disk is %.0f%% free (critical under 25%%): agents are held back and spool", pct)
	}
	s.noteEvent(store.Event{Severity: sev, Kind: "cache-" + state, Message: msg})
}

// noteDamage raises an event for replica blocks the process server found
// damaged (a verify's compare, a resync's sample, a scrub).
func (s *Server) noteDamage(id string, d procserver.Damage) {
	s.noteEvent(damageEvent(id, d))
}

// noteEvent is raise for the process server's callbacks: the event is
// logged now and written by the mirror.
func (s *Server) noteEvent(e store.Event) {
	e.Time = s.now()
	s.log.Warn("event", "machine", e.MachineID, "kind", e.Kind, "message", e.Message)
	s.mirror.note(e.MachineID, &news{events: []store.Event{e}})
}

// writeNews writes what was noted about machine id ("": the vault) to
// the vault database, taking out of n what it wrote. It runs on the
// mirror's goroutine only (and, once the mirror is stopped, in its close).
func (s *Server) writeNews(ctx context.Context, id string, n *news) error {
	unprotected, gone := s.unprotected(id)
	if gone {
		// Its row is being deleted (unprotect --delete-replica).
		*n = news{}
		return nil
	}
	if unprotected {
		// Its resyncs ended with its protection; what its drained cache
		// reported (points, disk states) is still written.
		n.resyncs = nil
	}
	if n.reconcile {
		delete(s.mirrorSeen, id) // mirrored reads the catalog's points again
		n.reconcile = false
	}
	if id != "" {
		known, err := s.mirrored(ctx, id)
		if err != nil {
			return err
		}
		if !known {
			// Not a registered machine (a cache left from another vault
			// database): nothing to mirror it into.
			*n = news{}
			return nil
		}
	}
	for len(n.points) > 0 {
		p := n.points[0]
		if err := s.db.AddPoint(ctx, store.Point{MachineID: id, Seq: p.Seq, Time: p.Time, Kind: p.Kind}); err != nil {
			return fmt.Errorf("save point %s: %w", p.ID, err)
		}
		n.points = n.points[1:]
	}
	if n.state != nil {
		if err := s.writeDisks(ctx, *n.state); err != nil {
			return err
		}
		if !unprotected {
			if err := s.reconcileResyncs(ctx, *n.state); err != nil {
				return err
			}
		}
		n.state = nil
	}
	if c := n.contact; c != nil {
		if c.touch || c.version != "" {
			if err := s.db.TouchMachine(ctx, id, c.version, 0); err != nil {
				return fmt.Errorf("record agent contact: %w", err)
			}
			c.touch, c.version = false, ""
		}
		if c.uuid != "" {
			if err := s.db.SetBIOSUUID(ctx, id, c.uuid); err != nil {
				return fmt.Errorf("record the BIOS UUID: %w", err)
			}
			c.uuid = ""
		}
		if c.modes != "" {
			if err := s.db.SetDiskModes(ctx, id, c.modes); err != nil {
				return fmt.Errorf("record the disks' modes: %w", err)
			}
			c.modes = ""
		}
		if c.setErr {
			if err := s.db.SetMachineError(ctx, id, c.err); err != nil {
				return fmt.Errorf("record machine error: %w", err)
			}
		}
		n.contact = nil
	}
	for disk, st := range n.resyncs {
		if err := s.noteResyncStatus(ctx, id, st); err != nil {
			return fmt.Errorf("record resync progress: %w", err)
		}
		delete(n.resyncs, disk)
	}
	for len(n.events) > 0 {
		if err := s.db.AddEvent(ctx, n.events[0]); err != nil {
			return fmt.Errorf("record event: %w", err)
		}
		n.events = n.events[1:]
	}
	return nil
}

// mirrored reports whether machine id is registered (so its rows can be
// written). The first time it is, its points table is brought in step with
// the catalog, the points' truth: points made while the database was
// behind at the last stop are added, points pruned meanwhile removed.
func (s *Server) mirrored(ctx context.Context, id string) (bool, error) {
	if s.mirrorSeen[id] {
		return true, nil
	}
	if _, err := s.db.Machine(ctx, id); errors.Is(err, store.ErrNotFound) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	ps, err := s.cat.Points(ctx, id)
	if err != nil {
		return false, fmt.Errorf("list the catalog's points: %w", err)
	}
	rows, err := s.db.Points(ctx, id, 0)
	if err != nil {
		return false, err
	}
	inCatalog := map[uint64]bool{}
	for _, p := range ps {
		inCatalog[p.Seq] = true
		if err := s.db.AddPoint(ctx, store.Point{MachineID: id, Seq: p.Seq, Time: p.Time, Kind: p.Kind}); err != nil {
			return false, fmt.Errorf("save point %s: %w", p.ID, err)
		}
	}
	var gone []uint64
	for _, r := range rows {
		if !inCatalog[r.Seq] {
			gone = append(gone, r.Seq)
		}
	}
	if err := s.db.DeletePoints(ctx, id, gone); err != nil {
		return false, err
	}
	s.mirrorSeen[id] = true
	return true, nil
}

// writeDisks writes a machine's disk rows from its catalog view, those
// that changed since the mirror last wrote them.
func (s *Server) writeDisks(ctx context.Context, m replication.MachineCatalog) error {
	written := s.mirrorDisks[m.ID]
	for _, d := range m.Disks {
		row := store.Disk{Index: d.Index, Name: d.Name, Size: d.Size, State: d.State, Cursor: d.Cursor, Reason: d.Reason}
		if slices.Contains(written, row) {
			continue
		}
		if err := s.db.PutDisk(ctx, m.ID, row); err != nil {
			return err
		}
		written = slices.DeleteFunc(written, func(w store.Disk) bool { return w.Index == row.Index })
		written = append(written, row)
		s.mirrorDisks[m.ID] = written
	}
	return nil
}
