package web

import (
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/a-h/templ"
	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// alertsFragment is the id of the part of the alerts page htmx polls.
const alertsFragment = "alerts"

// alertsEventLimit is how many recent events the alerts page lists, and
// alertsResolvedLimit how many resolved alerts.
const (
	alertsEventLimit    = 50
	alertsResolvedLimit = 50
)

// alertsHandler serves the alerts page: the active alerts with their
// Acknowledge button, the resolved ones, the recent events.
type alertsHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// alertsView is what the alerts page shows.
type alertsView struct {
	Session  *session
	Active   []api.Alert
	Resolved []api.Alert
	Events   []api.EventJSON
	Err      string
	// Done says what was just done (an acknowledgement).
	Done string
	Now  time.Time
}

func (h *alertsHandler) view(r *http.Request) (alertsView, int) {
	ctx := r.Context()
	v := alertsView{Session: sessionFrom(ctx), Now: h.now()}
	as, err := h.backend.Alerts(ctx, true)
	if err != nil {
		h.log.Error("list alerts", "err", err)
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	for _, a := range as {
		switch {
		case a.State == api.AlertActive:
			v.Active = append(v.Active, a)
		case len(v.Resolved) < alertsResolvedLimit:
			v.Resolved = append(v.Resolved, a)
		}
	}
	if v.Events, err = h.backend.Events(ctx, alertsEventLimit); err != nil {
		h.log.Error("list events", "err", err)
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	return v, http.StatusOK
}

// page serves the alerts page.
func (h *alertsHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	if id, err := strconv.ParseInt(r.URL.Query().Get("acked"), 10, 64); err == nil {
		for _, a := range append(v.Active, v.Resolved...) {
			if a.ID == id && !a.Acked.IsZero() {
				v.Done = "Acknowledged: the " + a.Kind + " alert of " + alertAbout(a) +
					". It stays active until its condition clears; an escalation to critical takes the acknowledgement back."
			}
		}
	}
	render(w, r, h.log, status, alertsPage(v))
}

// fragment serves the alerts page's polled part (200 even when the alerts
// could not be loaded: htmx swaps no error responses).
func (h *alertsHandler) fragment(w http.ResponseWriter, r *http.Request) {
	v, _ := h.view(r)
	render(w, r, h.log, http.StatusOK, alertsPage(v), alertsFragment)
}

// ack acknowledges an alert and goes back to the alerts page.
func (h *alertsHandler) ack(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseInt(chi.URLParam(r, "alert"), 10, 64)
	if err != nil || id <= 0 {
		http.Error(w, "404 page not found", http.StatusNotFound)
		return
	}
	switch err := h.backend.AckAlert(r.Context(), id); {
	case errors.Is(err, ErrNotFound):
		http.Error(w, "404 page not found", http.StatusNotFound)
		return
	case err != nil:
		h.log.Error("acknowledge alert", "alert", id, "err", err)
		v, _ := h.view(r)
		v.Err = "The alert was not acknowledged: " + err.Error()
		render(w, r, h.log, http.StatusUnprocessableEntity, alertsPage(v))
		return
	}
	redirect(w, r, "/alerts?acked="+strconv.FormatInt(id, 10))
}

// alertAbout names what an alert is about: machine/disk, or its subject.
func alertAbout(a api.Alert) string {
	switch {
	case a.Machine != "" && a.Disk != "":
		return a.Machine + " / " + a.Disk
	case a.Machine != "":
		return a.Machine
	}
	return a.Subject
}

// severityClass is the badge class of a severity.
func severityClass(s string) string {
	switch s {
	case api.SeverityCritical, "error":
		return "badge badge-bad"
	case api.SeverityWarning:
		return "badge badge-warn"
	}
	return "badge"
}

func alertAckURL(id int64) templ.SafeURL {
	return templ.SafeURL("/alerts/" + strconv.FormatInt(id, 10) + "/ack")
}
