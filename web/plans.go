package web

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/a-h/templ"
	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// plansHandler serves the recovery plans: their list, the form that
// creates one, and the buttons that fail a plan over (test, planned or
// not), clean its test failover up, commit it or delete it.
type plansHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// plansView is what the plans page shows.
type plansView struct {
	Session  *session
	Plans    []api.Plan
	Machines []string // names, for the groups' multi-selects
	// Live maps a plan's name to its live failovers.
	Live    map[string][]api.Failover
	Err     string // the plans could not be loaded
	Now     time.Time
	Created string // the plan just created
	Deleted string // the plan just deleted
	// Plan and PlanErr: why an action on a plan was refused.
	Plan, PlanErr string
	Form          planForm
}

// planForm is the "New plan" form as it is shown again.
type planForm struct {
	Name   string
	Groups [api.MaxPlanGroups]planGroupForm
	Drill  bool
	// The drill's schedule (hours) and boot check, as typed.
	DrillEvery, DrillCheck, DrillPort, DrillTimeout string
	Error                                           string
}

// planGroupForm is a group of the form: its machines, and its pre and
// post actions one a line (a line starting with "/" is a script on the
// server, any other line a manual action).
type planGroupForm struct {
	Machines  []string
	Pre, Post string
}

func (g planGroupForm) empty() bool {
	return len(g.Machines) == 0 && strings.TrimSpace(g.Pre) == "" && strings.TrimSpace(g.Post) == ""
}

// Has reports whether m is selected in the group.
func (g planGroupForm) Has(m string) bool {
	for _, x := range g.Machines {
		if x == m {
			return true
		}
	}
	return false
}

// defaultDrillEvery is the drill schedule the form suggests, in hours.
const defaultDrillEvery = "168"

func (h *plansHandler) view(r *http.Request) (plansView, int) {
	ctx := r.Context()
	v := plansView{Session: sessionFrom(ctx), Now: h.now(), Live: map[string][]api.Failover{},
		Form: planForm{DrillEvery: defaultDrillEvery}}
	status := http.StatusOK
	ps, err := h.backend.Plans(ctx)
	if err != nil {
		h.log.Error("list plans", "err", err)
		v.Err = err.Error()
		status = http.StatusInternalServerError
	}
	v.Plans = ps
	if ms, err := h.backend.Machines(ctx); err != nil {
		h.log.Error("list machines", "err", err)
	} else {
		for _, m := range ms {
			v.Machines = append(v.Machines, m.Name)
		}
	}
	if fs, err := h.backend.Failovers(ctx); err != nil {
		h.log.Error("list failovers", "err", err)
	} else {
		for _, f := range fs {
			if f.Plan != "" {
				v.Live[f.Plan] = append(v.Live[f.Plan], f)
			}
		}
	}
	return v, status
}

// page serves the plans page.
func (h *plansHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	q := r.URL.Query()
	v.Created, v.Deleted = q.Get("created"), q.Get("deleted")
	render(w, r, h.log, status, plansPage(v))
}

// parseActions parses a group's actions, one a line.
func parseActions(s string) []api.PlanAction {
	var out []api.PlanAction
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		on := ""
		for _, d := range []string{api.ActionOnFailover, api.ActionOnFailback} {
			if rest, ok := strings.CutPrefix(line, d+":"); ok {
				on, line = d, strings.TrimSpace(rest)
			}
		}
		switch {
		case line == "":
		case strings.HasPrefix(line, "/"):
			out = append(out, api.PlanAction{Kind: "script", Path: line, On: on})
		default:
			out = append(out, api.PlanAction{Kind: "manual", Text: line, On: on})
		}
	}
	return out
}

// formPlan reads the "New plan" form: the form as typed, and the plan it
// defines (groups up to the last one filled in; the server refuses an
// empty group between two others).
func formPlan(r *http.Request) (planForm, api.Plan, error) {
	f := planForm{
		Name:         strings.TrimSpace(r.PostFormValue("name")),
		Drill:        r.PostFormValue("drill") != "",
		DrillEvery:   strings.TrimSpace(r.PostFormValue("drill_every")),
		DrillCheck:   r.PostFormValue("drill_check"),
		DrillPort:    strings.TrimSpace(r.PostFormValue("drill_port")),
		DrillTimeout: strings.TrimSpace(r.PostFormValue("drill_timeout")),
	}
	last := -1
	for i := range f.Groups {
		n := strconv.Itoa(i + 1)
		g := planGroupForm{Machines: r.PostForm["g"+n+"_machines"], Pre: r.PostFormValue("g" + n + "_pre"), Post: r.PostFormValue("g" + n + "_post")}
		f.Groups[i] = g
		if !g.empty() {
			last = i
		}
	}
	p := api.Plan{Name: f.Name}
	for i := 0; i <= last; i++ {
		g := f.Groups[i]
		p.Groups = append(p.Groups, api.PlanGroup{Machines: g.Machines, Pre: parseActions(g.Pre), Post: parseActions(g.Post)})
	}
	if f.Name == "" {
		return f, p, errors.New("name the plan")
	}
	if len(p.Groups) == 0 {
		return f, p, errors.New("select the machines of group 1 at least")
	}
	if f.Drill {
		every, err := strconv.ParseFloat(f.DrillEvery, 64)
		if err != nil || every <= 0 {
			return f, p, fmt.Errorf("drill schedule %q: want a number of hours, e.g. %s", f.DrillEvery, defaultDrillEvery)
		}
		d := &api.PlanDrill{EverySeconds: every * 3600, BootCheck: f.DrillCheck}
		if d.BootPort, err = optInt(f.DrillPort, "boot port"); err != nil {
			return f, p, err
		}
		if d.TimeoutSeconds, err = optFloat(f.DrillTimeout, "boot timeout"); err != nil {
			return f, p, err
		}
		p.Drill = d
	}
	return f, p, nil
}

