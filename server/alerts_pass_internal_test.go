package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// faultyAlerts is the vault's alert store with faults injected: the raise
// of one subject fails, and the listing of the active alerts can hide one.
type faultyAlerts struct {
	alertStore
	failRaise string // a subject key whose raise fails
	hide      string // a subject key the active listing leaves out
}

func (f *faultyAlerts) RaiseAlert(ctx context.Context, a store.Alert) (int64, error) {
	if a.Key == f.failRaise {
		return 0, errors.New("injected: database is locked")
	}
	return f.alertStore.RaiseAlert(ctx, a)
}

func (f *faultyAlerts) ActiveAlerts(ctx context.Context) ([]store.Alert, error) {
	as, err := f.alertStore.ActiveAlerts(ctx)
	out := as[:0]
	for _, a := range as {
		if a.Key != f.hide {
			out = append(out, a)
		}
	}
	return out, err
}

func jobObs(n int) []alertObs {
	obs := make([]alertObs, n)
	for i := range obs {
		obs[i] = alertObs{kind: api.AlertJobFailed, key: fmt.Sprintf("job%04d", i), level: 1, message: "failed", action: "retry"}
	}
	return obs
}

func mustActive(t *testing.T, s *Server) map[string]store.Alert {
	t.Helper()
	as, err := s.db.ActiveAlerts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]store.Alert{}
	for _, a := range as {
		m[a.Kind+" "+a.Key] = a
	}
	return m
}

// More than a listing's worth of conditions are all raised, and stay
// raised pass after pass; one failing write does not stop the others and
// is raised on the next pass; a row already active is adopted.
func TestAlertPassManyConditionsAndAFailingWrite(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := &testClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	s := mustOpenServer(t, clock)
	s.alerts.engine.clear = time.Minute
	f := &faultyAlerts{alertStore: s.db, failRaise: "job0500"}
	s.alerts.db = f
	obs := jobObs(1100)
	if err := s.applyAlertPass(ctx, obs, clock.now()); err == nil || !strings.Contains(err.Error(), "1 alert changes not recorded") {
		t.Fatalf("pass with one failing raise: %v", err)
	}
	if n := len(mustActive(t, s)); n != 1099 {
		t.Fatalf("%d active after the first pass, want 1099 (all but the failed one)", n)
	}
	f.failRaise = ""
	for i := 0; i < 3; i++ {
		clock.add(time.Second)
		if err := s.applyAlertPass(ctx, obs, clock.now()); err != nil {
			t.Fatalf("pass %d: %v", i+2, err)
		}
	}
	active := mustActive(t, s)
	if len(active) != 1100 {
		t.Fatalf("%d active, want 1100", len(active))
	}
	// A row the listing misses is adopted, not an error (nor a second row).
	f.hide = "job0007"
	clock.add(time.Second)
	if err := s.applyAlertPass(ctx, obs, clock.now()); err != nil {
		t.Fatalf("pass with an active row unlisted: %v", err)
	}
	f.hide = ""
	after := mustActive(t, s)
	if len(after) != 1100 || after[api.AlertJobFailed+" job0007"].ID != active[api.AlertJobFailed+" job0007"].ID {
		t.Fatalf("after the adoption: %d active, job0007 %d was %d", len(after), after[api.AlertJobFailed+" job0007"].ID, active[api.AlertJobFailed+" job0007"].ID)
	}
	// They clear, all of them.
	clock.add(time.Second)
	if err := s.applyAlertPass(ctx, nil, clock.now()); err != nil {
		t.Fatal(err)
	}
	clock.add(2 * time.Minute)
	if err := s.applyAlertPass(ctx, nil, clock.now()); err != nil {
		t.Fatal(err)
	}
	if n := len(mustActive(t, s)); n != 0 {
		t.Fatalf("%d still active", n)
	}
}

// An observation with keep neither raises nor clears: an RPO alert whose
// machine's disk went into resync stays active however long; only the
// machine's going away clears it.
func TestEngineKeepHolds(t *testing.T) {
	t.Parallel()
	r := newEngineRig(t, 2*time.Minute)
	rpoObs := func(level int, clear, keep bool) alertObs {
		return alertObs{kind: api.AlertRPO, key: "m1", level: level, clear: clear, keep: keep, message: "RPO"}
	}
	if got := r.pass(0, rpoObs(1, false, false)); len(got) != 1 || got[0] != "raised warning" {
		t.Fatalf("raise: %v", got)
	}
	// Clearing starts, then the RPO cannot be measured: no clear, for long.
	r.pass(time.Minute, rpoObs(0, true, false))
	for i := 0; i < 10; i++ {
		if got := r.pass(time.Minute, rpoObs(0, false, true)); len(got) != 0 {
			t.Fatalf("unmeasured RPO changed the alert: %v", got)
		}
	}
	// Measurable again and low: clearing starts over (no break allowed).
	if got := r.pass(time.Minute, rpoObs(0, true, false)); len(got) != 0 {
		t.Fatalf("cleared on the first clear observation after a gap: %v", got)
	}
	if got := r.pass(time.Minute, rpoObs(1, false, false)); len(got) != 0 {
		t.Fatalf("raised again while active: %v", got)
	}
	// The machine is gone: not observed at all.
	r.pass(time.Minute)
	if got := r.pass(2 * time.Minute); len(got) != 1 || got[0] != "resolved" {
		t.Fatalf("gone machine: %v", got)
	}
}

