package server

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/notify"
	"github.com/asrdr/asr/store"
)

// Alerts. Every PolicyEvery the alert loop observes each condition on each
// subject (alertConditions) and the engine (alertEngine.step) turns the
// observations into raises, escalations and clears, with hysteresis:
//
//   - An observation has a level (0 none, 1 warning, 2 critical) and a
//     hold: a level raises (or escalates) the alert only once it has held
//     continuously for the hold (0 for conditions that are durations
//     already, such as the RPO; HealthHold, 15 min as in ASR, for the
//     process server's figures, a vCenter and the target).
//   - While active, an alert's severity only rises; it is not lowered
//     when the figure falls between the thresholds.
//   - It clears only once the condition has been clearly false, without a
//     break, for AlertClear (default 2 min): "clearly" is below a lower
//     threshold for figures (RPO under 80% of the threshold; CPU and
//     memory under 70%; cache free over 35%; upload time under 20 min),
//     the state back to normal for the others (agent connected, resync
//     no longer failed, ...). A subject that is gone (a machine
//     unprotected or deleted, a vCenter removed) counts as clearly false.
//     A condition that cannot be measured (host figures unreadable, CPU
//     not sampled yet) is not observed: for a subject that is still there
//     it is observed with keep (the RPO of a machine whose disk is in
//     resync, whose start or threshold is unknown), which neither raises
//     nor clears, and breaks a clearing under way.
//   - While active, an alert's message follows the figure (the RPO now),
//     without a notice.
//
// One alert row per (kind, subject) while active (store: a unique index);
// each raise, escalation and clear is an event, and a notice sent from
// the row by the outbox (outbox.go).

// Defaults of the alert settings.
const (
	defaultHeartbeatLost = 15 * time.Minute
	defaultHealthHold    = 15 * time.Minute
	defaultAlertClear    = 2 * time.Minute
	// jobAlertFor is how long a failed job stays an alert.
	jobAlertFor = 24 * time.Hour
	// maxAlertRows bounds the alerts a listing reads.
	maxAlertRows = 1000
	// alertKeep is how long a resolved alert is kept.
	alertKeep = 30 * 24 * time.Hour
	// alertPruneEvery is how often the resolved alerts are pruned.
	alertPruneEvery = time.Hour
	// alertChangeUpdate is the engine's op for a new message of an active
	// alert: no event, no notice.
	alertChangeUpdate = "update"
)

// alertObs is one observation of a condition on a subject.
type alertObs struct {
	kind, key string
	level     int           // 0 none, 1 warning, 2 critical
	clear     bool          // clearly false: counts towards clearing
	keep      bool          // not measurable now: neither raise nor clear
	hold      time.Duration // how long a level must hold before it raises
	machineID string
	machine   string
	disk      string
	subject   string
	message   string
	action    string
}

func (o alertObs) id() string { return o.kind + "\x00" + o.key }

// alertTrack is what the engine remembers of a condition between passes.
type alertTrack struct {
	since      [3]time.Time // since when level >= 1 and >= 2 held (zero: not holding)
	clearSince time.Time    // since when it has been clearly false
}

// alertOp is what a pass decided for one subject.
type alertOp struct {
	change string // api.AlertChangeRaised, AlertChangeEscalate, AlertChangeResolved
	obs    alertObs
	sev    string
	active *store.Alert // the alert escalated or resolved
}

// alertEngine holds the hysteresis state; step is pure apart from it.
type alertEngine struct {
	clear time.Duration
	track map[string]*alertTrack
}

func severityOf(level int) string {
	if level >= 2 {
		return api.SeverityCritical
	}
	return api.SeverityWarning
}

