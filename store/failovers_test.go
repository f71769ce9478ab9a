package store

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
)

// UpdateFailovers writes all of its failovers or none: one that is not
// there fails the whole update, and the others keep their records.
func TestUpdateFailoversAllOrNone(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	var fs []Failover
	for _, id := range []string{"m1", "m2"} {
		if _, _, err := d.CreateMachine(ctx, id, "vm-"+id, id); err != nil {
			t.Fatal(err)
		}
		f := Failover{ID: "f-" + id, MachineID: id, Kind: "failover", Dest: "nbd", State: FailoverCommitted, Detail: `{"a":1}`}
		if err := d.AddFailover(ctx, f); err != nil {
			t.Fatal(err)
		}
		fs = append(fs, f)
	}
	fs[0].Detail, fs[1].Detail = `{"a":2}`, `{"a":2}`
	missing := Failover{ID: "nosuch", MachineID: "m3", State: FailoverCommitted, Detail: "{}"}
	if err := d.UpdateFailovers(ctx, []Failover{fs[0], missing, fs[1]}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("an update with a missing failover: %v", err)
	}
	for _, id := range []string{"m1", "m2"} {
		if f, err := d.LiveFailover(ctx, id); err != nil || f.Detail != `{"a":1}` {
			t.Fatalf("after a failed update, %s's failover: %+v %v", id, f, err)
		}
	}
	if err := d.UpdateFailovers(ctx, fs); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"m1", "m2"} {
		if f, err := d.LiveFailover(ctx, id); err != nil || f.Detail != `{"a":2}` {
			t.Fatalf("after the update, %s's failover: %+v %v", id, f, err)
		}
	}
}
