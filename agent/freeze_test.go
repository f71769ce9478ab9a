package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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

func mustFreezeAgent(t *testing.T, cfg Config, fz *fakeFreezer) *Agent {
	t.Helper()
	d, sp, dir := mustTestDisk(t, 1<<20)
	cfg.StateDir = dir
	a := &Agent{cfg: cfg, disks: []*Disk{d}, spool: sp, log: slog.Default(), freezer: fz, ctx: context.Background()}
	return a
}

// lastTag returns the flags of the last tag record in the spool.
func lastTag(t *testing.T, a *Agent) (uint8, bool) {
	t.Helper()
	var flags uint8
	found := false
	for _, f := range readFrames(t, a.spool) {
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
	a := mustFreezeAgent(t, Config{
		FreezeMounts: []string{"/a", "/b"},
		PreFreeze:    script(t, "echo pre-$1 >> "+marks),
		PostThaw:     script(t, "echo post-$1 >> "+marks),
	}, fz)
	if err := a.point(7, true); err != nil {
		t.Fatal(err)
	}
	if flags, ok := lastTag(t, a); !ok || flags&replication.FlagApp == 0 {
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
	a := mustFreezeAgent(t, Config{FreezeMounts: []string{"/a", "/b"}}, fz)
	if err := a.point(0, true); err != nil {
		t.Fatal(err)
	}
	if flags, ok := lastTag(t, a); !ok || flags&replication.FlagApp != 0 {
		t.Fatalf("want a crash-consistent point, got found=%v flags=%b", ok, flags)
	}
	if fz.anyFrozen() {
		t.Fatal("a file system was left frozen after a failed freeze")
	}
	ev := a.takeEvents()
	if len(ev) != 1 || ev[0].Kind != "freeze-failed" || !strings.Contains(ev[0].Message, "/b") {
		t.Fatalf("events %+v", ev)
	}
}

func TestFreezeTimeBoxed(t *testing.T) {
	fz := &fakeFreezer{frozen: map[string]bool{}, block: "/b", unblck: make(chan struct{})}
	a := mustFreezeAgent(t, Config{FreezeMounts: []string{"/a", "/b"}, FreezeTimeout: 200 * time.Millisecond}, fz)
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
	if flags, ok := lastTag(t, a); !ok || flags&replication.FlagApp != 0 {
		t.Fatalf("want a crash-consistent point after the time-out, got found=%v flags=%b", ok, flags)
	}
}

func TestFailingPreFreezeScript(t *testing.T) {
	fz := &fakeFreezer{frozen: map[string]bool{}}
	a := mustFreezeAgent(t, Config{FreezeMounts: []string{"/a"}, PreFreeze: script(t, "echo database busy; exit 3")}, fz)
	if err := a.point(0, true); err != nil {
		t.Fatal(err)
	}
	if len(fz.log) != 0 {
		t.Fatalf("froze although the pre-freeze script failed: %v", fz.log)
	}
	ev := a.takeEvents()
	if len(ev) != 1 || !strings.Contains(ev[0].Message, "database busy") {
		t.Fatalf("events %+v", ev)
	}
}

func TestNoHooksStillAppPoint(t *testing.T) {
	a := mustFreezeAgent(t, Config{}, &fakeFreezer{frozen: map[string]bool{}})
	if err := a.point(0, true); err != nil {
		t.Fatal(err)
	}
	if flags, ok := lastTag(t, a); !ok || flags&replication.FlagApp == 0 {
		t.Fatal("with no hooks an application-consistent request must still give a point of kind app")
	}
}

// The policy's application-consistent frequency schedules app points (and
// each also serves as the crash point due then).
func TestScheduledAppPoints(t *testing.T) {
	fz := &fakeFreezer{frozen: map[string]bool{}}
	a := mustFreezeAgent(t, Config{FreezeMounts: []string{"/a"}}, fz)
	ctx, cancel := context.WithCancel(context.Background())
	a.ctx = ctx
	a.done = map[uint32]*atomic.Bool{0: {}}
	a.done[0].Store(true)
	a.setPolicy(replication.AgentPolicy{CrashInterval: int64(time.Hour), AppFrequency: int64(150 * time.Millisecond)})
	exited := make(chan struct{})
	go func() { a.tagLoop(); close(exited) }()
	// Each app point tags before it thaws: three thaws, three points. (The
	// deadline only ends a hung loop; a slow machine just takes longer.)
	deadline := time.Now().Add(time.Minute)
	for thaws := 0; thaws < 3; {
		fz.mu.Lock()
		thaws = 0
		for _, l := range fz.log {
			if l == "thaw /a" {
				thaws++
			}
		}
		fz.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("%d scheduled application-consistent points in a minute at a 150 ms frequency", thaws)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-exited
	apps := 0
	for _, f := range readFrames(t, a.spool) {
		recs, _, _ := replication.DefaultCodec().Records(&f, nil)
		for _, r := range recs {
			if r.Kind == replication.KindTag && r.Flags&replication.FlagApp != 0 {
				apps++
			}
		}
	}
	if apps < 3 {
		t.Fatalf("%d application-consistent points logged after three thaws", apps)
	}
	if fz.anyFrozen() {
		t.Fatal("left frozen")
	}
}
