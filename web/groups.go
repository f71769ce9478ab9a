package web

import (
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

// groupsHandler serves the replication groups (multi-VM consistency):
// each group's members and points, moving a machine into or out of a
// group, and a group point on request.
type groupsHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// groupPointsShown is how many of a group's newest points are listed.
const groupPointsShown = 10

// groupView is one group.
type groupView struct {
	Name      string
	Members   []api.Machine
	Points    []api.GroupPointJSON // newest first, at most groupPointsShown
	PointsErr string
}

// groupsView is what the groups page shows.
type groupsView struct {
	Session  *session
	Now      time.Time
	Machines []api.Machine
	Groups   []groupView
	Err      string
	Form     struct{ Machine, Group string }
	FormErr  string
	Done     string
}

func (h *groupsHandler) view(r *http.Request) (groupsView, int) {
	ctx := r.Context()
	v := groupsView{Session: sessionFrom(ctx), Now: h.now()}
	ms, err := h.backend.Machines(ctx)
	if err != nil {
		h.log.Error("list machines", "err", err)
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	v.Machines = ms
	byName := map[string]*groupView{}
	for _, m := range ms {
		if m.Group == "" {
			continue
		}
		g := byName[m.Group]
		if g == nil {
			g = &groupView{Name: m.Group}
			byName[m.Group] = g
		}
		g.Members = append(g.Members, m)
	}
	for _, g := range byName {
		ps, err := h.backend.GroupPoints(ctx, g.Name)
		if err != nil {
			h.log.Error("group points", "group", g.Name, "err", err)
			g.PointsErr = err.Error()
		}
		ps = slices.Clone(ps)
		slices.Reverse(ps)
		g.Points = ps[:min(len(ps), groupPointsShown)]
		v.Groups = append(v.Groups, *g)
	}
	slices.SortFunc(v.Groups, func(a, b groupView) int { return strings.Compare(a.Name, b.Name) })
	return v, http.StatusOK
}

// page lists the groups (?done=... says what the last action did).
func (h *groupsHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	v.Done = r.URL.Query().Get("done")
	render(w, r, h.log, status, groupsPage(v))
}

// setMember puts a machine in a group, or takes it out (group "").
func (h *groupsHandler) setMember(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	if status != http.StatusOK {
		render(w, r, h.log, status, groupsPage(v))
		return
	}
	v.Form.Machine, v.Form.Group = r.PostFormValue("machine"), strings.TrimSpace(r.PostFormValue("group"))
	if v.Form.Machine == "" {
		v.FormErr = "Choose a machine."
		render(w, r, h.log, http.StatusUnprocessableEntity, groupsPage(v))
		return
	}
	if err := h.backend.SetGroup(r.Context(), v.Form.Machine, v.Form.Group); err != nil {
		h.log.Warn("set group", "machine", v.Form.Machine, "group", v.Form.Group, "err", err)
		v.FormErr = "The group was not changed: " + err.Error()
		render(w, r, h.log, errorStatus(err, http.StatusUnprocessableEntity), groupsPage(v))
		return
	}
	h.log.Info("group set from the console", "machine", v.Form.Machine, "group", v.Form.Group, "remote", r.RemoteAddr)
	done := "Machine " + v.Form.Machine + " is now in group " + v.Form.Group + "."
	if v.Form.Group == "" {
		done = "Machine " + v.Form.Machine + " is in no group now."
	}
	redirect(w, r, "/groups?done="+url.QueryEscape(done))
}

// tag makes a group point now (form field kind: crash or app).
func (h *groupsHandler) tag(w http.ResponseWriter, r *http.Request) {
	group := chi.URLParam(r, "group")
	v, status := h.view(r)
	if status != http.StatusOK {
		render(w, r, h.log, status, groupsPage(v))
		return
	}
	if !slices.ContainsFunc(v.Groups, func(g groupView) bool { return g.Name == group }) {
		httpError(w, r, http.StatusNotFound, "There is no group "+group+".")
		return
	}
	gp, err := h.backend.GroupTag(r.Context(), group, r.PostFormValue("kind") == api.PointApp)
	if err != nil {
		h.log.Warn("group point", "group", group, "err", err)
		v.FormErr = "No group point was made for " + group + ": " + err.Error()
		render(w, r, h.log, http.StatusUnprocessableEntity, groupsPage(v))
		return
	}
	redirect(w, r, "/groups?done="+url.QueryEscape("Group point "+gp.ID+" of "+group+" made."))
}

// groupTagURL is where a group's tag form posts.
func groupTagURL(group string) templ.SafeURL {
	return templ.SafeURL("/groups/" + url.PathEscape(group) + "/points")
}

// groupMembers writes a group point's members, "a: p1, b: p2".
func groupMembers(gp api.GroupPointJSON) string {
	var parts []string
	for m, p := range gp.Members {
		parts = append(parts, m+": "+p)
	}
	slices.Sort(parts)
	return strings.Join(parts, ", ")
}

// timeText writes an RFC 3339 time of the API as the console writes times
// (as it is if it is not one).
func timeText(s string) string {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return s
	}
	return clockTime(t)
}
