package psnode

import (
	"testing"

	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

// A scrub report is cut to what a command result carries, and the damaged
// blocks left out are counted.
func TestBoundScrub(t *testing.T) {
	rep := procserver.ScrubReport{
		Disks:  []procserver.DiskScrub{{Disk: "d0", Checked: 1, Damaged: make([]int64, api.MaxPSScrubDamaged+5)}, {Disk: "d1", Damaged: []int64{1}}},
		Points: make([]procserver.PointScrub, api.MaxPSScrubEntries+2),
	}
	rep.Points[api.MaxPSScrubEntries].Damaged = []int64{1, 2, 3}
	if left := boundScrub(&rep); left != 5+3 {
		t.Fatalf("%d damaged blocks left out, want 8", left)
	}
	if len(rep.Disks[0].Damaged) != api.MaxPSScrubDamaged || len(rep.Disks[1].Damaged) != 1 || len(rep.Points) != api.MaxPSScrubEntries {
		t.Fatalf("the report is not cut to the bounds: %d, %d, %d", len(rep.Disks[0].Damaged), len(rep.Disks[1].Damaged), len(rep.Points))
	}
	if !rep.Damaged() {
		t.Fatal("a cut report lost its damage")
	}
}
