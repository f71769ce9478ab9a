package psnode

import (
	"encoding/json"
	"fmt"
	"slices"
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

// The whole report's lists are cut to api.MaxPSScrubDamagedTotal, the
// disks' first, and what is cut is counted.
func TestBoundScrubTotal(t *testing.T) {
	var rep procserver.ScrubReport
	for range api.MaxPSScrubEntries {
		rep.Disks = append(rep.Disks, procserver.DiskScrub{Damaged: make([]int64, api.MaxPSScrubDamaged)})
		rep.Points = append(rep.Points, procserver.PointScrub{Damaged: make([]int64, api.MaxPSScrubDamaged)})
	}
	all := int64(2 * api.MaxPSScrubEntries * api.MaxPSScrubDamaged)
	left := boundScrub(&rep)
	listed := 0
	for _, d := range rep.Disks {
		listed += len(d.Damaged)
	}
	for _, p := range rep.Points {
		listed += len(p.Damaged)
	}
	if listed != api.MaxPSScrubDamagedTotal || int64(listed)+left != all {
		t.Fatalf("%d damaged blocks listed and %d left out of %d, want %d listed", listed, left, all, api.MaxPSScrubDamagedTotal)
	}
	if len(rep.Disks[0].Damaged) != api.MaxPSScrubDamaged || len(rep.Points[0].Damaged) != 0 {
		t.Fatal("the disks' lists are not kept first")
	}
	if b, err := json.Marshal(api.PSCommandResult{Scrub: &rep, ScrubDamagedNotListed: left}); err != nil || len(b) > api.MaxPSResultsBytes {
		t.Fatalf("the largest scrub result takes %d bytes, more than a heartbeat's results (%d): %v", len(b), api.MaxPSResultsBytes, err)
	}
}

// A heartbeat carries results within api.MaxPSResultsBytes (one at least),
// in the order of their ids; the rest go once those are answered.
func TestPendingWithinBudget(t *testing.T) {
	big := make([]int64, api.MaxPSImageDamaged)
	for i := range big {
		big[i] = 1 << 40
	}
	c := commands{results: map[string]api.PSCommandResult{}}
	for i := range 40 {
		id := fmt.Sprintf("c%02d", i)
		c.results[id] = api.PSCommandResult{ID: id, Damaged: big}
	}
	var order []string
	for beat := 0; len(c.results) > 0; beat++ {
		if beat > 40 {
			t.Fatal("results never all sent")
		}
		sent := c.pending()
		b, _ := json.Marshal(sent)
		if len(sent) == 0 || len(sent) > 1 && len(b) > api.MaxPSResultsBytes {
			t.Fatalf("heartbeat %d: %d results in %d bytes", beat, len(sent), len(b))
		}
		for _, r := range sent {
			order = append(order, r.ID)
			delete(c.results, r.ID) // answered
		}
	}
	if !slices.IsSorted(order) || len(order) != 40 {
		t.Fatalf("sent %v", order)
	}
	// One result larger than the budget still goes, alone.
	c.results["huge"] = api.PSCommandResult{ID: "huge", Damaged: make([]int64, api.MaxPSResultsBytes)}
	c.results["next"] = api.PSCommandResult{ID: "next"}
	if sent := c.pending(); len(sent) != 1 || sent[0].ID != "huge" {
		t.Fatalf("sent %d results", len(sent))
	}
}
