package store

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

func vmRows(n int, tag string) []VMRow {
	rows := make([]VMRow, n)
	for i := range rows {
		ref := fmt.Sprintf("vm-%d", i)
		rows[i] = VMRow{Ref: ref, Name: "n" + ref, BIOSUUID: fmt.Sprintf("%08x-0000-4000-8000-000000000000", i),
			Data: fmt.Sprintf(`{"ref":%q,"tag":%q,"pad":"%0512d"}`, ref, tag, i)}
	}
	return rows
}

// TestUpdateVMs: the inventory after a whole write and a change is the
// same whether the change is written whole (ReplaceVMs) or as a diff
// (UpdateVMs); a stale inventory is current again after either; a vCenter
// no longer registered gets nothing.
func TestUpdateVMs(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "v.db"))
	for _, name := range []string{"a", "b"} {
		if err := d.AddVCenter(ctx, VCenter{Name: name, URL: "https://x/sdk", User: "u", Secret: []byte{1}, Thumbprint: "T"}); err != nil {
			t.Fatal(err)
		}
		if err := d.ReplaceVMs(ctx, name, vmRows(10, "v1")); err != nil {
			t.Fatal(err)
		}
		if err := d.SetVCenterStatus(ctx, name, false, time.Time{}, "down", ""); err != nil {
			t.Fatal(err)
		}
	}
	// The same change, whole and as a diff: vm-3 renamed, vm-9 gone, vm-10 new.
	whole := vmRows(11, "v1")
	whole[3].Name, whole[3].Data = "renamed", `{"ref":"vm-3","tag":"v2"}`
	whole = append(whole[:9], whole[10])
	if err := d.ReplaceVMs(ctx, "a", whole); err != nil {
		t.Fatal(err)
	}
	if err := d.UpdateVMs(ctx, "b", []VMRow{whole[3], whole[9]}, []string{"vm-9"}); err != nil {
		t.Fatal(err)
	}
	a, err := d.VMs(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := d.VMs(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	if len(a) != 10 || len(a) != len(b) {
		t.Fatalf("%d and %d VMs, want 10", len(a), len(b))
	}
	for i := range a {
		if a[i].Ref != b[i].Ref || a[i].Name != b[i].Name || a[i].Data != b[i].Data || a[i].Stale || b[i].Stale {
			t.Fatalf("row %d: %+v and %+v", i, a[i], b[i])
		}
	}
	// Looked up by BIOS UUID: vm-3 in both vCenters, nothing for an unknown one.
	got, err := d.VMsWithUUIDs(ctx, []string{whole[3].BIOSUUID, "ffffffff-0000-4000-8000-000000000000"})
	if err != nil || len(got) != 2 || got[0].Ref != "vm-3" || got[1].Ref != "vm-3" || got[0].VCenter == got[1].VCenter {
		t.Fatalf("VMsWithUUIDs = %+v, %v", got, err)
	}
	if got, err := d.VMsWithUUIDs(ctx, nil); err != nil || len(got) != 0 {
		t.Fatalf("VMsWithUUIDs(nil) = %+v, %v", got, err)
	}
	if err := d.RemoveVCenter(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if err := d.UpdateVMs(ctx, "b", whole, nil); err != nil {
		t.Fatal(err)
	}
	if vs, _ := d.VMs(ctx, "b"); len(vs) != 0 {
		t.Fatalf("a removed vCenter got %d VMs", len(vs))
	}
}

// BenchmarkInventoryWrite: one VM of 5,000 changed, written whole
// (ReplaceVMs, what the server did first) and as a diff (UpdateVMs).
func BenchmarkInventoryWrite(b *testing.B) {
	ctx := context.Background()
	for _, mode := range []string{"whole", "diff"} {
		b.Run(mode, func(b *testing.B) {
			d := mustOpen(b, filepath.Join(b.TempDir(), "v.db"))
			if err := d.AddVCenter(ctx, VCenter{Name: "a", URL: "https://x/sdk", User: "u", Secret: []byte{1}, Thumbprint: "T"}); err != nil {
				b.Fatal(err)
			}
			rows := vmRows(5000, "v1")
			if err := d.ReplaceVMs(ctx, "a", rows); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				rows[7].Data = fmt.Sprintf(`{"ref":"vm-7","tag":"%d"}`, i)
				var err error
				if mode == "whole" {
					err = d.ReplaceVMs(ctx, "a", rows)
				} else {
					err = d.UpdateVMs(ctx, "a", rows[7:8], nil)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
