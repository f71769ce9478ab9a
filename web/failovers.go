package web

import (
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// failoversHandler serves the live failovers, with their cleanup, commit
// and change of point, and the form that fails one machine over.
type failoversHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// failoversView is what the failovers page shows.
type failoversView struct {
	Session   *session
	Failovers []api.Failover
	// Points maps a failed-over machine to its points, for the change of
	// point.
	Points map[string][]api.PointJSON
	Err    string // the failovers could not be loaded
	Now    time.Time
	// Machine and ActionErr: why an action on a machine's failover was
	// refused.
	Machine, ActionErr string
}

func (h *failoversHandler) view(r *http.Request) (failoversView, int) {
	ctx := r.Context()
	v := failoversView{Session: sessionFrom(ctx), Now: h.now(), Points: map[string][]api.PointJSON{}}
	fs, err := h.backend.Failovers(ctx)
	if err != nil {
		h.log.Error("list failovers", "err", err)
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	v.Failovers = fs
	for _, f := range fs {
		if f.State != "active" {
			continue
		}
		if ps, err := h.backend.Points(ctx, f.Machine); err == nil {
			v.Points[f.Machine] = ps
		}
	}
	return v, http.StatusOK
}

// page serves the live failovers.
func (h *failoversHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	render(w, r, h.log, status, failoversPage(v))
}

// act starts the job that cleans up, commits or changes the point of a
// machine's live failover, and goes to the job's page.
func (h *failoversHandler) act(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	a := api.FailoverAction{Machine: strings.TrimSpace(r.PostFormValue("machine"))}
	action := chi.URLParam(r, "action")
	var j api.Job
	var err error
	switch action {
	case "cleanup":
		j, err = h.backend.Cleanup(ctx, a)
	case "commit":
		j, err = h.backend.Commit(ctx, a)
	case "change-point":
		a.Point = strings.TrimSpace(r.PostFormValue("point"))
		j, err = h.backend.ChangePoint(ctx, a)
	default:
		httpError(w, r, http.StatusNotFound, "No failover action "+action+".")
		return
	}
	if err != nil {
		h.log.Warn("failover action refused", "machine", a.Machine, "action", action, "err", err)
		v, _ := h.view(r)
		v.Machine, v.ActionErr = a.Machine, "Nothing was started: "+err.Error()
		render(w, r, h.log, http.StatusUnprocessableEntity, failoversPage(v))
		return
	}
	h.log.Info("failover action from the console", "machine", a.Machine, "action", action, "job", j.ID, "remote", r.RemoteAddr)
	redirect(w, r, "/jobs/"+url.PathEscape(j.ID))
}

// failoverForm is the form that fails one machine over, as typed.
type failoverForm struct {
	Machine string
	Kind    string // test, planned, unplanned
	Point   string // latest, latest-app or an id
	To      string // nbd, qemu, vsphere, azure

	BootCheck, BootPort, BootTimeout string

	VCenter, Datastore, Host, Pool, Folder, Network string
	PowerOn                                         bool

	Subscription, ResourceGroup, Location, VNet, Subnet, Size string

	Error string
}

// newFailoverView is what the form's page shows.
type newFailoverView struct {
	Session  *session
	Form     failoverForm
	Points   []api.PointJSON // newest first
	VCenters []string
	Err      string // the machine's points could not be loaded
}

func (h *failoversHandler) newView(r *http.Request, f failoverForm) (newFailoverView, int) {
	ctx := r.Context()
	v := newFailoverView{Session: sessionFrom(ctx), Form: f}
	if vcs, err := h.backend.VCenters(ctx); err == nil {
		for _, vc := range vcs {
			v.VCenters = append(v.VCenters, vc.Name)
		}
	}
	if f.Machine == "" {
		v.Err = "Choose the machine to fail over on the machines page."
		return v, http.StatusBadRequest
	}
	ps, err := h.backend.Points(ctx, f.Machine)
	if errors.Is(err, ErrNotFound) {
		v.Err = "There is no machine " + f.Machine + "."
		return v, http.StatusNotFound
	}
	if err != nil {
		h.log.Error("list points", "machine", f.Machine, "err", err)
		v.Err = "Could not load the recovery points: " + err.Error()
		return v, http.StatusInternalServerError
	}
	for i := len(ps) - 1; i >= 0; i-- {
		v.Points = append(v.Points, ps[i])
	}
	return v, http.StatusOK
}

// newPage serves the form that fails one machine over
// (/failovers/new?machine=NAME).
func (h *failoversHandler) newPage(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := failoverForm{Machine: q.Get("machine"), Kind: "test", Point: "latest", To: api.ToNBD}
	// Prefilled from a machine's page: the kind and the point chosen there.
	if k := q.Get("kind"); k == "planned" || k == "unplanned" {
		f.Kind = k
	}
	if p := q.Get("point"); p != "" {
		f.Point = p
	}
	v, status := h.newView(r, f)
	render(w, r, h.log, status, newFailoverPage(v))
}

// formFailover reads the form into the request it makes.
func formFailover(r *http.Request) (failoverForm, api.FailoverRequest, error) {
	val := func(k string) string { return strings.TrimSpace(r.PostFormValue(k)) }
	f := failoverForm{Machine: val("machine"), Kind: val("kind"), Point: val("point"), To: val("to"),
		BootCheck: r.PostFormValue("boot_check"), BootPort: val("boot_port"), BootTimeout: val("boot_timeout"),
		VCenter: val("vcenter"), Datastore: val("datastore"), Host: val("host"), Pool: val("pool"), Folder: val("folder"), Network: val("network"),
		PowerOn:      r.PostFormValue("power_on") != "",
		Subscription: val("subscription"), ResourceGroup: val("resource_group"), Location: val("location"),
		VNet: val("vnet"), Subnet: val("subnet"), Size: val("size")}
	req := api.FailoverRequest{Machine: f.Machine, To: f.To, Point: f.Point}
	switch f.Kind {
	case "test":
		req.Test = true
	case "planned":
		req.Planned = true
		if req.Point == "latest" {
			req.Point = "" // a planned failover takes its own last point
		}
	case "unplanned":
	default:
		return f, req, errors.New("choose a test failover, a planned or an unplanned failover")
	}
	var err error
	switch f.To {
	case api.ToQEMU:
		req.BootCheck = f.BootCheck
		if req.BootPort, err = optInt(f.BootPort, "boot port"); err != nil {
			return f, req, err
		}
		if req.BootTimeout, err = optFloat(f.BootTimeout, "boot timeout"); err != nil {
			return f, req, err
		}
	case api.ToVSphere:
		req.VSphere = &api.VSphereTarget{VCenter: f.VCenter, Datastore: f.Datastore, Host: f.Host, Pool: f.Pool, Folder: f.Folder, Network: f.Network, PowerOn: f.PowerOn}
	case api.ToAzure:
		req.Azure = &api.AzureTarget{Subscription: f.Subscription, ResourceGroup: f.ResourceGroup, Location: f.Location,
			VNet: f.VNet, Subnet: f.Subnet, Size: f.Size}
	}
	return f, req, nil
}

// start starts the failover of one machine and goes to its job's page; a
// request refused is shown again in the form with the reason.
func (h *failoversHandler) start(w http.ResponseWriter, r *http.Request) {
	f, req, err := formFailover(r)
	var j api.Job
	if err == nil {
		j, err = h.backend.StartFailover(r.Context(), req)
	}
	if err != nil {
		h.log.Warn("start failover", "machine", f.Machine, "err", err)
		f.Error = "Nothing was started: " + err.Error()
		v, _ := h.newView(r, f)
		render(w, r, h.log, http.StatusUnprocessableEntity, newFailoverPage(v))
		return
	}
	h.log.Info("failover started from the console", "machine", f.Machine, "job", j.ID, "remote", r.RemoteAddr)
	redirect(w, r, "/jobs/"+url.PathEscape(j.ID))
}

// failoverKind names a failover's kind.
func failoverKind(kind string) string {
	if kind == api.FailoverTest {
		return "test failover"
	}
	return "failover"
}

// failoverStateClass is the badge of a failover's state.
func failoverStateClass(state string) string {
	switch state {
	case "active", "committed":
		return "badge badge-ok"
	case "failed":
		return "badge badge-bad"
	case "starting":
		return "badge badge-initial"
	}
	return "badge"
}

// newFailoverURL is the form that fails a machine over.
func newFailoverURL(machine string) string {
	return "/failovers/new?machine=" + url.QueryEscape(machine)
}
