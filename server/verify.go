package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Checking replicas against their block checksums (replication/sums.go):
//
//   - a scrub reads a machine's replica disks (current contents, and the
//     blocks each point holds itself) and checks them; damaged current
//     blocks are marked and resynced from the source in the resync window;
//     it runs on schedule (every scrub interval, default weekly, inside the
//     machine's resync window) and on request;
//   - `asr verify --machine M` scrubs, then compares the source with the
//     replica's contents read back through the agent (DRBD's online
//     verify), resending what differs;
//   - `asr verify --machine M --point P` reads a whole point through its
//     checksums, as a recovery of it would.
//
// Every finding is an event (kind "damage", "scrub-ok", "verify-done"), and
// the machine shows its last scrub.

// DefaultScrubEvery is how often a machine is scrubbed unless set.
const DefaultScrubEvery = 7 * 24 * time.Hour

// onDamage raises an event for blocks found not to match their checksums.
func (s *Server) onDamage(id string, d procserver.Damage) {
	s.raise(s.ctx, damageEvent(id, d))
}

func damageEvent(id string, d procserver.Damage) store.Event {
	where := "the replica's current contents"
	todo := "they are fetched from the source by a resync"
	if d.Point != "" {
		where = "recovery point " + d.Point
		todo = "a recovery of that point fails unless the damage is accepted (asr recover --accept-damage); recover another point"
	}
	first := int64(-1)
	if len(d.Blocks) > 0 {
		first = d.Blocks[0]
	}
	return store.Event{MachineID: id, Severity: "error", Kind: "damage",
		Message: fmt.Sprintf("disk %s: %d blocks of 4 KiB in %s do not match their checksums (found by %s; first at offset %d): %s",
			d.Disk, len(d.Blocks), where, d.Found, first, todo)}
}

// scrubEvery returns the scrub interval (0: no scheduled scrubs).
func (s *Server) scrubEvery(ctx context.Context) (time.Duration, error) {
	v, err := s.db.Setting(ctx, "scrub_every")
	if errors.Is(err, store.ErrNotFound) {
		return DefaultScrubEvery, nil
	} else if err != nil {
		return 0, err
	}
	return parseScrubEvery(v)
}

func parseScrubEvery(v string) (time.Duration, error) {
	if v == "off" {
		return 0, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < time.Hour {
		return 0, fmt.Errorf("scrub interval %q: want a duration of 1h or more (e.g. 168h), or off", v)
	}
	return d, nil
}

// maybeScrub starts the scheduled scrub of one machine that is due (its
// last scrub older than the interval, and inside its resync window), unless
// one is running. It is called by the resync loop.
func (s *Server) maybeScrub(ctx context.Context) {
	every, err := s.scrubEvery(ctx)
	if err != nil || every == 0 {
		return
	}
	s.scrubMu.Lock()
	busy := s.scrubbing
	s.scrubMu.Unlock()
	if busy {
		return
	}
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return
	}
	now := s.now()
	for _, m := range ms {
		if m.Unprotected() || len(m.Disks) == 0 || now.Sub(m.LastScrub) < every {
			continue
		}
		if m.LastScrub.IsZero() && now.Sub(m.RegisteredAt) < every {
			continue // a new machine's first scrub comes an interval after it registered
		}
		w, err := s.windowFor(ctx, m)
		if err != nil || !w.contains(now) {
			continue
		}
		s.scrubMu.Lock()
		s.scrubbing = true
		s.scrubMu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.scrubMu.Lock()
				s.scrubbing = false
				s.scrubMu.Unlock()
			}()
			if _, err := s.ScrubMachine(s.ctx, m, true); err != nil && s.ctx.Err() == nil {
				s.log.Error("scheduled scrub", "machine", m.ID, "err", err)
			}
		}()
		return
	}
}

