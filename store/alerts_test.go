package store

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// One active alert per kind and subject; resolved ones do not count;
// acknowledging an unknown alert is ErrNotFound; an escalation takes the
// acknowledgement back.
func TestAlerts(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	now := time.Unix(1_800_000_000, 0)
	a := Alert{Kind: "rpo", Key: "m1", Severity: "warning", MachineID: "m1", Machine: "vm1", Message: "RPO 2m", Action: "check", Raised: now}
	id, err := d.RaiseAlert(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.RaiseAlert(ctx, a); !errors.Is(err, ErrAlertActive) {
		t.Fatalf("second active alert: %v", err)
	}
	if _, err := d.RaiseAlert(ctx, Alert{Kind: "rpo", Key: "m2", Severity: "warning", Raised: now}); err != nil {
		t.Fatal(err)
	}
	if err := d.AckAlert(ctx, id, now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := d.AckAlert(ctx, 999, now); !errors.Is(err, ErrNotFound) {
		t.Fatalf("ack of no alert: %v", err)
	}
	if err := d.UpdateAlert(ctx, id, "critical", "RPO 5m", "check", now.Add(2*time.Second)); err != nil {
		t.Fatal(err)
	}
	got, err := d.Alert(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if got.Severity != "critical" || !got.Acked.IsZero() || got.Machine != "vm1" || !got.Raised.Equal(now) {
		t.Fatalf("escalated: %+v", got)
	}
	if err := d.ResolveAlert(ctx, id, got.Message, now.Add(3*time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.RaiseAlert(ctx, a); err != nil {
		t.Fatalf("raise after the resolve: %v", err)
	}
	active, err := d.Alerts(ctx, false, 100)
	if err != nil || len(active) != 2 {
		t.Fatalf("active %+v %v", active, err)
	}
	all, err := d.Alerts(ctx, true, 100)
	if err != nil || len(all) != 3 || all[2].State != AlertResolved || all[2].Resolved.IsZero() {
		t.Fatalf("all %+v %v", all, err)
	}
	if _, err := d.Alert(ctx, 999); !errors.Is(err, ErrNotFound) {
		t.Fatalf("no alert: %v", err)
	}
}

// Alerts(all): the active first, the critical first and then newest
// first; then the resolved, the latest resolved first, whatever their
// severity; the query uses the listing's index.
func TestAlertsOrder(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	now := time.Unix(1_800_000_000, 0)
	raise := func(key, sev string) int64 {
		t.Helper()
		id, err := d.RaiseAlert(ctx, Alert{Kind: "k", Key: key, Severity: sev, Message: key, Raised: now})
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	r1 := raise("r1", "warning")  // resolved last: listed first, though older and a warning
	r2 := raise("r2", "critical") // resolved first
	a1 := raise("a1", "warning")
	a2 := raise("a2", "critical")
	a3 := raise("a3", "warning")
	if err := d.ResolveAlert(ctx, r2, "r2", now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := d.ResolveAlert(ctx, r1, "r1", now.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	all, err := d.Alerts(ctx, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got []int64
	for _, a := range all {
		got = append(got, a.ID)
	}
	want := []int64{a2, a3, a1, r1, r2}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("order %v, want %v", got, want)
	}
	var plan string
	rows, err := d.db.QueryContext(ctx, `EXPLAIN QUERY PLAN SELECT `+alertCols+` FROM alerts
		ORDER BY state = 'active' DESC, (state = 'active' AND severity = 'critical') DESC, resolved DESC, id DESC LIMIT 10`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id, parent, notused int
		var detail string
		if err := rows.Scan(&id, &parent, &notused, &detail); err != nil {
			t.Fatal(err)
		}
		plan += detail + "\n"
	}
	rows.Close()
	if !strings.Contains(plan, "alerts_listing") || strings.Contains(plan, "TEMP B-TREE") {
		t.Fatalf("the listing does not use its index:\n%s", plan)
	}
}

// The outbox's marks; pruning keeps the recent and the untold; a deleted
// machine takes its alerts with it.
func TestAlertsOutboxPruneDelete(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	now := time.Unix(1_800_000_000, 0)
	if _, _, err := d.CreateMachine(ctx, "m1", "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	old, _ := d.RaiseAlert(ctx, Alert{Kind: "rpo", Key: "m1", Severity: "warning", MachineID: "m1", Raised: now})
	untold, _ := d.RaiseAlert(ctx, Alert{Kind: "rpo", Key: "x", Severity: "warning", Raised: now})
	recent, _ := d.RaiseAlert(ctx, Alert{Kind: "rpo", Key: "y", Severity: "warning", Raised: now})
	active, _ := d.RaiseAlert(ctx, Alert{Kind: "hb", Key: "m1", Severity: "warning", MachineID: "m1", Raised: now})
	unsent := func() (ids []int64) {
		t.Helper()
		as, err := d.UnsentAlerts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range as {
			ids = append(ids, a.ID)
		}
		return ids
	}
	if got := fmt.Sprint(unsent()); got != fmt.Sprint([]int64{old, untold, recent, active}) {
		t.Fatalf("unsent %s", got)
	}
	for _, id := range []int64{old, untold, recent, active} {
		if err := d.MarkAlertNotified(ctx, id, NoticeRaised, "warning", now); err != nil {
			t.Fatal(err)
		}
	}
	if got := unsent(); len(got) != 0 {
		t.Fatalf("unsent after the marks: %v", got)
	}
	// An escalation is owed until told.
	if err := d.UpdateAlert(ctx, active, "critical", "worse", "a", now); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(unsent()); got != fmt.Sprint([]int64{active}) {
		t.Fatalf("unsent after an escalation %s", got)
	}
	if err := d.MarkAlertNotified(ctx, active, NoticeEscalate, "critical", now); err != nil {
		t.Fatal(err)
	}
	for id, at := range map[int64]time.Time{old: now, untold: now, recent: now.Add(40 * 24 * time.Hour)} {
		if err := d.ResolveAlert(ctx, id, "", at); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []int64{old, recent} {
		if err := d.MarkAlertNotified(ctx, id, NoticeResolved, "warning", now); err != nil {
			t.Fatal(err)
		}
	}
	n, err := d.PruneAlerts(ctx, now.Add(31*24*time.Hour))
	if err != nil || n != 1 {
		t.Fatalf("pruned %d (%v), want 1", n, err)
	}
	if _, err := d.Alert(ctx, old); !errors.Is(err, ErrNotFound) {
		t.Fatalf("old resolved alert kept: %v", err)
	}
	for _, id := range []int64{untold, recent, active} {
		if _, err := d.Alert(ctx, id); err != nil {
			t.Fatalf("alert %d pruned: %v", id, err)
		}
	}
	if err := d.DeleteMachine(ctx, "m1"); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Alert(ctx, active); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the deleted machine's alert is kept: %v", err)
	}
}
