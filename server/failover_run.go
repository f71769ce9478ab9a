package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// A failover target: a machine and the point selection it recovers.
type foTarget struct {
	m     store.Machine
	point replication.Point
	plan  *replication.TimePlan
}

// maxBootTimeout bounds a drill's boot check.
const maxBootTimeout = 2 * time.Hour

// checkFailoverRequest refuses a request that cannot run, before any job.
func checkFailoverRequest(req *api.FailoverRequest) error {
	n := 0
	for _, s := range []string{req.Machine, req.Group, req.Plan} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return errorf(http.StatusBadRequest, "name one machine, group or plan")
	}
	switch req.To {
	case api.ToNBD, api.ToQEMU, api.ToVSphere, api.ToAzure:
	case "":
		return errorf(http.StatusBadRequest, "say where the recovered machines run: to nbd, qemu, vsphere or azure")
	default:
		return errorf(http.StatusBadRequest, "to %q: want nbd, qemu, vsphere or azure", req.To)
	}
	if req.To == api.ToQEMU && !req.Test {
		return errorf(http.StatusBadRequest, "a QEMU drill is a test failover: add --test")
	}
	if req.Planned && req.Test {
		return errorf(http.StatusBadRequest, "a planned failover is not a test: drop --test or --planned")
	}
	if req.Planned && (req.Point != "" || req.Time != nil) {
		return errorf(http.StatusBadRequest, "a planned failover takes a last point itself: no --point or --time")
	}
	if req.Time != nil && req.Point != "" && req.Point != "latest" {
		return errorf(http.StatusBadRequest, "give a point or a time, not both")
	}
	if req.Group != "" && req.Time != nil {
		return errorf(http.StatusBadRequest, "a group fails over at one of its cuts (--point), not at a time")
	}
	if req.To == api.ToQEMU {
		if req.BootCheck == "" && req.BootPort == 0 {
			return errorf(http.StatusBadRequest, "a drill needs a boot check: --boot-check REGEX and/or --boot-port PORT")
		}
		if req.BootCheck != "" {
			if _, err := regexp.Compile(req.BootCheck); err != nil {
				return errorf(http.StatusBadRequest, "boot check: %v", err)
			}
		}
		if req.BootPort < 0 || req.BootPort > 65535 {
			return errorf(http.StatusBadRequest, "boot port %d: want 1 to 65535", req.BootPort)
		}
		if req.BootTimeout < 0 || time.Duration(req.BootTimeout*float64(time.Second)) > maxBootTimeout {
			return errorf(http.StatusBadRequest, "boot timeout %gs: want up to %s", req.BootTimeout, maxBootTimeout)
		}
	} else if req.BootCheck != "" || req.BootPort != 0 {
		return errorf(http.StatusBadRequest, "a boot check is for --to qemu")
	}
	if (req.To == api.ToVSphere) != (req.VSphere != nil) {
		return errorf(http.StatusBadRequest, "--to vsphere needs --vcenter and --datastore (and only it takes them)")
	}
	if (req.To == api.ToAzure) != (req.Azure != nil) {
		return errorf(http.StatusBadRequest, "--to azure needs --subscription, --resource-group, --location, --vnet and --subnet (and only it takes them)")
	}
	if v := req.VSphere; v != nil && (v.VCenter == "" || v.Datastore == "") {
		return errorf(http.StatusBadRequest, "--to vsphere needs --vcenter and --datastore")
	}
	if v := req.VSphere; v != nil && v.Host != "" && v.Pool != "" {
		return errorf(http.StatusBadRequest, "give --host or --pool, not both")
	}
	if a := req.Azure; a != nil && (a.Subscription == "" || a.ResourceGroup == "" || a.Location == "" || a.VNet == "" || a.Subnet == "") {
		return errorf(http.StatusBadRequest, "--to azure needs --subscription, --resource-group, --location, --vnet and --subnet")
	}
	return nil
}

