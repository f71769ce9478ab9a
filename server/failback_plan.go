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
// without their actions (a power-on failure does the same). The progress
// past the switch is recorded (failback_plan_resume.go): a server
// restarted there resumes the job with the remaining groups in order and
// their actions.
//
// Each machine reprotects and fails back by its own path: a failover to
// NBD planned (the overlay's blocks) or unplanned (the original frozen and
// compared first), or to vSphere or Azure (the recovered VM powered off,
// its disks read through vCenter or a SAS: failback_vsphere.go); a plan
// may mix them.

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
//
// A plan takes every failover of its machines that no other plan made (as
// ASR's recovery plans act on each of their machines whatever failed it
// over): its own, and those of asr failover --machine or --group.
func (x fbSet) owns(f store.Failover) bool {
	if x.kind == "plan" {
		return f.Plan == x.p.Name || f.Plan == ""
	}
	return f.Plan == ""
}

// ownsWhat says which failovers the set fails back.
func (x fbSet) ownsWhat() string {
	if x.kind == "plan" {
		return "made by plan " + x.p.Name + " or by asr failover --machine or --group"
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
	return s.registerPlanJob(x, machines, func(wrap func(context.Context, *job) error) (api.Job, error) {
		return s.startJob(ctx, kind, x.label(), wrap)
	}, fn)
}

// registerPlanJob runs fn as a plan's job started by start (a new job, or
// one resumed at a restart), its machines noted in s.rv.planJobs while it
// runs. s.rv.startMu is held.
func (s *Server) registerPlanJob(x fbSet, machines []string, start func(func(context.Context, *job) error) (api.Job, error), fn func(ctx context.Context, j *job) error) (api.Job, error) {
	ready := make(chan struct{})
	j, err := start(func(ctx context.Context, j *job) error {
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
	s.jobs.mu.Lock()
	rj := s.jobs.running[j.ID]
	s.jobs.mu.Unlock()
	if rj != nil {
		rj.setMachines(machines)
		j = rj.snapshot()
	}
	close(ready)
	return j, nil
}

// refusePlan is the conflict of a plan (or group) some of whose machines
// cannot take part: every reason, one a line, and nothing started.
func refusePlan(x fbSet, what string, problems []string) error {
	return errorf(http.StatusConflict, "%s cannot be %s (nothing was started):\n  %s", x.label(), what, strings.Join(problems, "\n  "))
}

// planItem is a machine of a plan's reprotect, and the failover it is
// for; run is an unplanned failover's reprotect whose compare goes on (a
// restart ended the job that started it): the plan's job follows it.
type planItem struct {
	m   store.Machine
	f   store.Failover
	run *reverseRun
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
				it, done, err := s.reverseItem(ctx, m, f)
				switch {
				case err != nil:
					problems = append(problems, err.Error())
				case done:
					already++ // reprotected before (by itself, or a plan reprotect that stopped half-way)
				default:
					rev = append(rev, it)
					names = append(names, m.Name)
				}
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
			fwd = append(fwd, planItem{m: m, f: f})
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
		var sent, compared, resent, cmpRev int64
		for _, it := range rev {
			line, n, c, err := s.reprotectItem(ctx, j, it)
			if err != nil {
				j.setResult(lines, 0)
				return fmt.Errorf("machine %s: %w", it.m.Name, err)
			}
			sent, cmpRev = sent+n, cmpRev+c
			lines = append(lines, it.m.Name+": "+line)
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
			h := fmt.Sprintf("%s reprotected: %s, %d bytes sent to the original disks", x.label(), machinesWord(len(rev), ""), sent)
			if cmpRev > 0 {
				h += fmt.Sprintf(" (%d bytes compared by checksum)", cmpRev)
			}
			head = append(head, h)
		}
		if len(fwd) > 0 {
			head = append(head, fmt.Sprintf("%s protected again: %s, %d bytes compared, %d sent", x.label(), machinesWord(len(fwd), ""), compared, resent))
		}
		j.setResult(append(head, lines...), 0)
		return nil
	})
}

// reverseItem says what a set's reprotect does with machine m's live
// failover f (the set's): reprotect it (it), nothing (done: reprotected
// already), or why it cannot (err). Each failover is reprotected by its
// own path: to NBD planned (the overlay's blocks), unplanned (the original
// frozen and compared first: failback_compare.go), to vSphere or Azure
// (one checksum pass over the recovered VM's disks: failback_vsphere.go).
func (s *Server) reverseItem(ctx context.Context, m store.Machine, f store.Failover) (it planItem, done bool, err error) {
	it = planItem{m: m, f: f}
	d := decodeDetail(f)
	if vmFailback(f) {
		if d.Reverse != nil && d.Reverse.State == dirReprotected {
			return it, true, nil
		}
		return it, false, s.refuseReprotectVM(ctx, m, f)
	}
	if d.Reverse != nil && d.Reverse.State == dirReprotected {
		run := s.reverseRunOf(m.ID)
		switch {
		case run == nil || run.failoverID != f.ID:
			return it, false, errorf(http.StatusConflict, "machine %s: its changes are not being sent back (is the server starting?)", m.Name)
		case run.cmp.Load().left() > 0:
			it.run = run // its compare goes on: followed
			return it, false, nil
		}
		return it, true, nil
	}
	if d.Reverse != nil {
		return it, false, errorf(http.StatusConflict, "machine %s is %s already", m.Name, d.Reverse.State)
	}
	if err := s.refuseReprotectReverse(ctx, m, f); err != nil {
		return it, false, err
	}
	if unplannedFailover(f) {
		err = s.refuseResyncRunning(ctx, m)
	}
	return it, false, err
}

// reprotectItem reprotects one machine of a set in its job: its result
// line, the bytes sent and compared.
func (s *Server) reprotectItem(ctx context.Context, j *job, it planItem) (line string, sent, compared int64, err error) {
	switch {
	case vmFailback(it.f):
		j.setCancellable(true)
		defer j.setCancellable(false)
		p, vm, err := s.reprotectVMSteps(ctx, j, it.m, it.f)
		if err != nil {
			return "", 0, 0, err
		}
		return fmt.Sprintf("reprotected: %d bytes compared, %d differ, %d bytes sent to the original disks; VM %s runs on until the failback", p.compared, p.differ, p.sent, vm), p.sent, p.compared, nil
	case unplannedFailover(it.f):
		c, differ, n, err := s.reprotectUnplannedSteps(ctx, j, it.m, it.f, it.run)
		if err != nil {
			return "", 0, 0, err
		}
		return fmt.Sprintf("reprotected: %d bytes compared, %d differ, %d bytes sent to the original disks", c, differ, n), n, c, nil
	}
	n, err := s.reprotectReverseSteps(ctx, j, it.m, it.f)
	if err != nil {
		return "", 0, 0, err
	}
	return fmt.Sprintf("reprotected: %d bytes sent to the original disks", n), n, 0, nil
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
			var sm *switchMember
			if vmFailback(f) {
				if err := failbackVMReady(m, f, x.flag()); err != nil {
					problems = append(problems, err.Error())
					continue
				}
				sm = newVMMember(m, f)
			} else {
				f, run, err := s.failbackReady(ctx, m, x.flag())
				if err != nil {
					problems = append(problems, err.Error())
					continue
				}
				sm = &switchMember{m: m, run: run, f: f}
			}
			members[i] = append(members[i], sm)
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
// drain and verify every machine, switch them all (with the progress
// record past the switch), power on in plan order (planPowerOn).
func (s *Server) runPlanFailback(ctx context.Context, j *job, x fbSet, members [][]*switchMember) ([]string, error) {
	var all []*switchMember
	for _, g := range members {
		all = append(all, g...)
	}
	defer func() {
		for _, sm := range all {
			sm.close()
		}
	}()
	j.setCancellable(true)
	err := s.planFailbackPrepare(ctx, j, members)
	if err == nil {
		err = ctx.Err()
	}
	rec := newPFRecord(x, members)
	if err == nil {
		// The switch: from here the failback goes on (also after a restart).
		j.setCancellable(false)
		done := j.step("switch", machinesWord(len(all), "")+" switch back at once")
		var pf store.PlanFailback
		if pf, err = rec.row(j.id, x.label()); err == nil {
			err = s.recordSwitch(ctx, all, &pf)
		}
		done("recorded", err)
	}
	if err != nil {
		for _, sm := range all {
			s.undoMember(ctx, j, sm) // the failed-over machines run on
		}
		return nil, err
	}
	if s.rv.switchHook != nil {
		s.rv.switchHook(s.ctx)
	}
	if s.ctx.Err() != nil {
		return nil, errServerStopped
	}
	return s.planPowerOn(ctx, j, rec)
}

// errServerStopped ends a plan's failback job that a server stop cut past
// its switch: its record stays, and the next start resumes the job.
var errServerStopped = errors.New("the server stopped after the switch: the failback goes on at its next start, with the remaining groups in order and their actions")

// planFailbackPrepare stops every failed-over machine of the plan (the
// last group first), drains every one, then compares every original disk
// with its failed-over state: all of it before any switch, any of it
// undone by a cancel.
func (s *Server) planFailbackPrepare(ctx context.Context, j *job, members [][]*switchMember) error {
	var order []*switchMember // the shut-down order
	for i := len(members) - 1; i >= 0; i-- {
		if len(members[i]) == 0 {
			continue
		}
		done := j.step(fmt.Sprintf("group %d: shut down", i+1), "stop "+machinesWord(len(members[i]), "failed-over"))
		for _, sm := range members[i] {
			if err := s.stopMember(ctx, j, sm); err != nil {
				done("", err)
				return err
			}
		}
		done("stopped", nil)
		order = append(order, members[i]...)
	}
	for _, sm := range order {
		if err := s.drainMember(ctx, j, sm); err != nil {
			return fmt.Errorf("machine %s: %w", sm.m.Name, err)
		}
	}
	for _, sm := range order {
		if err := s.verifyMember(ctx, j, sm); err != nil {
			return fmt.Errorf("machine %s: %w", sm.m.Name, err)
		}
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
