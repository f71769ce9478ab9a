package web

import (
	"log/slog"
	"net/http"
	"net/url"
	"time"

	"github.com/a-h/templ"

	"github.com/asrdr/asr/server/api"
)

// dashboardFragment is the id of the part of the dashboard htmx polls
// every 5 s; chartsFragment that of its charts, polled every 30 s (the
// history is sampled once a minute, and reading it is the page's costly
// part).
const (
	dashboardFragment = "dashboard"
	chartsFragment    = "dashboard-charts"
)

// dashboardHandler serves the console's home: the health of everything at
// a glance.
type dashboardHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// Machine statuses as the console shows them: a machine's replication
// state, except that an agent not connected shows as disconnected (its
// state secondary) and a machine whose protection ended as unprotected.
const (
	statusDisconnected = "disconnected"
)

// machineStatus is what the console calls a machine's state.
func machineStatus(m api.Machine) string {
	switch {
	case m.Unprotected:
		return api.StateUnprotected
	case !m.Connected:
		return statusDisconnected
	}
	return m.State
}

// healthCounts counts the machines by status, the active alerts by
// severity, the live failovers and the running jobs.
type healthCounts struct {
	Machines, Protected, Initial, Resync, Disconnected, Unprotected int
	Critical, Warning                                               int
	Failovers, Jobs                                                 int
}

// dashboardView is what the dashboard shows.
type dashboardView struct {
	Session       *session
	NeedsPassword bool // no console password yet: suggest setting one
	Now           time.Time
	Err           string // the machines could not be loaded
	Machines      []api.Machine
	Counts        healthCounts
	Alerts        []api.Alert
	AlertsErr     string
	Jobs          []api.Job // running
	Thresholds    map[string]time.Duration
	History       map[string][]api.HistorySample
}

// Threshold is the RPO threshold of a machine's policy (0: unknown).
func (v dashboardView) Threshold(m api.Machine) time.Duration { return v.Thresholds[m.Policy] }

// view gathers what the dashboard shows; the machines' history only with
// charts.
func (h *dashboardHandler) view(r *http.Request, charts bool) (dashboardView, int) {
	ctx := r.Context()
	now := h.now()
	v := dashboardView{Session: sessionFrom(ctx), Now: now, Thresholds: map[string]time.Duration{}, History: map[string][]api.HistorySample{}}
	ms, err := h.backend.Machines(ctx)
	if err != nil {
		h.log.Error("list machines", "err", err)
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	v.Machines = ms
	v.Counts.Machines = len(ms)
	for _, m := range ms {
		switch machineStatus(m) {
		case api.StateProtected:
			v.Counts.Protected++
		case api.StateInitial:
			v.Counts.Initial++
		case api.StateResync:
			v.Counts.Resync++
		case statusDisconnected:
			v.Counts.Disconnected++
		case api.StateUnprotected:
			v.Counts.Unprotected++
		}
		if m.Unprotected || !charts {
			continue
		}
		hist, err := h.backend.History(ctx, m.Name, now.Add(-historyWindow))
		if err != nil {
			h.log.Warn("machine history", "machine", m.Name, "err", err)
		}
		v.History[m.Name] = hist
	}
	if as, err := h.backend.Alerts(ctx, false); err != nil {
		h.log.Error("list alerts", "err", err)
		v.AlertsErr = err.Error()
	} else {
		v.Alerts = as
		for _, a := range as {
			switch a.Severity {
			case api.SeverityCritical:
				v.Counts.Critical++
			case api.SeverityWarning:
				v.Counts.Warning++
			}
		}
	}
	if fs, err := h.backend.Failovers(ctx); err != nil {
		h.log.Error("list failovers", "err", err)
	} else {
		v.Counts.Failovers = len(fs)
	}
	if js, err := h.backend.Jobs(ctx, 50); err != nil {
		h.log.Error("list jobs", "err", err)
	} else {
		for _, j := range js {
			if j.State == api.JobRunning {
				v.Jobs = append(v.Jobs, j)
			}
		}
		v.Counts.Jobs = len(v.Jobs)
	}
	if ps, err := h.backend.Policies(ctx); err != nil {
		h.log.Error("list policies", "err", err)
	} else {
		for _, p := range ps {
			if d, err := time.ParseDuration(p.RPOThreshold); err == nil {
				v.Thresholds[p.Name] = d
			}
		}
	}
	return v, http.StatusOK
}

// page serves the dashboard.
func (h *dashboardHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r, true)
	v.NeedsPassword = !h.backend.HasPassword(r.Context())
	render(w, r, h.log, status, dashboardPage(v))
}