// failoverTargets resolves a machine or group request into machines and
// points, refusing what cannot fail over.
func (s *Server) failoverTargets(ctx context.Context, req api.FailoverRequest) ([]foTarget, error) {
	var ms []store.Machine
	var points map[string]string // machine id -> point id (a group's cut)
	switch {
	case req.Machine != "":
		m, err := s.db.MachineByName(ctx, req.Machine)
		if errors.Is(err, store.ErrNotFound) {
			return nil, errorf(http.StatusNotFound, "no machine named %q", req.Machine)
		}
		if err != nil {
			return nil, err
		}
		ms = append(ms, m)
	case req.Group != "" && req.Planned:
		// Every member, each stopped and given a last point by the job:
		// the members stopped one after the other, each point is its
		// machine's final state, so together they are a moment of the
		// group. No group point is needed.
		x, err := s.groupSet(ctx, req.Group)
		if err != nil {
			return nil, err
		}
		for _, name := range x.p.Groups[0].Machines {
			m, err := s.db.MachineByName(ctx, name)
			if err != nil {
				return nil, fmt.Errorf("group %s: member %s: %w", req.Group, name, err)
			}
			ms = append(ms, m)
		}
	case req.Group != "":
		gp, err := s.cat.FindGroupPoint(ctx, req.Group, req.Point)
		if err != nil {
			return nil, fmt.Errorf("group %s: %w", req.Group, err)
		}
		points = gp.Members
		for id := range gp.Members {
			m, err := s.db.Machine(ctx, id)
			if err != nil {
				return nil, fmt.Errorf("group %s: member %s: %w", req.Group, id, err)
			}
			ms = append(ms, m)
		}
		slices.SortFunc(ms, func(a, b store.Machine) int { return strings.Compare(a.Name, b.Name) })
	}
	var out []foTarget
	for _, m := range ms {
		t, err := s.failoverTarget(ctx, m, req, points[m.ID])
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, nil
}

func (s *Server) failoverTarget(ctx context.Context, m store.Machine, req api.FailoverRequest, groupPoint string) (foTarget, error) {
	if m.Unprotected() && !req.Test {
		return foTarget{}, errorf(http.StatusConflict, "machine %s is unprotected (failed over already?): a failover needs a protected machine", m.Name)
	}
	if f, err := s.db.LiveFailover(ctx, m.ID); err == nil {
		return foTarget{}, errorf(http.StatusConflict, "machine %s has a %s (%s, %s): clean it up or commit it first", m.Name, kindWord(f.Kind), f.ID, f.State)
	}
	t := foTarget{m: m}
	if req.Planned {
		return t, nil // its point is the last one, taken by the job
	}
	sel := req.Point
	if groupPoint != "" {
		sel = groupPoint
	}
	p, plan, err := s.resolvePoint(ctx, m, sel, req.Time)
	if err != nil {
		return t, err
	}
	t.point, t.plan = p, plan
	return t, nil
}

func jobKind(req api.FailoverRequest) string {
	switch {
	case req.To == api.ToQEMU:
		return "drill"
	case req.Test:
		return "test-failover"
	case req.Planned:
		return "planned-failover"
	}
	return "failover"
}

// StartFailover validates a failover request and runs it as a job.
func (s *Server) StartFailover(ctx context.Context, req api.FailoverRequest) (api.Job, error) {
	if err := checkFailoverRequest(&req); err != nil {
		return api.Job{}, err
	}
	if req.Plan != "" {
		return s.startPlanFailover(ctx, req)
	}
	targets, err := s.failoverTargets(ctx, req)
	if err != nil {
		return api.Job{}, err
	}
	subject := req.Machine
	if req.Group != "" {
		subject = "group " + req.Group
	}
	return s.startJob(ctx, jobKind(req), subject, func(ctx context.Context, j *job) error {
		start := time.Now()
		lines, err := s.failoverMachines(ctx, j, targets, req, "", req.Group != "")
		j.setResult(lines, time.Since(start))
		return err
	})
}

// failoverMachines fails the targets over in parallel and returns their
// output lines ("DISK URI", prefixed with MACHINE/ when prefix is set),
// sorted. Every target is tried; the error names each that failed.
func (s *Server) failoverMachines(ctx context.Context, j *job, ts []foTarget, req api.FailoverRequest, plan string, prefix bool) ([]string, error) {
	var mu sync.Mutex
	var lines []string
	var errs []error
	var wg sync.WaitGroup
	for _, t := range ts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ls, err := s.failoverOne(ctx, j, t, req, plan)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", t.m.Name, err))
			}
			for _, l := range ls {
				if prefix {
					l = t.m.Name + "/" + l
				}
				lines = append(lines, l)
			}
		}()
	}
	wg.Wait()
	slices.Sort(lines)
	return lines, errors.Join(errs...)
}

