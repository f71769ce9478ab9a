package store

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
)

// The switch of a plan's failback and its progress record are written
// together or not at all; the record is updated, listed, removed.
func TestSwitchFailoversWithRecord(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	if _, _, err := d.CreateMachine(ctx, "m1", "vm-m1", "m1"); err != nil {
		t.Fatal(err)
	}
	f := Failover{ID: "f-m1", MachineID: "m1", Kind: "failover", Dest: "nbd", State: FailoverCommitted, Detail: `{"a":1}`}
	if err := d.AddFailover(ctx, f); err != nil {
		t.Fatal(err)
	}
	f.Detail = `{"a":2}`
	pf := PlanFailback{JobID: "j1", Subject: "plan p", Data: `{"v":1}`}
	missing := Failover{ID: "nosuch", MachineID: "m3", State: FailoverCommitted, Detail: "{}"}
	if err := d.SwitchFailovers(ctx, []Failover{f, missing}, pf); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a switch with a missing failover: %v", err)
	}
	if pfs, err := d.PlanFailbacks(ctx); err != nil || len(pfs) != 0 {
		t.Fatalf("records after a failed switch: %+v %v", pfs, err)
	}
	if g, _ := d.LiveFailover(ctx, "m1"); g.Detail != `{"a":1}` {
		t.Fatalf("after a failed switch: %+v", g)
	}
	if err := d.SwitchFailovers(ctx, []Failover{f}, pf); err != nil {
		t.Fatal(err)
	}
	if g, _ := d.LiveFailover(ctx, "m1"); g.Detail != `{"a":2}` {
		t.Fatalf("after the switch: %+v", g)
	}
	if err := d.SwitchFailovers(ctx, []Failover{f}, pf); err == nil {
		t.Fatal("a second record for the same job was accepted")
	}
	if err := d.UpdatePlanFailback(ctx, "j1", `{"v":1,"next":{}}`); err != nil {
		t.Fatal(err)
	}
	if err := d.UpdatePlanFailback(ctx, "nosuch", `{}`); !errors.Is(err, ErrNotFound) {
		t.Fatalf("an update of a missing record: %v", err)
	}
	pfs, err := d.PlanFailbacks(ctx)
	if err != nil || len(pfs) != 1 || pfs[0].Data != `{"v":1,"next":{}}` || pfs[0].Subject != "plan p" {
		t.Fatalf("records: %+v %v", pfs, err)
	}
	for range 2 {
		if err := d.DeletePlanFailback(ctx, "j1"); err != nil {
			t.Fatal(err)
		}
	}
	if pfs, _ := d.PlanFailbacks(ctx); len(pfs) != 0 {
		t.Fatalf("records after the removal: %+v", pfs)
	}
}

// A job a stopped server left is running again once resumed.
func TestResumeJob(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	if err := d.AddJob(ctx, Job{ID: "j1", Kind: "failback", Subject: "plan p"}); err != nil {
		t.Fatal(err)
	}
	if err := d.FailRunningJobs(ctx, "stopped"); err != nil {
		t.Fatal(err)
	}
	if err := d.ResumeJob(ctx, "j1"); err != nil {
		t.Fatal(err)
	}
	if j, err := d.Job(ctx, "j1"); err != nil || j.State != JobRunning || j.Error != "" || !j.EndedAt.IsZero() {
		t.Fatalf("the resumed job: %+v %v", j, err)
	}
	if err := d.ResumeJob(ctx, "nosuch"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("resume of a missing job: %v", err)
	}
}
