package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Recovery plans: ordered groups of machines that fail over together, with
// pre and post actions per group. A plan's failover (test, planned or not)
// is one job: for each group in order, its pre actions, then its machines
// in parallel (failoverMachines), then its post actions; the next group
// starts when every machine of this one has started. A script action runs
// on the server with the JSON context (api.ActionContext) on its standard
// input and fails the plan if it fails; a manual action pauses the job
// until an operator confirms it (console, `asr job confirm ID`).

var planNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

const (
	// scriptTimeout bounds a plan's script; scriptOutput the output kept.
	scriptTimeout = 30 * time.Minute
	scriptOutput  = 64 << 10
	// minDrillEvery bounds how often a plan's drill may be scheduled.
	minDrillEvery = time.Hour
	maxActions    = 16
)

// checkPlan validates a plan definition against the machines there are.
func (s *Server) checkPlan(ctx context.Context, p *api.Plan) error {
	if !planNameRE.MatchString(p.Name) {
		return errorf(http.StatusBadRequest, "plan name %q: use 1 to 64 letters, digits, '.', '_' or '-'", p.Name)
	}
	if len(p.Groups) == 0 || len(p.Groups) > api.MaxPlanGroups {
		return errorf(http.StatusBadRequest, "a plan has 1 to %d groups, not %d", api.MaxPlanGroups, len(p.Groups))
	}
	seen := map[string]int{}
	for i, g := range p.Groups {
		if len(g.Machines) == 0 {
			return errorf(http.StatusBadRequest, "group %d has no machines", i+1)
		}
		for _, name := range g.Machines {
			if prev, ok := seen[name]; ok {
				return errorf(http.StatusBadRequest, "machine %s is in groups %d and %d: a machine is in one group", name, prev, i+1)
			}
			seen[name] = i + 1
			if _, err := s.db.MachineByName(ctx, name); err != nil {
				if errors.Is(err, store.ErrNotFound) {
					return errorf(http.StatusBadRequest, "group %d: no machine named %q", i+1, name)
				}
				return err
			}
		}
		if len(g.Pre)+len(g.Post) > maxActions {
			return errorf(http.StatusBadRequest, "group %d: at most %d actions", i+1, maxActions)
		}
		for _, a := range append(append([]api.PlanAction(nil), g.Pre...), g.Post...) {
			switch a.Kind {
			case "script":
				if !filepath.IsAbs(a.Path) {
					return errorf(http.StatusBadRequest, "group %d: script %q: give an absolute path on the server", i+1, a.Path)
				}
				st, err := os.Stat(a.Path)
				if err != nil || !st.Mode().IsRegular() || st.Mode()&0o111 == 0 {
					return errorf(http.StatusBadRequest, "group %d: script %s is not an executable file on the server", i+1, a.Path)
				}
			case "manual":
				if strings.TrimSpace(a.Text) == "" || len(a.Text) > 1000 {
					return errorf(http.StatusBadRequest, "group %d: a manual action needs a text (up to 1000 bytes)", i+1)
				}
			default:
				return errorf(http.StatusBadRequest, "group %d: action kind %q: want script or manual", i+1, a.Kind)
			}
			switch a.On {
			case "", api.ActionOnFailover, api.ActionOnFailback:
			default:
				return errorf(http.StatusBadRequest, "group %d: an action runs on %q or %q (or both: leave it empty), not %q", i+1, api.ActionOnFailover, api.ActionOnFailback, a.On)
			}
		}
	}
	if d := p.Drill; d != nil {
		if time.Duration(d.EverySeconds*float64(time.Second)) < minDrillEvery {
			return errorf(http.StatusBadRequest, "a drill runs at most every %s", minDrillEvery)
		}
		req := api.FailoverRequest{Plan: p.Name, Test: true, To: api.ToQEMU, BootCheck: d.BootCheck, BootPort: d.BootPort, BootTimeout: d.TimeoutSeconds}
		if err := checkFailoverRequest(&req); err != nil {
			return err
		}
	}
	return nil
}