// ScrubMachine scrubs a machine's replica now and records the result
// (scheduled: see procserver.Server.Scrub).
func (s *Server) ScrubMachine(ctx context.Context, m store.Machine, scheduled bool) (procserver.ScrubReport, error) {
	start := s.now()
	var rep procserver.ScrubReport
	var err error
	var notListed int64
	if ps := s.assignedTo(m.ID); ps != "" {
		// Its process server scrubs it (a command in its heartbeat
		// reply); its damage comes back as its reports' news.
		var r api.PSCommandResult
		r, err = s.psCommand(ctx, ps, api.PSCommand{Kind: api.PSCommandScrub, MachineID: m.ID, Scheduled: scheduled, Timeout: api.MaxPSCommandTimeout})
		switch {
		case err == nil && r.Error != "":
			err = fmt.Errorf("process server %s: %s", ps, r.Error)
		case err == nil && r.Scrub == nil:
			err = fmt.Errorf("process server %s answered the scrub of %s without a report", ps, m.Name)
		case err == nil:
			rep, notListed = *r.Scrub, r.ScrubDamagedNotListed
		}
	} else {
		rep, err = s.ps.Scrub(ctx, m.ID, scheduled)
	}
	// The damage it found is noted for the database (the process server's
	// callbacks do not wait for it): written before the scrub's answer.
	if serr := s.mirror.sync(ctx); serr != nil && err == nil {
		err = serr
	}
	if err != nil {
		s.db.SetScrub(s.ctx, m.ID, start, store.ScrubFailed, "failed: "+err.Error())
		s.raise(s.ctx, store.Event{MachineID: m.ID, Severity: "error", Kind: "scrub-failed",
			Message: fmt.Sprintf("the scrub of the replica failed: %v", err)})
		return rep, err
	}
	summary, outcome := scrubSummary(rep), store.ScrubOK
	if notListed > 0 {
		summary += fmt.Sprintf(" (and %d more damaged blocks not listed)", notListed)
	}
	if rep.Damaged() || notListed > 0 {
		outcome = store.ScrubDamaged
	}
	if err := s.db.SetScrub(s.ctx, m.ID, start, outcome, summary); err != nil {
		return rep, err
	}
	if !rep.Damaged() {
		s.raise(s.ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "scrub-ok", Message: "scrub: " + summary})
	}
	s.log.Info("scrub done", "machine", m.ID, "result", summary)
	return rep, nil
}

