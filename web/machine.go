package web

import (
	"context"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/a-h/templ"
	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// machineHandler serves a machine's page (/machines/{machine}, by name)
// and its tag action.
type machineHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// machineLiveFragment is the id of the part of a machine's page htmx
// polls: its status, figures and disks.
const machineLiveFragment = "machine-live"

// machineFragmentURL is where a machine's page polls its live part.
func machineFragmentURL(name string) string {
	return "/fragments/machines/" + url.PathEscape(name)
}

// machineEventsShown is how many of a machine's events its page lists.
const machineEventsShown = 50

// machinePointsListed is how many of the newest points the page lists (the
// timeline shows every one in its window).
const machinePointsListed = 20

// machinePageView is what a machine's page shows.
type machinePageView struct {
	Session   *session
	Now       time.Time
	Machine   api.Machine
	Policy    *api.PolicyJSON // nil if not found
	Points    []api.PointJSON // oldest first
	PointsErr string
	Events    []api.EventJSON // newest first
	Resyncs   []api.EventJSON // the resync events among them
	EventsErr string
	History   []api.HistorySample
	Failback  failbackOffer // what its failback direction allows now
	Tagged    string        // the point just made by Tag
	Error     string        // an action refused
}

// TimelineStart is where the points timeline begins: the retention of
// the machine's policy back from now (24 h if unknown), or the oldest
// point if that is later.
func (v machinePageView) TimelineStart() time.Time {
	d := 24 * time.Hour
	if v.Policy != nil {
		if r, err := time.ParseDuration(v.Policy.Retention); err == nil && r > 0 {
			d = r
		}
	}
	return v.Now.Add(-d)
}

// NewestPoints are the newest points, newest first.
func (v machinePageView) NewestPoints() []api.PointJSON {
	ps := slices.Clone(v.Points)
	slices.Reverse(ps)
	return ps[:min(len(ps), machinePointsListed)]
}

// anyPointWindow is the range of times a machine can be recovered to
// (asr recover --time): from the later of the oldest point and the
// policy's any-point-in-time window back from now, to the newest change
// the server holds (now, for a connected agent; its last report for one
// that is gone).
type anyPointWindow struct {
	From, To time.Time
	Window   time.Duration
}

// AnyPoint returns the machine's any-point-in-time window; ok is false
// without a point or a policy window.
func (v machinePageView) AnyPoint() (anyPointWindow, bool) {
	if v.Policy == nil || len(v.Points) == 0 {
		return anyPointWindow{}, false
	}
	d, err := time.ParseDuration(v.Policy.PITWindow)
	if err != nil || d <= 0 {
		return anyPointWindow{}, false
	}
	oldest, err := time.Parse(time.RFC3339Nano, v.Points[0].Time)
	if err != nil {
		return anyPointWindow{}, false
	}
	w := anyPointWindow{From: v.Now.Add(-d), To: v.Now, Window: d}
	if oldest.After(w.From) {
		w.From = oldest
	}
	if !v.Machine.Connected {
		w.To = v.Machine.LastSeen
		if rpo, _, ok := v.Machine.RPOAtLeast(v.Now); ok {
			w.To = v.Now.Add(-rpo)
		}
	}
	if w.To.Before(w.From) {
		w.To = w.From
	}
	return w, true
}

// isResyncEvent tells the events of a machine's resync history.
func isResyncEvent(e api.EventJSON) bool {
	return strings.HasPrefix(e.Kind, "resync") || strings.HasPrefix(e.Kind, "verify")
}

// view gathers what a machine's page shows (live: only its polled part).
func (h *machineHandler) view(r *http.Request, live bool) (machinePageView, int, string) {
	ctx := r.Context()
	name := chi.URLParam(r, "machine")
	v := machinePageView{Session: sessionFrom(ctx), Now: h.now()}
	m, code, msg := machineNamed(ctx, h.backend, h.log, name)
	if code != 0 {
		return v, code, msg
	}
	v.Machine = m
	if ps, err := h.backend.Policies(ctx); err == nil {
		for _, p := range ps {
			if p.Name == v.Machine.Policy {
				v.Policy = &p
			}
		}
	} else {
		h.log.Error("list policies", "err", err)
	}
	v.Failback = failbackOffers(ctx, h.backend, h.log, []api.Machine{v.Machine})[v.Machine.ID]
	if live {
		return v, http.StatusOK, ""
	}
	var err error
	if v.Points, err = h.backend.Points(ctx, name); err != nil {
		h.log.Error("list points", "machine", name, "err", err)
		v.PointsErr = err.Error()
	}
	if v.Events, err = h.backend.MachineEvents(ctx, name, machineEventsShown); err != nil {
		h.log.Error("list events", "machine", name, "err", err)
		v.EventsErr = err.Error()
	}
	for _, e := range v.Events {
		if isResyncEvent(e) {
			v.Resyncs = append(v.Resyncs, e)
		}
	}
	if v.History, err = h.backend.History(ctx, name, v.Now.Add(-historyWindow)); err != nil {
		h.log.Warn("machine history", "machine", name, "err", err)
	}
	return v, http.StatusOK, ""
}

// page serves a machine's page (?tagged=ID after a tag).
func (h *machineHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status, msg := h.view(r, false)
	if status != http.StatusOK {
		httpError(w, r, status, msg)
		return
	}
	v.Tagged = r.URL.Query().Get("tagged")
	render(w, r, h.log, http.StatusOK, machinePage(v))
}

// fragment serves the polled part of a machine's page. A machine gone (a
// deletion) or a failed load answers 200 with the message in its place:
// htmx swaps no error responses.
func (h *machineHandler) fragment(w http.ResponseWriter, r *http.Request) {
	v, status, msg := h.view(r, true)
	if status != http.StatusOK {
		render(w, r, h.log, http.StatusOK, machineGone(chi.URLParam(r, "machine"), msg))
		return
	}
	render(w, r, h.log, http.StatusOK, machinePage(v), machineLiveFragment)
}

// tag asks the machine's agent for a recovery point (form field kind:
// crash or app) and goes back to the machine's page, which names it. A
// refusal (an agent not connected, a machine unprotected) shows there and
// makes nothing.
func (h *machineHandler) tag(w http.ResponseWriter, r *http.Request) {
	v, status, msg := h.view(r, false)
	if status != http.StatusOK {
		httpError(w, r, status, msg)
		return
	}
	kind := r.PostFormValue("kind")
	if kind != api.PointCrash && kind != api.PointApp {
		v.Error = "Unknown kind of point " + kind + ": choose crash-consistent or application-consistent."
		render(w, r, h.log, http.StatusUnprocessableEntity, machinePage(v))
		return
	}
	p, err := h.backend.Tag(r.Context(), v.Machine.Name, kind == api.PointApp)
	if err != nil {
		h.log.Warn("tag from the console", "machine", v.Machine.Name, "err", err)
		v.Error = "No recovery point was made: " + err.Error()
		render(w, r, h.log, errorStatus(err, http.StatusUnprocessableEntity), machinePage(v))
		return
	}
	h.log.Info("point requested from the console", "machine", v.Machine.Name, "point", p.ID, "remote", r.RemoteAddr)
	redirect(w, r, string(machineURL(v.Machine.Name))+"?tagged="+url.QueryEscape(p.ID))
}

// recoverCommand is the command that recovers a point's disks as images.
func recoverCommand(machine, point string) string {
	return "asr recover --machine " + machine + " --point " + point + " --out DIR"
}

// recoverTimeCommand is the command that recovers the disks as of a time.
func recoverTimeCommand(machine string, t time.Time) string {
	return "asr recover --machine " + machine + " --time " + t.UTC().Format(time.RFC3339) + " --out DIR"
}

// pointTime parses a point's time for display ("" if it is not RFC 3339).
func pointTime(p api.PointJSON) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, p.Time)
	return t
}