// step takes one pass's observations and the active alerts, and says
// what to raise, escalate and resolve.
func (e *alertEngine) step(now time.Time, obs []alertObs, active []store.Alert) []alertOp {
	if e.track == nil {
		e.track = map[string]*alertTrack{}
	}
	act := map[string]*store.Alert{}
	for i := range active {
		act[active[i].Kind+"\x00"+active[i].Key] = &active[i]
	}
	seen := map[string]bool{}
	for _, o := range obs {
		seen[o.id()] = true
	}
	// An active alert whose subject is no longer observed is clearly
	// false (its subject went away).
	for id, a := range act {
		if !seen[id] {
			obs = append(obs, alertObs{kind: a.Kind, key: a.Key, clear: true, machineID: a.MachineID, machine: a.Machine,
				disk: a.Disk, subject: a.Subject, message: "no longer applies", action: a.Action})
		}
	}
	var ops []alertOp
	for _, o := range obs {
		id := o.id()
		if o.keep {
			if t := e.track[id]; t != nil {
				t.clearSince = time.Time{} // clearing needs no break
			}
			continue
		}
		t := e.track[id]
		if t == nil {
			t = &alertTrack{}
			e.track[id] = t
		}
		for l := 1; l <= 2; l++ {
			switch {
			case o.level < l:
				t.since[l] = time.Time{}
			case t.since[l].IsZero():
				t.since[l] = now
			}
		}
		if o.clear {
			if t.clearSince.IsZero() {
				t.clearSince = now
			}
		} else {
			t.clearSince = time.Time{}
		}
		lvl := 0
		for l := 1; l <= 2; l++ {
			if o.level >= l && now.Sub(t.since[l]) >= o.hold {
				lvl = l
			}
		}
		a := act[id]
		switch {
		case a == nil && lvl > 0:
			ops = append(ops, alertOp{change: api.AlertChangeRaised, obs: o, sev: severityOf(lvl)})
		case a != nil && lvl > api.SeverityRank(a.Severity):
			ops = append(ops, alertOp{change: api.AlertChangeEscalate, obs: o, sev: severityOf(lvl), active: a})
		case a != nil && o.clear && now.Sub(t.clearSince) >= e.clear:
			ops = append(ops, alertOp{change: api.AlertChangeResolved, obs: o, sev: a.Severity, active: a})
			delete(e.track, id)
			continue
		case a != nil && o.level > 0 && (o.message != a.Message || o.action != a.Action):
			ops = append(ops, alertOp{change: alertChangeUpdate, obs: o, sev: a.Severity, active: a})
		}
		if a == nil && lvl == 0 && o.level == 0 {
			delete(e.track, id) // nothing to remember
		}
	}
	// Forget subjects neither observed nor active.
	for id := range e.track {
		if !seen[id] && act[id] == nil {
			delete(e.track, id)
		}
	}
	sort.SliceStable(ops, func(i, j int) bool { return ops[i].obs.id() < ops[j].obs.id() })
	return ops
}

// alertStore is what the engine's pass needs of the vault database.
type alertStore interface {
	ActiveAlerts(ctx context.Context) ([]store.Alert, error)
	ActiveAlert(ctx context.Context, kind, key string) (store.Alert, error)
	RaiseAlert(ctx context.Context, a store.Alert) (int64, error)
	UpdateAlert(ctx context.Context, id int64, severity, message, action string, at time.Time) error
	ResolveAlert(ctx context.Context, id int64, message string, at time.Time) error
	PruneAlerts(ctx context.Context, before time.Time) (int64, error)
}

var _ alertStore = (*store.DB)(nil)

// alertState is the server's alert engine and notifier.
type alertState struct {
	mu        sync.Mutex // one pass at a time
	engine    alertEngine
	db        alertStore
	started   time.Time // the server's start: no contact is known before it
	notify    *notify.Notifier
	outbox    *outbox
	lastPrune time.Time
	passes    atomic.Int64 // engine passes done, for tests
}

