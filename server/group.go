package server

import (
	"context"
	"errors"
	"net/http"
	"sort"
	"strconv"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Replication groups (multi-VM consistency): the machines of a group share
// their crash- and application-consistent points. The server makes them:
// each is a cut across the members, whichever process servers serve them
// (cutAcross, groupcut.go), on the schedule of the members' policies (the
// shortest interval among them), or on request. Members' agents then
// schedule no points of their own.

// holdWait bounds how long the group waits for every member to hold its
// writes; an application-consistent cut also waits for the freezes.
const holdWait = 3 * time.Second

func (s *Server) handleSetGroup(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	m, err := s.findMachine(ctx, r)
	if err != nil {
		return err
	}
	var req api.GroupRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	if err := s.setGroup(ctx, m, req.Group); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]string{"machine": m.Name, "group": req.Group})
	return nil
}

// setGroup puts a machine in a replication group ("" takes it out) and
// sends its agent the new schedule. A bad name or an unprotected machine
// changes nothing.
func (s *Server) setGroup(ctx context.Context, m store.Machine, group string) error {
	if err := refuseUnprotected(m, "a replication group"); err != nil {
		return err
	}
	if group != "" && !replication.ValidGroupName(group) {
		return errorf(http.StatusBadRequest, "group name %q: 1 to 64 letters, digits, '.', '_' or '-'; nothing was changed", group)
	}
	if err := s.db.SetGroup(ctx, m.ID, group); err != nil {
		return err
	}
	if p := s.policyFor(m.ID); p != nil {
		if err := s.ps.SendPolicy(m.ID, *p); err != nil {
			s.log.Warn("push policy", "machine", m.ID, "err", err)
		}
	}
	return nil
}

// groupMembers returns the machines of each group.
func (s *Server) groupMembers(ctx context.Context) (map[string][]store.Machine, error) {
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return nil, err
	}
	groups := map[string][]store.Machine{}
	for _, m := range ms {
		if m.Group != "" && !m.Unprotected() {
			groups[m.Group] = append(groups[m.Group], m)
		}
	}
	return groups, nil
}

// groupCut makes a group point now and records it. Cuts run one at a time:
// two cuts holding different members at once would wait on each other.
func (s *Server) groupCut(ctx context.Context, group string, app bool) (replication.GroupPoint, error) {
	s.cutMu.Lock()
	defer s.cutMu.Unlock()
	groups, err := s.groupMembers(ctx)
	if err != nil {
		return replication.GroupPoint{}, err
	}
	members := groups[group]
	if len(members) == 0 {
		return replication.GroupPoint{}, errorf(http.StatusNotFound, "no machine is in group %q", group)
	}
	// The members on the built-in process server, and those on scale-out
	// ones (cutAcross coordinates them).
	var local []string
	remote := map[string]string{}
	for _, m := range members {
		if ps := s.assignedTo(m.ID); ps != "" {
			remote[m.ID] = ps
		} else {
			local = append(local, m.ID)
		}
	}
	wait := holdWait
	if app {
		wait += 15 * time.Second // pre-freeze scripts and freezes first
	}
	cut, points, err := s.cutAcross(ctx, local, remote, app, wait)
	if err != nil {
		return replication.GroupPoint{}, err
	}
	gp := replication.GroupPoint{Kind: replication.PointApp, Members: map[string]string{}, Cut: cut}
	for id, p := range points {
		gp.Members[id] = p.ID
		if p.Time.After(gp.Time) {
			gp.Time = p.Time
		}
		if p.Kind != replication.PointApp {
			gp.Kind = replication.PointCrash
		}
	}
	// The group point's id: the cut's request id is in every member's tag
	// record; a stable, sortable id is the time of the cut.
	gp.ID = strconv.FormatInt(gp.Time.UnixNano(), 10)
	if err := s.cat.PutGroupPoint(ctx, group, gp); err != nil {
		return gp, err
	}
	return gp, nil
}

func (s *Server) groupPointJSON(ctx context.Context, gp replication.GroupPoint) api.GroupPointJSON {
	return api.GroupPointOf(gp, func(id string) string {
		if m, err := s.db.Machine(ctx, id); err == nil {
			return m.Name
		}
		return id
	})
}

func (s *Server) handleGroupTag(w http.ResponseWriter, r *http.Request) error {
	var req api.TagRequest
	if r.ContentLength != 0 {
		if err := readJSON(r, &req); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	gp, err := s.groupCut(ctx, chi.URLParam(r, "group"), req.App)
	if err != nil {
		var ae *apiError
		if errors.As(err, &ae) || errors.Is(err, procserver.ErrNotConnected) {
			return err
		}
		return errorf(http.StatusConflict, "%v", err)
	}
	writeJSON(w, http.StatusOK, s.groupPointJSON(r.Context(), gp))
	return nil
}

func (s *Server) handleGroupPoints(w http.ResponseWriter, r *http.Request) error {
	gps, err := s.cat.GroupPoints(r.Context(), chi.URLParam(r, "group"))
	if err != nil {
		return err
	}
	out := make([]api.GroupPointJSON, len(gps))
	for i, gp := range gps {
		out[i] = s.groupPointJSON(r.Context(), gp)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// groupLoop makes each group's scheduled points: crash-consistent at the
// shortest crash interval among the members' policies, application-
// consistent at the shortest application-consistent frequency.
func (s *Server) groupLoop() {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	lastCrash, lastApp := map[string]time.Time{}, map[string]time.Time{}
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		groups, err := s.groupMembers(s.ctx)
		if err != nil {
			continue
		}
		names := make([]string, 0, len(groups))
		for g := range groups {
			names = append(names, g)
		}
		sort.Strings(names)
		now := time.Now()
		for _, g := range names {
			crash, app, ready := s.groupSchedule(s.ctx, groups[g])
			if _, ok := lastCrash[g]; !ok || !ready {
				lastCrash[g], lastApp[g] = now, now
				continue
			}
			appDue := app > 0 && now.Sub(lastApp[g]) >= app
			if now.Sub(lastCrash[g]) < crash && !appDue {
				continue
			}
			lastCrash[g] = now
			if appDue {
				lastApp[g] = now
			}
			ctx, cancel := context.WithTimeout(s.ctx, time.Minute)
			if _, err := s.groupCut(ctx, g, appDue); err != nil && s.ctx.Err() == nil {
				s.raise(s.ctx, store.Event{Severity: "warning", Kind: "group-point-failed",
					Message: "replication group " + g + ": no group point: " + err.Error()})
			}
			cancel()
		}
	}
}

// groupSchedule gives a group's crash interval and app frequency, and
// whether every member is protected and connected (points only then).
func (s *Server) groupSchedule(ctx context.Context, members []store.Machine) (crash, app time.Duration, ready bool) {
	ready = true
	for _, m := range members {
		p, err := s.db.Policy(ctx, m.Policy)
		if err != nil {
			return 0, 0, false
		}
		if crash == 0 || p.CrashInterval < crash {
			crash = p.CrashInterval
		}
		if p.AppFrequency > 0 && (app == 0 || p.AppFrequency < app) {
			app = p.AppFrequency
		}
		st, ok := s.machineStats(m.ID) // on any process server
		ready = ready && ok && st.Connected
		for _, d := range m.Disks {
			ready = ready && d.State == replication.StateProtected
		}
	}
	return crash, app, ready
}