// optInt and optFloat parse an optional number of a form ("" is 0).
func optInt(s, what string) (int, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("%s %q: want a whole number", what, s)
	}
	return n, nil
}

func optFloat(s, what string) (float64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, fmt.Errorf("%s %q: want a number of seconds", what, s)
	}
	return n, nil
}

// create stores a new plan; a plan the console or the server refuses is
// shown again in the form with the reason, nothing stored.
func (h *plansHandler) create(w http.ResponseWriter, r *http.Request) {
	f, p, err := formPlan(r)
	if err == nil {
		p, err = h.backend.CreatePlan(r.Context(), p)
	}
	if err != nil {
		h.log.Warn("create plan", "plan", f.Name, "err", err)
		v, _ := h.view(r)
		f.Error = "The plan was not created: " + err.Error()
		v.Form = f
		render(w, r, h.log, http.StatusUnprocessableEntity, plansPage(v))
		return
	}
	h.log.Info("plan created from the console", "plan", p.Name, "remote", r.RemoteAddr)
	redirect(w, r, "/plans?created="+url.QueryEscape(p.Name)+"#plan-"+url.QueryEscape(p.Name))
}

// remove deletes a plan (refused while it has a live failover).
func (h *plansHandler) remove(w http.ResponseWriter, r *http.Request) {
	name := chi.URLParam(r, "plan")
	err := h.backend.DeletePlan(r.Context(), name)
	if errors.Is(err, ErrNotFound) {
		httpError(w, r, http.StatusNotFound, "There is no plan "+name+".")
		return
	}
	if err != nil {
		h.planFailed(w, r, name, "The plan was not deleted: "+err.Error())
		return
	}
	h.log.Info("plan deleted from the console", "plan", name, "remote", r.RemoteAddr)
	redirect(w, r, "/plans?deleted="+url.QueryEscape(name))
}

// planFailed shows the plans page with why an action on a plan was
// refused.
func (h *plansHandler) planFailed(w http.ResponseWriter, r *http.Request, name, msg string) {
	h.log.Warn("plan action refused", "plan", name, "err", msg)
	v, _ := h.view(r)
	v.Plan, v.PlanErr = name, msg
	render(w, r, h.log, http.StatusUnprocessableEntity, plansPage(v))
}

// act starts a job on a plan: "test" (to nbd or a drill to qemu),
// "failover" (planned or not, to nbd), "cleanup", "commit", "reprotect"
// (after the plan's committed planned failover, or forward after its
// failback) or "failback"; the browser goes to the job's page.
func (h *plansHandler) act(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	name, action := chi.URLParam(r, "plan"), chi.URLParam(r, "action")
	var j api.Job
	var err error
	switch action {
	case "test":
		req := api.FailoverRequest{Plan: name, Test: true, To: r.PostFormValue("to")}
		if req.To == api.ToQEMU {
			req.BootCheck = r.PostFormValue("boot_check")
			if req.BootPort, err = optInt(strings.TrimSpace(r.PostFormValue("boot_port")), "boot port"); err == nil {
				req.BootTimeout, err = optFloat(strings.TrimSpace(r.PostFormValue("boot_timeout")), "boot timeout")
			}
		}
		if err == nil {
			j, err = h.backend.StartFailover(ctx, req)
		}
	case "failover":
		j, err = h.backend.StartFailover(ctx, api.FailoverRequest{Plan: name, To: api.ToNBD, Planned: r.PostFormValue("planned") == "1"})
	case "cleanup":
		j, err = h.backend.Cleanup(ctx, api.FailoverAction{Plan: name})
	case "commit":
		j, err = h.backend.Commit(ctx, api.FailoverAction{Plan: name})
	case "reprotect":
		j, err = h.backend.ReprotectPlan(ctx, name)
	case "failback":
		j, err = h.backend.FailbackPlan(ctx, name)
	default:
		httpError(w, r, http.StatusNotFound, "No plan action "+action+".")
		return
	}
	if err != nil {
		h.planFailed(w, r, name, "Nothing was started: "+err.Error())
		return
	}
	h.log.Info("plan job started from the console", "plan", name, "action", action, "job", j.ID, "remote", r.RemoteAddr)
	redirect(w, r, "/jobs/"+url.PathEscape(j.ID))
}

// planActionURL is where a plan's buttons post.
func planActionURL(name, action string) templ.SafeURL {
	return templ.SafeURL("/plans/" + url.PathEscape(name) + "/" + action)
}

// actionText is a plan's action in a few words.
func actionText(a api.PlanAction) string {
	on := ""
	if a.On != "" {
		on = " (on " + a.On + " only)"
	}
	if a.Kind == "script" {
		return "script " + a.Path + on
	}
	return "manual: " + a.Text + on
}

// drillText is a plan's drill schedule in a few words.
func drillText(d *api.PlanDrill) string {
	s := "every " + humanDuration(time.Duration(d.EverySeconds*float64(time.Second)))
	var checks []string
	if d.BootCheck != "" {
		checks = append(checks, "console shows /"+d.BootCheck+"/")
	}
	if d.BootPort != 0 {
		checks = append(checks, "port "+strconv.Itoa(d.BootPort)+" answers")
	}
	if len(checks) > 0 {
		s += ", boot check: " + strings.Join(checks, " and ")
	}
	if d.TimeoutSeconds > 0 {
		s += " within " + humanDuration(time.Duration(d.TimeoutSeconds*float64(time.Second)))
	}
	return s
}

// groupN is the 1-based number of the group at index i.
func groupN(i int) string { return strconv.Itoa(i + 1) }