// openAlerts sets the alert settings' defaults and starts the notifier
// with the stored settings.
func (s *Server) openAlerts(ctx context.Context) error {
	if s.cfg.HeartbeatLost <= 0 {
		s.cfg.HeartbeatLost = defaultHeartbeatLost
	}
	if s.cfg.PSHeartbeatLost <= 0 {
		s.cfg.PSHeartbeatLost = defaultPSHeartbeatLost
	}
	if s.cfg.HealthHold <= 0 {
		s.cfg.HealthHold = defaultHealthHold
	}
	if s.cfg.AlertClear <= 0 {
		s.cfg.AlertClear = defaultAlertClear
	}
	s.alerts.engine.clear = s.cfg.AlertClear
	s.alerts.started = s.now()
	s.alerts.db = s.db
	s.alerts.notify = notify.New(notify.Options{Logger: s.cfg.Logger})
	s.alerts.outbox = newOutbox(s.db, s.alerts.notify, s.now, s.log.With("component", "alerts"))
	// Settings that cannot be read (a sealed password this vault's key
	// does not open) leave the notifications off, not the server down.
	if err := s.loadNotifications(ctx); err != nil {
		s.log.Error("alert notifications are off: their settings cannot be read; set them again (asr alerts email ...)", "err", err)
	}
	return nil
}

// closeAlerts stops the notifier (what is queued and a waiting digest are
// sent, and marked).
func (s *Server) closeAlerts() {
	if s.alerts.notify != nil {
		s.alerts.notify.Close()
	}
}

// alertLoop evaluates the alert conditions every PolicyEvery, and sends
// the notices not sent yet: at once (those a stopped server left), then
// after each pass.
func (s *Server) alertLoop() {
	t := time.NewTicker(s.cfg.PolicyEvery)
	defer t.Stop()
	if err := s.alerts.outbox.flush(s.ctx); err != nil && s.ctx.Err() == nil {
		s.log.Error("alert notices", "err", err)
	}
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		if err := s.evaluateAlerts(s.ctx); err != nil && s.ctx.Err() == nil {
			s.log.Error("alerts", "err", err)
		}
		if s.cfg.AutoSwitch {
			if err := s.autoSwitch(s.ctx); err != nil && s.ctx.Err() == nil {
				s.log.Error("automatic switch", "err", err)
			}
		}
		if err := s.alerts.outbox.flush(s.ctx); err != nil && s.ctx.Err() == nil {
			s.log.Error("alert notices", "err", err)
		}
		s.alerts.passes.Add(1)
	}
}

// evaluateAlerts runs one pass of the engine and records what it decided.
func (s *Server) evaluateAlerts(ctx context.Context) error {
	s.alerts.mu.Lock()
	defer s.alerts.mu.Unlock()
	obs, err := s.alertConditions(ctx)
	if err != nil {
		return err
	}
	return s.applyAlertPass(ctx, obs, s.now())
}

// applyAlertPass steps the engine with a pass's observations and every
// active alert, and records its decisions: one that fails is logged and
// the others go on (the engine remembers nothing of a failed raise, so
// the next pass raises it again). It prunes the old resolved alerts.
func (s *Server) applyAlertPass(ctx context.Context, obs []alertObs, now time.Time) error {
	active, err := s.alerts.db.ActiveAlerts(ctx)
	if err != nil {
		return err
	}
	failed := 0
	for _, op := range s.alerts.engine.step(now, obs, active) {
		if err := s.applyAlertOp(ctx, op, now); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			failed++
			s.log.Error("alert not recorded; tried again next pass", "kind", op.obs.kind, "key", op.obs.key, "change", op.change, "err", err)
		}
	}
	if now.Sub(s.alerts.lastPrune) >= alertPruneEvery {
		n, err := s.alerts.db.PruneAlerts(ctx, now.Add(-alertKeep))
		if err != nil {
			s.log.Error("alerts", "err", err)
		} else {
			s.alerts.lastPrune = now
			if n > 0 {
				s.log.Info("old resolved alerts pruned", "alerts", n, "older_than", alertKeep)
			}
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d alert changes not recorded", failed)
	}
	return nil
}

// alertEventKind names the event of an alert's change; the RPO's keep
// their older names.
func alertEventKind(kind, change string) string {
	if kind == api.AlertRPO {
		switch change {
		case api.AlertChangeRaised:
			return "rpo-exceeded"
		case api.AlertChangeResolved:
			return "rpo-recovered"
		}
	}
	return kind + "-" + change
}

