package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Failback of a recovery plan (docs/ARCHITECTURE.md, "Failback"):
//
//   - asr reprotect --plan P reprotects, in one job and in plan order,
//     every machine of P that P's committed failover failed over (toward
//     the original disks), or, after P's failback, protects them forward
//     again (checksum resyncs). A machine that cannot be reprotected
//     refuses the whole plan with the reason, and nothing starts.
//   - asr failback --plan P is one job: the failed-over machines are
//     stopped group by group, the plan's last group first (as ASR shuts a
//     plan's recovered machines down), then every machine is drained and
//     every original disk compared with its export, and only then are they
//     all switched, in one transaction; the original machines power on in
//     the plan's order. So a replication group's members (all in the plan,
//     or the plan is refused) switch back at one consistent moment: none
//     of them writes on either side between the first stop and the last
//     switch. Cancellable until the switch; a cancel lets every
//     failed-over machine run on, still reprotected.
//
// A plan's failback runs each group's pre actions (those that run on
// failback, api.PlanAction.RunsOn) before the group's original machines
// power on and its post actions after, with the direction
// "recovery-to-primary"; they run past the switch, so an action that fails
// fails the job and the groups after it are finished in the background
// without their actions (a power-on failure does the same). A plan whose
// failback a restart finishes past the switch does not run them.

// fbSet is what a reprotect or failback of several machines at once acts
// on: a recovery plan (its groups in order, its actions), or a replication
// group (asr reprotect|failback --group G: one group of its members, no
// actions), whose members fail back together, switched at one consistent
// moment.
type fbSet struct {
	kind string   // "plan" or "group"
	p    api.Plan // a group's: named after it, one group of its members
}

// label names the set in messages: "plan app", "group rg".
func (x fbSet) label() string { return x.kind + " " + x.p.Name }

// flag is the set's command-line flag: "--plan app", "--group rg".
func (x fbSet) flag() string { return "--" + x.kind + " " + x.p.Name }

// owns reports whether a failover is the set's to fail back: one the plan
// made; for a group, one no plan made (of the group, or of a member by
// itself).
func (x fbSet) owns(f store.Failover) bool {
	if x.kind == "plan" {
		return f.Plan == x.p.Name
	}
	return f.Plan == ""
}

// ownsWhat says which failovers the set fails back.
func (x fbSet) ownsWhat() string {
	if x.kind == "plan" {
		return "made by plan " + x.p.Name
	}
	return "made by asr failover --group or --machine (not by a plan)"
}

// planSet is a recovery plan's set.
func (s *Server) planSet(ctx context.Context, plan string) (fbSet, error) {
	p, err := s.Plan(ctx, plan)
	return fbSet{kind: "plan", p: p}, err
}

// groupSet is a replication group's set: its members, by name.
func (s *Server) groupSet(ctx context.Context, group string) (fbSet, error) {
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return fbSet{}, err
	}
	var names []string
	for _, m := range ms {
		if m.Group == group {
			names = append(names, m.Name)
		}
	}
	if group == "" || len(names) == 0 {
		return fbSet{}, errorf(http.StatusNotFound, "no replication group named %q", group)
	}
	slices.Sort(names)
	return fbSet{kind: "group", p: api.Plan{Name: group, Groups: []api.PlanGroup{{Machines: names}}}}, nil
}

// planMachineGroups returns a plan's machines by group, in plan order.
func (s *Server) planMachineGroups(ctx context.Context, p api.Plan) ([][]store.Machine, error) {
	out := make([][]store.Machine, len(p.Groups))
	for i, g := range p.Groups {
		for _, n := range g.Machines {
			m, err := s.db.MachineByName(ctx, n)
			if err != nil {
				return nil, fmt.Errorf("plan %s group %d: machine %s: %w", p.Name, i+1, n, err)
			}
			out[i] = append(out[i], m)
		}
	}
	return out, nil
}

// groupPartnersFailedOver returns the names of the members of m's
// replication group, other than m and those in with, that are failed over
// and not switched back yet.
func (s *Server) groupPartnersFailedOver(ctx context.Context, m store.Machine, with map[string]bool) ([]string, error) {
	if m.Group == "" {
		return nil, nil
	}
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, o := range ms {
		if o.ID == m.ID || o.Group != m.Group || with[o.Name] {
			continue
		}
		f, err := s.db.LiveFailover(ctx, o.ID)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if d := decodeDetail(f); f.Kind == api.FailoverReal && (d.Reverse == nil || d.Reverse.State == dirReprotected) {
			out = append(out, o.Name)
		}
	}
	slices.Sort(out)
	return out, nil
}

