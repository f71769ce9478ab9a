package agent

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/asrdr/asr/replication"
)

func TestTagMarks(t *testing.T) {
	var m tagMarks
	for _, s := range []uint64{9, 3, 12, 5} {
		m.mark(s)
	}
	if got := m.pending(); !slices.Equal(got, []uint64{3, 5, 9, 12}) {
		t.Fatalf("pending %v", got)
	}
	if m.has(1, 2) {
		t.Fatal("no mark in [1, 2]")
	}
	if !m.has(4, 6) { // 5; 3 is forgotten too (sent before)
		t.Fatal("mark 5 not found in [4, 6]")
	}
	if got := m.pending(); !slices.Equal(got, []uint64{9, 12}) {
		t.Fatalf("pending after [4, 6] was sent: %v", got)
	}
	m.reset()
	if m.has(0, 100) {
		t.Fatal("a mark survived reset")
	}
}

func TestEventQueueBounded(t *testing.T) {
	var q eventQueue
	for i := range maxQueuedEvents + 5 {
		q.add("k", fmt.Sprint(i))
	}
	ev := q.take()
	if len(ev) != maxQueuedEvents || ev[0].Message != "0" || ev[len(ev)-1].Message != fmt.Sprint(maxQueuedEvents-1) {
		t.Fatalf("%d events, first %+v", len(ev), ev[0])
	}
	if q.take() != nil {
		t.Fatal("take did not clear the queue")
	}
}

// tagRecords returns the tag records of the points' spool (decoded
// without the shared zstd codec, so also inside a bubble).
func tagRecords(t *testing.T, p *points) []replication.Record {
	t.Helper()
	var tags []replication.Record
	for _, r := range spoolRecords(t, p.spool, p.spool.First()) {
		if r.Kind == replication.KindTag {
			tags = append(tags, r)
		}
	}
	return tags
}

// The schedule makes no point before the copy is complete, none while the
// server makes the group's points, and one each crash interval otherwise;
// each is marked to ship like a tag.
func TestPointSchedule(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := mustPoints(t, freezeConfig{}, &fakeFreezer{frozen: map[string]bool{}})
		var ready atomic.Bool
		p.ready = ready.Load
		p.setPolicy(replication.AgentPolicy{CrashInterval: int64(time.Second)})
		p.start()
		time.Sleep(3500 * time.Millisecond)
		synctest.Wait()
		if n := len(tagRecords(t, p)); n != 0 {
			t.Fatalf("%d points before the copy was complete", n)
		}
		ready.Store(true)
		time.Sleep(3050 * time.Millisecond) // due at +1s, +2s, +3s
		synctest.Wait()
		tags := tagRecords(t, p)
		if len(tags) != 3 {
			t.Fatalf("%d points in 3 s at a 1 s interval", len(tags))
		}
		for _, r := range tags {
			if r.Flags != 0 || r.Offset != 0 {
				t.Fatalf("scheduled point %+v: want crash-consistent, no request", r)
			}
			if !p.tags.has(r.Seq, r.Seq) {
				t.Fatalf("tag %d not marked to ship like a tag", r.Seq)
			}
		}
		p.setPolicy(replication.AgentPolicy{CrashInterval: int64(time.Second), Group: "g"})
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if n := len(tagRecords(t, p)); n != 3 {
			t.Fatalf("%d points, want none more while in a group", n-3)
		}
		p.Close()
	})
}

// A point the server asks for runs on its own goroutine; Close waits for
// it, and starts none afterwards.
func TestRequestedPointWaitedByClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fz := &fakeFreezer{frozen: map[string]bool{}, block: "/a", unblck: make(chan struct{})}
		p := mustPoints(t, freezeConfig{mounts: []string{"/a"}, timeout: time.Minute}, fz)
		p.request(context.Background(), 42, true)
		synctest.Wait() // in its freeze
		closed := make(chan struct{})
		go func() { p.Close(); close(closed) }()
		synctest.Wait()
		select {
		case <-closed:
			t.Fatal("Close returned while a requested point was in its freeze")
		default:
		}
		close(fz.unblck)
		<-closed
		tags := tagRecords(t, p)
		if len(tags) != 1 || tags[0].Offset != 42 || tags[0].Flags&replication.FlagApp == 0 {
			t.Fatalf("tags %+v: want the requested application-consistent point", tags)
		}
		p.request(context.Background(), 43, false)
		synctest.Wait()
		if len(tagRecords(t, p)) != 1 {
			t.Fatal("a point requested after Close was made")
		}
	})
}

// whileFrozen runs inside the freeze (scan-mode disks are read then); its
// failure gives a crash-consistent point. A machine with scan-mode disks
// marks a crash-consistent point as such.
func TestPointWhileFrozen(t *testing.T) {
	fz := &fakeFreezer{frozen: map[string]bool{}}
	p := mustPoints(t, freezeConfig{mounts: []string{"/a"}}, fz)
	var sawFrozen bool
	p.whileFrozen = func() error {
		sawFrozen = fz.anyFrozen()
		return nil
	}
	if err := p.point(1, true); err != nil {
		t.Fatal(err)
	}
	if !sawFrozen {
		t.Fatal("whileFrozen ran outside the freeze")
	}
	p.whileFrozen = func() error { return fmt.Errorf("scan of disk d: boom") }
	p.disks[0].scan = newScanState(p.disks[0].Size(), time.Hour)
	if err := p.point(2, true); err != nil {
		t.Fatal(err)
	}
	tags := tagRecords(t, p)
	if len(tags) != 2 || tags[0].Flags != replication.FlagApp || tags[1].Flags != replication.FlagScan {
		t.Fatalf("tags %+v: want an app point, then a crash point marked scan", tags)
	}
	if ev := p.events.take(); len(ev) != 1 || ev[0].Kind != "freeze-failed" {
		t.Fatalf("events %+v", ev)
	}
}
