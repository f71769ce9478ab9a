package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// fakeFreezer records freezes and thaws; block makes a freeze hang.
type fakeFreezer struct {
	mu     sync.Mutex
	frozen map[string]bool
	log    []string
	fail   string        // mount whose freeze fails
	block  string        // mount whose freeze blocks until released
	unblck chan struct{} // closed to release a blocked freeze
}

func (f *fakeFreezer) Freeze(m string) error {
	if m == f.block {
		<-f.unblck
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, "freeze "+m)
	if m == f.fail {
		return errors.New("operation not supported")
	}
	f.frozen[m] = true
	return nil
}

func (f *fakeFreezer) Thaw(m string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, "thaw "+m)
	delete(f.frozen, m)
	return nil
}

func (f *fakeFreezer) anyFrozen() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.frozen) > 0
}

// mustPoints makes the points of one disk, quiesced as fc says with fz.
func mustPoints(t *testing.T, fc freezeConfig, fz *fakeFreezer) *points {
	t.Helper()
	d, sp, _ := mustTestDisk(t, 1<<20)
	p := newPoints(context.Background(), slog.Default(), sp, diskSet{d}, &tagMarks{}, &eventQueue{}, time.Hour, 0, fc)
	p.freezer = fz
	t.Cleanup(p.Close)
	return p
}

// lastTag returns the flags of the last tag record in the spool.
func lastTag(t *testing.T, sp *spool.Spool) (uint8, bool) {
	t.Helper()
	var flags uint8
	found := false
	for _, f := range readFrames(t, sp) {
		recs, _, err := replication.DefaultCodec().Records(&f, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			if r.Kind == replication.KindTag {
				flags, found = r.Flags, true
			}
		}
	}
	return flags, found
}

func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "hook.sh")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAppPointFreezesTagsThaws(t *testing.T) {
	marks := filepath.Join(t.TempDir(), "marks")
	fz := &fakeFreezer{frozen: map[string]bool{}}
	a := mustPoints(t, freezeConfig{
		mounts:    []string{"/a", "/b"},
		preFreeze: script(t, "echo pre-$1 >> "+marks),
		postThaw:  script(t, "echo post-$1 >> "+marks),
	}, fz)
	if err := a.point(7, true); err != nil {
		t.Fatal(err)
	}
	if flags, ok := lastTag(t, a.spool); !ok || flags&replication.FlagApp == 0 {
		t.Fatalf("no application-consistent tag (found %v, flags %b)", ok, flags)
	}
	if fz.anyFrozen() {
		t.Fatal("a file system was left frozen")
	}
	if got := strings.Join(fz.log, ","); got != "freeze /a,freeze /b,thaw /b,thaw /a" {
		t.Fatalf("freeze sequence %s", got)
	}
	b, _ := os.ReadFile(marks)
	if string(b) != "pre-freeze\npost-thaw\n" {
		t.Fatalf("scripts ran as %q", b)
	}
}

func TestFailedFreezeThawsAndTakesCrashPoint(t *testing.T) {
	fz := &fakeFreezer{frozen: map[string]bool{}, fail: "/b"}
	a := mustPoints(t, freezeConfig{mounts: []string{"/a", "/b"}}, fz)
	if err := a.point(0, true); err != nil {
		t.Fatal(err)
	}
	if flags, ok := lastTag(t, a.spool); !ok || flags&replication.FlagApp != 0 {
		t.Fatalf("want a crash-consistent point, got found=%v flags=%b", ok, flags)
	}
	if fz.anyFrozen() {
		t.Fatal("a file system was left frozen after a failed freeze")
	}
	ev := a.events.take()
	if len(ev) != 1 || ev[0].Kind != "freeze-failed" || !strings.Contains(ev[0].Message, "/b") {
		t.Fatalf("events %+v", ev)
	}
}

func TestFreezeTimeBoxed(t *testing.T) {
	fz := &fakeFreezer{frozen: map[string]bool{}, block: "/b", unblck: make(chan struct{})}
	a := mustPoints(t, freezeConfig{mounts: []string{"/a", "/b"}, timeout: 200 * time.Millisecond}, fz)
	done := make(chan error, 1)
	go func() { done <- a.point(0, true) }()
	// While /b's freeze hangs, the box closes and /a is thawed.
	deadline := time.Now().Add(5 * time.Second)
	for {
		fz.mu.Lock()
		thawed := len(fz.log) > 0 && fz.log[len(fz.log)-1] == "thaw /a"
		fz.mu.Unlock()
		if thawed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/a still frozen after the freeze window: %v", fz.log)
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(fz.unblck) // the hung freeze finally returns
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if fz.anyFrozen() {
		t.Fatalf("left frozen: %v", fz.log)
	}
	if flags, ok := lastTag(t, a.spool); !ok || flags&replication.FlagApp != 0 {
		t.Fatalf("want a crash-consistent point after the time-out, got found=%v flags=%b", ok, flags)
	}
}

func TestFailingPreFreezeScript(t *testing.T) {
	fz := &fakeFreezer{frozen: map[string]bool{}}
	a := mustPoints(t, freezeConfig{mounts: []string{"/a"}, preFreeze: script(t, "echo database busy; exit 3")}, fz)
	if err := a.point(0, true); err != nil {
		t.Fatal(err)
	}
	if len(fz.log) != 0 {
		t.Fatalf("froze although the pre-freeze script failed: %v", fz.log)
	}
	ev := a.events.take()
	if len(ev) != 1 || !strings.Contains(ev[0].Message, "database busy") {
		t.Fatalf("events %+v", ev)
	}
}

func TestNoHooksStillAppPoint(t *testing.T) {
	a := mustPoints(t, freezeConfig{}, &fakeFreezer{frozen: map[string]bool{}})
	if err := a.point(0, true); err != nil {
		t.Fatal(err)
	}
	if flags, ok := lastTag(t, a.spool); !ok || flags&replication.FlagApp == 0 {
		t.Fatal("with no hooks an application-consistent request must still give a point of kind app")
	}
}

// The policy's application-consistent frequency schedules app points (and
// each also serves as the crash point due then). In a bubble, so time is
// the schedule's alone: the first 800 ms give exactly the points due.
func TestScheduledAppPoints(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fz := &fakeFreezer{frozen: map[string]bool{}}
		p := mustPoints(t, freezeConfig{mounts: []string{"/a"}}, fz)
		p.setPolicy(replication.AgentPolicy{CrashInterval: int64(time.Hour), AppFrequency: int64(150 * time.Millisecond)})
		p.start()
		time.Sleep(850 * time.Millisecond)
		p.Close()
		apps, crashes := 0, 0
		// Decoded without the shared zstd codec, which must not be tied
		// to a bubble.
		for _, r := range spoolRecords(t, p.spool, p.spool.First()) {
			switch {
			case r.Kind == replication.KindTag && r.Flags&replication.FlagApp != 0:
				apps++
			case r.Kind == replication.KindTag:
				crashes++
			}
		}
		// Ticks every 100 ms: due at 200, 400, 600 and 800 ms.
		if apps != 4 || crashes != 0 {
			t.Fatalf("%d application-consistent and %d crash points in 850 ms at a 150 ms frequency, want 4 and 0", apps, crashes)
		}
		if fz.anyFrozen() {
			t.Fatal("left frozen")
		}
	})
}
