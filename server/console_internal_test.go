package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/web"
)

// testClock is a clock tests move by hand.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *testClock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// mustOpenServer opens a server (not run) on a fresh vault with the clock.
func mustOpenServer(t *testing.T, clock *testClock) *Server {
	t.Helper()
	s, err := Open(context.Background(), Config{DataDir: filepath.Join(t.TempDir(), "srv"), Listen: "127.0.0.1:0", DataListen: "127.0.0.1:0",
		NBDListen: "off", Now: clock.now, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	s.db.SetClock(clock.now)
	return s
}

// TestConsolePoliciesAndGroups: the console's policy and group changes go
// through the API's checks, and a refused one changes nothing.
func TestConsolePoliciesAndGroups(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := &testClock{t: time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)}
	s := mustOpenServer(t, clock)
	if _, _, err := s.db.CreateMachine(ctx, "aa", "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	b := consoleBackend{s}
	for _, bad := range []api.PolicyJSON{
		{Name: "silver", CrashInterval: "1s"},
		{Name: "silver", Retention: "soon"},
		{Name: "bad name"},
		{Name: "default"},
	} {
		if _, err := b.CreatePolicy(ctx, bad); err == nil {
			t.Errorf("%+v: created", bad)
		}
	}
	if ps, _ := b.Policies(ctx); len(ps) != 2 { // default and its failback twin
		t.Fatalf("refused policies were stored: %+v", ps)
	}
	p, err := b.CreatePolicy(ctx, api.PolicyJSON{Name: "silver", CrashInterval: "1m", RPOThreshold: "10m"})
	if err != nil || p.CrashInterval != "1m0s" || p.RPOThreshold != "10m0s" {
		t.Fatalf("create: %+v, %v", p, err)
	}
	if _, err := b.UpdatePolicy(ctx, "silver", api.PolicyJSON{CrashInterval: "10m"}); err == nil || !strings.Contains(err.Error(), "nothing was changed") {
		t.Errorf("a refused change: %v", err)
	}
	if p, _ := s.db.Policy(ctx, "silver"); p.CrashInterval != time.Minute {
		t.Errorf("a refused change changed the policy: %+v", p)
	}
	if _, err := b.UpdatePolicy(ctx, "nope", api.PolicyJSON{CrashInterval: "1m"}); !errors.Is(err, web.ErrNotFound) {
		t.Errorf("update of an unknown policy: %v", err)
	}
	if err := b.AssignPolicy(ctx, "vm1", "silver-failback"); err == nil {
		t.Error("a failback policy was assigned")
	}
	if err := b.AssignPolicy(ctx, "vm1", "silver"); err != nil {
		t.Fatal(err)
	}
	if err := b.SetGroup(ctx, "vm1", "bad name"); err == nil {
		t.Error("a bad group name was accepted")
	}
	if err := b.SetGroup(ctx, "vm1", "erp"); err != nil {
		t.Fatal(err)
	}
	m, _ := s.db.MachineByName(ctx, "vm1")
	if m.Policy != "silver" || m.Group != "erp" {
		t.Errorf("machine: policy %q group %q", m.Policy, m.Group)
	}
	if err := b.SetGroup(ctx, "nope", "erp"); !errors.Is(err, web.ErrNotFound) {
		t.Errorf("group of an unknown machine: %v", err)
	}
	if _, err := b.Tag(ctx, "vm1", false); err == nil {
		t.Error("a machine with no agent connected was tagged")
	}
}

// TestHistorySample: each sample has the machine's RPO (a lower bound for
// an agent not seen since the start) and its bytes received; old samples
// are pruned.
func TestHistorySample(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := &testClock{t: time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)}
	s := mustOpenServer(t, clock)
	if _, _, err := s.db.CreateMachine(ctx, "aa", "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	if err := s.db.TouchMachine(ctx, "aa", "0.4", 100); err != nil { // seen now, 100 bytes received
		t.Fatal(err)
	}
	for i := range 3 {
		clock.add(time.Minute)
		if i == 2 {
			s.db.TouchMachine(ctx, "aa", "0.4", 50)
		}
		if err := s.sampleHistory(ctx, clock.now()); err != nil {
			t.Fatal(err)
		}
	}
	h, err := s.History(ctx, "vm1", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if len(h) != 3 {
		t.Fatalf("%d samples, want 3", len(h))
	}
	// The agent is gone: the RPO grows from when it was last seen, until
	// it is seen again.
	for i, want := range []time.Duration{time.Minute, 2 * time.Minute, 0} {
		if !h[i].RPOKnown || h[i].RPO != want {
			t.Errorf("sample %d: RPO %v (known %v), want %v", i, h[i].RPO, h[i].RPOKnown, want)
		}
	}
	if h[0].Bytes != 100 || h[2].Bytes != 150 || h[1].Churn != 0 || h[2].Churn != 50 {
		t.Errorf("bytes and churn: %+v", h)
	}
	clock.add(historyKeep + time.Minute)
	if err := s.sampleHistory(ctx, clock.now()); err != nil {
		t.Fatal(err)
	}
	if h, _ := s.History(ctx, "vm1", time.Time{}); len(h) != 1 {
		t.Errorf("%d samples after 25 h, want the newest only", len(h))
	}
}