func planFromRow(r store.Plan) (api.Plan, error) {
	var p api.Plan
	if err := json.Unmarshal([]byte(r.Data), &p); err != nil {
		return p, fmt.Errorf("plan %s: %w", r.Name, err)
	}
	p.Name, p.Created, p.LastDrill = r.Name, r.CreatedAt, r.LastDrill
	return p, nil
}

// CreatePlan stores a new plan (replace: replaces an existing one).
func (s *Server) CreatePlan(ctx context.Context, p api.Plan, replace bool) (api.Plan, error) {
	if err := s.checkPlan(ctx, &p); err != nil {
		return p, err
	}
	data, _ := json.Marshal(api.Plan{Groups: p.Groups, Drill: p.Drill})
	err := s.db.PutPlan(ctx, store.Plan{Name: p.Name, Data: string(data)}, replace)
	if errors.Is(err, store.ErrConflict) {
		return p, errorf(http.StatusConflict, "a plan named %s exists", p.Name)
	}
	if err != nil {
		return p, err
	}
	return s.Plan(ctx, p.Name)
}

// Plan returns a plan.
func (s *Server) Plan(ctx context.Context, name string) (api.Plan, error) {
	r, err := s.db.GetPlan(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return api.Plan{}, errorf(http.StatusNotFound, "no plan named %q", name)
	}
	if err != nil {
		return api.Plan{}, err
	}
	return planFromRow(r)
}