// refuseGroupAlone refuses the failback of one machine of a replication
// group while other members are failed over: the group's points are cuts
// across its members, and failing them back one at a time would put the
// original machines back at different moments (one running on premises
// while another still runs failed over), which is not a consistent state
// of the group. They fail back together: asr failback --group G, or
// through a plan that holds them all.
func (s *Server) refuseGroupAlone(ctx context.Context, m store.Machine) error {
	others, err := s.groupPartnersFailedOver(ctx, m, nil)
	if err != nil || len(others) == 0 {
		return err
	}
	hint := "run asr failback --group " + m.Group
	if ps, err := s.Plans(ctx); err == nil {
		for _, p := range ps {
			var in []string
			for _, g := range p.Groups {
				in = append(in, g.Machines...)
			}
			if slices.Contains(in, m.Name) && !slices.ContainsFunc(others, func(o string) bool { return !slices.Contains(in, o) }) {
				hint = "run asr failback --plan " + p.Name
				break
			}
		}
	}
	return errorf(http.StatusConflict, "machine %s is in replication group %s with %s, failed over too: a group's machines fail back together, switched at one consistent moment: %s (or fail back every member of the group)",
		m.Name, m.Group, strings.Join(others, ", "), hint)
}

// startPlanJob starts a plan's reprotect or failback job; while it runs,
// a reprotect or failback of any of its machines is refused.
// s.rv.startMu is held.
func (s *Server) startPlanJob(ctx context.Context, kind string, x fbSet, machines []string, fn func(ctx context.Context, j *job) error) (api.Job, error) {
	ready := make(chan struct{})
	j, err := s.startJob(ctx, kind, x.label(), func(ctx context.Context, j *job) error {
		<-ready
		defer func() {
			s.rv.startMu.Lock()
			delete(s.rv.planJobs, j.id)
			s.rv.startMu.Unlock()
		}()
		return fn(ctx, j)
	})
	if err != nil {
		return j, err
	}
	if s.rv.planJobs == nil {
		s.rv.planJobs = map[string][]string{}
	}
	s.rv.planJobs[j.ID] = machines
	close(ready)
	return j, nil
}

// refusePlan is the conflict of a plan (or group) some of whose machines
// cannot take part: every reason, one a line, and nothing started.
func refusePlan(x fbSet, what string, problems []string) error {
	return errorf(http.StatusConflict, "%s cannot be %s (nothing was started):\n  %s", x.label(), what, strings.Join(problems, "\n  "))
}

// planItem is a machine of a plan's reprotect, and the failover it is for.
type planItem struct {
	m store.Machine
	f store.Failover
}

// ReprotectPlan reprotects a plan's machines in the direction they need:
// toward the original disks after the plan's committed failover, forward
// again after its failback.
func (s *Server) ReprotectPlan(ctx context.Context, plan string) (api.Job, error) {
	x, err := s.planSet(ctx, plan)
	if err != nil {
		return api.Job{}, err
	}
	return s.reprotectSet(ctx, x)
}

// ReprotectGroup reprotects a replication group's machines as
// ReprotectPlan does a plan's: the failovers no plan made.
func (s *Server) ReprotectGroup(ctx context.Context, group string) (api.Job, error) {
	x, err := s.groupSet(ctx, group)
	if err != nil {
		return api.Job{}, err
	}
	return s.reprotectSet(ctx, x)
}

