package web

import (
	"context"
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

// machinesFragment is the id of the part of the machines page that htmx
// polls and swaps.
const machinesFragment = "machines"

// machinesHandler serves the machines page and its live fragment.
type machinesHandler struct {
	backend   Backend
	log       *slog.Logger
	now       func() time.Time
	serverURL string
}

// machinesPageView is what the machines page shows.
type machinesPageView struct {
	Session       *session
	NeedsPassword bool // no console password yet: suggest setting one
	Table         machinesView
}

// machinesView is what the polled fragment shows.
type machinesView struct {
	Machines  []api.Machine
	PS        *api.ProcessServer // nil if its figures could not be loaded
	Err       string             // the machines could not be loaded
	Now       time.Time
	ServerURL string
	// Failback is the failback offer of each machine in failback, by id.
	Failback map[string]failbackOffer
}

// page serves the whole machines page.
func (h *machinesHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	v.NeedsPassword = !h.backend.HasPassword(r.Context())
	render(w, r, h.log, status, machinesPage(v))
}

// fragment serves the machines table alone, for htmx to swap in. If the
// machines cannot be loaded it answers 200 with the error in place of the
// table: htmx does not swap error responses, which would leave stale values
// on screen with nothing to say so.
func (h *machinesHandler) fragment(w http.ResponseWriter, r *http.Request) {
	v, _ := h.view(r)
	render(w, r, h.log, http.StatusOK, machinesPage(v), machinesFragment)
}

func (h *machinesHandler) view(r *http.Request) (machinesPageView, int) {
	v := machinesPageView{
		Session: sessionFrom(r.Context()),
		Table:   machinesView{Now: h.now(), ServerURL: h.serverURL},
	}
	ms, err := h.backend.Machines(r.Context())
	if err != nil {
		h.log.Error("list machines", "err", err)
		v.Table.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	v.Table.Machines = ms
	v.Table.Failback = failbackOffers(r.Context(), h.backend, h.log, ms)
	if ps, err := h.backend.ProcessServer(r.Context()); err != nil {
		h.log.Error("process server figures", "err", err)
	} else {
		v.Table.PS = &ps
	}
	return v, http.StatusOK
}

// machineSummary counts the machines by state, e.g. "3 machines: 1 protected,
// 1 in initial replication, 1 needs resync · 1 agent disconnected".
func machineSummary(ms []api.Machine) string {
	var protected, initial, resync, unprotected, other, disconnected int
	for _, m := range ms {
		switch m.State {
		case api.StateProtected:
			protected++
		case api.StateInitial:
			initial++
		case api.StateResync:
			resync++
		case api.StateUnprotected:
			unprotected++
			continue // its agent is refused, not disconnected
		default:
			other++
		}
		if !m.Connected {
			disconnected++
		}
	}
	var parts []string
	add := func(n int, s string) {
		if n > 0 {
			parts = append(parts, strconv.Itoa(n)+" "+s)
		}
	}
	add(protected, "protected")
	add(initial, "in initial replication")
	add(resync, plural(resync, "needs", "need")+" resync")
	add(unprotected, "unprotected")
	add(other, "in another state")
	s := fmt.Sprintf("%d %s: %s", len(ms), plural(len(ms), "machine", "machines"), strings.Join(parts, ", "))
	if disconnected > 0 {
		s += fmt.Sprintf(" · %d %s disconnected", disconnected, plural(disconnected, "agent", "agents"))
	}
	return s
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// rpoClass flags a large data-loss window. asr has no RPO target to compare
// with, so the thresholds are the usual ones of continuous replication: a few
// minutes is worth a look, half an hour is trouble.
func rpoClass(d time.Duration) string {
	switch {
	case d > 30*time.Minute:
		return "rpo rpo-bad"
	case d > 5*time.Minute:
		return "rpo rpo-warn"
	default:
		return "rpo"
	}
}

// pointKind names a kind of recovery point.
func pointKind(kind string) string {
	switch kind {
	case api.PointCrash:
		return "crash-consistent"
	case api.PointApp:
		return "app-consistent"
	case "inconsistent":
		return "not crash-consistent (scan-mode disk)"
	default:
		return kind
	}
}

// agentCommand is the command line that registers a machine with this
// server, one option per line so that it reads well and pastes into a shell.
func agentCommand(serverURL string) string {
	if serverURL == "" {
		serverURL = "https://SERVER:8443"
	}
	return "asr agent --server " + serverURL + " \\\n" +
		"  --passphrase-file FILE \\\n" +
		"  --state DIR \\\n" +
		"  --name NAME \\\n" +
		"  --disk NAME=PATH \\\n" +
		"  --nbd unix:/run/asr.sock"
}

// progressValue is the value attribute of a <progress max="1">.
func progressValue(p float64) string { return strconv.FormatFloat(clamp01(p), 'f', 3, 64) }

// resyncView is what the resync confirmation page shows.
type resyncView struct {
	Session *session
	Machine api.Machine
	Disk    string // the disk to resync; "" for every disk
	Error   string
	Now     time.Time
}

// Disks returns the disks the resync covers.
func (v resyncView) Disks() []api.Disk {
	if v.Disk == "" {
		return v.Machine.Disks
	}
	for _, d := range v.Machine.Disks {
		if d.Name == v.Disk {
			return []api.Disk{d}
		}
	}
	return nil
}

// findMachine returns the machine of the request's {machine} path value.
func (h *machinesHandler) findMachine(r *http.Request) (api.Machine, int, string) {
	return findByPath(r, h.log, h.backend.Machines, "machine", "machine", "machines", func(m api.Machine) string { return m.ID })
}

// findByPath finds the item of list whose key is the request's {param}
// path value (one names one item in messages, what the list); a failed list is a 500, no such item a 404 (with the message
// to show).
func findByPath[T any](r *http.Request, log *slog.Logger, list func(context.Context) ([]T, error), param, one, what string, key func(T) string) (T, int, string) {
	var zero T
	items, err := list(r.Context())
	if err != nil {
		log.Error("list "+what, "err", err)
		return zero, http.StatusInternalServerError, "Could not load the " + what + ": " + err.Error()
	}
	v := chi.URLParam(r, param)
	for _, it := range items {
		if key(it) == v {
			return it, http.StatusOK, ""
		}
	}
	return zero, http.StatusNotFound, "There is no " + one + " " + v + "."
}

// resyncPage asks the operator to confirm a resync (GET
// /machines/{machine}/resync, optionally ?disk=NAME): what it covers, why it
// may be needed, and what it costs. Starting one is a POST from this page.
func (h *machinesHandler) resyncPage(w http.ResponseWriter, r *http.Request) {
	m, status, msg := h.findMachine(r)
	if status != http.StatusOK {
		httpError(w, r, status, msg)
		return
	}
	v := resyncView{Session: sessionFrom(r.Context()), Machine: m, Disk: r.URL.Query().Get("disk"), Now: h.now()}
	if len(v.Disks()) == 0 {
		httpError(w, r, http.StatusNotFound, "Machine "+m.Name+" has no disk "+v.Disk+".")
		return
	}
	render(w, r, h.log, http.StatusOK, resyncPage(v))
}

// startResync starts the confirmed resync and goes back to the machines page,
// where its progress shows. A refusal (say, a disk still in its initial
// replication) shows on the confirmation page and starts nothing.
func (h *machinesHandler) startResync(w http.ResponseWriter, r *http.Request) {
	m, status, msg := h.findMachine(r)
	if status != http.StatusOK {
		httpError(w, r, status, msg)
		return
	}
	v := resyncView{Session: sessionFrom(r.Context()), Machine: m, Disk: r.PostFormValue("disk"), Now: h.now()}
	if len(v.Disks()) == 0 {
		httpError(w, r, http.StatusNotFound, "Machine "+m.Name+" has no disk "+v.Disk+".")
		return
	}
	if err := h.backend.StartResync(r.Context(), m.ID, v.Disk); err != nil {
		h.log.Warn("start resync", "machine", m.ID, "disk", v.Disk, "err", err)
		v.Error = "The resync was not started: " + err.Error()
		render(w, r, h.log, http.StatusUnprocessableEntity, resyncPage(v))
		return
	}
	h.log.Info("resync requested from the console", "machine", m.ID, "disk", v.Disk, "remote", r.RemoteAddr)
	redirect(w, r, string(machineURL(m.Name)))
}

// resyncStatus describes a disk's resync in a few words, e.g. "Running: 45%
// compared, 12 MiB sent" or "Scheduled for 22:00 (in 3 h)".
func resyncStatus(rs *api.Resync, now time.Time) string {
	switch rs.State {
	case api.ResyncRunning:
		s := "Running"
		if rs.Total > 0 {
			s += ": " + percent(float64(rs.Compared)/float64(rs.Total)) + " compared, " + humanBytes(rs.Sent) + " sent"
		} else {
			s += ": starting"
		}
		return s
	case api.ResyncScheduled:
		if rs.Scheduled.IsZero() || !rs.Scheduled.After(now) {
			return "Starts as soon as the agent is connected"
		}
		if rs.Attempts > 0 {
			return "Retry at " + clockTime(rs.Scheduled) + " (" + in(now, rs.Scheduled) + ")"
		}
		return "Scheduled for " + clockTime(rs.Scheduled) + " (" + in(now, rs.Scheduled) + ")"
	case api.ResyncFailed:
		return "Failed after " + strconv.Itoa(rs.Attempts) + " " + plural(rs.Attempts, "attempt", "attempts")
	default:
		return rs.State
	}
}

// in is how far t lies ahead of now, e.g. "in 3 h".
func in(now, t time.Time) string {
	return "in " + humanDuration(t.Sub(now))
}

// resyncURL is the confirmation page of a resync of a machine's disk ("" for
// every disk); the same path without the query starts it.
func resyncURL(machineID, disk string) templ.SafeURL {
	u := "/machines/" + url.PathEscape(machineID) + "/resync"
	if disk != "" {
		u += "?disk=" + url.QueryEscape(disk)
	}
	return templ.SafeURL(u)
}
