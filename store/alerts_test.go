package store

import (
	"context"
	"errors"
	"path/filepath"
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