func (s *Server) reprotectSet(ctx context.Context, x fbSet) (api.Job, error) {
	p := x.p
	groups, err := s.planMachineGroups(ctx, p)
	if err != nil {
		return api.Job{}, err
	}
	s.rv.startMu.Lock()
	defer s.rv.startMu.Unlock()
	var rev, fwd []planItem
	var problems, names []string
	already := 0
	for _, g := range groups {
		for _, m := range g {
			if id := s.failbackJobRunning(m.Name); id != "" {
				problems = append(problems, fmt.Sprintf("machine %s: a reprotect or failback job is running (job %s)", m.Name, id))
				continue
			}
			f, err := s.db.LiveFailover(ctx, m.ID)
			if err == nil {
				if !x.owns(f) {
					problems = append(problems, fmt.Sprintf("machine %s: its failover %s was not %s: reprotect it with --machine %s", m.Name, f.ID, x.ownsWhat(), m.Name))
					continue
				}
				if d := decodeDetail(f); d.Reverse != nil && d.Reverse.State == dirReprotected && s.reverseRunOf(m.ID) != nil {
					already++ // reprotected before (by itself, or a plan reprotect that stopped half-way)
					continue
				}
				if err := s.refuseReprotectReverse(ctx, m, f); err != nil {
					problems = append(problems, err.Error())
					continue
				}
				if unplannedFailover(f) {
					// Its reprotect waits for the original agent and compares
					// the disks first: a job of its own (not done in a plan's).
					problems = append(problems, fmt.Sprintf("machine %s: its failover %s was unplanned; the reprotect of a %s does not do the checksum compare that needs: reprotect it with --machine %s, then run asr reprotect %s again", m.Name, f.ID, x.kind, m.Name, x.flag()))
					continue
				}
				rev = append(rev, planItem{m, f})
				names = append(names, m.Name)
				continue
			}
			if !errors.Is(err, store.ErrNotFound) {
				return api.Job{}, err
			}
			f, ok, err := s.lastFailback(ctx, m.ID)
			if err != nil {
				return api.Job{}, err
			}
			if !ok || !x.owns(f) {
				continue // not failed over by the set: nothing to do
			}
			if err := refuseUnprotected(m, "a reprotect"); err != nil {
				problems = append(problems, err.Error())
				continue
			}
			fwd = append(fwd, planItem{m, f})
			names = append(names, m.Name)
		}
	}
	if len(problems) > 0 {
		return api.Job{}, refusePlan(x, "reprotected", problems)
	}
	if len(rev)+len(fwd) == 0 {
		if already > 0 {
			return api.Job{}, errorf(http.StatusConflict, "%s: its %d failed-over machines are reprotected already: fail it back with asr failback %s", x.label(), already, x.flag())
		}
		return api.Job{}, errorf(http.StatusConflict, "%s has nothing to reprotect: no machine of it has a committed failover %s, nor a failback waiting for forward protection", x.label(), x.ownsWhat())
	}
	return s.startPlanJob(ctx, "reprotect", x, names, func(ctx context.Context, j *job) error {
		var lines []string
		var sent, compared, resent int64
		for _, it := range rev {
			n, err := s.reprotectReverseSteps(ctx, j, it.m, it.f)
			if err != nil {
				j.setResult(lines, 0)
				return fmt.Errorf("machine %s: %w", it.m.Name, err)
			}
			sent += n
			lines = append(lines, fmt.Sprintf("%s: reprotected: %d bytes sent to the original disks", it.m.Name, n))
		}
		for _, it := range fwd {
			c, n, err := s.reprotectForwardSteps(ctx, j, it.m, it.f)
			if err != nil {
				j.setResult(lines, 0)
				return fmt.Errorf("machine %s: %w", it.m.Name, err)
			}
			compared, resent = compared+c, resent+n
			lines = append(lines, fmt.Sprintf("%s: protected again: %d bytes compared, %d sent", it.m.Name, c, n))
		}
		var head []string
		if len(rev) > 0 {
			head = append(head, fmt.Sprintf("%s reprotected: %s, %d bytes sent to the original disks", x.label(), machinesWord(len(rev), ""), sent))
		}
		if len(fwd) > 0 {
			head = append(head, fmt.Sprintf("%s protected again: %s, %d bytes compared, %d sent", x.label(), machinesWord(len(fwd), ""), compared, resent))
		}
		j.setResult(append(head, lines...), 0)
		return nil
	})
}

// FailbackPlan fails a reprotected plan back to its original machines.
func (s *Server) FailbackPlan(ctx context.Context, plan string) (api.Job, error) {
	x, err := s.planSet(ctx, plan)
	if err != nil {
		return api.Job{}, err
	}
	return s.failbackSet(ctx, x)
}

