package server

import (
	"context"
	"encoding/binary"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/overlay"
	"github.com/asrdr/asr/server/api"
)

func mustLag(t *testing.T, m *reverseMap, now time.Time, want time.Duration) {
	t.Helper()
	l := m.lag()
	var got time.Duration
	if l.pend > 0 {
		got = now.Sub(l.safe)
	}
	if got != want {
		t.Fatalf("reverse RPO %s (pending %d blocks, safe %s), want %s", got, l.pend, l.safe, want)
	}
}

// The reverse RPO of one map: 0 when nothing is pending; from the first
// write after an empty map; moved on by each generation sent and
// acknowledged (never less than the true age); a failure keeps it; saved
// with the map and loaded again; a version 1 map's age is not known.
func TestReverseMapAge(t *testing.T) {
	t.Parallel()
	clock := &testClock{t: time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)}
	path := filepath.Join(t.TempDir(), "d.rev")
	m := newReverseMap(path, 64*overlay.BlockSize, func() {})
	m.setClock(clock.now)
	mustLag(t, m, clock.now(), 0)
	t0 := clock.now()
	m.mark(0, 1)
	m.backdate(t0) // the overlay's blocks at reprotect: the first pass
	clock.add(10 * time.Second)
	mustLag(t, m, clock.now(), 10*time.Second)
	if m.lag().synced {
		t.Fatal("synced before anything was sent")
	}
	got := m.take(1) // a generation of block 0 starts at t0+10s
	clock.add(5 * time.Second)
	m.mark(overlay.BlockSize, 1) // block 1 at t0+15s
	m.done(got)
	// Block 0's generation is on the original: every write before its
	// start (t0+10s) is; block 1 (t0+15s) is not: 10 s at t0+20s (the
	// true age is 5 s: late by at most the generation's length).
	clock.add(5 * time.Second)
	mustLag(t, m, clock.now(), 10*time.Second)
	// A failed send keeps the age; the retry's generation moves it.
	got = m.take(4) // generation at t0+20s
	m.fail(got)
	clock.add(time.Minute)
	mustLag(t, m, clock.now(), 70*time.Second)
	m.mark(2*overlay.BlockSize, 1) // block 2 at t0+80s
	got = m.take(4)                // still the generation of t0+20s: blocks 1 and 2 taken
	m.mark(overlay.BlockSize, 1)   // block 1 written again while in flight (t0+80s)
	m.done(got)
	// Block 1 is dirty again (its write at t0+80s), every write before
	// t0+20s is on the original.
	mustLag(t, m, clock.now(), 60*time.Second)
	if l := m.lag(); l.pend != 1 {
		t.Fatalf("pending %d blocks, want 1", l.pend)
	}
	// Saved, loaded: the same age.
	if err := m.save(); err != nil {
		t.Fatal(err)
	}
	l, err := loadReverseMap(path, 64*overlay.BlockSize, func() {})
	if err != nil {
		t.Fatal(err)
	}
	l.setClock(clock.now)
	mustLag(t, l, clock.now(), 60*time.Second)
	if !l.lag().synced {
		t.Fatal("a loaded map counts as past its first pass")
	}
	// Drained: 0, and the first write after it counts from itself.
	got = m.take(4)
	m.done(got)
	mustLag(t, m, clock.now(), 0)
	if !m.lag().synced {
		t.Fatal("not synced once drained")
	}
	clock.add(time.Hour)
	m.mark(5*overlay.BlockSize, 1)
	clock.add(3 * time.Second)
	mustLag(t, m, clock.now(), 3*time.Second)
	if !m.lag().synced {
		t.Fatal("a write after the first pass counts as a first pass")
	}
	// backdate: the overlay's blocks at reprotect were written since the
	// failover.
	m.backdate(t0)
	mustLag(t, m, clock.now(), clock.now().Sub(t0))
	// A version 1 map (no time): loaded, its age is not known until a
	// generation is on the original.
	v1 := make([]byte, 24+8+4)
	copy(v1, revMagic[:])
	binary.LittleEndian.PutUint32(v1[8:], 1)
	binary.LittleEndian.PutUint32(v1[12:], overlay.BlockSize)
	binary.LittleEndian.PutUint64(v1[16:], uint64(64*overlay.BlockSize))
	binary.LittleEndian.PutUint64(v1[24:], 1<<3)
	binary.LittleEndian.PutUint32(v1[32:], replication.Checksum(v1[:32]))
	p1 := filepath.Join(t.TempDir(), "v1.rev")
	if err := os.WriteFile(p1, v1, 0o600); err != nil {
		t.Fatal(err)
	}
	old, err := loadReverseMap(p1, 64*overlay.BlockSize, func() {})
	if err != nil {
		t.Fatal(err)
	}
	old.setClock(clock.now)
	if ol := old.lag(); ol.pend != 1 || !ol.safe.IsZero() {
		t.Fatalf("version 1 map: %+v", ol)
	}
	gen := clock.now()
	got = old.take(4)
	clock.add(time.Second)
	old.mark(0, 1)
	old.done(got)
	clock.add(time.Second)
	if ol := old.lag(); ol.pend != 1 || !ol.safe.Equal(gen) {
		t.Fatalf("version 1 map after a generation: %+v, want safe %s", ol, gen)
	}
}

