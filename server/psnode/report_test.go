package psnode

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

// The outbox's bounds: a heartbeat reports at most maxMachines machines
// and api.MaxPSReportPoints points and api.MaxPSReportEvents events each;
// the rest follow in later heartbeats, every machine in turn. A heartbeat
// not answered is sent again with the same number and news; every point
// and event arrives once, in order, and the bytes add up.
func TestOutboxBoundsAndResends(t *testing.T) {
	o := newOutbox(slog.New(slog.NewTextHandler(io.Discard, nil)), 3)
	var cfg procserver.Config
	o.callbacks(&cfg)
	const machines, points, events = 7, 150, 100
	var ids []string
	for m := range machines {
		id := fmt.Sprintf("%032x", m+1)
		ids = append(ids, id)
		for i := range points {
			cfg.OnPoint(id, replication.Point{Seq: uint64(i + 1), Time: time.Unix(int64(i), 0)})
		}
		cfg.OnStatus(id, replication.Status{Events: make([]replication.AgentEvent, events)})
		cfg.OnBytes(id, 10)
		cfg.OnBytes(id, 5)
	}
	got := map[string][]uint64{}
	gotEvents, gotBytes := map[string]int{}, map[string]int64{}
	lastSeq := uint64(0)
	for beat := 0; ; beat++ {
		if beat > 1000 {
			t.Fatal("the outbox never emptied")
		}
		reps, seq := o.report(nil, ids)
		if len(reps) > 3 {
			t.Fatalf("beat %d: %d machine reports, at most 3", beat, len(reps))
		}
		news := 0
		for _, r := range reps {
			if r.News == nil {
				continue
			}
			news++
			if len(r.News.Points) > api.MaxPSReportPoints || len(r.News.Events) > api.MaxPSReportEvents {
				t.Fatalf("beat %d: machine %s: %d points, %d events", beat, r.MachineID, len(r.News.Points), len(r.News.Events))
			}
		}
		if news == 0 {
			if seq != 0 {
				t.Fatalf("beat %d: number %d without news", beat, seq)
			}
			break
		}
		if seq != lastSeq+1 {
			t.Fatalf("beat %d: number %d after %d", beat, seq, lastSeq)
		}
		// Every third heartbeat is lost: the next one is the same.
		if beat%3 == 1 {
			again, seq2 := o.report(nil, ids)
			if seq2 != seq || len(again) != len(reps) {
				t.Fatalf("beat %d sent again: number %d (was %d), %d reports (was %d)", beat, seq2, seq, len(again), len(reps))
			}
			for i := range again {
				if again[i].News != reps[i].News {
					t.Fatalf("beat %d sent again with other news", beat)
				}
			}
		}
		lastSeq = seq
		for _, r := range reps {
			if r.News == nil {
				continue
			}
			for _, p := range r.News.Points {
				got[r.MachineID] = append(got[r.MachineID], p.Seq)
			}
			gotEvents[r.MachineID] += len(r.News.Events)
			gotBytes[r.MachineID] += r.News.Bytes
		}
		o.answered(seq)
	}
	for _, id := range ids {
		if len(got[id]) != points || gotEvents[id] != events || gotBytes[id] != 15 {
			t.Fatalf("machine %s: %d points, %d events, %d bytes; want %d, %d, 15", id, len(got[id]), gotEvents[id], gotBytes[id], points, events)
		}
		for i, s := range got[id] {
			if s != uint64(i+1) {
				t.Fatalf("machine %s: point %d is seq %d", id, i, s)
			}
		}
	}
	// Without news, the figures of every open machine, in turns.
	seen := map[string]bool{}
	for range 3 {
		reps, _ := o.report(nil, ids)
		for _, r := range reps {
			seen[r.MachineID] = true
		}
	}
	if len(seen) != machines {
		t.Fatalf("three heartbeats of at most 3 machines reported %d of %d", len(seen), machines)
	}
}

// A heartbeat's news stay within api.MaxPSNewsBytes (one machine's at
// least): large events wait for the next heartbeats, and all arrive.
func TestOutboxNewsBudget(t *testing.T) {
	o := newOutbox(slog.New(slog.NewTextHandler(io.Discard, nil)), 0)
	var cfg procserver.Config
	o.callbacks(&cfg)
	big := strings.Repeat("x", 30<<10)
	const machines = 5
	for m := range machines {
		evs := make([]replication.AgentEvent, api.MaxPSReportEvents)
		for i := range evs {
			evs[i].Message = big
		}
		cfg.OnStatus(fmt.Sprintf("%032x", m+1), replication.Status{Events: evs})
	}
	got, beats := 0, 0
	for {
		reps, seq := o.report(nil, nil)
		if seq == 0 {
			break
		}
		beats++
		b, err := json.Marshal(reps)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) > api.MaxPSNewsBytes && len(reps) > 1 {
			t.Fatalf("heartbeat %d: %d bytes of news for %d machines, at most %d", beats, len(b), len(reps), api.MaxPSNewsBytes)
		}
		for _, r := range reps {
			got += len(r.News.Events)
		}
		o.answered(seq)
	}
	if got != machines*api.MaxPSReportEvents || beats < 2 {
		t.Fatalf("%d events in %d heartbeats, want %d in more than one", got, beats, machines*api.MaxPSReportEvents)
	}
}