// failoverOne recovers one machine: its record first (which holds the
// point), then the destination. A failure removes what was made.
func (s *Server) failoverOne(ctx context.Context, j *job, t foTarget, req api.FailoverRequest, plan string) ([]string, error) {
	m := t.m
	kind := api.FailoverReal
	if req.Test {
		kind = api.FailoverTest
	}
	f := store.Failover{ID: newID(), MachineID: m.ID, Kind: kind, Dest: req.To, State: store.FailoverStarting,
		Plan: plan, JobID: j.id, PointSeq: t.point.Seq, PointID: t.point.ID}
	if t.plan != nil {
		f.AtTime = t.plan.At
	}
	reqJSON, _ := json.Marshal(req)
	f.Detail = encodeDetail(failoverDetail{Request: reqJSON})
	// A machine on a scale-out process server comes back to the built-in
	// one first (failover_ps.go).
	if err := s.toBuiltin(ctx, j, m, req.Planned, "for a failover"); err != nil {
		return nil, err
	}
	// The record comes first: it claims the machine (one live failover
	// each), so a planned failover freezes no source another one holds.
	// The switch lock keeps a switch away from the built-in process
	// server (the exports read the replica in this process) from slipping
	// in before the record.
	s.pss.switchMu.Lock()
	if ps := s.assignedTo(m.ID); ps != "" {
		s.pss.switchMu.Unlock()
		return nil, fmt.Errorf("machine %s was switched to process server %s during its failover: fail it over again", m.Name, ps)
	}
	err := s.db.AddFailover(ctx, f)
	s.pss.switchMu.Unlock()
	if err != nil {
		if errors.Is(err, store.ErrConflict) {
			return nil, errorf(http.StatusConflict, "machine %s has a failover already", m.Name)
		}
		return nil, err
	}
	if req.Planned {
		p, err := s.plannedPoint(ctx, j, m, f.ID)
		if err == nil {
			t.point, f.PointSeq, f.PointID = p, p.Seq, p.ID
			err = s.db.UpdateFailover(ctx, f)
		}
		if err != nil {
			f.State = store.FailoverFailed
			s.db.UpdateFailover(context.WithoutCancel(ctx), f)
			return nil, err
		}
	}
	d, lines, err := s.recoverTo(ctx, j, f, m, t.point, t.plan, req)
	if err != nil {
		f.State = store.FailoverFailed
		s.removeFailoverResources(context.WithoutCancel(ctx), f, m, &d)
		f.Detail = encodeDetail(d)
		s.db.UpdateFailover(context.WithoutCancel(ctx), f)
		return nil, err
	}
	f.State = store.FailoverActive
	if req.To == api.ToQEMU {
		// A drill lives only as long as its check: it ends here.
		s.removeFailoverResources(ctx, f, m, &d)
		f.State = store.FailoverEnded
	}
	f.Detail = encodeDetail(d)
	if err := s.db.UpdateFailover(context.WithoutCancel(ctx), f); err != nil {
		return lines, err
	}
	if req.To == api.ToQEMU && d.Drill != nil && !d.Drill.Passed {
		return lines, fmt.Errorf("drill failed: %s", d.Drill.Reason)
	}
	return lines, nil
}