// eventTime parses an event's time.
func eventTime(e api.EventJSON) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, e.Time)
	return t
}

// failoverPointURL is the failover form for a machine at a point.
func failoverPointURL(machine, point string) string {
	return newFailoverURL(machine) + "&point=" + url.QueryEscape(point)
}

// failoverKindURL is the failover form for a machine with a kind chosen.
func failoverKindURL(machine, kind string) string {
	return newFailoverURL(machine) + "&kind=" + url.QueryEscape(kind)
}

// machineTagURL is where a machine's tag form posts.
func machineTagURL(name string) templ.SafeURL {
	return templ.SafeURL("/machines/" + url.PathEscape(name) + "/tag")
}

// policyThreshold is a policy's RPO threshold (0 for none or unknown).
func policyThreshold(p *api.PolicyJSON) time.Duration {
	if p == nil {
		return 0
	}
	d, _ := time.ParseDuration(p.RPOThreshold)
	return d
}

// eventBadge is the badge class of an event's severity.
func eventBadge(sev string) string {
	switch sev {
	case "error", "critical":
		return "badge-bad"
	case "warning":
		return "badge-warn"
	}
	return "badge-ok"
}

// machineNamed finds the machine a page is about: its HTTP status and
// message when it cannot (0 and "" when found).
func machineNamed(ctx context.Context, b Backend, log *slog.Logger, name string) (api.Machine, int, string) {
	ms, err := b.Machines(ctx)
	if err != nil {
		log.Error("list machines", "err", err)
		return api.Machine{}, http.StatusInternalServerError, "Could not load the machines: " + err.Error()
	}
	for _, m := range ms {
		if m.Name == name {
			return m, 0, ""
		}
	}
	return api.Machine{}, http.StatusNotFound, "There is no machine " + name + "."
}
