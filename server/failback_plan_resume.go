package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// A plan's (or replication group's) failback past its switch, resumable
// (docs/ARCHITECTURE.md, "Failback"): the switch of every machine and a
// record of what is left (pfRecord, store.PlanFailback, migration 0014)
// are written in one transaction; then, group by group in the plan's
// order, the group's pre actions, its machines' power-on, its post
// actions, the record's cursor (Next) written after each action done and
// each group powered on. A server restarted past the switch resumes the
// same job from the cursor (resumePlanFailbacks): the actions confirmed
// or run are not asked again, the one under way (a manual action not
// confirmed yet, a script cut short) is run again, and the groups after
// it power on in order. The record goes when the failback ends.

// pfVersion is the version of pfRecord's JSON.
const pfVersion = 1

// pfRecord is a plan failback's progress past its switch.
type pfRecord struct {
	V    int      `json:"v"`
	Kind string   `json:"kind"` // plan | group (fbSet.kind)
	Plan api.Plan `json:"plan"` // its groups and actions at the failback
	// Members are the machines switched, by the plan's group.
	Members [][]pfMember `json:"members"`
	Next    pfCursor     `json:"next"`
	// Failed are the steps that failed past the switch (an action, a
	// machine's power-on), the plan going on past them: the job fails
	// at its end, naming them.
	Failed []string `json:"failed,omitempty"`
}

// pfMember is a machine a plan's failback switched.
type pfMember struct {
	Machine  string `json:"machine"` // id
	Name     string `json:"name"`
	Failover string `json:"failover"`
	// VM is the recovered VM of a failover to vSphere or Azure ("VM N in
	// vCenter V"), left powered off: the job's output says so.
	VM string `json:"vm,omitempty"`
}

// pfCursor is the next thing to do: in group Group (0-based), phase
// "pre" (action Action next), "power", or "post" (action Action next).
type pfCursor struct {
	Group  int    `json:"group"`
	Phase  string `json:"phase"`
	Action int    `json:"action"`
}

func newPFRecord(x fbSet, members [][]*switchMember) *pfRecord {
	rec := &pfRecord{V: pfVersion, Kind: x.kind, Plan: x.p, Members: make([][]pfMember, len(members)), Next: pfCursor{Phase: "pre"}}
	for i, g := range members {
		for _, sm := range g {
			pm := pfMember{Machine: sm.m.ID, Name: sm.m.Name, Failover: sm.f.ID}
			if sm.vm != nil {
				pm.VM = sm.vm.String()
			}
			rec.Members[i] = append(rec.Members[i], pm)
		}
	}
	return rec
}

// row is the record's form in the store.
func (rec *pfRecord) row(jobID, subject string) (store.PlanFailback, error) {
	b, err := json.Marshal(rec)
	return store.PlanFailback{JobID: jobID, Subject: subject, Data: string(b)}, err
}

// decodePFRecord reads a stored record, refusing what it does not know.
func decodePFRecord(data string) (*pfRecord, error) {
	var rec pfRecord
	if err := json.Unmarshal([]byte(data), &rec); err != nil {
		return nil, err
	}
	if rec.V != pfVersion {
		return nil, fmt.Errorf("version %d, want %d", rec.V, pfVersion)
	}
	if rec.Kind != "plan" && rec.Kind != "group" || len(rec.Members) != len(rec.Plan.Groups) || len(rec.Members) > api.MaxPlanGroups {
		return nil, fmt.Errorf("a %q record of %d groups for %d", rec.Kind, len(rec.Members), len(rec.Plan.Groups))
	}
	switch rec.Next.Phase {
	case "pre", "power", "post":
	default:
		return nil, fmt.Errorf("phase %q", rec.Next.Phase)
	}
	if rec.Next.Group < 0 || rec.Next.Action < 0 {
		return nil, fmt.Errorf("next step: group %d, action %d", rec.Next.Group, rec.Next.Action)
	}
	return &rec, nil
}

// save writes the cursor; a failure is logged (the job goes on: a restart
// would repeat what was done since the last save).
func (s *Server) savePF(j *job, rec *pfRecord) {
	b, err := json.Marshal(rec)
	if err == nil {
		err = s.db.UpdatePlanFailback(context.WithoutCancel(s.ctx), j.id, string(b))
	}
	if err != nil {
		s.log.Error("failback: record a plan failback's progress", "job", j.id, "err", err)
	}
}