// Plans lists the plans.
func (s *Server) Plans(ctx context.Context) ([]api.Plan, error) {
	rs, err := s.db.Plans(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Plan, 0, len(rs))
	for _, r := range rs {
		p, err := planFromRow(r)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// DeletePlan deletes a plan; a plan with a live failover is kept.
func (s *Server) DeletePlan(ctx context.Context, name string) error {
	ms, err := s.planMachines(ctx, name)
	if err != nil {
		return err
	}
	for _, m := range ms {
		if f, err := s.db.LiveFailover(ctx, m.ID); err == nil && f.Plan == name {
			return errorf(http.StatusConflict, "plan %s has a live %s (%s): clean it up or commit it first", name, kindWord(f.Kind), m.Name)
		}
	}
	return s.db.DeletePlan(ctx, name)
}

// planMachines returns the machines of a plan, in plan order.
func (s *Server) planMachines(ctx context.Context, name string) ([]store.Machine, error) {
	p, err := s.Plan(ctx, name)
	if err != nil {
		return nil, err
	}
	var out []store.Machine
	for i, g := range p.Groups {
		for _, n := range g.Machines {
			m, err := s.db.MachineByName(ctx, n)
			if err != nil {
				return nil, fmt.Errorf("plan %s group %d: machine %s: %w", name, i+1, n, err)
			}
			out = append(out, m)
		}
	}
	return out, nil
}

// startPlanFailover runs a failover of a whole plan as one job.
func (s *Server) startPlanFailover(ctx context.Context, req api.FailoverRequest) (api.Job, error) {
	p, err := s.Plan(ctx, req.Plan)
	if err != nil {
		return api.Job{}, err
	}
	if req.Point != "" && req.Point != "latest" && req.Point != "latest-app" {
		return api.Job{}, errorf(http.StatusBadRequest, "a plan fails over at latest, latest-app or a time, not at one machine's point %q", req.Point)
	}
	// Every member is checked before anything starts.
	groups := make([][]foTarget, len(p.Groups))
	for i, g := range p.Groups {
		for _, name := range g.Machines {
			m, err := s.db.MachineByName(ctx, name)
			if err != nil {
				return api.Job{}, fmt.Errorf("plan %s: machine %s: %w", p.Name, name, err)
			}
			t, err := s.failoverTarget(ctx, m, req, "")
			if err != nil {
				return api.Job{}, err
			}
			groups[i] = append(groups[i], t)
		}
	}
	return s.startJob(ctx, "plan-"+jobKind(req), "plan "+p.Name, func(ctx context.Context, j *job) error {
		start := time.Now()
		lines, err := s.runPlan(ctx, j, p, groups, req)
		j.setResult(lines, time.Since(start))
		return err
	})
}

func failoverType(req api.FailoverRequest) string {
	switch {
	case req.Test:
		return "test"
	case req.Planned:
		return "planned"
	}
	return "unplanned"
}

func (s *Server) runPlan(ctx context.Context, j *job, p api.Plan, groups [][]foTarget, req api.FailoverRequest) ([]string, error) {
	actx := api.ActionContext{Plan: p.Name, Type: failoverType(req), Direction: "primary-to-recovery", Machines: map[string]api.ActionMachine{}}
	var all []string
	for i, g := range p.Groups {
		n := i + 1
		actx.Phase = "pre"
		if err := s.runActions(ctx, j, n, g.Pre, &actx, false); err != nil {
			return all, err
		}
		// A plan's points are resolved when its group starts: a later
		// group fails over at a point as recent as its turn allows.
		ts := groups[i]
		if !req.Planned && req.Time == nil {
			for k := range ts {
				t, err := s.failoverTarget(ctx, ts[k].m, req, "")
				if err != nil {
					return all, fmt.Errorf("group %d: %w", n, err)
				}
				ts[k] = t
			}
		}
		done := j.step(fmt.Sprintf("group %d", n), fmt.Sprintf("%d machines fail over", len(ts)))
		lines, err := s.failoverMachines(ctx, j, ts, req, p.Name, true)
		all = append(all, lines...)
		done(fmt.Sprintf("%d machines started", len(ts)), err)
		if err != nil {
			return all, fmt.Errorf("group %d: %w", n, err)
		}
		for _, t := range ts {
			am := api.ActionMachine{To: req.To, Point: t.point.ID}
			if f, err := s.db.LiveFailover(ctx, t.m.ID); err == nil {
				v := s.failoverView(ctx, f)
				am.Point, am.Exports, am.VM = v.Point, v.Exports, v.VM
			}
			actx.Machines[t.m.Name] = am
		}
		actx.Phase = "post"
		if err := s.runActions(ctx, j, n, g.Post, &actx, false); err != nil {
			return all, err
		}
	}
	return all, nil
}

// runActions runs group n's actions of actx.Phase that run in the plan's
// direction (failback or failover), in order; the first that fails ends
// them. Each is a step of the job, numbered as in the plan.
func (s *Server) runActions(ctx context.Context, j *job, n int, as []api.PlanAction, actx *api.ActionContext, failback bool) error {
	actx.Group = n
	for k, a := range as {
		if !a.RunsOn(failback) {
			continue
		}
		if err := s.runAction(ctx, j, fmt.Sprintf("group %d %s %d", n, actx.Phase, k+1), a, *actx); err != nil {
			return err
		}
	}
	return nil
}

// runAction runs one of a plan's actions as a step of its job.
func (s *Server) runAction(ctx context.Context, j *job, name string, a api.PlanAction, actx api.ActionContext) error {
	switch a.Kind {
	case "manual":
		done := j.step(name, "manual: "+a.Text)
		err := j.waitConfirm(ctx, a.Text)
		done("confirmed", err)
		return err
	case "script":
		done := j.step(name, "script "+a.Path)
		out, err := s.runScript(ctx, a.Path, actx)
		if err != nil {
			done("", fmt.Errorf("%w; output: %s", err, out))
			return fmt.Errorf("%s: script %s: %w", name, a.Path, err)
		}
		done("ok: "+out, nil)
		return nil
	}
	return fmt.Errorf("%s: unknown action %q", name, a.Kind)
}

// runScript runs a plan's script with the context on its standard input;
// it returns the tail of its output.
func (s *Server) runScript(ctx context.Context, path string, actx api.ActionContext) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, scriptTimeout)
	defer cancel()
	in, _ := json.Marshal(actx)
	cmd := exec.CommandContext(ctx, path)
	cmd.Stdin = bytes.NewReader(in)
	cmd.Env = append(os.Environ(), "ASR_PLAN="+actx.Plan, fmt.Sprintf("ASR_GROUP=%d", actx.Group), "ASR_PHASE="+actx.Phase, "ASR_FAILOVER_TYPE="+actx.Type, "ASR_DIRECTION="+actx.Direction)
	var out tailBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	return strings.TrimSpace(out.String()), err
}

