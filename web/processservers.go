package web

import (
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

// processServersHandler serves the process servers (the built-in one and
// every scale-out one: asr ps list) and ASR's "switch": a machine moved to
// another process server, or every machine of one moved away
// (docs/ARCHITECTURE.md, "Scale-out process servers").
type processServersHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// processServersView is what the page shows.
type processServersView struct {
	Session  *session
	Now      time.Time
	PSs      []api.ProcessServerInfo
	Machines []string // protected machines' names, for the switch form
	Err      string   // a refusal, or why the lists could not be read
	Done     string
	Form     psSwitchForm
}

// psSwitchForm is the switch form as typed.
type psSwitchForm struct{ Machine, To string }

// Destinations are where a machine can be switched to: the least loaded
// (auto), the built-in one, each scale-out one.
func (v processServersView) Destinations() []string {
	out := []string{api.AutoProcessServer}
	for _, p := range v.PSs {
		out = append(out, p.Name)
	}
	return out
}

// destinationText names a destination in the forms.
func destinationText(name string) string {
	switch name {
	case api.AutoProcessServer:
		return "the least loaded healthy one (auto)"
	case api.BuiltinProcessServer:
		return "builtin (this server's own)"
	}
	return name
}

// psStateClass is a process server's state badge.
func psStateClass(state string) string {
	if state == api.PSHealthy {
		return "badge badge-ok"
	}
	return "badge badge-bad"
}

// heartbeatText is when a process server's last heartbeat came.
func heartbeatText(now time.Time, p api.ProcessServerInfo) string {
	switch {
	case p.Builtin:
		return "in this server"
	case p.LastHeartbeat.IsZero():
		return "none since this server started"
	}
	return ago(now, p.LastHeartbeat)
}

func (h *processServersHandler) view(r *http.Request) (processServersView, int) {
	ctx := r.Context()
	v := processServersView{Session: sessionFrom(ctx), Now: h.now(), Done: r.URL.Query().Get("done")}
	pss, err := h.backend.ProcessServers(ctx)
	if err != nil {
		h.log.Error("list process servers", "err", err)
		v.Err = "The process servers could not be listed: " + err.Error()
		return v, http.StatusInternalServerError
	}
	v.PSs = pss
	ms, err := h.backend.Machines(ctx)
	if err != nil {
		h.log.Error("list machines", "err", err)
		v.Err = "The machines could not be listed: " + err.Error()
		return v, http.StatusInternalServerError
	}
	for _, m := range ms {
		if !m.Unprotected {
			v.Machines = append(v.Machines, m.Name)
		}
	}
	return v, http.StatusOK
}

func (h *processServersHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	render(w, r, h.log, status, processServersPage(v))
}

// refused shows the page again with the server's refusal (prefixed by
// what it means) and the form as typed.
func (h *processServersHandler) refused(w http.ResponseWriter, r *http.Request, v processServersView, what, prefix string, err error) {
	h.log.Warn(what+" refused", "err", err, "remote", r.RemoteAddr)
	v.Err = prefix + err.Error()
	render(w, r, h.log, errorStatus(err, http.StatusConflict), processServersPage(v))
}

// switchMachine moves one machine (SwitchProcessServer: it returns once
// the old process server has handed the machine over).
func (h *processServersHandler) switchMachine(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	if status != http.StatusOK {
		render(w, r, h.log, status, processServersPage(v))
		return
	}
	v.Form = psSwitchForm{Machine: strings.TrimSpace(r.PostFormValue("machine")), To: strings.TrimSpace(r.PostFormValue("to"))}
	if v.Form.Machine == "" || v.Form.To == "" {
		v.Err = "Choose the machine and where it goes."
		render(w, r, h.log, http.StatusBadRequest, processServersPage(v))
		return
	}
	to, err := h.backend.SwitchProcessServer(r.Context(), v.Form.Machine, v.Form.To)
	if err != nil {
		h.refused(w, r, v, "process server switch", "Nothing was moved: ", err)
		return
	}
	h.log.Info("process server switched from the console", "machine", v.Form.Machine, "to", to, "remote", r.RemoteAddr)
	redirect(w, r, "/process-servers?done="+url.QueryEscape("Machine "+v.Form.Machine+" is served by process server "+to+" now."))
}

// moveAll moves every machine of a process server elsewhere (SwitchAll,
// one machine at a time; it stops at the first that fails).
func (h *processServersHandler) moveAll(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	if status != http.StatusOK {
		render(w, r, h.log, status, processServersPage(v))
		return
	}
	from, to := chi.URLParam(r, "ps"), strings.TrimSpace(r.PostFormValue("to"))
	moved, err := h.backend.SwitchAll(r.Context(), from, to)
	if err != nil {
		prefix := "Nothing was moved: "
		if len(moved) > 0 {
			prefix = "The move stopped after " + strings.Join(moved, ", ") + " had moved: "
		}
		h.refused(w, r, v, "process server move", prefix, err)
		return
	}
	h.log.Info("process server emptied from the console", "from", from, "to", to, "machines", len(moved), "remote", r.RemoteAddr)
	done := "Process server " + from + " had no machines to move."
	if len(moved) > 0 {
		done = strconv.Itoa(len(moved)) + " " + plural(len(moved), "machine", "machines") + " moved from process server " + from + ": " + strings.Join(moved, ", ") + "."
	}
	redirect(w, r, "/process-servers?done="+url.QueryEscape(done))
}

// moveURL is where a process server's "move all" form posts.
func moveURL(name string) templ.SafeURL {
	return templ.SafeURL("/process-servers/" + url.PathEscape(name) + "/move")
}
