package server

import (
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// engineRig drives alertEngine.step like evaluateAlerts does, keeping the
// active alerts as the store would.
type engineRig struct {
	t      *testing.T
	e      alertEngine
	now    time.Time
	active []store.Alert
	next   int64
	log    []string // "raised warning", "escalated critical", "resolved"
}

func newEngineRig(t *testing.T, clear time.Duration) *engineRig {
	return &engineRig{t: t, e: alertEngine{clear: clear}, now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
}

// pass advances the clock by d and steps once with obs.
func (r *engineRig) pass(d time.Duration, obs ...alertObs) []string {
	r.now = r.now.Add(d)
	var got []string
	for _, op := range r.e.step(r.now, obs, append([]store.Alert(nil), r.active...)) {
		switch op.change {
		case api.AlertChangeRaised:
			r.next++
			r.active = append(r.active, store.Alert{ID: r.next, Kind: op.obs.kind, Key: op.obs.key, Severity: op.sev, Message: op.obs.message})
			got = append(got, "raised "+op.sev)
		case api.AlertChangeEscalate:
			for i := range r.active {
				if r.active[i].ID == op.active.ID {
					r.active[i].Severity = op.sev
				}
			}
			got = append(got, "escalated "+op.sev)
		case api.AlertChangeResolved:
			for i := range r.active {
				if r.active[i].ID == op.active.ID {
					r.active = append(r.active[:i], r.active[i+1:]...)
					break
				}
			}
			got = append(got, "resolved")
		}
	}
	r.log = append(r.log, got...)
	return got
}

func cpu(level int, clear bool) alertObs {
	return alertObs{kind: api.AlertPSCPU, key: "process-server", level: level, clear: clear, hold: 15 * time.Minute, message: "cpu"}
}

func TestEngineHysteresis(t *testing.T) {
	t.Parallel()
	r := newEngineRig(t, 2*time.Minute)
	// Over the warning level, but not yet for the hold: nothing.
	if got := r.pass(0, cpu(1, false)); len(got) != 0 {
		t.Fatalf("raised at once: %v", got)
	}
	r.pass(10*time.Minute, cpu(1, false))
	// A dip under the threshold restarts the hold.
	r.pass(time.Minute, cpu(0, false))
	if got := r.pass(10*time.Minute, cpu(1, false)); len(got) != 0 {
		t.Fatalf("raised after a broken hold: %v", got)
	}
	if got := r.pass(14*time.Minute, cpu(1, false)); len(got) != 0 {
		t.Fatalf("raised before 15 min: %v", got)
	}
	if got := r.pass(time.Minute, cpu(1, false)); len(got) != 1 || got[0] != "raised warning" {
		t.Fatalf("after 15 min: %v", got)
	}
	// Still over: one alert, no repeat.
	if got := r.pass(time.Minute, cpu(1, false)); len(got) != 0 {
		t.Fatalf("raised again: %v", got)
	}
	// Critical level, held for the hold: escalates once.
	r.pass(time.Minute, cpu(2, false))
	if got := r.pass(15*time.Minute, cpu(2, false)); len(got) != 1 || got[0] != "escalated critical" {
		t.Fatalf("escalation: %v", got)
	}
	// Back to warning levels: stays critical (no downgrade), no flapping.
	for i := 0; i < 5; i++ {
		if got := r.pass(time.Minute, cpu(1, false)); len(got) != 0 {
			t.Fatalf("changed under the critical level: %v", got)
		}
	}
	// Between the thresholds (level 0 but not clearly false): not cleared.
	if got := r.pass(time.Hour, cpu(0, false)); len(got) != 0 {
		t.Fatalf("cleared while not clearly false: %v", got)
	}
	// Clearly false, but interrupted before AlertClear: not cleared.
	r.pass(time.Minute, cpu(0, true))
	r.pass(time.Minute, cpu(0, false))
	if got := r.pass(time.Minute, cpu(0, true)); len(got) != 0 {
		t.Fatalf("cleared after a broken clear: %v", got)
	}
	if got := r.pass(time.Minute, cpu(0, true)); len(got) != 0 {
		t.Fatalf("cleared before AlertClear: %v", got)
	}
	if got := r.pass(time.Minute, cpu(0, true)); len(got) != 1 || got[0] != "resolved" {
		t.Fatalf("clear: %v", got)
	}
	if len(r.active) != 0 {
		t.Fatalf("active after the clear: %+v", r.active)
	}
	want := []string{"raised warning", "escalated critical", "resolved"}
	if strings.Join(r.log, ",") != strings.Join(want, ",") {
		t.Fatalf("changes %v, want %v", r.log, want)
	}
}

// A flapping figure (over, under, over, ...) never raises with a hold, and
// an active alert of a flapping figure never clears.
func TestEngineNoFlapping(t *testing.T) {
	t.Parallel()
	r := newEngineRig(t, 2*time.Minute)
	for i := 0; i < 50; i++ {
		r.pass(time.Minute, cpu(1, false))
		r.pass(time.Minute, cpu(0, true))
	}
	if len(r.log) != 0 {
		t.Fatalf("flapping raised: %v", r.log)
	}
	rpo := func(level int, clear bool) alertObs {
		return alertObs{kind: api.AlertRPO, key: "m1", level: level, clear: clear, message: "rpo"}
	}
	r.pass(time.Second, rpo(1, false))
	for i := 0; i < 50; i++ {
		r.pass(time.Minute, rpo(0, true))
		r.pass(time.Second, rpo(1, false))
	}
	if strings.Join(r.log, ",") != "raised warning" {
		t.Fatalf("flapping RPO: %v", r.log)
	}
}

// An alert whose subject is gone (no observation) clears after AlertClear;
// a critical level raises critical at once.
func TestEngineSubjectGone(t *testing.T) {
	t.Parallel()
	r := newEngineRig(t, time.Minute)
	o := alertObs{kind: api.AlertScrubDamage, key: "m1", level: 2, message: "damage"}
	if got := r.pass(0, o); len(got) != 1 || got[0] != "raised critical" {
		t.Fatalf("%v", got)
	}
	r.pass(time.Second)
	if got := r.pass(time.Minute); len(got) != 1 || got[0] != "resolved" {
		t.Fatalf("subject gone: %v", got)
	}
	if len(r.e.track) != 0 {
		t.Fatalf("tracks left: %v", r.e.track)
	}
}

func TestProcessServerObs(t *testing.T) {
	t.Parallel()
	level := func(obs []alertObs, kind string) (int, bool) {
		for _, o := range obs {
			if o.kind == kind {
				return o.level, o.clear
			}
		}
		return -1, false
	}
	for _, tc := range []struct {
		ps    api.ProcessServer
		kind  string
		level int
		clear bool
	}{
		{api.ProcessServer{CPU: 0.5}, api.AlertPSCPU, 0, true},
		{api.ProcessServer{CPU: 0.75}, api.AlertPSCPU, 0, false},
		{api.ProcessServer{CPU: 0.85}, api.AlertPSCPU, 1, false},
		{api.ProcessServer{CPU: 0.96}, api.AlertPSCPU, 2, false},
		{api.ProcessServer{CPU: 0.99, HostError: "no /proc"}, api.AlertPSCPU, -1, false},
		{api.ProcessServer{CPU: -1}, api.AlertPSCPU, -1, false}, // not sampled yet: not observed
		{api.ProcessServer{Memory: 0.81, MemoryTotal: 1 << 30}, api.AlertPSMemory, 1, false},
		{api.ProcessServer{Memory: 0.951, MemoryTotal: 1 << 30}, api.AlertPSMemory, 2, false},
		{api.ProcessServer{Memory: 0.1, MemoryTotal: 1 << 30}, api.AlertPSMemory, 0, true},
		{api.ProcessServer{Memory: 0}, api.AlertPSMemory, -1, false}, // total unknown: not observed
		{api.ProcessServer{CacheFree: 0.5, CacheState: api.CacheOK}, api.AlertPSCacheFree, 0, true},
		{api.ProcessServer{CacheFree: 0.29, CacheState: api.CacheOK}, api.AlertPSCacheFree, 1, false},
		{api.ProcessServer{CacheFree: 0.2, CacheState: api.CacheOK}, api.AlertPSCacheFree, 2, false},
		{api.ProcessServer{CacheFree: 0.2, CacheState: "unknown"}, api.AlertPSCacheFree, -1, false},
		{api.ProcessServer{UploadETA: 10 * time.Minute}, api.AlertPSUpload, 0, true},
		{api.ProcessServer{UploadETA: 31 * time.Minute}, api.AlertPSUpload, 1, false},
		{api.ProcessServer{UploadETA: api.UploadStalled}, api.AlertPSUpload, 2, false},
	} {
		obs := processServerObs(tc.ps, time.Minute)
		if l, c := level(obs, tc.kind); l != tc.level || c != tc.clear {
			t.Errorf("%+v %s: level %d clear %v, want %d %v", tc.ps, tc.kind, l, c, tc.level, tc.clear)
		}
		for _, o := range obs {
			if o.hold != time.Minute || o.action == "" || o.subject != "process-server" {
				t.Errorf("%+v", o)
			}
		}
	}
}

// TestHeartbeatSince: a process server's silence counts from its last
// heartbeat, else from the later of the server's start and its
// registration (one registered after the start was reported silent since
// the start before its first heartbeat could come).
func TestHeartbeatSince(t *testing.T) {
	t.Parallel()
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		registered, beat, want time.Time
	}{
		{start.Add(-time.Hour), time.Time{}, start},
		{start.Add(5 * time.Second), time.Time{}, start.Add(5 * time.Second)},
		{start.Add(5 * time.Second), start.Add(6 * time.Second), start.Add(6 * time.Second)},
		{start.Add(-time.Hour), start.Add(-time.Minute), start},
	} {
		if got := heartbeatSince(start, tc.registered, tc.beat); !got.Equal(tc.want) {
			t.Errorf("registered %s, beat %s: %s, want %s", tc.registered, tc.beat, got, tc.want)
		}
	}
}

func TestCertObs(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	day := 24 * time.Hour
	for _, tc := range []struct {
		left  time.Duration
		level int
		clear bool
	}{
		{365 * day, 0, true}, {29 * day, 1, false}, {6 * day, 2, false}, {-day, 2, false},
	} {
		o := certObs("server", "the server's TLS certificate", now.Add(tc.left), now, "restart")
		if o.level != tc.level || o.clear != tc.clear || !strings.Contains(o.message, "the server's TLS certificate") {
			t.Errorf("%s left: %+v", tc.left, o)
		}
	}
}

func TestRPOLevel(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		rpo  time.Duration
		want int
	}{{time.Minute, 0}, {15 * time.Minute, 0}, {16 * time.Minute, 1}, {30 * time.Minute, 1}, {31 * time.Minute, 2}} {
		if got := rpoLevel(tc.rpo, 15*time.Minute); got != tc.want {
			t.Errorf("rpo %s: level %d, want %d", tc.rpo, got, tc.want)
		}
	}
}