// planPowerOn powers the switched machines on, group by group in the
// plan's order from the record's cursor, each group's actions around its
// power-on, and ends the record. Past the switch nothing is undone, and a
// failure does not end the plan: an action that fails (a script's exit, a
// manual action cancelled) or a machine whose power-on fails is recorded
// in the record's Failed, the machine is finished in the background
// (finishLater), and the plan goes on in its order with its actions; the
// job fails at the end, naming every failure. A server stop leaves the
// record for the next start, the step under way to do again.
func (s *Server) planPowerOn(ctx context.Context, j *job, rec *pfRecord) ([]string, error) {
	// The job's cancel no longer stops it, a server stop does; the job's
	// own context still answers a manual action waiting (runPFActions).
	jctx := ctx
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)()
	x := fbSet{kind: rec.Kind, p: rec.Plan}
	actx := api.ActionContext{Plan: x.p.Name, Type: "failback", Direction: "recovery-to-primary", Machines: map[string]api.ActionMachine{}}
	var lines []string
	var sent, compared int64
	n := 0
	// finished adds a machine failed back (now or before a restart) to
	// the figures and to the actions' context.
	finished := func(pm pfMember, m store.Machine, f store.Failover) {
		d := decodeDetail(f)
		if d.Reverse != nil {
			sent, compared = sent+d.Reverse.Sent, compared+d.Reverse.Compared
			lines = append(lines, fmt.Sprintf("%s: failed back: %d bytes sent, %d bytes compared", pm.Name, d.Reverse.Sent, d.Reverse.Compared))
		}
		if pm.VM != "" {
			lines = append(lines, fmt.Sprintf("%s: the recovered %s stays powered off: remove it there once the original machine runs", pm.Name, pm.VM))
		}
		am := api.ActionMachine{To: "original"}
		if vm := s.sourceVM(ctx, m); vm != nil {
			am.VM = vm.Name
		}
		actx.Machines[pm.Name] = am
		n++
	}
	// failed records a failure past which the plan goes on; false when
	// the server is stopping (the step is done again at the next start).
	failed := func(err error) bool {
		if s.ctx.Err() != nil {
			return false
		}
		rec.Failed = append(rec.Failed, err.Error())
		s.log.Warn("failback: a plan's step failed past the switch; the plan goes on in its order", "job", j.id, "err", err)
		return true
	}
	// powerOn powers a machine on: "" when it is, else what failed (the
	// machine then finished in the background, left out of the actions'
	// context); stop when the server is stopping.
	powerOn := func(pm pfMember, m store.Machine, f store.Failover) (fail string, stop bool) {
		_, err := s.finishFailback(ctx, j, f, m)
		if err == nil {
			var ended store.Failover
			if ended, err = s.pfEnded(ctx, pm); err == nil {
				finished(pm, m, ended)
				return "", false
			}
		}
		if !failed(fmt.Errorf("machine %s: power on: %w (powered on in the background, out of the plan's order)", pm.Name, err)) {
			return "", true
		}
		s.finishLater(f, m)
		return rec.Failed[len(rec.Failed)-1], false
	}
	stopped := false
	for gi, g := range rec.Members {
		if len(g) == 0 || stopped {
			continue
		}
		if gi < rec.Next.Group || gi == rec.Next.Group && rec.Next.Phase == "post" {
			// Powered on before a restart (a failed one is finished in
			// the background again).
			for _, pm := range g {
				m, f, live, err := s.pfState(ctx, pm)
				switch {
				case err != nil:
					stopped = !failed(err)
				case live:
					s.finishLater(f, m)
				default:
					finished(pm, m, f)
				}
				if stopped {
					break
				}
			}
			if stopped {
				break
			}
			if gi < rec.Next.Group {
				continue
			}
		}
		if gi > rec.Next.Group {
			rec.Next = pfCursor{Group: gi, Phase: "pre"}
		}
		grp := x.p.Groups[gi]
		if rec.Next.Phase == "pre" {
			actx.Phase = "pre"
			if stopped = !s.runPFActions(ctx, jctx, j, rec, gi, grp.Pre, &actx, failed); stopped {
				break
			}
			rec.Next = pfCursor{Group: gi, Phase: "power"}
		}
		if rec.Next.Phase == "power" {
			done := j.step(fmt.Sprintf("group %d: power on", gi+1), machinesWord(len(g), "original"))
			var fails []string
			for _, pm := range g {
				m, f, live, err := s.pfState(ctx, pm)
				fail := ""
				switch {
				case err != nil:
					if stopped = !failed(err); !stopped {
						fail = rec.Failed[len(rec.Failed)-1]
					}
				case live:
					// Past the switch: finished now, or in the background.
					fail, stopped = powerOn(pm, m, f)
				default:
					finished(pm, m, f)
				}
				if stopped {
					break
				}
				if fail != "" {
					fails = append(fails, fail)
				}
			}
			if stopped {
				done("", errServerStopped)
				break
			}
			if len(fails) > 0 {
				done("", fmt.Errorf("%d of %d powered on: %s", len(g)-len(fails), len(g), strings.Join(fails, "; ")))
			} else {
				done(fmt.Sprintf("%d powered on", len(g)), nil)
			}
			rec.Next = pfCursor{Group: gi, Phase: "post"}
			s.savePF(j, rec)
		}
		actx.Phase = "post"
		if stopped = !s.runPFActions(ctx, jctx, j, rec, gi, grp.Post, &actx, failed); stopped {
			break
		}
		rec.Next = pfCursor{Group: gi + 1, Phase: "pre"}
		s.savePF(j, rec)
	}
	if stopped {
		return lines, errServerStopped // the record stays: the next start resumes
	}
	if err := s.db.DeletePlanFailback(context.WithoutCancel(ctx), j.id); err != nil {
		s.log.Error("failback: remove a plan failback's record", "job", j.id, "err", err)
	}
	head := fmt.Sprintf("%s failed back: %s, %d bytes sent, %d bytes compared; run asr reprotect %s to protect them again", x.label(), machinesWord(n, ""), sent, compared, x.flag())
	if len(rec.Failed) > 0 {
		head = fmt.Sprintf("%s failed back with failures past the switch (the plan went on in its order, with its actions): %s, %d bytes sent, %d bytes compared; %d failed", x.label(), machinesWord(n, ""), sent, compared, len(rec.Failed))
		for _, f := range rec.Failed {
			lines = append(lines, "failed: "+f)
		}
		return append([]string{head}, lines...), fmt.Errorf("past the switch, %s (the plan went on in its order, with its actions)", strings.Join(rec.Failed, "; "))
	}
	return append([]string{head}, lines...), nil
}

