package server

import (
	"context"
	"sort"
	"strconv"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// This file is the console's stand-in for the alerts engine (branch
// "alerts"), which replaces it at the merge: until then the dashboard's
// alerts are derived from the events table.

// consoleAlertWindow is how many recent events alertsForConsole reads.
const consoleAlertWindow = 500

// consoleAlertTTL is how long an alert whose kind has no resolving event
// stays active.
const consoleAlertTTL = 24 * time.Hour

// resolvedBy names, for each kind of warning or error event, the kinds of
// the later event of the same machine that clears it.
var resolvedBy = map[string][]string{
	"rpo-exceeded":   {"rpo-recovered"},
	"resync-needed":  {"resync-done", "verify-done"},
	"resync-failed":  {"resync-done", "verify-done"},
	"drill-failed":   {"drill-passed"},
	"scrub-failed":   {"scrub-ok"},
	"damage":         {"scrub-ok", "resync-done"},
	"cache-warning":  {"cache-ok", "cache-critical"},
	"cache-critical": {"cache-ok", "cache-warning"},
}

// alertActions is what to do about an alert, by kind.
var alertActions = map[string]string{
	"rpo-exceeded":   "Check the agent's connection and the process server's backlog and upload rate.",
	"resync-needed":  "A resync runs in the resync window; start it now from the machine's page.",
	"resync-failed":  "Read the last error on the machine's page, fix it, and start the resync again.",
	"drill-failed":   "Open the drill's job for the boot check's output.",
	"scrub-failed":   "Read the scrub's result on the machine's page.",
	"damage":         "Resync the machine; recover from another point than a damaged one.",
	"cache-warning":  "Free space on the process server's cache disk.",
	"cache-critical": "Free space on the process server's cache disk now: agents are held back.",
}

// alertsForConsole returns the active alerts (all: the resolved too,
// newest first): each warning or error among the recent events that no
// later event of the same machine resolves (resolvedBy), or, of a kind
// nothing resolves, that is younger than consoleAlertTTL. An alert's id
// is its event's; acknowledgements are kept as settings (AckAlert).
func (s *Server) alertsForConsole(ctx context.Context, all bool) ([]api.Alert, error) {
	es, err := s.db.Events(ctx, "", consoleAlertWindow)
	if err != nil {
		return nil, err
	}
	now := s.now()
	names := map[string]string{}
	name := func(id string) string {
		if n, ok := names[id]; ok || id == "" {
			return n
		}
		if m, err := s.db.Machine(ctx, id); err == nil {
			names[id] = m.Name
		} else {
			names[id] = id
		}
		return names[id]
	}
	// es is newest first: an event's resolver, if any, comes before it.
	var out []api.Alert
	latest := map[string]bool{} // machine/kind already alerted: older repeats are folded
	for i, e := range es {
		sev := alertSeverity(e.Severity)
		if sev == "" || latest[e.MachineID+"/"+e.Kind] {
			continue
		}
		latest[e.MachineID+"/"+e.Kind] = true
		a := api.Alert{ID: e.ID, Kind: e.Kind, Severity: sev, State: api.AlertActive, Machine: name(e.MachineID),
			Message: e.Message, Action: alertActions[e.Kind], Raised: e.Time, Updated: e.Time}
		if e.MachineID == "" {
			a.Subject = "process-server"
		}
		if r, ok := resolution(es[:i], e); ok {
			a.State, a.Resolved = api.AlertResolved, r.Time
		} else if _, known := resolvedBy[e.Kind]; !known && now.Sub(e.Time) > consoleAlertTTL {
			a.State, a.Resolved = api.AlertResolved, e.Time.Add(consoleAlertTTL)
		}
		if v, err := s.db.Setting(ctx, alertAckKey(e.ID)); err == nil {
			if ns, err := strconv.ParseInt(v, 10, 64); err == nil {
				a.Acked = time.Unix(0, ns)
			}
		}
		if all || a.State == api.AlertActive {
			out = append(out, a)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Raised.After(out[j].Raised) })
	return out, nil
}

// resolution finds, among the newer events, the one that resolves e.
func resolution(newer []store.Event, e store.Event) (store.Event, bool) {
	for i := len(newer) - 1; i >= 0; i-- { // oldest of the newer first
		n := newer[i]
		if n.MachineID != e.MachineID {
			continue
		}
		for _, k := range resolvedBy[e.Kind] {
			if n.Kind == k {
				return n, true
			}
		}
	}
	return store.Event{}, false
}

// alertSeverity maps an event's severity to an alert's ("" for none).
func alertSeverity(sev string) string {
	switch sev {
	case "warning":
		return api.SeverityWarning
	case "error", "critical":
		return api.SeverityCritical
	}
	return ""
}

func alertAckKey(id int64) string { return "console_alert_ack_" + strconv.FormatInt(id, 10) }

// ackConsoleAlert acknowledges a derived alert (an event id).
func (s *Server) ackConsoleAlert(ctx context.Context, id int64) error {
	return s.db.SetSetting(ctx, alertAckKey(id), strconv.FormatInt(s.now().UnixNano(), 10))
}
