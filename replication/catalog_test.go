package replication_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/memtarget"
)

func TestValidMachineName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"m1", true},
		{"web-01.example_com", true},
		{"A", true},
		{"9", true},
		{strings.Repeat("a", 64), true},
		{"", false},
		{strings.Repeat("a", 65), false},
		{"a/b", false},                        // a path separator: recovery writes NAME/
		{`a\b`, false},                        // the other one
		{"x'; DROP TABLE machines;--", false}, // quotes, spaces, semicolons
		{"\x1b[31mred\x1b[0m", false},         // an ESC sequence, printed raw by `asr status`
		{"m1 ", false},                        // would sit beside "m1" looking the same
		{" m1", false},
		{"m1\n", false},
		{"m\x00", false},
		{"-m1", false}, // read as a flag
		{".hidden", false},
		{"..", false},
		{"_m1", false}, // a valid disk name, but not a machine name
		{"mé", false},  // non-ASCII letters look like ASCII ones
	} {
		if got := replication.ValidMachineName(tc.name); got != tc.ok {
			t.Errorf("ValidMachineName(%q) = %v, want %v", tc.name, got, tc.ok)
		}
	}
}

// DeleteMachine leaves nothing of the machine on the target (disks, sums,
// points, segments, its entry), takes it out of group points (deleting
// those it was alone in), touches no other machine, and finishes a
// deletion cut short when run again.
func TestCatalogDeleteMachine(t *testing.T) {
	ctx := context.Background()
	tgt := memtarget.New()
	defer tgt.Close()
	cat := &replication.Catalog{T: tgt, Codec: replication.PlainCodec{}}
	for _, id := range []string{"00aa", "00bb"} {
		a, err := replication.OpenApplier(ctx, cat, id, "vm-"+id, slog.Default())
		if err != nil {
			t.Fatal(err)
		}
		if err := a.EnsureDisks(ctx, []replication.DiskInfo{{Index: 0, Name: "d0", Size: 1 << 20}, {Index: 3, Name: "d3", Size: 1 << 20}}); err != nil {
			t.Fatal(err)
		}
		a.Close()
		p := replication.Point{ID: "7", Seq: 7, Time: time.Unix(100, 0).UTC(), Kind: replication.PointCrash}
		if err := cat.PutPoint(ctx, id, p); err != nil {
			t.Fatal(err)
		}
		si := replication.SegmentInfo{First: 1, Last: 7, LastTime: time.Unix(100, 0)}
		if err := cat.PutSegment(ctx, id, si, []byte("segment")); err != nil {
			t.Fatal(err)
		}
	}
	if err := cat.PutGroupPoint(ctx, "g", replication.GroupPoint{ID: "1", Kind: replication.PointCrash, Members: map[string]string{"00aa": "7", "00bb": "7"}}); err != nil {
		t.Fatal(err)
	}
	if err := cat.PutGroupPoint(ctx, "solo", replication.GroupPoint{ID: "2", Kind: replication.PointCrash, Members: map[string]string{"00aa": "7"}}); err != nil {
		t.Fatal(err)
	}
	// Cut short: one disk is deleted already, the entry still names it.
	if err := tgt.DeleteDisk(ctx, replication.DiskKey("00aa", 0)); err != nil {
		t.Fatal(err)
	}
	for range 2 { // again: nothing left to do, no error
		if err := cat.DeleteMachine(ctx, "00aa"); err != nil {
			t.Fatal(err)
		}
	}
	objs, err := tgt.ListObjects(ctx, "machines/00aa/")
	if err != nil || len(objs) != 0 {
		t.Fatalf("objects left: %v, %v", objs, err)
	}
	for _, idx := range []uint32{0, 3} {
		for _, key := range []string{replication.DiskKey("00aa", idx), replication.SumKey("00aa", idx)} {
			if _, err := tgt.OpenDisk(ctx, key, 0); !errors.Is(err, replication.ErrNotFound) {
				t.Errorf("disk %s: %v, want not found", key, err)
			}
		}
	}
	gps, err := cat.GroupPoints(ctx, "g")
	if err != nil || len(gps) != 1 || len(gps[0].Members) != 1 || gps[0].Members["00bb"] != "7" {
		t.Fatalf("group g's points: %+v, %v", gps, err)
	}
	if gps, err := cat.GroupPoints(ctx, "solo"); err != nil || len(gps) != 0 {
		t.Fatalf("group solo's points: %+v, %v", gps, err)
	}
	// The other machine is whole.
	if m, err := cat.Machine(ctx, "00bb"); err != nil || len(m.Disks) != 2 {
		t.Fatalf("the other machine: %+v, %v", m, err)
	}
	if ps, err := cat.Points(ctx, "00bb"); err != nil || len(ps) != 1 {
		t.Fatalf("the other machine's points: %+v, %v", ps, err)
	}
	if d, err := tgt.OpenDisk(ctx, replication.DiskKey("00bb", 3), 0); err != nil {
		t.Fatal(err)
	} else {
		d.Close()
	}
}

// MachineOfKey covers every key of a machine and nothing else: what a
// machine's lease fences on a shared target.
func TestMachineOfKey(t *testing.T) {
	for _, c := range []struct {
		key, id string
	}{
		{"machines/m1/machine", "m1"},
		{"machines/m1/points/0000000000000001.0000000000000002.crash", "m1"},
		{"machines/m-2/segments/0000000000000001-0000000000000002.0000000000000003.seg", "m-2"},
		{replication.DiskKey("abc", 3), "abc"},
		{replication.SumKey("abc", 3), "abc"},
		{"vault", ""},
		{"groups/g/points/00000000000000000001", ""},
		{"machines/m1", ""},
		{"machines//machine", ""},
		{"machines/../machine", ""},
		{"machinesX/m1/machine", ""},
	} {
		id, ok := replication.MachineOfKey(c.key)
		if id != c.id || ok != (c.id != "") {
			t.Errorf("MachineOfKey(%q) = %q, %v, want %q", c.key, id, ok, c.id)
		}
	}
}