func (s *Server) applyAlertOp(ctx context.Context, op alertOp, now time.Time) error {
	o := op.obs
	var a store.Alert
	evSev, msg := op.sev, o.message
	switch op.change {
	case api.AlertChangeRaised:
		a = store.Alert{Kind: o.kind, Key: o.key, Severity: op.sev, State: store.AlertActive, MachineID: o.machineID,
			Machine: o.machine, Disk: o.disk, Subject: o.subject, Message: o.message, Action: o.action, Raised: now, Updated: now}
		id, err := s.alerts.db.RaiseAlert(ctx, a)
		if errors.Is(err, store.ErrAlertActive) {
			// Active already (a row the listing did not have): adopt it;
			// the next pass sees it and escalates or resolves it.
			old, gerr := s.alerts.db.ActiveAlert(ctx, o.kind, o.key)
			if gerr != nil {
				return fmt.Errorf("raise alert %s %s: %w; %w", o.kind, o.key, err, gerr)
			}
			s.log.Warn("alert already active; adopted", "kind", o.kind, "key", o.key, "alert", old.ID)
			return nil
		}
		if err != nil {
			return fmt.Errorf("raise alert %s: %w", o.kind, err)
		}
		a.ID = id
	case alertChangeUpdate:
		if err := s.alerts.db.UpdateAlert(ctx, op.active.ID, op.active.Severity, o.message, o.action, now); err != nil {
			return fmt.Errorf("update alert %d: %w", op.active.ID, err)
		}
		return nil
	case api.AlertChangeEscalate:
		if err := s.alerts.db.UpdateAlert(ctx, op.active.ID, op.sev, o.message, o.action, now); err != nil {
			return fmt.Errorf("escalate alert %d: %w", op.active.ID, err)
		}
		a = *op.active
		a.Severity, a.Message, a.Action, a.Updated, a.Acked = op.sev, o.message, o.action, now, time.Time{}
		msg = "escalated to " + op.sev + ": " + o.message
	case api.AlertChangeResolved:
		msg = "resolved: " + op.active.Message
		if o.message != "" {
			msg += "; now: " + o.message
		}
		// The row keeps what was wrong and says what it is now: the
		// resolve's notice is made from it.
		rowMsg := op.active.Message
		if o.message != "" && !strings.HasPrefix(o.message, "no longer applies") {
			rowMsg += "; now: " + o.message
		}
		if err := s.alerts.db.ResolveAlert(ctx, op.active.ID, rowMsg, now); err != nil {
			return fmt.Errorf("resolve alert %d: %w", op.active.ID, err)
		}
		a = *op.active
		evSev = api.SeverityInfo
	}
	// The notice goes from the row (outbox.go), after the pass.
	s.raise(ctx, store.Event{MachineID: o.machineID, Severity: evSev, Kind: alertEventKind(o.kind, op.change), Message: alertSubjectPrefix(a) + msg})
	return nil
}

// alertSubjectPrefix names what an alert is about in an event's message,
// when the event's machine column does not say it all.
func alertSubjectPrefix(a store.Alert) string {
	switch {
	case a.Disk != "":
		return "disk " + a.Disk + ": "
	case a.MachineID == "" && a.Subject != "":
		return a.Subject + ": "
	}
	return ""
}

func alertJSON(a store.Alert) api.Alert {
	return api.Alert{ID: a.ID, Kind: a.Kind, Severity: a.Severity, State: a.State, Machine: a.Machine, Disk: a.Disk,
		Subject: a.Subject, Message: a.Message, Action: a.Action, Raised: a.Raised, Updated: a.Updated,
		Resolved: a.Resolved, Acked: a.Acked}
}

// Alerts lists the active alerts (all: and the resolved ones after them).
func (s *Server) Alerts(ctx context.Context, all bool) ([]api.Alert, error) {
	as, err := s.db.Alerts(ctx, all, maxAlertRows)
	if err != nil {
		return nil, err
	}
	out := make([]api.Alert, len(as))
	for i, a := range as {
		out[i] = alertJSON(a)
	}
	return out, nil
}