// recoverTo makes the recovered machine at its destination and returns the
// record's detail and the output lines.
func (s *Server) recoverTo(ctx context.Context, j *job, f store.Failover, m store.Machine, p replication.Point, plan *replication.TimePlan, req api.FailoverRequest) (failoverDetail, []string, error) {
	d := decodeDetail(f)
	switch req.To {
	case api.ToNBD, api.ToQEMU:
		done := j.step(m.Name+": export", fmt.Sprintf("point %s as NBD exports", p.ID))
		exports, err := s.exportMachine(ctx, f, m, p, plan)
		done(fmt.Sprintf("%d disks from point %s", len(exports), p.ID), err)
		if err != nil {
			return d, nil, err
		}
		d.Exports = exports
		var lines []string
		for _, e := range exports {
			lines = append(lines, e.Disk+" "+e.URI)
		}
		if req.To == api.ToNBD {
			return d, lines, nil
		}
		res, err := s.drill(ctx, j, f, m, exports, req)
		d.Drill = res
		if err != nil {
			return d, nil, err
		}
		return d, []string{fmt.Sprintf("%s %s", m.Name, drillLine(res))}, nil
	case api.ToVSphere:
		return s.failoverToVSphere(ctx, j, f, m, p, plan, req, d)
	case api.ToAzure:
		return s.failoverToAzure(ctx, j, f, m, p, plan, req, d)
	}
	return d, nil, fmt.Errorf("unknown destination %q", req.To)
}

func drillLine(r *api.DrillResult) string {
	if r == nil {
		return "no result"
	}
	if r.Passed {
		return fmt.Sprintf("passed: booted in %.1fs (%s)", r.BootTime, r.Accel)
	}
	return "failed: " + r.Reason
}

// removeFailoverResources removes what a failover made (exports and their
// overlays, a created VM); d is its detail when the caller has it.
func (s *Server) removeFailoverResources(ctx context.Context, f store.Failover, m store.Machine, d *failoverDetail) error {
	if d == nil {
		dd := decodeDetail(f)
		d = &dd
	}
	err := s.unexport(m.ID, f.ID, true)
	switch f.Dest {
	case api.ToVSphere:
		if e := s.removeVSphereVM(ctx, d); e != nil && err == nil {
			err = e
		}
	case api.ToAzure:
		if e := s.removeAzureVM(ctx, d); e != nil && err == nil {
			err = e
		}
	}
	return err
}

// selected resolves an action's machine, group or plan into machines.
func (s *Server) selected(ctx context.Context, a api.FailoverAction) ([]store.Machine, error) {
	n := 0
	for _, x := range []string{a.Machine, a.Group, a.Plan} {
		if x != "" {
			n++
		}
	}
	if n != 1 {
		return nil, errorf(http.StatusBadRequest, "name one machine, group or plan")
	}
	switch {
	case a.Machine != "":
		m, err := s.db.MachineByName(ctx, a.Machine)
		if errors.Is(err, store.ErrNotFound) {
			return nil, errorf(http.StatusNotFound, "no machine named %q", a.Machine)
		}
		return []store.Machine{m}, err
	case a.Group != "":
		all, err := s.db.Machines(ctx)
		if err != nil {
			return nil, err
		}
		var out []store.Machine
		for _, m := range all {
			if m.Group == a.Group {
				out = append(out, m)
			}
		}
		if len(out) == 0 {
			return nil, errorf(http.StatusNotFound, "no machine is in group %s", a.Group)
		}
		return out, nil
	default:
		return s.planMachines(ctx, a.Plan)
	}
}

