package agent

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// heldWriter is the session of a group cut's test: it passes on each HELD.
type heldWriter struct{ held chan replication.Cut }

func (w *heldWriter) write(f *replication.Frame) error {
	if f.Type != replication.FrameHeld {
		return errors.New("unexpected " + f.Type.String())
	}
	var c replication.Cut
	if err := replication.DecodeJSON(f, &c); err != nil {
		return err
	}
	w.held <- c
	return nil
}

// mustGroupCuts makes the group cuts of one disk, with their points.
func mustGroupCuts(t *testing.T) (*groupCuts, *heldWriter) {
	t.Helper()
	p := mustPoints(t, freezeConfig{}, &fakeFreezer{frozen: map[string]bool{}})
	g := newGroupCuts(context.Background(), slog.New(slog.DiscardHandler), p.disks, p, p.events)
	t.Cleanup(g.Close)
	return g, &heldWriter{held: make(chan replication.Cut, 1)}
}

// cutRecords returns the kinds and request ids of the points' spool.
func cutRecords(t *testing.T, g *groupCuts) []replication.Record {
	t.Helper()
	return spoolRecords(t, g.points.spool, g.points.spool.First())
}

// A cut holds the writes from HELD until the server's CUT, then tags: a
// write started while held is logged after the tag.
func TestGroupCutHoldsWritesUntilTheTag(t *testing.T) {
	g, w := mustGroupCuts(t)
	d := g.disks[0]
	g.hold(replication.Cut{ID: 5}, w)
	if c := <-w.held; c.ID != 5 {
		t.Fatalf("HELD for cut %d", c.ID)
	}
	wrote := make(chan error, 1)
	go func() { wrote <- d.WriteAt(bytes.Repeat([]byte{1}, 4096), 0, false) }()
	g.decide(replication.FrameCut, replication.Cut{ID: 5})
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	g.Close() // the cut has ended
	recs := cutRecords(t, g)
	if len(recs) != 2 || recs[0].Kind != replication.KindTag || recs[0].Offset != 5 || recs[1].Kind != replication.KindWrite {
		t.Fatalf("records %+v: want the cut's tag, then the held write", recs)
	}
	if g.holds.stats().Count != 1 {
		t.Fatal("the hold was not measured")
	}
}

// RELEASE, or no decision within the hold timeout, lets the writes go
// without a tag; a decision for another cut changes nothing.
func TestGroupCutReleased(t *testing.T) {
	for _, decide := range []bool{true, false} {
		g, w := mustGroupCuts(t)
		g.holdTimeout = 50 * time.Millisecond
		if decide {
			g.holdTimeout = time.Hour
		}
		g.hold(replication.Cut{ID: 6}, w)
		<-w.held
		g.decide(replication.FrameCut, replication.Cut{ID: 99})
		if decide {
			g.decide(replication.FrameRelease, replication.Cut{ID: 6})
		}
		if err := g.disks[0].WriteAt(make([]byte, 4096), 0, false); err != nil {
			t.Fatal(err)
		}
		g.Close()
		for _, r := range cutRecords(t, g) {
			if r.Kind == replication.KindTag {
				t.Fatalf("release=%v: a released cut tagged", decide)
			}
		}
	}
}

// stuckWriter is a session whose HELD is stuck behind a frame on a slow
// link: its write returns only when released.
type stuckWriter struct{ called, release chan struct{} }

func (w *stuckWriter) write(*replication.Frame) error {
	close(w.called)
	<-w.release
	return nil
}

// The hold timeout counts from the moment the writes stop: a HELD stuck in
// the connection does not hold the guest's writes past it, and the cut
// then tags nothing.
func TestGroupCutHoldBoundedWhileHeldIsStuck(t *testing.T) {
	g, _ := mustGroupCuts(t)
	g.holdTimeout = 100 * time.Millisecond
	w := &stuckWriter{called: make(chan struct{}), release: make(chan struct{})}
	g.hold(replication.Cut{ID: 4}, w)
	<-w.called // the writes are held, HELD is being sent
	wrote := make(chan error, 1)
	go func() { wrote <- g.disks[0].WriteAt(make([]byte, 4096), 0, false) }()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		close(w.release) // so that Close ends
		t.Fatal("a write stayed held while HELD was stuck in the connection")
	}
	g.decide(replication.FrameCut, replication.Cut{ID: 4}) // too late: no cut
	close(w.release)
	g.Close()
	for _, r := range cutRecords(t, g) {
		if r.Kind == replication.KindTag {
			t.Fatal("a cut released by its timeout tagged")
		}
	}
	if n := g.holds.stats().Count; n != 1 {
		t.Fatalf("%d holds measured, want 1", n)
	}
}

// Close ends a cut being held at once.
func TestGroupCutEndsWithClose(t *testing.T) {
	g, w := mustGroupCuts(t)
	g.hold(replication.Cut{ID: 7}, w)
	<-w.held
	g.Close()
	if err := g.disks[0].WriteAt(make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	g.hold(replication.Cut{ID: 8}, w)
	select {
	case <-w.held:
		t.Fatal("a cut started after Close")
	default:
	}
}
