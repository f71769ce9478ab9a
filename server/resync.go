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

// Resync scheduling, as in ASR: a disk that needs a resync (whatever the
// trigger: a lost or corrupt segment, a disk that grew, an agent that
// stopped uncleanly or in the middle of a spool overflow, ...) gets a row
// in the resyncs table. A spool overflow itself does not: the agent
// resends the blocks it marked and ends that resync itself
// (replication.OverflowReason). An automatic resync waits for the resync
// window, outside office hours (default 22:00-06:00 server local time;
// per vault with the setting resync_window, per policy with its
// resync_window); an operator's request
// (asr resync, the console's Resync button) runs at once. A failed attempt
// is retried with backoff inside the window; when the next try would fall
// outside it, the resync stays failed, with its reason on the machine, until
// an operator presses Resync again. When the agent's resync-done record is
// applied the disk is protected again and the row goes away.

// DefaultResyncWindow is the vault's resync window unless set.
const DefaultResyncWindow = "22:00-06:00"

// resyncWindow is a daily window of local time; always for "always".
type resyncWindow struct {
	always     bool
	start, end time.Duration // since midnight; end < start wraps past midnight
}

func parseWindow(s string) (resyncWindow, error) {
	if s == "always" {
		return resyncWindow{always: true}, nil
	}
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return resyncWindow{}, fmt.Errorf("resync window %q: want HH:MM-HH:MM (or always)", s)
	}
	pa, err1 := time.Parse("15:04", strings.TrimSpace(a))
	pb, err2 := time.Parse("15:04", strings.TrimSpace(b))
	if err1 != nil || err2 != nil || pa.Equal(pb) {
		return resyncWindow{}, fmt.Errorf("resync window %q: want HH:MM-HH:MM (or always)", s)
	}
	since := func(t time.Time) time.Duration {
		return time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute
	}
	return resyncWindow{start: since(pa), end: since(pb)}, nil
}

// contains reports whether t (local time) is in the window.
func (w resyncWindow) contains(t time.Time) bool {
	if w.always {
		return true
	}
	d := time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute + time.Duration(t.Second())*time.Second
	if w.start < w.end {
		return d >= w.start && d < w.end
	}
	return d >= w.start || d < w.end
}

// next returns when the window next opens at or after t (t if open now).
func (w resyncWindow) next(t time.Time) time.Time {
	if w.contains(t) {
		return t
	}
	y, m, d := t.Date()
	open := time.Date(y, m, d, 0, 0, 0, 0, t.Location()).Add(w.start)
	if !open.After(t) {
		open = open.AddDate(0, 0, 1)
	}
	return open
}

// windowFor returns the resync window of a machine: its policy's, else the
// vault's.
func (s *Server) windowFor(ctx context.Context, m store.Machine) (resyncWindow, error) {
	w, err := s.db.ResyncWindow(ctx, m.Policy)
	if err != nil {
		return resyncWindow{}, err
	}
	if w == "" {
		if w, err = s.db.Setting(ctx, "resync_window"); errors.Is(err, store.ErrNotFound) {
			w = DefaultResyncWindow
		} else if err != nil {
			return resyncWindow{}, err
		}
	}
	return parseWindow(w)
}