// fragment serves the dashboard's polled part (200 even when the machines
// could not be loaded: htmx swaps no error responses).
func (h *dashboardHandler) fragment(w http.ResponseWriter, r *http.Request) {
	v, _ := h.view(r, false)
	render(w, r, h.log, http.StatusOK, dashboardPage(v), dashboardFragment)
}

// chartsFragment serves the dashboard's charts alone.
func (h *dashboardHandler) charts(w http.ResponseWriter, r *http.Request) {
	v, _ := h.view(r, true)
	render(w, r, h.log, http.StatusOK, dashboardPage(v), chartsFragment)
}

// rpoText writes a machine's RPO for a table: "0.8 s", or "≥ 2 h 10 min"
// when only a lower bound is known (an agent gone since the server
// started), or "" when nothing is known.
func rpoText(m api.Machine, now time.Time) string {
	d, exact, ok := m.RPOAtLeast(now)
	switch {
	case !ok:
		return ""
	case exact:
		return humanDuration(d)
	}
	return "≥ " + humanDuration(d)
}

// rpoOf is a machine's RPO (or its lower bound) for classes and bars.
func rpoOf(m api.Machine, now time.Time) time.Duration {
	d, _, _ := m.RPOAtLeast(now)
	return d
}

// rpoClassFor flags a machine's RPO: against its policy's threshold when
// known (over it is bad, over half of it a warning), else the usual
// thresholds of rpoClass.
func rpoClassFor(d, threshold time.Duration) string {
	switch {
	case threshold <= 0:
		return rpoClass(d)
	case d > threshold:
		return "rpo rpo-bad"
	case d > threshold/2:
		return "rpo rpo-warn"
	}
	return "rpo"
}

// rpoBar draws a machine's RPO as a bar against its threshold: the bar
// fills the width at twice the threshold, the threshold is a mark.
func rpoBar(d, threshold time.Duration) string {
	const w = 120
	full := 2 * threshold
	if full <= 0 {
		full = time.Hour
	}
	fill := clamp01(float64(d)/float64(full)) * w
	cls := "bar-ok"
	switch rpoClassFor(d, threshold) {
	case "rpo rpo-bad":
		cls = "bar-bad"
	case "rpo rpo-warn":
		cls = "bar-warn"
	}
	s := `<svg class="rpo-bar" viewBox="0 0 120 12" width="120" height="12" aria-hidden="true">` +
		`<rect class="bar-bg" x="0" y="0" width="120" height="12" rx="2"/>` +
		`<rect class="` + cls + `" x="0" y="0" width="` + f1(fill) + `" height="12" rx="2"/>`
	if threshold > 0 {
		s += `<line class="bar-threshold" x1="60" y1="0" x2="60" y2="12"/>`
	}
	return s + `</svg>`
}

// machineURL is a machine's page.
func machineURL(name string) templ.SafeURL {
	return templ.SafeURL("/machines/" + url.PathEscape(name))
}

// severityBadge is the badge class of an alert's severity.
func severityBadge(sev string) string {
	if sev == api.SeverityCritical {
		return "badge-bad"
	}
	return "badge-warn"
}

// stateWords names a replication state in a few words, secondary to a
// machine's "Disconnected".
func stateWords(state string) string {
	switch state {
	case api.StateProtected:
		return "protected when last connected"
	case api.StateInitial:
		return "initial replication not finished"
	case api.StateResync:
		return "needs resync"
	}
	return state
}

// jobSteps counts a job's steps that are over (done or skipped) and all
// those started.
func jobSteps(j api.Job) (done, total int) {
	for _, st := range j.Steps {
		if st.State == "done" || st.State == "skipped" {
			done++
		}
	}
	return done, len(j.Steps)
}

// runningStep is a job's step that runs now.
func runningStep(j api.Job) (api.JobStep, bool) {
	for _, st := range j.Steps {
		if st.State == api.JobRunning {
			return st, true
		}
	}
	return api.JobStep{}, false
}
