package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

func policyJSON(p replication.Policy) api.PolicyJSON {
	j := api.PolicyJSON{Name: p.Name, RPOThreshold: p.RPOThreshold.String(), Retention: p.Retention.String(),
		AppFrequency: p.AppFrequency.String(), CrashInterval: p.CrashInterval.String(), PITWindow: p.PITWindow.String(),
		FailbackOf: p.FailbackOf}
	if p.FailbackOf != "" {
		j.Notes = strings.Join(replication.FailbackNotes(), "; ")
	}
	return j
}

// applyPolicy overlays the fields set in j on p; a malformed duration is an error
// naming the field.
func applyPolicy(j api.PolicyJSON, p *replication.Policy) error {
	for _, f := range []struct {
		name string
		v    string
		dst  *time.Duration
	}{
		{"rpo_threshold", j.RPOThreshold, &p.RPOThreshold},
		{"retention", j.Retention, &p.Retention},
		{"app_frequency", j.AppFrequency, &p.AppFrequency},
		{"crash_interval", j.CrashInterval, &p.CrashInterval},
		{"pit_window", j.PITWindow, &p.PITWindow},
	} {
		if f.v == "" {
			continue
		}
		d, err := time.ParseDuration(f.v)
		if err != nil {
			return errorf(http.StatusBadRequest, "%s %q: not a duration (e.g. 15m, 4h, 0 for off)", f.name, f.v)
		}
		*f.dst = d
	}
	return nil
}

// ensureDefaultPolicy creates the default policy (and its failback twin) at
// the first start.
func (s *Server) ensureDefaultPolicy(ctx context.Context) error {
	_, err := s.db.Policy(ctx, "default")
	if errors.Is(err, store.ErrNotFound) {
		p := replication.DefaultPolicy()
		for _, q := range []replication.Policy{p, replication.DefaultFailbackPolicy(p.Name)} {
			if err := q.Validate(s.cfg.TargetTier); err != nil {
				return err
			}
		}
		return s.db.CreatePolicy(ctx, p)
	}
	return err
}

// policyFor gives the point schedule an agent gets when it connects.
func (s *Server) policyFor(id string) *replication.AgentPolicy {
	m, err := s.db.Machine(s.ctx, id)
	if err != nil {
		s.log.Error("policy of machine", "machine", id, "err", err)
		return nil
	}
	p, err := s.db.Policy(s.ctx, m.Policy)
	if err != nil {
		s.log.Error("policy of machine", "machine", id, "err", err)
		return nil
	}
	ap := agentPolicy(p)
	ap.Group = m.Group
	return &ap
}

func agentPolicy(p replication.Policy) replication.AgentPolicy {
	return replication.AgentPolicy{CrashInterval: int64(p.CrashInterval), AppFrequency: int64(p.AppFrequency)}
}

// pushPolicy sends a policy to the running agents it is assigned to.
func (s *Server) pushPolicy(ctx context.Context, p replication.Policy) {
	ids, err := s.db.MachinesWithPolicy(ctx, p.Name)
	if err != nil {
		s.log.Error("machines of policy", "policy", p.Name, "err", err)
		return
	}
	for _, id := range ids {
		if ap := s.policyFor(id); ap != nil {
			if err := s.ps.SendPolicy(id, *ap); err != nil {
				s.log.Warn("push policy", "machine", id, "err", err)
			}
		}
	}
}

func (s *Server) handlePolicies(w http.ResponseWriter, r *http.Request) error {
	ps, err := s.db.Policies(r.Context())
	if err != nil {
		return err
	}
	out := make([]api.PolicyJSON, len(ps))
	for i, p := range ps {
		out[i] = policyJSON(p)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) handlePolicy(w http.ResponseWriter, r *http.Request) error {
	p, err := s.db.Policy(r.Context(), chi.URLParam(r, "policy"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, policyJSON(p))
	return nil
}

// handleCreatePolicy creates a policy (starting from the defaults for the
// fields not given) and its failback twin.
func (s *Server) handleCreatePolicy(w http.ResponseWriter, r *http.Request) error {
	var j api.PolicyJSON
	if err := readJSON(r, &j); err != nil {
		return err
	}
	p, err := s.CreatePolicy(r.Context(), j)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, p)
	return nil
}

// CreatePolicy creates a policy (starting from the defaults for the
// fields not given) and its failback twin. A policy refused (a malformed
// duration, a rule broken: 400; a name taken: 409) creates nothing.
func (s *Server) CreatePolicy(ctx context.Context, j api.PolicyJSON) (api.PolicyJSON, error) {
	p := replication.DefaultPolicy()
	p.Name = j.Name
	if err := applyPolicy(j, &p); err != nil {
		return api.PolicyJSON{}, err
	}
	if err := p.Validate(s.cfg.TargetTier); err != nil {
		return api.PolicyJSON{}, errorf(http.StatusBadRequest, "%v; nothing was created", err)
	}
	if err := replication.DefaultFailbackPolicy(p.Name).Validate(s.cfg.TargetTier); err != nil {
		return api.PolicyJSON{}, errorf(http.StatusBadRequest, "its failback policy: %v; nothing was created", err)
	}
	if err := s.db.CreatePolicy(ctx, p); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return api.PolicyJSON{}, errorf(http.StatusConflict, "%v", err)
		}
		return api.PolicyJSON{}, err
	}
	s.log.Info("policy created", "policy", p.Name, "failback", replication.FailbackName(p.Name))
	return policyJSON(p), nil
}

