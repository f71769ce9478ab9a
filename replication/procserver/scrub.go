package procserver

import (
	"context"
	"errors"
	"fmt"

	"github.com/asrdr/asr/replication"
)

// ScrubReport is what a scrub of a machine found: per disk, the bytes of
// its current contents read and the blocks that did not match their
// checksums; per recovery point checked, the same for the blocks the point
// holds itself.
type ScrubReport struct {
	Disks  []DiskScrub  `json:"disks"`
	Points []PointScrub `json:"points,omitempty"`
	// PointsUnchecked counts the points whose own blocks could not be
	// told apart (a target that does not say) or that have no checksums.
	PointsUnchecked int `json:"points_unchecked,omitempty"`
}

// DiskScrub is a disk's current contents, checked.
type DiskScrub struct {
	Disk    string  `json:"disk"`
	Checked int64   `json:"checked"`
	Damaged []int64 `json:"damaged,omitempty"`
	// Skipped says why a scheduled scrub left the disk alone.
	Skipped string `json:"skipped,omitempty"`
}

// PointScrub is one disk of a recovery point, checked.
type PointScrub struct {
	Point   string  `json:"point"`
	Disk    string  `json:"disk"`
	Checked int64   `json:"checked"`
	Damaged []int64 `json:"damaged,omitempty"`
}

// Damaged reports whether the scrub found any damage.
func (r ScrubReport) Damaged() bool {
	for _, d := range r.Disks {
		if len(d.Damaged) > 0 {
			return true
		}
	}
	for _, p := range r.Points {
		if len(p.Damaged) > 0 {
			return true
		}
	}
	return false
}

// Scrub reads a machine's replica disks and checks them against their
// checksums: the current contents (damaged blocks are marked, and the disk
// is marked for a resync of them, which fetches them from the source), then
// the blocks each recovery point holds itself, where the target can tell
// which (damage there cannot be repaired: the source has moved on; it is
// reported). The applier is held out one chunk at a time, so replication
// goes on meanwhile. A scheduled scrub reads only targets that say where
// their data is (the local one): reading a cloud target back costs egress,
// and the service checks its own data; an operator's scrub reads any.
func (s *Server) Scrub(ctx context.Context, machineID string, scheduled bool) (ScrubReport, error) {
	m, err := s.known(machineID)
	if err != nil {
		return ScrubReport{}, err
	}
	var rep ScrubReport
	mc := m.rep.machine()
	buf := make([]byte, replication.HashChunk)
	for _, d := range mc.Disks {
		rd, sums, ok := m.rep.handles(d.Index)
		if !ok {
			continue
		}
		if _, local := rd.(replication.DataExtenter); scheduled && !local {
			rep.Disks = append(rep.Disks, DiskScrub{Disk: d.Name, Skipped: "not read back on schedule: the target keeps its own checksums (asr verify reads it)"})
			continue
		}
		m.rep.mu.Lock()
		chunks, err := replication.ScrubChunks(ctx, rd, sums)
		m.rep.mu.Unlock()
		if err != nil {
			return rep, fmt.Errorf("scrub disk %s: %w", d.Name, err)
		}
		ds := DiskScrub{Disk: d.Name}
		for _, c := range chunks {
			if err := ctx.Err(); err != nil {
				return rep, err
			}
			m.rep.mu.Lock()
			bad, err := replication.CheckChunk(rd, sums, c, buf)
			m.rep.mu.Unlock()
			if err != nil {
				return rep, fmt.Errorf("scrub disk %s: %w", d.Name, err)
			}
			ds.Checked += min(int64(replication.HashChunk), rd.Size()-c*replication.HashChunk)
			ds.Damaged = append(ds.Damaged, bad...)
		}
		if len(ds.Damaged) > 0 {
			reason := fmt.Sprintf("a scrub found %d damaged blocks in the replica (first at offset %d)", len(ds.Damaged), ds.Damaged[0])
			m.rep.mu.Lock()
			err := m.rep.a.MarkDamage(ctx, d.Index, ds.Damaged, reason)
			m.rep.mu.Unlock()
			if err != nil {
				return rep, err
			}
			m.log.Error("scrub found damaged replica blocks", "disk", d.Name, "blocks", len(ds.Damaged))
			if s.cfg.OnDamage != nil {
				s.cfg.OnDamage(m.id, Damage{Disk: d.Name, Blocks: ds.Damaged, Found: "scrub"})
			}
		}
		rep.Disks = append(rep.Disks, ds)
	}
	points, err := s.cfg.Catalog.Points(ctx, machineID)
	if err != nil {
		return rep, err
	}
	for _, lp := range points {
		p, err := s.cfg.Catalog.FindPoint(ctx, machineID, lp.ID)
		if errors.Is(err, replication.ErrNoPoint) || errors.Is(err, replication.ErrNotFound) {
			continue // pruned meanwhile
		} else if err != nil {
			return rep, err
		}
		if !p.Sums {
			rep.PointsUnchecked++
			continue
		}
		for _, idx := range p.Disks {
			d, ok := mc.Disk(idx)
			rd, sums, ok2 := m.rep.handles(idx)
			if !ok || !ok2 {
				continue
			}
			se, ok := rd.(replication.SnapshotExtenter)
			if !ok {
				rep.PointsUnchecked++
				break
			}
			ranges, err := se.SnapshotExtents(ctx, replication.SnapshotName(p.Seq))
			if errors.Is(err, replication.ErrNotFound) {
				break // pruned meanwhile
			} else if err != nil {
				return rep, err
			}
			bad, n, _, err := replication.CheckPoint(ctx, mc, p, idx, rd, sums.Disk(), ranges)
			if errors.Is(err, replication.ErrNotFound) {
				break
			} else if err != nil {
				return rep, fmt.Errorf("scrub point %s of disk %s: %w", p.ID, d.Name, err)
			}
			rep.Points = append(rep.Points, PointScrub{Point: p.ID, Disk: d.Name, Checked: n, Damaged: bad})
			if len(bad) > 0 {
				m.log.Error("scrub found damaged blocks in a recovery point", "point", p.ID, "disk", d.Name, "blocks", len(bad))
				if s.cfg.OnDamage != nil {
					s.cfg.OnDamage(m.id, Damage{Disk: d.Name, Point: p.ID, Blocks: bad, Found: "scrub"})
				}
			}
		}
	}
	return rep, nil
}