// AckAlert acknowledges an alert (store.ErrNotFound if there is none).
func (s *Server) AckAlert(ctx context.Context, id int64) error {
	if err := s.db.AckAlert(ctx, id, s.now()); err != nil {
		return err
	}
	s.log.Info("alert acknowledged", "alert", id)
	return nil
}

// alertConditions observes every condition on every subject.
func (s *Server) alertConditions(ctx context.Context) ([]alertObs, error) {
	now := s.now()
	var obs []alertObs
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return nil, err
	}
	policies := map[string]replication.Policy{}
	var applyErrs []string // machine: error, for the target's alert
	stats := false
	for _, m := range ms {
		if m.Unprotected() || s.sourceFailedOverUnplanned(ctx, m.ID) {
			continue // no RPO, no agent expected (its alerts clear)
		}
		p, ok := policies[m.Policy]
		if !ok {
			if p, err = s.db.Policy(ctx, m.Policy); err != nil {
				return nil, fmt.Errorf("policy of machine %s: %w", m.Name, err)
			}
			policies[m.Policy] = p
		}
		st, ok := s.machineStats(m.ID)
		mo, err := s.machineObs(ctx, m, p, now, st, ok)
		if err != nil {
			return nil, err
		}
		obs = append(obs, mo...)
		if ok {
			stats = true
			if st.ApplyError != "" {
				applyErrs = append(applyErrs, m.Name+": "+st.ApplyError)
			}
		}
	}
	rev, err := s.reverseRPOObs(ctx, ms, now)
	if err != nil {
		return nil, err
	}
	obs = append(obs, rev...)
	obs = append(obs, targetObs(s.target.String(), stats, applyErrs, s.cfg.HealthHold))
	obs = append(obs, processServerObs(s.ProcessServer(), s.cfg.HealthHold)...)
	psObs, err := s.psHeartbeatObs(ctx, now)
	if err != nil {
		return nil, err
	}
	obs = append(obs, psObs...)
	vs, err := s.db.VCenters(ctx)
	if err != nil {
		return nil, err
	}
	for _, v := range vs {
		o := alertObs{kind: api.AlertVCenter, key: v.Name, subject: "vCenter " + v.Name, hold: s.cfg.HealthHold, clear: v.Connected}
		if !v.Connected {
			o.level = 2
			o.message = fmt.Sprintf("vCenter %s (%s) is unreachable: %s; the inventory shown is the last known", v.Name, v.URL, orNone(v.LastError))
			o.action = fmt.Sprintf("check that the vCenter answers at %s from this server and that the user %s can log in (asr vcenter list shows the error)", v.URL, v.User)
		}
		obs = append(obs, o)
	}
	jobs, err := s.db.FailedJobs(ctx, now.Add(-jobAlertFor))
	if err != nil {
		return nil, err
	}
	for _, j := range jobs {
		if now.Sub(j.EndedAt) < jobAlertFor {
			obs = append(obs, alertObs{kind: api.AlertJobFailed, key: j.ID, level: 1, subject: fmt.Sprintf("job %s (%s %s)", j.ID, j.Kind, j.Subject),
				message: fmt.Sprintf("job %s (%s %s) failed: %s", j.ID, j.Kind, j.Subject, orNone(j.Error)),
				action:  fmt.Sprintf("read the job's steps (asr jobs %s), fix the cause and start it again; this alert clears %s after the failure", j.ID, jobAlertFor)})
		}
	}
	if s.cert.Leaf != nil {
		obs = append(obs, certObs("server", "the server's TLS certificate", s.cert.Leaf.NotAfter, now,
			"restart the server: it issues itself a new certificate from its CA at start when the old one expires within 30 days"))
	}
	if s.ca != nil && s.ca.Cert != nil {
		obs = append(obs, certObs("ca", "the vault's CA certificate", s.ca.Cert.NotAfter, now,
			"the CA signs every agent's certificate: plan a new vault CA and register every agent again before it expires"))
	}
	return obs, nil
}