// An active alert's message follows the figure, as an update (no notice).
func TestEngineUpdatesMessage(t *testing.T) {
	t.Parallel()
	e := alertEngine{clear: time.Minute}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	o := alertObs{kind: api.AlertRPO, key: "m1", level: 1, message: "RPO 20m", action: "check"}
	active := []store.Alert{{ID: 1, Kind: api.AlertRPO, Key: "m1", Severity: api.SeverityWarning, Message: "RPO 16m", Action: "check"}}
	ops := e.step(now, []alertObs{o}, active)
	if len(ops) != 1 || ops[0].change != alertChangeUpdate || ops[0].obs.message != "RPO 20m" || ops[0].sev != api.SeverityWarning {
		t.Fatalf("ops %+v", ops)
	}
	active[0].Message = "RPO 20m"
	if ops := e.step(now.Add(time.Second), []alertObs{o}, active); len(ops) != 0 {
		t.Fatalf("unchanged message: ops %+v", ops)
	}
}

func mustMachine(t *testing.T, s *Server, id, name string, disks ...store.Disk) store.Machine {
	t.Helper()
	ctx := context.Background()
	if _, _, err := s.db.CreateMachine(ctx, id, name, "1"); err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		if err := s.db.PutDisk(ctx, id, d); err != nil {
			t.Fatal(err)
		}
	}
	m, err := s.db.Machine(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func obsOf(obs []alertObs, kind string) (alertObs, bool) {
	for _, o := range obs {
		if o.kind == kind {
			return o, true
		}
	}
	return alertObs{}, false
}

// The RPO of an existing machine that cannot be measured is observed with
// keep; it is measured on the server's clock; a failed scrub is a
// warning of its own, damage a critical one.
func TestMachineObs(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := &testClock{t: time.Date(2030, 6, 1, 0, 0, 0, 0, time.UTC)} // far from the wall clock
	s := mustOpenServer(t, clock)
	p := replication.Policy{Name: "default", RPOThreshold: 15 * time.Minute}
	const id = "0123456789abcdef0123456789abcdef"
	m := mustMachine(t, s, id, "vm1",
		store.Disk{Index: 0, Name: "sda", Size: 1 << 20, State: store.DiskProtected},
		store.Disk{Index: 1, Name: "sdb", Size: 1 << 20, State: store.DiskResync})
	now := clock.now()
	st := procserver.MachineStats{Connected: true, StatusAt: now.Add(-20 * time.Minute)}
	for name, tc := range map[string]struct {
		m  store.Machine
		p  replication.Policy
		ok bool
	}{
		"disk in resync":   {m, p, true},
		"no threshold":     {withDisksProtected(m), replication.Policy{Name: "x"}, true},
		"nothing to start": {withDisksProtected(m), p, false}, // no status, no point, never seen
	} {
		obs, err := s.machineObs(ctx, tc.m, tc.p, now, st, tc.ok)
		if err != nil {
			t.Fatal(err)
		}
		if o, found := obsOf(obs, api.AlertRPO); !found || !o.keep || o.level != 0 || o.clear {
			t.Errorf("%s: RPO observation %+v (found %v), want keep", name, o, found)
		}
	}
	// Measured on the server's clock: 20 min by it.
	obs, err := s.machineObs(ctx, withDisksProtected(m), p, now, st, true)
	if err != nil {
		t.Fatal(err)
	}
	if o, _ := obsOf(obs, api.AlertRPO); o.keep || o.level != 1 || !strings.HasPrefix(o.message, "RPO 20m0s exceeds") {
		t.Fatalf("RPO observation %+v", o)
	}
	// Scrubs.
	for _, tc := range []struct {
		outcome, result, kind string
		level                 int
	}{
		{store.ScrubDamaged, "3 damaged blocks on sda", api.AlertScrubDamage, 2},
		{store.ScrubFailed, "failed: target unreachable", api.AlertScrubFailed, 1},
		{store.ScrubOK, "ok: 2 disks checked, no damaged blocks", "", 0},
	} {
		if err := s.db.SetScrub(ctx, id, now, tc.outcome, tc.result); err != nil {
			t.Fatal(err)
		}
		m, _ := s.db.Machine(ctx, id)
		obs, err := s.machineObs(ctx, m, p, now, st, true)
		if err != nil {
			t.Fatal(err)
		}
		_, damage := obsOf(obs, api.AlertScrubDamage)
		_, failed := obsOf(obs, api.AlertScrubFailed)
		switch o, _ := obsOf(obs, tc.kind); {
		case tc.kind == "" && (damage || failed):
			t.Errorf("%s: a scrub alert: %+v", tc.result, obs)
		case tc.kind != "" && (o.level != tc.level || damage == failed):
			t.Errorf("%s: %+v, want only %s at level %d", tc.result, o, tc.kind, tc.level)
		}
	}
}

func withDisksProtected(m store.Machine) store.Machine {
	m.Disks = append([]store.Disk(nil), m.Disks...)
	for i := range m.Disks {
		m.Disks[i].State = store.DiskProtected
	}
	return m
}

// Failed jobs are read by when they ended, not among the latest jobs.
func TestAlertConditionsFailedJobOfADay(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := &testClock{t: time.Date(2030, 6, 1, 0, 0, 0, 0, time.UTC)}
	s := mustOpenServer(t, clock)
	if err := s.db.AddJob(ctx, store.Job{ID: "00000000000000aa", Kind: "protect", Subject: "vc1/web", State: store.JobRunning}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 250; i++ { // started later than the failed one
		clock.add(time.Second)
		if err := s.db.AddJob(ctx, store.Job{ID: fmt.Sprintf("1%015x", i), Kind: "protect", Subject: "vc1/x", State: store.JobRunning}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.db.UpdateJob(ctx, "00000000000000aa", store.JobFailed, "[]", "ssh: handshake failed"); err != nil {
		t.Fatal(err)
	}
	obs, err := s.alertConditions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if o, ok := obsOf(obs, api.AlertJobFailed); !ok || o.key != "00000000000000aa" {
		t.Fatalf("no alert for the failed job: %+v", obs)
	}
	clock.add(jobAlertFor + time.Second)
	obs, err = s.alertConditions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if o, ok := obsOf(obs, api.AlertJobFailed); ok {
		t.Fatalf("a job failed over a day ago: %+v", o)
	}
}

// One target outage is one alert keyed by the target, naming the
// machines; without figures it is kept.
func TestTargetObs(t *testing.T) {
	t.Parallel()
	errs := []string{}
	for i := 0; i < 8; i++ {
		errs = append(errs, fmt.Sprintf("vm%d: 403 forbidden", i))
	}
	o := targetObs("azure://acct/ctr", true, errs, time.Minute)
	if o.key != "azure://acct/ctr" || o.machineID != "" || o.level != 2 || o.clear || o.keep ||
		!strings.Contains(o.message, "8 machines") || !strings.Contains(o.message, "vm0: 403") || !strings.Contains(o.message, "and 3 more") {
		t.Fatalf("%+v", o)
	}
	if o := targetObs("t", true, nil, time.Minute); o.level != 0 || !o.clear || o.keep {
		t.Fatalf("healthy: %+v", o)
	}
	if o := targetObs("t", false, nil, time.Minute); !o.keep {
		t.Fatalf("no figures: %+v", o)
	}
}

// The pass prunes the alerts resolved over 30 days ago (their resolve
// told), hourly.
func TestAlertPassPrunes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := &testClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	s := mustOpenServer(t, clock)
	now := clock.now()
	old, err := s.db.RaiseAlert(ctx, store.Alert{Kind: api.AlertJobFailed, Key: "old", Severity: api.SeverityWarning, Raised: now.Add(-40 * 24 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	recent, err := s.db.RaiseAlert(ctx, store.Alert{Kind: api.AlertJobFailed, Key: "recent", Severity: api.SeverityWarning, Raised: now.Add(-2 * 24 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	for id, at := range map[int64]time.Time{old: now.Add(-31 * 24 * time.Hour), recent: now.Add(-24 * time.Hour)} {
		if err := s.db.ResolveAlert(ctx, id, "", at); err != nil {
			t.Fatal(err)
		}
		if err := s.db.MarkAlertNotified(ctx, id, store.NoticeResolved, api.SeverityWarning, at); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.applyAlertPass(ctx, nil, now); err != nil {
		t.Fatal(err)
	}
	if _, err := s.db.Alert(ctx, old); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("an alert resolved 31 days ago is kept: %v", err)
	}
	if _, err := s.db.Alert(ctx, recent); err != nil {
		t.Fatalf("an alert resolved a day ago is pruned: %v", err)
	}
}