// Cleanup ends test failovers: their exports, overlays and created VMs go.
func (s *Server) Cleanup(ctx context.Context, a api.FailoverAction) (api.Job, error) {
	ms, err := s.selected(ctx, a)
	if err != nil {
		return api.Job{}, err
	}
	var fs []store.Failover
	var live []store.Machine
	for _, m := range ms {
		f, err := s.db.LiveFailover(ctx, m.ID)
		if errors.Is(err, store.ErrNotFound) {
			if a.Machine != "" {
				return api.Job{}, errorf(http.StatusNotFound, "machine %s has no test failover to clean up", m.Name)
			}
			continue
		}
		if err != nil {
			return api.Job{}, err
		}
		if f.Kind != api.FailoverTest {
			return api.Job{}, errorf(http.StatusConflict, "machine %s has a failover, not a test failover: commit it (or fail back), cleanup is for tests", m.Name)
		}
		fs, live = append(fs, f), append(live, m)
	}
	if len(fs) == 0 {
		return api.Job{}, errorf(http.StatusNotFound, "no test failover to clean up")
	}
	return s.startJob(ctx, "cleanup", subjectOf(a), func(ctx context.Context, j *job) error {
		var errs []error
		for i, f := range fs {
			done := j.step(live[i].Name+": cleanup", "remove the test failover's exports and VMs")
			err := s.removeFailoverResources(ctx, f, live[i], nil)
			if err == nil {
				f.State = store.FailoverEnded
				err = s.db.UpdateFailover(ctx, f)
			}
			done("removed", err)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", live[i].Name, err))
			}
		}
		return errors.Join(errs...)
	})
}

func subjectOf(a api.FailoverAction) string {
	switch {
	case a.Plan != "":
		return "plan " + a.Plan
	case a.Group != "":
		return "group " + a.Group
	}
	return a.Machine
}

// Commit ends failovers: the recovered machines are the machines now. The
// source's protection stops (it is unprotected, its replica and the
// failed-over point kept) until reprotect; the other points are released.
// A failover to NBD keeps its source registered (frozen if planned), and
// so does a failover to vSphere: it is the master target of failback
// (failback.go, failback_vsphere.go).
func (s *Server) Commit(ctx context.Context, a api.FailoverAction) (api.Job, error) {
	ms, err := s.selected(ctx, a)
	if err != nil {
		return api.Job{}, err
	}
	var fs []store.Failover
	for _, m := range ms {
		f, err := s.db.LiveFailover(ctx, m.ID)
		if err != nil {
			return api.Job{}, errorf(http.StatusNotFound, "machine %s has no failover to commit", m.Name)
		}
		if f.Kind != api.FailoverReal {
			return api.Job{}, errorf(http.StatusConflict, "machine %s has a test failover: clean it up, tests are not committed", m.Name)
		}
		if f.State != store.FailoverActive {
			return api.Job{}, errorf(http.StatusConflict, "machine %s's failover is %s", m.Name, f.State)
		}
		fs = append(fs, f)
	}
	return s.startJob(ctx, "commit", subjectOf(a), func(ctx context.Context, j *job) error {
		var errs []error
		for i, f := range fs {
			m := ms[i]
			done := j.step(m.Name+": release points", "keep only the failed-over point")
			deleted, err := s.ps.DeletePointsExcept(ctx, m.ID, f.PointSeq)
			if err == nil {
				seqs := make([]uint64, len(deleted))
				for k, p := range deleted {
					seqs[k] = p.Seq
				}
				err = s.db.DeletePoints(ctx, m.ID, seqs)
				done(fmt.Sprintf("%d points released", len(deleted)), err)
			} else {
				done(fmt.Sprintf("kept: %v", err), nil)
			}
			if reverseCandidate(f) || vmFailback(f) {
				// A failover to NBD, vSphere or Azure: the source's agent stays registered
				// (frozen if planned) as failback's master target (asr
				// reprotect ships the changes back; an unplanned one
				// freezes it and compares its disks first).
				step, what := keepSourceStep(f)
				done = j.step(m.Name+": "+step, what)
				f.State = store.FailoverCommitted
				err = s.db.UpdateFailover(ctx, f)
				done("", err)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", m.Name, err))
					continue
				}
				s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "failover-committed",
					Message: fmt.Sprintf("failover %s committed at point %s: the source stays registered; asr reprotect --machine %s sends the changes back", f.ID, f.PointID, m.Name)})
				continue
			}
			done = j.step(m.Name+": stop protection", "until reprotect")
			err = s.Unprotect(ctx, m.ID, false)
			if err == nil {
				f.State = store.FailoverCommitted
				err = s.db.UpdateFailover(ctx, f)
			}
			done("", err)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", m.Name, err))
				continue
			}
			s.raise(ctx, store.Event{MachineID: m.ID, Severity: "info", Kind: "failover-committed",
				Message: fmt.Sprintf("failover %s committed at point %s: protection stopped until reprotect", f.ID, f.PointID)})
		}
		return errors.Join(errs...)
	})
}