func scrubSummary(rep procserver.ScrubReport) string {
	var checked, damaged, pdamaged, pchecked int64
	skipped := 0
	for _, d := range rep.Disks {
		if d.Skipped != "" {
			skipped++
		}
		checked += d.Checked
		damaged += int64(len(d.Damaged))
	}
	points := map[string]bool{}
	for _, p := range rep.Points {
		pchecked += p.Checked
		pdamaged += int64(len(p.Damaged))
		if len(p.Damaged) > 0 {
			points[p.Point] = true
		}
	}
	if damaged == 0 && pdamaged == 0 {
		if skipped == len(rep.Disks) && skipped > 0 {
			return rep.Disks[0].Skipped
		}
		return fmt.Sprintf("no damage (%d bytes of the replica and %d bytes held by points checked)", checked, pchecked)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d damaged blocks in the replica", damaged)
	if damaged > 0 {
		b.WriteString(" (being resynced from the source)")
	}
	if pdamaged > 0 {
		fmt.Fprintf(&b, ", %d damaged blocks in %d recovery points", pdamaged, len(points))
	}
	fmt.Fprintf(&b, "; %d bytes checked", checked+pchecked)
	return b.String()
}

func (s *Server) handleVerify(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	m, err := s.findMachine(ctx, r)
	if err != nil {
		return err
	}
	if err := refuseUnprotected(m, "verify"); err != nil {
		return err
	}
	var req api.VerifyRequest
	if r.ContentLength != 0 {
		if err := readJSON(r, &req); err != nil {
			return err
		}
	}
	out := api.VerifyJSON{Machine: m.Name}
	if req.Point != "" {
		var ps []procserver.PointScrub
		var notListed int64
		if on := s.assignedTo(m.ID); on != "" {
			// Its process server reads it (a command): the point's blocks
			// are consistent only in the process that applies the machine.
			p, err := s.cat.FindPoint(ctx, m.ID, req.Point)
			if err != nil {
				return err
			}
			ps, notListed, err = s.psCheckPoint(ctx, on, m, p.ID)
			if err != nil {
				return err
			}
		} else if ps, err = s.ps.CheckPoint(ctx, m.ID, req.Point); err != nil {
			return err
		}
		if err := s.mirror.sync(ctx); err != nil { // its damage events
			return err
		}
		out.Point = ps
		damaged := notListed
		var checked int64
		for _, p := range ps {
			damaged += int64(len(p.Damaged))
			checked += p.Checked
		}
		out.Damaged = damaged > 0
		id := req.Point
		if len(ps) > 0 {
			id = ps[0].Point
		}
		out.Summary = fmt.Sprintf("point %s: %d bytes checked, %d damaged blocks", id, checked, damaged)
		if notListed > 0 {
			out.Summary += fmt.Sprintf(" (%d of them not listed)", notListed)
		}
		writeJSON(w, http.StatusOK, out)
		return nil
	}
	for _, d := range m.Disks {
		if d.State == replication.StateInitial {
			return errorf(http.StatusConflict, "disk %s is still in its initial replication; verify it once it is protected", d.Name)
		}
	}
	rep, err := s.ScrubMachine(ctx, m, false)
	if err != nil {
		return err
	}
	out.Scrub, out.Damaged, out.Summary = &rep, rep.Damaged(), scrubSummary(rep)
	if !req.NoSource {
		if out.Jobs, err = s.requestVerify(ctx, m); err != nil {
			return err
		}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// requestVerify starts a verify job on each disk of a machine that has no
// resync running.
func (s *Server) requestVerify(ctx context.Context, m store.Machine) ([]api.ResyncJSON, error) {
	s.resyncMu.Lock()
	defer s.resyncMu.Unlock()
	var out []api.ResyncJSON
	for _, d := range m.Disks {
		row, err := s.db.Resync(ctx, m.ID, d.Index)
		if err == nil && row.State == store.ResyncRunning {
			out = append(out, s.resyncJSON(ctx, m, d, row))
			continue // a resync is comparing the disk already
		} else if err != nil && !errors.Is(err, store.ErrNotFound) {
			return nil, err
		}
		reason := "operator verify: compare the source with the replica's contents"
		if err == nil && !row.Verify {
			// A resync is due (the scrub may just have found damage): the
			// verify compares the whole disk, so it does that resync's
			// work too, and ends it.
			reason += "; also due: " + row.Reason
		}
		row = store.Resync{MachineID: m.ID, Disk: d.Index, Reason: reason,
			Manual: true, Verify: true, State: store.ResyncScheduled, RequestedAt: s.now()}
		if err := s.db.PutResync(ctx, row); err != nil {
			return nil, err
		}
		s.resyncHook("attempt")
		s.maybeStartResync(ctx, row)
		row, _ = s.db.Resync(ctx, m.ID, d.Index)
		out = append(out, s.resyncJSON(ctx, m, d, row))
	}
	return out, nil
}

func (s *Server) handleVerifyStatus(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	m, err := s.findMachine(ctx, r)
	if err != nil {
		return err
	}
	out := api.VerifyStatusJSON{Machine: m.Name, ScrubResult: m.ScrubResult, Jobs: []api.ResyncJSON{}}
	if !m.LastScrub.IsZero() {
		out.LastScrub = m.LastScrub.UTC().Format(time.RFC3339)
	}
	for _, d := range m.Disks {
		if row, err := s.db.Resync(ctx, m.ID, d.Index); err == nil {
			out.Jobs = append(out.Jobs, s.resyncJSON(ctx, m, d, row))
		}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// handleScrubSetting sets the scrub interval (PUT /api/v1/settings/scrub
// {"every": "168h"} or {"every": "off"}).
func (s *Server) handleScrubSetting(w http.ResponseWriter, r *http.Request) error {
	var req api.ScrubRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	if _, err := parseScrubEvery(req.Every); err != nil {
		return errorf(http.StatusBadRequest, "%v; nothing was changed", err)
	}
	if err := s.db.SetSetting(r.Context(), "scrub_every", req.Every); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, req)
	return nil
}

// DB returns the vault database (for tests and tools in-process).
func (s *Server) DB() *store.DB { return s.db }