// CheckPoint reads every disk of a recovery point through its checksums
// (`asr verify --point`): what a recovery of it would read.
func (s *Server) CheckPoint(ctx context.Context, machineID, pointID string) ([]PointScrub, error) {
	m, err := s.known(machineID)
	if err != nil {
		return nil, err
	}
	p, err := s.cfg.Catalog.FindPoint(ctx, machineID, pointID)
	if err != nil {
		return nil, err
	}
	if !p.Sums {
		return nil, fmt.Errorf("point %s was made before asr kept block checksums: it cannot be checked", p.ID)
	}
	mc := m.rep.machine()
	var out []PointScrub
	for _, idx := range p.Disks {
		d, ok := mc.Disk(idx)
		rd, sums, ok2 := m.rep.handles(idx)
		if !ok || !ok2 {
			return out, fmt.Errorf("point %s names disk %d, which is not open", p.ID, idx)
		}
		bad, n, _, err := replication.CheckPoint(ctx, mc, p, idx, rd, sums.Disk(), nil)
		if err != nil {
			return out, fmt.Errorf("check point %s of disk %s: %w", p.ID, d.Name, err)
		}
		out = append(out, PointScrub{Point: p.ID, Disk: d.Name, Checked: n, Damaged: bad})
		if len(bad) > 0 && s.cfg.OnDamage != nil {
			s.cfg.OnDamage(m.id, Damage{Disk: d.Name, Point: p.ID, Blocks: bad, Found: "verify"})
		}
	}
	return out, nil
}

// known returns a machine the process server has state for (opening it if
// its cache or catalog entry exists).
func (s *Server) known(machineID string) (*machine, error) {
	s.mu.Lock()
	m, ok := s.machines[machineID]
	s.mu.Unlock()
	if ok {
		return m, nil
	}
	return s.machine(s.ctx, machineID, "") // refuses a removed machine
}

// OpenPoint opens a disk (by name) of a machine at a recovery point for
// reading through the point's checksums (see replication.CheckedReader).
func (s *Server) OpenPoint(ctx context.Context, machineID string, p replication.Point, disk string, accept bool) (*replication.CheckedReader, error) {
	if s.isRemoved(machineID) {
		// Its replica is kept for recovery, with no applier.
		return s.openRemovedPoint(ctx, machineID, p, disk, accept)
	}
	m, err := s.known(machineID)
	if err != nil {
		return nil, err
	}
	mc := m.rep.machine()
	for _, d := range mc.Disks {
		if d.Name != disk {
			continue
		}
		rd, sums, ok := m.rep.handles(d.Index)
		if !ok {
			return nil, fmt.Errorf("disk %s is not open", disk)
		}
		return replication.OpenPointDisk(ctx, mc, p, d.Index, rd, sums.Disk(), accept)
	}
	return nil, fmt.Errorf("machine %s has no disk %q: %w", mc.Name, disk, replication.ErrNotFound)
}

// DamagedCopies names the points other than except (and "current") whose
// copy of the 4 KiB block at off of a disk is damaged.
func (s *Server) DamagedCopies(ctx context.Context, machineID, disk string, off int64, except string) []string {
	m, err := s.known(machineID)
	if err != nil {
		return nil
	}
	mc := m.rep.machine()
	listed, err := s.cfg.Catalog.Points(ctx, machineID)
	if err != nil {
		return nil
	}
	var full []replication.Point
	for _, lp := range listed {
		if lp.ID == except {
			continue
		}
		if p, err := s.cfg.Catalog.FindPoint(ctx, machineID, lp.ID); err == nil {
			full = append(full, p)
		}
	}
	for _, d := range mc.Disks {
		if d.Name != disk {
			continue
		}
		rd, sums, ok := m.rep.handles(d.Index)
		if !ok {
			return nil
		}
		// The current contents are read under the applier's lock.
		m.rep.mu.Lock()
		defer m.rep.mu.Unlock()
		return replication.DamagedCopies(ctx, mc, full, d.Index, rd, sums.Disk(), off)
	}
	return nil
}