// tailBuffer keeps the last scriptOutput bytes written to it.
type tailBuffer struct{ b []byte }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > scriptOutput {
		t.b = append(t.b[:0], t.b[len(t.b)-scriptOutput:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return string(t.b) }

// drillLoop runs the plans' scheduled drills when they are due.
func (s *Server) drillLoop() {
	t := time.NewTicker(s.cfg.DrillCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		ps, err := s.Plans(s.ctx)
		if err != nil {
			continue
		}
		for _, p := range ps {
			if p.Drill == nil || s.now().Sub(p.LastDrill) < time.Duration(p.Drill.EverySeconds*float64(time.Second)) {
				continue
			}
			s.runScheduledDrill(p)
		}
	}
}

// runScheduledDrill runs a plan's drill and reports it as an event.
func (s *Server) runScheduledDrill(p api.Plan) {
	ctx := s.ctx
	if err := s.db.SetPlanDrill(ctx, p.Name, s.now()); err != nil {
		return
	}
	req := api.FailoverRequest{Plan: p.Name, Test: true, To: api.ToQEMU, BootCheck: p.Drill.BootCheck, BootPort: p.Drill.BootPort, BootTimeout: p.Drill.TimeoutSeconds}
	j, err := s.StartFailover(ctx, req)
	if err == nil {
		j, err = s.awaitJob(ctx, j.ID)
	}
	if err == nil && j.State != api.JobSucceeded {
		err = errors.New(j.Error)
	}
	if err != nil {
		s.raise(ctx, store.Event{Severity: "error", Kind: "drill-failed",
			Message: fmt.Sprintf("scheduled drill of plan %s failed: %v (job %s)", p.Name, err, j.ID)})
		return
	}
	s.raise(ctx, store.Event{Severity: "info", Kind: "drill-passed",
		Message: fmt.Sprintf("scheduled drill of plan %s passed: every machine booted (RTO %.1fs, job %s)", p.Name, j.RTO, j.ID)})
}

// awaitJob waits until a job ends.
func (s *Server) awaitJob(ctx context.Context, id string) (api.Job, error) {
	version := ""
	for {
		j, err := s.waitJob(ctx, id, version)
		if err != nil || j.State != api.JobRunning {
			return j, err
		}
		version = api.JobVersion(j)
	}
}

func (s *Server) handlePlans(w http.ResponseWriter, r *http.Request) error {
	ps, err := s.Plans(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ps)
	return nil
}

func (s *Server) handlePlan(w http.ResponseWriter, r *http.Request) error {
	p, err := s.Plan(r.Context(), chi.URLParam(r, "plan"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, p)
	return nil
}

func (s *Server) handleCreatePlan(w http.ResponseWriter, r *http.Request) error {
	var p api.Plan
	if err := readJSON(r, &p); err != nil {
		return err
	}
	p, err := s.CreatePlan(r.Context(), p, r.Method == http.MethodPut)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, p)
	return nil
}

func (s *Server) handleDeletePlan(w http.ResponseWriter, r *http.Request) error {
	if err := s.DeletePlan(r.Context(), chi.URLParam(r, "plan")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