// ChangePoint recovers a failed-over machine again at another point, before
// commit: what was recovered (and written since) is replaced.
func (s *Server) ChangePoint(ctx context.Context, a api.FailoverAction) (api.Job, error) {
	if a.Machine == "" {
		return api.Job{}, errorf(http.StatusBadRequest, "change the point of one machine (--machine)")
	}
	ms, err := s.selected(ctx, a)
	if err != nil {
		return api.Job{}, err
	}
	m := ms[0]
	f, err := s.db.LiveFailover(ctx, m.ID)
	if err != nil {
		return api.Job{}, errorf(http.StatusNotFound, "machine %s has no failover", m.Name)
	}
	if f.State != store.FailoverActive {
		return api.Job{}, errorf(http.StatusConflict, "machine %s's failover is %s: the point changes only before commit", m.Name, f.State)
	}
	if a.Point == "" && a.Time == nil {
		return api.Job{}, errorf(http.StatusBadRequest, "give the new point (--change-point ID) or --time")
	}
	p, plan, err := s.resolvePoint(ctx, m, a.Point, a.Time)
	if err != nil {
		return api.Job{}, err
	}
	d := decodeDetail(f)
	var req api.FailoverRequest
	if err := json.Unmarshal(d.Request, &req); err != nil {
		return api.Job{}, fmt.Errorf("failover %s: its request is unreadable: %w", f.ID, err)
	}
	return s.startJob(ctx, "change-point", m.Name, func(ctx context.Context, j *job) error {
		start := time.Now()
		done := j.step(m.Name+": remove", fmt.Sprintf("what point %s recovered", f.PointID))
		err := s.removeFailoverResources(ctx, f, m, &d)
		done("", err)
		if err != nil {
			return err
		}
		f.PointSeq, f.PointID, f.AtTime = p.Seq, p.ID, time.Time{}
		if plan != nil {
			f.AtTime = plan.At
		}
		d = failoverDetail{Request: d.Request}
		f.Detail = encodeDetail(d)
		if err := s.db.UpdateFailover(ctx, f); err != nil {
			return err
		}
		nd, lines, err := s.recoverTo(ctx, j, f, m, p, plan, req)
		f.Detail = encodeDetail(nd)
		if err != nil {
			f.State = store.FailoverFailed
		}
		s.db.UpdateFailover(context.WithoutCancel(ctx), f)
		j.setResult(lines, time.Since(start))
		return err
	})
}

func (s *Server) handleFailovers(w http.ResponseWriter, r *http.Request) error {
	fs, err := s.Failovers(r.Context(), r.URL.Query().Get("all") == "1")
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, fs)
	return nil
}

func (s *Server) handleStartFailover(w http.ResponseWriter, r *http.Request) error {
	var req api.FailoverRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	j, err := s.StartFailover(r.Context(), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}

func (s *Server) handleFailoverAction(w http.ResponseWriter, r *http.Request) error {
	var a api.FailoverAction
	if err := readJSON(r, &a); err != nil {
		return err
	}
	var j api.Job
	var err error
	switch chi.URLParam(r, "action") {
	case "cleanup":
		j, err = s.Cleanup(r.Context(), a)
	case "commit":
		j, err = s.Commit(r.Context(), a)
	case "change-point":
		j, err = s.ChangePoint(r.Context(), a)
	default:
		return errorf(http.StatusNotFound, "no failover action %q (cleanup, commit, change-point)", chi.URLParam(r, "action"))
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}