// FailbackGroup fails a reprotected replication group back as
// FailbackPlan does a plan: every member stopped, drained and verified
// before one switch of them all.
func (s *Server) FailbackGroup(ctx context.Context, group string) (api.Job, error) {
	x, err := s.groupSet(ctx, group)
	if err != nil {
		return api.Job{}, err
	}
	return s.failbackSet(ctx, x)
}

func (s *Server) failbackSet(ctx context.Context, x fbSet) (api.Job, error) {
	p := x.p
	groups, err := s.planMachineGroups(ctx, p)
	if err != nil {
		return api.Job{}, err
	}
	s.rv.startMu.Lock()
	defer s.rv.startMu.Unlock()
	members := make([][]*switchMember, len(groups))
	var problems, names []string
	in := map[string]bool{}
	for i, g := range groups {
		for _, m := range g {
			in[m.Name] = true
			if id := s.failbackJobRunning(m.Name); id != "" {
				problems = append(problems, fmt.Sprintf("machine %s: a reprotect or failback job is running (job %s)", m.Name, id))
				continue
			}
			f, err := s.db.LiveFailover(ctx, m.ID)
			if errors.Is(err, store.ErrNotFound) {
				continue // not failed over (or failed back by itself)
			}
			if err != nil {
				return api.Job{}, err
			}
			if !x.owns(f) {
				problems = append(problems, fmt.Sprintf("machine %s: its failover %s was not %s: fail it back with --machine %s", m.Name, f.ID, x.ownsWhat(), m.Name))
				continue
			}
			f, run, err := s.failbackReady(ctx, m, x.flag())
			if err != nil {
				problems = append(problems, err.Error())
				continue
			}
			members[i] = append(members[i], &switchMember{m: m, run: run, f: f})
			names = append(names, m.Name)
		}
	}
	for _, g := range members {
		for _, sm := range g {
			others, err := s.groupPartnersFailedOver(ctx, sm.m, in)
			if err != nil {
				return api.Job{}, err
			}
			if len(others) > 0 {
				problems = append(problems, fmt.Sprintf("machine %s is in replication group %s with %s, failed over and not in %s: a group's machines switch back together; add them to the plan", sm.m.Name, sm.m.Group, strings.Join(others, ", "), x.label()))
			}
		}
	}
	if len(problems) > 0 {
		return api.Job{}, refusePlan(x, "failed back", problems)
	}
	if len(names) == 0 {
		return api.Job{}, errorf(http.StatusConflict, "%s has no failed-over machine to fail back", x.label())
	}
	return s.startPlanJob(ctx, "failback", x, names, func(ctx context.Context, j *job) error {
		start := time.Now()
		lines, err := s.runPlanFailback(ctx, j, x, members)
		j.setResult(lines, time.Since(start))
		return err
	})
}