// reconcileResyncs brings a machine's resync rows in step with its
// catalog entry m, the truth on whether a disk needs a resync, why, over
// which ranges, and when one is done (the job's done record applied). A
// row keeps only what the catalog does not know: the schedule (when, how
// often tried, the last error), who asked (an operator, a verify) and the
// progress. m is the newest view: news is coalesced, so no decision may
// rest on having seen a state in between.
func (s *Server) reconcileResyncs(ctx context.Context, m replication.MachineCatalog) error {
	s.resyncMu.Lock()
	defer s.resyncMu.Unlock()
	rows, err := s.db.Resyncs(ctx, m.ID)
	if err != nil {
		return err
	}
	byDisk := map[uint32]store.Resync{}
	for _, r := range rows {
		byDisk[r.Disk] = r
	}
	// schedule writes a scheduled row for a disk marked for resync, and
	// says so (once written: a failed write is tried again, whole).
	schedule := func(d replication.CatalogDisk, keep *store.Resync) error {
		r := store.Resync{MachineID: m.ID, Disk: d.Index, Reason: d.Reason, State: store.ResyncScheduled, RequestedAt: s.now()}
		if keep != nil { // who asked for it stays
			r.Manual, r.Verify, r.StartedAt = keep.Manual, keep.Verify, keep.StartedAt
		}
		if err := s.db.PutResync(ctx, r); err != nil {
			return err
		}
		s.raise(ctx, store.Event{MachineID: m.ID, Severity: "warning", Kind: "resync-needed",
			Message: fmt.Sprintf("disk %s needs a resync: %s", d.Name, d.Reason)})
		return nil
	}
	for _, d := range m.Disks {
		row, has := byDisk[d.Index]
		resync := d.State == replication.StateResync
		switch {
		case has && row.State == store.ResyncRunning && row.JobID != 0 && d.LastResync == row.JobID:
			// The job's done record is applied. The disk is consistent
			// again, unless it was marked again since.
			if resync {
				if err := schedule(d, nil); err != nil {
					return err
				}
			} else if err := s.db.DeleteResync(ctx, m.ID, d.Index); err != nil {
				return err
			}
			switch {
			case row.Verify && d.LastResyncSent == 0:
				s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "verify-done",
					Message: fmt.Sprintf("disk %s verified against the source: compared %d bytes, no difference", d.Name, d.LastResyncCompared)})
			case row.Verify:
				s.raise(ctx, store.Event{MachineID: m.ID, Severity: "warning", Kind: "verify-done",
					Message: fmt.Sprintf("disk %s verified against the source: compared %d bytes, %d bytes differed and were resent; the replica is consistent again", d.Name, d.LastResyncCompared, d.LastResyncSent)})
			default:
				s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "resync-done",
					Message: fmt.Sprintf("disk %s is consistent again: compared %d bytes, sent %d", d.Name, d.LastResyncCompared, d.LastResyncSent)})
			}
		case has && resync && m.LogStart > 0 && d.Reason == m.LogReason && row.Reason != d.Reason:
			// The agent started a new log: the whole disk is compared, by
			// the new agent, whatever an earlier resync was to compare (a
			// part of the disk) or was running (the old agent's job).
			if err := schedule(d, &row); err != nil {
				return err
			}
		case resync && !has && d.Reason != replication.OverflowReason:
			// (An overflow's resync is the agent's to end: OverflowReason.)
			if err := schedule(d, nil); err != nil {
				return err
			}
		case has && !row.Manual && row.State != store.ResyncRunning && d.State == replication.StateProtected:
			// Consistent again by other means (the agent resent its
			// overflow's changed blocks): nothing to schedule.
			if err := s.db.DeleteResync(ctx, m.ID, d.Index); err != nil {
				return err
			}
		case has && !row.Verify && row.State != store.ResyncRunning && resync && row.Reason != d.Reason:
			// More became due (a scrub found damage): the waiting job says
			// so (it takes its ranges from the catalog when it starts).
			row.Reason = d.Reason
			if err := s.db.PutResync(ctx, row); err != nil {
				return err
			}
		}
	}
	return nil
}

// resyncLoop starts the resyncs that are due.
func (s *Server) resyncLoop() {
	t := time.NewTicker(s.cfg.ResyncEvery)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		rows, err := s.db.Resyncs(s.ctx, "")
		if err != nil {
			continue
		}
		for _, r := range rows {
			if r.State == store.ResyncScheduled {
				s.startIfDue(s.ctx, r.MachineID, r.Disk)
			}
		}
		s.maybeScrub(s.ctx)
		s.loopTicks.Add(1)
		s.resyncHook("pass")
	}
}

// resyncHook, when set (tests only, before Run), is called at "attempt"
// (before a start of a scheduled resync takes resyncMu, or the operator's
// under it), "start" (before the job goes to the agent) and "pass" (after
// each pass of the loop).
func (s *Server) resyncHook(event string) {
	if h := s.resyncTestHook; h != nil {
		h(event)
	}
}

// startIfDue starts a disk's scheduled resync if it is due.
func (s *Server) startIfDue(ctx context.Context, machineID string, disk uint32) {
	s.resyncHook("attempt")
	s.resyncMu.Lock()
	defer s.resyncMu.Unlock()
	r, err := s.db.Resync(ctx, machineID, disk)
	if err != nil || r.State != store.ResyncScheduled {
		return // changed meanwhile
	}
	s.maybeStartResync(ctx, r)
}

// resyncBackoff is the wait before retry n (1-based) of a failed resync.
func resyncBackoff(n int) time.Duration {
	d := 30 * time.Second << min(n-1, 5)
	return min(d, 15*time.Minute)
}