func orNone(s string) string {
	if s == "" {
		return "no error reported"
	}
	return s
}

// machineObs observes a machine's RPO, its agent's heartbeat, its resyncs,
// its scrub; st and ok are the process server's figures of it (ok: it has
// some).
func (s *Server) machineObs(ctx context.Context, m store.Machine, p replication.Policy, now time.Time, st procserver.MachineStats, ok bool) ([]alertObs, error) {
	var obs []alertObs
	protected := len(m.Disks) > 0
	for _, d := range m.Disks {
		if d.State != replication.StateProtected {
			protected = false
		}
	}
	// The RPO. Without a status from the agent since this server started
	// (an agent that never reconnected), it is measured from the newest
	// durable data the vault knows: the latest recovery point or the
	// agent's last contact. When it cannot be measured (a disk in resync,
	// no threshold, nothing to measure from), the machine is still there:
	// its RPO alert holds (keep), it does not clear.
	rpoKeep := alertObs{kind: api.AlertRPO, key: m.ID, machineID: m.ID, machine: m.Name, keep: true}
	if !protected || p.RPOThreshold <= 0 {
		obs = append(obs, rpoKeep)
	} else {
		var r time.Duration
		known, how := false, ""
		if ok && !st.StatusAt.IsZero() {
			r, known = rpo(st.LastStatus, st.StatusAt, now), true
		} else {
			var base time.Time
			pts, err := s.db.Points(ctx, m.ID, 1)
			if err != nil {
				return nil, err
			}
			if len(pts) > 0 {
				base, how = pts[0].Time, "the latest recovery point"
			}
			if m.LastSeen.After(base) {
				base, how = m.LastSeen, "the agent's last contact"
			}
			if !base.IsZero() {
				r, known = now.Sub(base), true
				how = fmt.Sprintf(" (no status from the agent since the server started: measured from %s, %s)", how, base.UTC().Format(time.RFC3339))
			}
		}
		if known {
			o := alertObs{kind: api.AlertRPO, key: m.ID, machineID: m.ID, machine: m.Name,
				clear: r <= p.RPOThreshold*8/10, level: rpoLevel(r, p.RPOThreshold),
				message: fmt.Sprintf("RPO %s exceeds the threshold of %s (policy %s)%s", r.Round(time.Second), p.RPOThreshold, p.Name, how),
				action: fmt.Sprintf("check the agent on %s (asr status --machine %s: connected, backlog, errors) and the network to the server; "+
					"critical at twice the threshold", m.Name, m.Name)}
			if o.level == 0 {
				o.message = fmt.Sprintf("RPO %s is back under the threshold of %s", r.Round(time.Second), p.RPOThreshold)
			}
			obs = append(obs, o)
		} else {
			obs = append(obs, rpoKeep)
		}
	}
	// The agent's heartbeat: not connected for HeartbeatLost (warning),
	// four times that (critical). No contact is known from before this
	// server started. A machine on a scale-out process server is
	// observed the same way, from its heartbeats' reports (machineStats).
	connected := ok && st.Connected
	last := s.alerts.started
	for _, t := range []time.Time{m.LastSeen, st.StatusAt} {
		if t.After(last) {
			last = t
		}
	}
	hb := alertObs{kind: api.AlertHeartbeat, key: m.ID, machineID: m.ID, machine: m.Name, clear: connected}
	if !connected {
		down := now.Sub(last)
		switch {
		case down > 4*s.cfg.HeartbeatLost:
			hb.level = 2
		case down > s.cfg.HeartbeatLost:
			hb.level = 1
		}
		hb.message = fmt.Sprintf("no connection from the agent of %s for %s (since %s)", m.Name, down.Round(time.Second), last.UTC().Format(time.RFC3339))
		hb.action = fmt.Sprintf("check that the asr agent runs on the guest %s (systemctl status asr-agent; journalctl -u asr-agent) and reaches this server's data port", m.Name)
	} else {
		hb.message = "the agent of " + m.Name + " is connected"
	}
	obs = append(obs, hb)
	return s.machineObsRest(ctx, m, obs)
}

