package web

import (
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"
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
	Machines  []Machine
	Err       string // the machines could not be loaded
	Now       time.Time
	ServerURL string
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
	return v, http.StatusOK
}

// machineSummary counts the machines by state, e.g. "3 machines: 1 protected,
// 1 in initial replication, 1 needs resync · 1 agent disconnected".
func machineSummary(ms []Machine) string {
	var protected, initial, resync, other, disconnected int
	for _, m := range ms {
		switch m.State {
		case StateProtected:
			protected++
		case StateInitial:
			initial++
		case StateResync:
			resync++
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
	case PointCrash:
		return "crash-consistent"
	case PointApp:
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