// maxManualAttempts bounds the retries of an operator's resync.
const maxManualAttempts = 3

// maybeStartResync starts a scheduled resync if it is due (its window,
// its backoff). The process server takes the job's reason and ranges from
// the catalog. Caller holds resyncMu.
func (s *Server) maybeStartResync(ctx context.Context, r store.Resync) {
	now := s.now()
	m, err := s.db.Machine(ctx, r.MachineID)
	if err != nil || m.Unprotected() {
		return // an unprotected machine's rows are going (unprotect.go)
	}
	if s.reverseRunOf(m.ID) != nil {
		return // failback writes the source: compared once it is failed back
	}
	w, err := s.windowFor(ctx, m)
	if err != nil {
		s.log.Error("resync window", "machine", m.ID, "err", err)
		return
	}
	if !r.Manual && !w.contains(now) {
		return
	}
	if !r.NextTry.IsZero() && now.Before(r.NextTry) {
		return
	}
	job := replication.ResyncJob{ID: uint64(now.UnixNano()), Disk: r.Disk, Reason: r.Reason, Verify: r.Verify}
	s.resyncHook("start")
	// A scheduled row may lag behind the catalog (the mirror writes it
	// after the fact): one the scheduler made is started only while the
	// catalog still marks the disk, or a disk its done record just made
	// consistent would be compared whole again, without points meanwhile.
	err = s.startResync(ctx, m.ID, job, !r.Manual)
	if errors.Is(err, procserver.ErrResyncNotNeeded) {
		if err := s.db.DeleteResync(ctx, m.ID, r.Disk); err != nil {
			s.log.Error("drop a resync the catalog no longer needs", "machine", m.ID, "disk", r.Disk, "err", err)
		}
		s.log.Info("scheduled resync not needed any more: the disk is consistent", "machine", m.ID, "disk", r.Disk)
		return
	}
	if err == nil {
		r.State, r.JobID, r.StartedAt, r.LastError = store.ResyncRunning, job.ID, now, ""
		r.Compared, r.Sent, r.Total = 0, 0, 0
		if err := s.db.PutResync(ctx, r); err != nil {
			s.log.Error("the resync started but its row could not be saved; it may be started again", "machine", m.ID, "disk", r.Disk, "err", err)
		}
		s.log.Info("resync started", "machine", m.ID, "disk", r.Disk, "job", job.ID, "manual", r.Manual)
		return
	}
	r.Attempts++
	r.LastError = err.Error()
	r.NextTry = now.Add(resyncBackoff(r.Attempts))
	if (!r.Manual && !w.contains(r.NextTry)) || (r.Manual && r.Attempts >= maxManualAttempts) {
		r.State = store.ResyncFailed
		s.raise(ctx, store.Event{MachineID: m.ID, Severity: "error", Kind: "resync-failed",
			Message: fmt.Sprintf("resync of disk %d failed after %d attempts: %v; fix the cause and press Resync", r.Disk, r.Attempts, err)})
	}
	if err := s.db.PutResync(ctx, r); err != nil {
		s.log.Error("save a failed resync attempt", "machine", m.ID, "disk", r.Disk, "err", err)
	}
}

// noteResyncStatus records a running resync's progress from the agent (a
// job that is not the row's any more is left alone).
func (s *Server) noteResyncStatus(ctx context.Context, id string, st replication.ResyncStatus) error {
	s.resyncMu.Lock()
	defer s.resyncMu.Unlock()
	_, err := s.db.UpdateResyncProgress(ctx, id, st.Disk, st.Job, st.Total, st.Compared, st.Sent, st.Error)
	return err
}