// machineObsRest adds a machine's resync and scrub observations to obs.
func (s *Server) machineObsRest(ctx context.Context, m store.Machine, obs []alertObs) ([]alertObs, error) {
	// Resyncs that failed.
	rows, err := s.db.Resyncs(ctx, m.ID)
	if err != nil {
		return nil, err
	}
	for _, r := range rows {
		if r.State != store.ResyncFailed {
			continue
		}
		disk, known := "", false
		for _, d := range m.Disks {
			if d.Index == r.Disk {
				disk, known = d.Name, true
			}
		}
		if !known {
			// The machine was read before its disk was added (this pass
			// reads the resyncs later): not measurable now, and no alert
			// naming the disk by its number only.
			obs = append(obs, alertObs{kind: api.AlertResyncFailed, key: fmt.Sprintf("%s/%d", m.ID, r.Disk), keep: true, machineID: m.ID, machine: m.Name})
			continue
		}
		obs = append(obs, alertObs{kind: api.AlertResyncFailed, key: fmt.Sprintf("%s/%d", m.ID, r.Disk), level: 1, machineID: m.ID, machine: m.Name, disk: disk,
			message: fmt.Sprintf("the resync of disk %s of %s failed after %d attempts: %s; no recovery point is made until it succeeds", disk, m.Name, r.Attempts, orNone(r.LastError)),
			action:  fmt.Sprintf("fix the cause, then start it again: asr resync --machine %s --disk %s (or the Resync button in the console)", m.Name, disk)})
	}
	// What the last scrub found: damage (critical), or a scrub that could
	// not run to its end (warning: nothing is known to be damaged).
	switch m.ScrubOutcome {
	case store.ScrubDamaged:
		obs = append(obs, alertObs{kind: api.AlertScrubDamage, key: m.ID, level: 2, machineID: m.ID, machine: m.Name,
			message: fmt.Sprintf("the scrub of %s's replica at %s: %s", m.Name, m.LastScrub.UTC().Format(time.RFC3339), m.ScrubResult),
			action:  fmt.Sprintf("see which blocks: asr verify --machine %s; a resync repairs the replica (asr resync --machine %s); check the target's storage", m.Name, m.Name)})
	case store.ScrubFailed:
		obs = append(obs, alertObs{kind: api.AlertScrubFailed, key: m.ID, level: 1, machineID: m.ID, machine: m.Name,
			message: fmt.Sprintf("the scrub of %s's replica at %s did not finish: %s; the replica is not checked", m.Name, m.LastScrub.UTC().Format(time.RFC3339), m.ScrubResult),
			action:  fmt.Sprintf("fix the cause (the target's reachability, the server's logs), then scrub again: asr verify --machine %s", m.Name)})
	}
	return obs, nil
}

// targetObs observes the applier's writes to the target: one alert for
// the target, however many machines it fails (applyErrs: "machine:
// error"). Without any machine's figures (stats false: no agent came
// since the start) it cannot be told: keep.
func targetObs(target string, stats bool, applyErrs []string, hold time.Duration) alertObs {
	o := alertObs{kind: api.AlertTarget, key: target, subject: "target " + target, hold: hold, clear: len(applyErrs) == 0, keep: !stats}
	if len(applyErrs) > 0 {
		o.level = 2
		shown := applyErrs
		if len(shown) > 5 {
			shown = append(shown[:5:5], fmt.Sprintf("and %d more", len(applyErrs)-5))
		}
		o.message = fmt.Sprintf("the replication data of %d machines cannot be applied to the target %s (%s); the process server's cache fills meanwhile",
			len(applyErrs), target, strings.Join(shown, "; "))
		o.action = "check that the target storage is reachable and writable from this server (space, credentials, network); the applier retries on its own"
	}
	return o
}

// rpoLevel: warning over the threshold, critical over twice it.
func rpoLevel(r, threshold time.Duration) int {
	switch {
	case r > 2*threshold:
		return 2
	case r > threshold:
		return 1
	}
	return 0
}