// handleUpdatePolicy changes the given fields of a policy; running agents
// get the new schedule at once.
func (s *Server) handleUpdatePolicy(w http.ResponseWriter, r *http.Request) error {
	var j api.PolicyJSON
	if err := readJSON(r, &j); err != nil {
		return err
	}
	p, err := s.UpdatePolicy(r.Context(), chi.URLParam(r, "policy"), j)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, p)
	return nil
}

// UpdatePolicy changes the fields set in j of policy name (store.ErrNotFound
// if there is none) and sends the new schedule to the running agents it is
// assigned to. A change refused (a rename, a malformed duration, a rule
// broken: 400) changes nothing.
func (s *Server) UpdatePolicy(ctx context.Context, name string, j api.PolicyJSON) (api.PolicyJSON, error) {
	p, err := s.db.Policy(ctx, name)
	if err != nil {
		return api.PolicyJSON{}, err
	}
	if j.Name != "" && j.Name != p.Name {
		return api.PolicyJSON{}, errorf(http.StatusBadRequest, "a policy cannot be renamed (%q to %q); create a new one and assign it", p.Name, j.Name)
	}
	if err := applyPolicy(j, &p); err != nil {
		return api.PolicyJSON{}, err
	}
	if err := p.Validate(s.cfg.TargetTier); err != nil {
		return api.PolicyJSON{}, errorf(http.StatusBadRequest, "%v; nothing was changed", err)
	}
	if err := s.db.UpdatePolicy(ctx, p); err != nil {
		return api.PolicyJSON{}, err
	}
	s.pushPolicy(ctx, p)
	s.log.Info("policy changed", "policy", p.Name)
	return policyJSON(p), nil
}

// assignPolicy gives a machine a (forward) policy and sends it to its agent.
func (s *Server) assignPolicy(ctx context.Context, m store.Machine, policy string) error {
	p, err := s.db.Policy(ctx, policy)
	if err != nil {
		return errorf(http.StatusBadRequest, "no policy named %q; nothing was changed", policy)
	}
	if p.FailbackOf != "" {
		return errorf(http.StatusBadRequest, "%q is a failback policy (used when replicating back from the recovery site); assign %q instead", p.Name, p.FailbackOf)
	}
	if err := s.db.AssignPolicy(ctx, m.ID, p.Name); err != nil {
		return err
	}
	if ap := s.policyFor(m.ID); ap != nil {
		if err := s.ps.SendPolicy(m.ID, *ap); err != nil {
			s.log.Warn("push policy", "machine", m.ID, "err", err)
		}
	}
	return nil
}

func (s *Server) handleAssignPolicy(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	m, err := s.findMachine(ctx, r)
	if err != nil {
		return err
	}
	var req api.AssignRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	if err := s.assignPolicy(ctx, m, req.Policy); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.AssignJSON{Machine: m.Name, Policy: req.Policy})
	return nil
}

func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	id := ""
	if name := r.URL.Query().Get("machine"); name != "" {
		m, err := s.db.MachineByName(ctx, name)
		if err != nil {
			return err
		}
		id = m.ID
	}
	out, err := s.Events(ctx, id, 200)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// Events lists the newest events (of one machine unless machineID is ""),
