package store

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

func TestHistory(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	for _, id := range []string{"aa", "bb"} {
		if _, _, err := d.CreateMachine(ctx, id, "vm-"+id, "1"); err != nil {
			t.Fatal(err)
		}
	}
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	var ss []Sample
	for i := range 30 {
		ss = append(ss, Sample{MachineID: "aa", Time: t0.Add(time.Duration(i) * time.Hour), RPO: time.Duration(i) * time.Second, Bytes: int64(i) << 20})
	}
	ss = append(ss, Sample{MachineID: "bb", Time: t0, RPO: -1, Bytes: 7})
	if err := d.AddSamples(ctx, ss); err != nil {
		t.Fatal(err)
	}
	got, err := d.History(ctx, "aa", t0.Add(10*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 20 || !got[0].Time.Equal(t0.Add(10*time.Hour)) || got[19].RPO != 29*time.Second || got[19].Bytes != 29<<20 {
		t.Fatalf("history since 10h: %d samples, first %+v, last %+v", len(got), got[0], got[len(got)-1])
	}
	// Pruning past 25 h before the newest sample keeps 25 + the newest.
	n, err := d.PruneHistory(ctx, t0.Add(29*time.Hour-25*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if n != 5 { // aa's hours 0-3 and bb's only sample
		t.Errorf("pruned %d samples, want 5", n)
	}
	if got, _ := d.History(ctx, "aa", time.Time{}); len(got) != 26 {
		t.Errorf("%d samples left, want 26", len(got))
	}
	if got, _ := d.History(ctx, "bb", time.Time{}); len(got) != 0 {
		t.Errorf("bb: %d samples left, want 0", len(got))
	}
}

func TestHistoryBounded(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	if _, _, err := d.CreateMachine(ctx, "aa", "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	var ss []Sample
	for i := range MaxSamplesPerMachine + 50 {
		ss = append(ss, Sample{MachineID: "aa", Time: t0.Add(time.Duration(i) * time.Second)})
	}
	if err := d.AddSamples(ctx, ss); err != nil {
		t.Fatal(err)
	}
	if n, err := d.CapHistory(ctx); err != nil || n != 50 {
		t.Fatalf("capped %d samples (%v), want 50", n, err)
	}
	got, err := d.History(ctx, "aa", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != MaxSamplesPerMachine || !got[0].Time.Equal(t0.Add(50*time.Second)) {
		t.Fatalf("%d samples from %v; want %d from the 50th", len(got), got[0].Time, MaxSamplesPerMachine)
	}
}

// A machine deleted between the listing and AddSamples does not fail the
// batch: its sample is skipped, the others are kept.
func TestHistoryOfADeletedMachine(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	for _, id := range []string{"aa", "bb"} {
		if _, _, err := d.CreateMachine(ctx, id, "vm-"+id, "1"); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.DeleteMachine(ctx, "aa"); err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	if err := d.AddSamples(ctx, []Sample{{MachineID: "aa", Time: t0, RPO: time.Second, Bytes: 1}, {MachineID: "bb", Time: t0, RPO: time.Second, Bytes: 2}}); err != nil {
		t.Fatalf("a deleted machine's sample failed the batch: %v", err)
	}
	if got, err := d.History(ctx, "bb", t0); err != nil || len(got) != 1 || got[0].Bytes != 2 {
		t.Fatalf("bb's history %+v %v", got, err)
	}
	if got, _ := d.History(ctx, "aa", t0); len(got) != 0 {
		t.Fatalf("aa's history %+v", got)
	}
}