// runPFActions runs group gi's actions of actx.Phase that run on
// failback, from the cursor's, recording each one done or failed (failed
// says whether to go on); false when the server is stopping. A manual
// action waits on the job's context jctx: a cancel past the switch
// answers it (not done, recorded as failed), and the plan goes on.
func (s *Server) runPFActions(ctx, jctx context.Context, j *job, rec *pfRecord, gi int, as []api.PlanAction, actx *api.ActionContext, failed func(error) bool) bool {
	actx.Group = gi + 1
	for k := rec.Next.Action; k < len(as); k++ {
		if a := as[k]; a.RunsOn(true) {
			name := fmt.Sprintf("group %d %s %d", gi+1, actx.Phase, k+1)
			actCtx := ctx
			if a.Kind == "manual" {
				actCtx = jctx
			}
			err := s.runAction(actCtx, j, name, a, *actx)
			if err != nil && a.Kind == "manual" {
				err = fmt.Errorf("%s: manual action %q not confirmed: %w", name, a.Text, err)
			}
			if err != nil && !failed(err) {
				return false
			}
		}
		rec.Next = pfCursor{Group: gi, Phase: actx.Phase, Action: k + 1}
		s.savePF(j, rec)
	}
	rec.Next.Action = 0
	return true
}

// pfState returns a member's machine and failover: live (still to power
// on) or ended (failed back already: its ended record).
func (s *Server) pfState(ctx context.Context, pm pfMember) (store.Machine, store.Failover, bool, error) {
	m, err := s.db.Machine(ctx, pm.Machine)
	if err != nil {
		return m, store.Failover{}, false, fmt.Errorf("machine %s: %w", pm.Name, err)
	}
	if f, err := s.db.LiveFailover(ctx, pm.Machine); err == nil && f.ID == pm.Failover {
		return m, f, true, nil
	}
	f, err := s.pfEnded(ctx, pm)
	return m, f, false, err
}