// The reverse RPO alert of a reprotected machine, with the engine's
// passes driven by hand: kept during the first pass, raised over the
// failback policy's threshold (not the replication policy's), critical
// at twice it, cleared once under 80% of it for AlertClear, and cleared
// when the machine is no longer reprotected. The API and the metrics
// show the figure.
func TestReverseRPOAlert(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := &testClock{t: time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)}
	s := mustOpenServer(t, clock)
	s.alerts.engine.clear = time.Minute
	id := "0123456789abcdef0123456789abcdef"
	m, _, err := s.db.CreateMachine(ctx, id, "vm1", "1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdatePolicy(ctx, "default-failback", api.PolicyJSON{RPOThreshold: "30s"}); err != nil {
		t.Fatal(err)
	}
	rms := []*reverseMap{newReverseMap(filepath.Join(t.TempDir(), "a.rev"), 16*overlay.BlockSize, func() {}),
		newReverseMap(filepath.Join(t.TempDir(), "b.rev"), 16*overlay.BlockSize, func() {})}
	run := &reverseRun{failoverID: "f1", machineID: id}
	for i, rm := range rms {
		rm.setClock(clock.now)
		run.disks = append(run.disks, revDisk{index: uint32(i), name: string(rune('a' + i)), m: rm})
	}
	s.rv.runs = map[string]*reverseRun{id: run}
	// Being set up: not known, kept.
	if rs := s.reverseStatus(ctx, m); rs == nil || rs.RPOKnown || rs.FirstPassDone {
		t.Fatalf("reverse status of a run being set up: %+v", rs)
	}
	run.fp.ready.Store(true)
	active := func() (api.Alert, bool) {
		t.Helper()
		as, err := s.Alerts(ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range as {
			if a.Kind == api.AlertReverseRPO && a.Machine == "vm1" {
				return a, true
			}
		}
		return api.Alert{}, false
	}
	pass := func(d time.Duration) {
		t.Helper()
		clock.add(d)
		obs, err := s.alertConditions(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.applyAlertPass(ctx, obs, clock.now()); err != nil {
			t.Fatal(err)
		}
	}
	// The first pass: the overlay's blocks, written since the failover
	// an hour ago, are not on the original yet: kept, not raised.
	rms[0].mark(0, 3*overlay.BlockSize)
	rms[0].backdate(clock.now().Add(-time.Hour))
	pass(time.Second)
	if a, ok := active(); ok {
		t.Fatalf("raised during the first pass: %+v", a)
	}
	if rs := s.reverseStatus(ctx, m); rs == nil || !rs.RPOKnown || rs.RPO < time.Hour || rs.FirstPassDone || rs.Threshold != 30*time.Second ||
		rs.Policy != "default-failback" || rs.Pending != 3*overlay.BlockSize {
		t.Fatalf("reverse status in the first pass: %+v", rs)
	}
	for _, rm := range rms {
		rm.done(rm.take(16))
	}
	pass(time.Second)
	if rs := s.reverseStatus(ctx, m); rs.RPO != 0 || !rs.FirstPassDone || !rs.ConsistentAt.Equal(clock.now()) {
		t.Fatalf("reverse status drained: %+v", rs)
	}
	// A write to the second disk, the agent not acknowledging: over the
	// failback policy's 30 s (the replication policy's is 15 min).
	rms[1].mark(5*overlay.BlockSize, 1)
	pass(20 * time.Second)
	if a, ok := active(); ok {
		t.Fatalf("raised at 20 s: %+v", a)
	}
	pass(15 * time.Second)
	a, ok := active()
	if !ok || a.Severity != api.SeverityWarning || !strings.Contains(a.Message, "reverse direction") ||
		!strings.Contains(a.Message, "default-failback") || !strings.Contains(a.Message, "35s behind") || !strings.Contains(a.Action, "asr status --machine vm1") {
		t.Fatalf("reverse RPO alert at 35 s: %+v %v", a, ok)
	}
	pass(30 * time.Second)
	if a, _ = active(); a.Severity != api.SeverityCritical {
		t.Fatalf("at 65 s (over twice the threshold): %+v", a)
	}
	// Metrics show it.
	body := scrapeMetrics(t, s)
	if !strings.Contains(body, `asr_machine_reverse_rpo_seconds{machine="vm1"} 65`) ||
		!strings.Contains(body, `asr_machine_reverse_pending_bytes{machine="vm1"} 65536`) ||
		!strings.Contains(body, `asr_alerts_active{kind="reverse-rpo",severity="critical"} 1`) {
		t.Fatalf("metrics lack the reverse RPO:\n%s", grepLines(body, "reverse"))
	}
	// Sent and acknowledged: it clears after AlertClear, not before.
	rms[1].done(rms[1].take(16))
	pass(time.Second)
	if _, ok := active(); !ok {
		t.Fatal("cleared at once, before AlertClear")
	}
	pass(time.Minute)
	if a, ok := active(); ok {
		t.Fatalf("still active a minute under the threshold: %+v", a)
	}
	es, err := s.Events(ctx, id, 50)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, e := range es {
		kinds = append(kinds, e.Kind)
	}
	if k := strings.Join(kinds, " "); !strings.Contains(k, "reverse-rpo-raised") || !strings.Contains(k, "reverse-rpo-resolved") {
		t.Fatalf("events %s", k)
	}
	// Raised again, then the machine is no longer reprotected: cleared.
	rms[0].mark(0, 1)
	pass(40 * time.Second)
	if _, ok := active(); !ok {
		t.Fatal("not raised again")
	}
	delete(s.rv.runs, id)
	pass(time.Second)
	pass(time.Minute)
	if a, ok := active(); ok {
		t.Fatalf("active after the machine left the reverse direction: %+v", a)
	}
	if rs := s.reverseStatus(ctx, m); rs != nil {
		t.Fatalf("reverse status of a machine not reprotected: %+v", rs)
	}
}

// Reverse points: recorded when every disk is empty at once, at most
// every failback policy's crash-consistent interval, pruned past its
// retention.
func TestReversePoints(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := &testClock{t: time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)}
	s := mustOpenServer(t, clock)
	id := "0123456789abcdef0123456789abcdef"
	if _, _, err := s.db.CreateMachine(ctx, id, "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdatePolicy(ctx, "default-failback", api.PolicyJSON{CrashInterval: "1m", Retention: "2h", PITWindow: "1h"}); err != nil {
		t.Fatal(err)
	}
	rm := newReverseMap(filepath.Join(t.TempDir(), "a.rev"), 16*overlay.BlockSize, func() {})
	rm.setClock(clock.now)
	run := &reverseRun{failoverID: "f1", machineID: id, disks: []revDisk{{name: "a", m: rm}}}
	run.fp.ready.Store(true)
	points := func() int {
		t.Helper()
		es, err := s.Events(ctx, id, 100)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, e := range es {
			if e.Kind == eventReversePoint {
				n++
			}
		}
		return n
	}
	rm.mark(0, 1)
	s.reverseIdle(ctx, run) // pending: no point
	if n := points(); n != 0 {
		t.Fatalf("%d points with a block pending", n)
	}
	rm.done(rm.take(4))
	s.reverseIdle(ctx, run)
	clock.add(30 * time.Second)
	s.reverseIdle(ctx, run) // within the interval
	if n := points(); n != 1 {
		t.Fatalf("%d points, want 1", n)
	}
	clock.add(31 * time.Second)
	s.reverseIdle(ctx, run)
	if n := points(); n != 2 {
		t.Fatalf("%d points after the interval, want 2", n)
	}
	clock.add(2*time.Hour - 10*time.Second) // the first is past the retention
	if err := s.pruneReversePoints(ctx); err != nil {
		t.Fatal(err)
	}
	if n := points(); n != 1 {
		t.Fatalf("%d points after pruning, want 1", n)
	}
}

// scrapeMetrics is what GET /metrics answers, in the text format.
func scrapeMetrics(t *testing.T, s *Server) string {
	t.Helper()
	w := httptest.NewRecorder()
	r := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	s.metrics.handler.ServeHTTP(w, r)
	if w.Code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", w.Code, w.Body)
	}
	return w.Body.String()
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