// newest first, at most limit.
func (s *Server) Events(ctx context.Context, machineID string, limit int) ([]api.EventJSON, error) {
	es, err := s.db.Events(ctx, machineID, limit)
	if err != nil {
		return nil, err
	}
	names := map[string]string{}
	out := make([]api.EventJSON, len(es))
	for i, e := range es {
		if _, ok := names[e.MachineID]; !ok && e.MachineID != "" {
			if m, err := s.db.Machine(ctx, e.MachineID); err == nil {
				names[e.MachineID] = m.Name
			}
		}
		out[i] = api.EventJSON{Time: e.Time.UTC().Format(time.RFC3339Nano), Machine: names[e.MachineID],
			Severity: e.Severity, Kind: e.Kind, Message: e.Message}
	}
	return out, nil
}

// policyLoop prunes points older than the retention, on schedule (the
// RPO against each machine's threshold is the alert engine's: alerts.go).
func (s *Server) policyLoop() {
	t := time.NewTicker(s.cfg.PolicyEvery)
	defer t.Stop()
	lastPrune := time.Time{}
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		if now := s.now(); now.Sub(lastPrune) >= s.cfg.PruneEvery {
			lastPrune = now
			if err := s.prune(s.ctx); err != nil && s.ctx.Err() == nil {
				s.log.Error("retention pruning", "err", err)
			}
			if err := s.pruneReversePoints(s.ctx); err != nil && s.ctx.Err() == nil {
				s.log.Error("reverse points pruning", "err", err)
			}
		}
	}
}

// raise records an event, logged at its severity: info at INFO, warning
// at WARN, critical (and error) at ERROR.
func (s *Server) raise(ctx context.Context, e store.Event) {
	e.Time = s.now()
	level := slog.LevelWarn
	switch e.Severity {
	case api.SeverityInfo:
		level = slog.LevelInfo
	case api.SeverityCritical, "error":
		level = slog.LevelError
	}
	s.log.Log(ctx, level, "event", "machine", e.MachineID, "kind", e.Kind, "severity", e.Severity, "message", e.Message)
	if err := s.db.AddEvent(ctx, e); err != nil {
		s.log.Error("record event", "err", err)
	}
}

// pruneSegments deletes the kept segments no recovery to a time after
// windowStart needs: those wholly before the newest point at or before it
// (every such time starts from that point or a later one).
func (s *Server) pruneSegments(ctx context.Context, machineID string, windowStart time.Time) error {
	ps, err := s.cat.Points(ctx, machineID)
	if err != nil {
		return err
	}
	var cut *replication.Point
	for i := range ps {
		if !ps[i].Time.After(windowStart) {
			cut = &ps[i]
		}
	}
	if cut == nil {
		return nil
	}
	segs, err := s.cat.Segments(ctx, machineID)
	if err != nil {
		return err
	}
	for _, si := range segs {
		if si.Last > cut.Seq {
			break
		}
		if err := s.cat.DeleteSegment(ctx, si); err != nil {
			return err
		}
	}
	return nil
}

// prune deletes, for every machine, the points older than its policy's
// retention (the newest point is always kept), reclaiming their storage.
func (s *Server) prune(ctx context.Context) error {
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return err
	}
	held, err := s.db.HeldPoints(ctx)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, m := range ms {
		if m.Unprotected() {
			// Its points are frozen as they were when its protection
			// ended (unprotect.go): no new point would replace those
			// that age out.
			continue
		}
		p, err := s.db.Policy(ctx, m.Policy)
		if err != nil {
			return err
		}
		if _, ok := s.machineStats(m.ID); !ok {
			continue // never connected (or not reported yet): no applier, no points
		}
		if err := s.pruneSegments(ctx, m.ID, s.now().Add(-p.PITWindow)); err != nil {
			return fmt.Errorf("machine %s: %w", m.Name, err)
		}
		if s.assignedTo(m.ID) != "" {
			// Its scale-out process server prunes (a command in its
			// next heartbeat's reply): all such machines at once, not a
			// heartbeat's wait each in turn.
			wg.Go(func() {
				if _, n, err := s.prunePoints(ctx, m.ID, s.now().Add(-p.Retention), held[m.ID]); err != nil {
					s.log.Error("prune recovery points", "machine", m.ID, "err", err)
				} else if n > 0 {
					s.log.Info("recovery points pruned", "machine", m.ID, "count", n, "retention", p.Retention)
				}
			})
			continue
		}
		seqs, n, err := s.prunePoints(ctx, m.ID, s.now().Add(-p.Retention), held[m.ID])
		if err != nil {
			return fmt.Errorf("machine %s: %w", m.Name, err)
		}
		if n == 0 {
			continue
		}
		if err := s.db.DeletePoints(ctx, m.ID, seqs); err != nil {
			return err
		}
		s.log.Info("recovery points pruned", "machine", m.ID, "count", n, "retention", p.Retention)
	}
	return nil
}