// processServerObs observes the process server's health as ASR counts it:
// CPU and memory over 80% (warning) and 95% (critical), the cache disk's
// free space under 30% and 25%, the estimated cache upload time over 30
// and 45 minutes, each held for hold.
func processServerObs(ps api.ProcessServer, hold time.Duration) []alertObs {
	const subj = "process-server"
	mk := func(kind string, level int, clear bool, msg, action string) alertObs {
		return alertObs{kind: kind, key: subj, subject: subj, level: level, clear: clear, hold: hold, message: msg, action: action}
	}
	above := func(v, warn, crit float64) int {
		switch {
		case v > crit:
			return 2
		case v > warn:
			return 1
		}
		return 0
	}
	var obs []alertObs
	// CPU < 0 is not sampled yet, MemoryTotal 0 not read: unmeasured, not
	// low (it must not count towards clearing).
	if ps.HostError == "" && ps.CPU >= 0 {
		obs = append(obs,
			mk(api.AlertPSCPU, above(ps.CPU, 0.80, 0.95), ps.CPU < 0.70,
				fmt.Sprintf("the process server's CPU is %.0f%% busy (warning over 80%%, critical over 95%%, held %s)", ps.CPU*100, hold),
				"see what else runs on the server's host (top); give the host more CPUs or move machines to another server"))
	}
	if ps.HostError == "" && ps.MemoryTotal > 0 {
		obs = append(obs,
			mk(api.AlertPSMemory, above(ps.Memory, 0.80, 0.95), ps.Memory < 0.70,
				fmt.Sprintf("the process server's host uses %.0f%% of its memory (warning over 80%%, critical over 95%%, held %s)", ps.Memory*100, hold),
				"see what uses the memory on the server's host (top, free -m); give the host more memory"))
	}
	if ps.CacheError == "" && ps.CacheState != "unknown" && ps.CacheState != "" {
		obs = append(obs, mk(api.AlertPSCacheFree, above(1-ps.CacheFree, 0.70, 0.75), ps.CacheFree > 0.35,
			fmt.Sprintf("the process server's cache disk is %.0f%% free (warning under 30%%, critical under 25%%, held %s)", ps.CacheFree*100, hold),
			"free space on the cache disk (DATA/cache) or grow it; check that the target takes data (asr status --process-server: upload rate)"))
	}
	eta := ps.UploadETA
	obs = append(obs, mk(api.AlertPSUpload, above(eta.Minutes(), 30, 45), eta < 20*time.Minute,
		fmt.Sprintf("the estimated cache upload time is %s (warning over 30 min, critical over 45 min, held %s)", etaText(eta), hold),
		"check the target's reachability and bandwidth (asr status --process-server: upload rate, backlog); lower the agents' --max-rate if the link is saturated"))
	return obs
}

func etaText(d time.Duration) string {
	if d >= api.UploadStalled {
		return "unbounded (a backlog and no upload)"
	}
	return d.Round(time.Second).String()
}

// certObs observes a certificate's expiry: a warning 30 days before
// NotAfter, critical 7 days before.
func certObs(key, what string, notAfter, now time.Time, action string) alertObs {
	left := notAfter.Sub(now)
	o := alertObs{kind: api.AlertCertificate, key: key, subject: what, clear: left > 30*24*time.Hour, action: action}
	switch {
	case left < 7*24*time.Hour:
		o.level = 2
	case left < 30*24*time.Hour:
		o.level = 1
	}
	o.message = fmt.Sprintf("%s expires on %s (in %s)", what, notAfter.UTC().Format(time.RFC3339), left.Round(time.Hour))
	if left <= 0 {
		o.message = fmt.Sprintf("%s expired on %s", what, notAfter.UTC().Format(time.RFC3339))
	}
	return o
}

// errNoChannel is the test notification's answer when nothing is set up.
var errNoChannel = errors.New("no notification channel is set up: asr alerts email ... or asr alerts webhook --url URL")