// pfEnded returns a member's failover once failed back.
func (s *Server) pfEnded(ctx context.Context, pm pfMember) (store.Failover, error) {
	f, err := s.db.LatestFailover(ctx, pm.Machine)
	if err == nil && (f.ID != pm.Failover || f.State != store.FailoverEnded) {
		err = fmt.Errorf("its failover %s is neither live nor failed back (the newest is %s, %s)", pm.Failover, f.ID, f.State)
	}
	if err != nil {
		return f, fmt.Errorf("machine %s: %w", pm.Name, err)
	}
	return f, nil
}

// loadPlanFailbacks, at start before restoreFailovers, reads the plan
// failbacks a stop left past their switch and notes their machines (whose
// failbacks their job finishes, not restoreReverse). A record that cannot
// be read is reported and removed: its machines are then finished one by
// one, as before such records were kept.
func (s *Server) loadPlanFailbacks(ctx context.Context) (map[string]*pfRecord, error) {
	rows, err := s.db.PlanFailbacks(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]*pfRecord{}
	s.rv.planOwned = map[string]bool{}
	for _, r := range rows {
		rec, err := decodePFRecord(r.Data)
		if err != nil {
			s.raise(ctx, store.Event{Severity: "error", Kind: "failback-plan-record",
				Message: fmt.Sprintf("the record of %s's failback (job %s) past its switch is unreadable (%v): its machines are finished one by one, without the plan's order and actions", r.Subject, r.JobID, err)})
			if err := s.db.DeletePlanFailback(ctx, r.JobID); err != nil {
				return nil, err
			}
			continue
		}
		for _, g := range rec.Members {
			for _, pm := range g {
				s.rv.planOwned[pm.Machine] = true
			}
		}
		out[r.JobID] = rec
	}
	return out, nil
}

// resumePlanFailbacks, at start after restoreFailovers, resumes each plan
// failback a stop left past its switch, in the job that started it.
func (s *Server) resumePlanFailbacks(ctx context.Context, recs map[string]*pfRecord) error {
	for id, rec := range recs {
		x := fbSet{kind: rec.Kind, p: rec.Plan}
		var names []string
		for _, g := range rec.Members {
			for _, pm := range g {
				names = append(names, pm.Name)
			}
		}
		fn := func(ctx context.Context, j *job) error {
			start := time.Now()
			done := j.step("resume", "the server restarted past the switch: the remaining groups power on in the plan's order, with their actions")
			done(fmt.Sprintf("from group %d (%s)", rec.Next.Group+1, rec.Next.Phase), nil)
			lines, err := s.planPowerOn(ctx, j, rec)
			j.setResult(lines, time.Since(start))
			return err
		}
		s.rv.startMu.Lock()
		_, err := s.registerPlanJob(x, names, func(wrap func(context.Context, *job) error) (api.Job, error) {
			jr, err := s.db.Job(ctx, id)
			if errors.Is(err, store.ErrNotFound) {
				// The job's row is gone: a new one under its id.
				if err = s.db.AddJob(ctx, store.Job{ID: id, Kind: "failback", Subject: x.label()}); err == nil {
					jr, err = s.db.Job(ctx, id)
				}
			}
			if err != nil {
				return api.Job{}, err
			}
			return s.resumeJob(ctx, jr, wrap)
		}, fn)
		s.rv.startMu.Unlock()
		if err != nil {
			return fmt.Errorf("resume the failback of %s (job %s): %w", x.label(), id, err)
		}
		s.log.Info("failback: resumed past the switch", "job", id, "set", x.label(), "next", fmt.Sprintf("group %d %s", rec.Next.Group+1, rec.Next.Phase), "machines", strings.Join(names, ","))
	}
	return nil
}