// handleResync starts a resync of a machine's disks at once (an operator's
// request): of the disks that need one, with their reason and ranges; with
// ?disk or for a machine all of whose disks are consistent, a full compare.
func (s *Server) handleResync(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	m, err := s.findMachine(ctx, r)
	if err != nil {
		return err
	}
	var req api.ResyncRequest
	if r.ContentLength != 0 {
		if err := readJSON(r, &req); err != nil {
			return err
		}
	}
	out, err := s.RequestResync(ctx, m, req.Disk)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// RequestResync starts a resync of machine m's disk (every disk for "") at
// once, outside the resync window, as an operator asks from the API, the CLI
// or the console. A disk whose resync is running is left to it. Nothing is
// changed if any disk is refused.
func (s *Server) RequestResync(ctx context.Context, m store.Machine, disk string) ([]api.ResyncJSON, error) {
	if err := refuseUnprotected(m, "a resync"); err != nil {
		return nil, err
	}
	if s.reverseRunOf(m.ID) != nil {
		return nil, errorf(http.StatusConflict, "machine %s is reprotected: its original disks are being written by failback; it is resynced by asr reprotect after failback", m.Name)
	}
	var picked []store.Disk
	for _, d := range m.Disks {
		if disk == "" || d.Name == disk {
			picked = append(picked, d)
		}
	}
	if len(picked) == 0 {
		return nil, errorf(http.StatusNotFound, "machine %s has no disk %q", m.Name, disk)
	}
	for _, d := range picked {
		if d.State == replication.StateInitial {
			return nil, errorf(http.StatusConflict, "disk %s is still in its initial replication (%d%%); a resync is not needed",
				d.Name, d.Cursor*100/max(d.Size, 1))
		}
	}
	s.resyncMu.Lock()
	defer s.resyncMu.Unlock()
	out := []api.ResyncJSON{}
	for _, d := range picked {
		row, err := s.db.Resync(ctx, m.ID, d.Index)
		if errors.Is(err, store.ErrNotFound) {
			row = store.Resync{MachineID: m.ID, Disk: d.Index, Reason: "operator request", RequestedAt: s.now()}
		} else if err != nil {
			return nil, err
		}
		if row.State == store.ResyncRunning {
			out = append(out, s.resyncJSON(ctx, m, d, row))
			continue // already running
		}
		row.Manual, row.State, row.Attempts, row.NextTry, row.LastError = true, store.ResyncScheduled, 0, time.Time{}, ""
		if err := s.db.PutResync(ctx, row); err != nil {
			return nil, err
		}
		s.log.Info("resync requested", "machine", m.ID, "disk", d.Name, "reason", row.Reason)
		s.resyncHook("attempt")
		s.maybeStartResync(ctx, row)
		row, _ = s.db.Resync(ctx, m.ID, d.Index)
		out = append(out, s.resyncJSON(ctx, m, d, row))
	}
	return out, nil
}

func (s *Server) handleResyncs(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	m, err := s.findMachine(ctx, r)
	if err != nil {
		return err
	}
	out := []api.ResyncJSON{}
	for _, d := range m.Disks {
		if row, err := s.db.Resync(ctx, m.ID, d.Index); err == nil {
			out = append(out, s.resyncJSON(ctx, m, d, row))
		}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) resyncJSON(ctx context.Context, m store.Machine, d store.Disk, r store.Resync) api.ResyncJSON {
	j := api.ResyncJSON{Disk: d.Name, Reason: r.Reason, State: r.State, Manual: r.Manual, Attempts: r.Attempts,
		LastError: r.LastError, Total: r.Total, Compared: r.Compared, Sent: r.Sent}
	if at := s.resyncScheduled(ctx, m, r); !at.IsZero() {
		j.Scheduled = at.UTC().Format(time.RFC3339)
	}
	return j
}

// resyncScheduled is when a scheduled resync will start (zero if not
// scheduled).
func (s *Server) resyncScheduled(ctx context.Context, m store.Machine, r store.Resync) time.Time {
	if r.State != store.ResyncScheduled {
		return time.Time{}
	}
	at := s.now()
	if r.NextTry.After(at) {
		at = r.NextTry
	}
	if r.Manual {
		return at
	}
	w, err := s.windowFor(ctx, m)
	if err != nil {
		return time.Time{}
	}
	return w.next(at)
}

// handleResyncWindow sets the vault's resync window (PUT
// /api/v1/settings/resync-window {"window": "22:00-06:00"}) or a policy's
// (with "policy").
func (s *Server) handleResyncWindow(w http.ResponseWriter, r *http.Request) error {
	var req api.ResyncWindowRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	if req.Window != "" || req.Policy == "" {
		if _, err := parseWindow(req.Window); err != nil {
			return errorf(http.StatusBadRequest, "%v; nothing was changed", err)
		}
	}
	if req.Policy != "" {
		if _, err := s.db.Policy(r.Context(), req.Policy); err != nil {
			return errorf(http.StatusBadRequest, "no policy named %q; nothing was changed", req.Policy)
		}
		if err := s.db.SetResyncWindow(r.Context(), req.Policy, req.Window); err != nil {
			return err
		}
	} else if err := s.db.SetSetting(r.Context(), "resync_window", req.Window); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, req)
	return nil
}