// runPlanFailback is a plan's failback job: shut down (last group first),
// drain and verify every machine, switch them all, power on in plan order.
func (s *Server) runPlanFailback(ctx context.Context, j *job, x fbSet, members [][]*switchMember) ([]string, error) {
	p := x.p
	var all []*switchMember
	for _, g := range members {
		all = append(all, g...)
	}
	j.setCancellable(true)
	err := s.planFailbackPrepare(ctx, j, members)
	if err == nil {
		err = ctx.Err()
	}
	if err == nil {
		// The switch: from here the failback goes on (also after a restart).
		j.setCancellable(false)
		done := j.step("switch", machinesWord(len(all), "")+" switch back at once")
		err = s.recordSwitch(ctx, all)
		done("recorded", err)
	}
	if err != nil {
		for _, sm := range all {
			for _, d := range sm.run.disks {
				d.be.stopped.Store(false) // the failed-over machines run on
			}
		}
		return nil, err
	}
	if s.rv.switchHook != nil {
		s.rv.switchHook(s.ctx)
	}
	if s.ctx.Err() != nil {
		return nil, fmt.Errorf("the server stopped after the switch: the failback is finished at its next start")
	}
	var lines []string
	var sent, compared int64
	var failed error
	actx := api.ActionContext{Plan: p.Name, Type: "failback", Direction: "recovery-to-primary", Machines: map[string]api.ActionMachine{}}
	for i, g := range members {
		if len(g) == 0 {
			continue
		}
		if failed == nil {
			actx.Phase = "pre"
			failed = s.runActions(ctx, j, i+1, p.Groups[i].Pre, &actx, true)
		}
		done := j.step(fmt.Sprintf("group %d: power on", i+1), machinesWord(len(g), "original"))
		n := 0
		for _, sm := range g {
			if failed != nil {
				// A group failed to power on: the rest are finished in the
				// background (past the switch, never undone).
				s.finishLater(sm.f, sm.m)
				continue
			}
			if _, err := s.finishFailback(ctx, j, sm.f, sm.m); err != nil {
				failed = fmt.Errorf("machine %s: %w", sm.m.Name, err)
				s.finishLater(sm.f, sm.m)
				continue
			}
			d := decodeDetail(sm.f)
			sent, compared = sent+d.Reverse.Sent, compared+d.Reverse.Compared
			lines = append(lines, fmt.Sprintf("%s: failed back: %d bytes sent, %d bytes compared", sm.m.Name, d.Reverse.Sent, d.Reverse.Compared))
			am := api.ActionMachine{To: "original"}
			if vm := s.sourceVM(ctx, sm.m); vm != nil {
				am.VM = vm.Name
			}
			actx.Machines[sm.m.Name] = am
			n++
		}
		if failed != nil {
			done("", fmt.Errorf("%w; the rest are powered on in the background", failed))
			continue
		}
		done(fmt.Sprintf("%d powered on", n), nil)
		actx.Phase = "post"
		failed = s.runActions(ctx, j, i+1, p.Groups[i].Post, &actx, true)
	}
	if failed != nil {
		return lines, failed
	}
	head := fmt.Sprintf("%s failed back: %s, %d bytes sent, %d bytes compared; run asr reprotect %s to protect them again", x.label(), machinesWord(len(all), ""), sent, compared, x.flag())
	return append([]string{head}, lines...), nil
}

// planFailbackPrepare stops every failed-over machine of the plan (the
// last group first), drains every one, then compares every original disk
// with its export: all of it before any switch, any of it undone by a
// cancel.
func (s *Server) planFailbackPrepare(ctx context.Context, j *job, members [][]*switchMember) error {
	var order []*switchMember // the shut-down order
	for i := len(members) - 1; i >= 0; i-- {
		if len(members[i]) == 0 {
			continue
		}
		done := j.step(fmt.Sprintf("group %d: shut down", i+1), "stop "+machinesWord(len(members[i]), "failed-over"))
		for _, sm := range members[i] {
			if err := stopFailedOver(j, sm.m, sm.run); err != nil {
				done("", err)
				return err
			}
		}
		done("stopped", nil)
		order = append(order, members[i]...)
	}
	for _, sm := range order {
		if err := s.waitDrained(ctx, j, sm.m.Name+": drain", "send the last changes to the original disks", sm.run); err != nil {
			return fmt.Errorf("machine %s: %w", sm.m.Name, err)
		}
	}
	for _, sm := range order {
		c, err := s.verifyOriginal(ctx, j, sm.f, sm.m, sm.run)
		if err != nil {
			return fmt.Errorf("machine %s: %w", sm.m.Name, err)
		}
		sm.compared = c
	}
	return nil
}

func (s *Server) handleReprotectPlan(w http.ResponseWriter, r *http.Request) error {
	j, err := s.ReprotectPlan(r.Context(), chi.URLParam(r, "plan"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}

func (s *Server) handleReprotectGroup(w http.ResponseWriter, r *http.Request) error {
	j, err := s.ReprotectGroup(r.Context(), chi.URLParam(r, "group"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}

func (s *Server) handleFailbackGroup(w http.ResponseWriter, r *http.Request) error {
	j, err := s.FailbackGroup(r.Context(), chi.URLParam(r, "group"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}

func (s *Server) handleFailbackPlan(w http.ResponseWriter, r *http.Request) error {
	j, err := s.FailbackPlan(r.Context(), chi.URLParam(r, "plan"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}

// machinesWord is "1 machine", "2 original machines" and so on.
func machinesWord(n int, adj string) string {
	w := "machines"
	if n == 1 {
		w = "machine"
	}
	if adj != "" {
		w = adj + " " + w
	}
	return fmt.Sprintf("%d %s", n, w)
}
