package server

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// TestRecoveredAgentWelcome: the Welcome rules of a recovered VM's
// agent's stream. Held: the agent drops everything (a new epoch, the
// floor its last record); live: after the floor, the last record
// acknowledged (same log only) or SpoolFirst, whichever is latest; a
// compare of an older epoch does not let it flow; a server restart takes
// it live from the record's floor; another log, or one behind the floor,
// holds it and records the path as the flat files'.
func TestRecoveredAgentWelcome(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := &testClock{t: time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)}
	s := mustOpenServer(t, clock)
	id := "0123456789abcdef0123456789abcdef"
	if _, _, err := s.db.CreateMachine(ctx, id, "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	m, err := s.db.Machine(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	d := failoverDetail{VSphere: &vsphereDetail{VCenter: "vc1", Ref: "vm-9", Name: "vm1-recovered", UUID: "4211aaaa-0000-4000-8000-000000000001"}}
	f := store.Failover{ID: "f1", MachineID: id, Kind: api.FailoverReal, Dest: api.ToVSphere, State: store.FailoverCommitted, Detail: encodeDetail(d)}
	if err := s.db.AddFailover(ctx, f); err != nil {
		t.Fatal(err)
	}
	hello := func(first, next uint64, log string) replication.Hello {
		return replication.Hello{MachineID: id, SpoolFirst: first, NextSeq: next, LogID: log}
	}
	a := s.recAgents.get(s, m, f, d, d.VSphere.Name, d.VSphere.UUID)
	c1 := &recConn{a: a}
	if dur, err := c1.Start(hello(1, 101, "log1")); err != nil || dur != 100 {
		t.Fatalf("held Welcome: %d, %v; want 100", dur, err)
	}
	e, connected := a.beginCompare()
	// Welcomed again during the compare: that compare does not count.
	c2 := &recConn{a: a}
	if dur, _ := c2.Start(hello(1, 121, "log1")); dur != 120 {
		t.Fatalf("second held Welcome: %d, want 120", dur)
	}
	if _, _, ok := a.goLive(e); ok || !connected {
		t.Fatalf("a compare of an older epoch let the stream flow (connected %v)", connected)
	}
	if c1.Hold(ctx) == nil {
		t.Fatal("an older connection may write")
	}
	e, _ = a.beginCompare()
	floor, log, ok := a.goLive(e)
	if !ok || floor != 120 || log != "log1" {
		t.Fatalf("goLive: %d %q %v", floor, log, ok)
	}
	if err := c2.Hold(ctx); err != nil {
		t.Fatalf("live: %v", err)
	}
	a.mu.Lock()
	a.acked = 130
	a.mu.Unlock()
	c3 := &recConn{a: a}
	if dur, _ := c3.Start(hello(1, 141, "log1")); dur != 130 {
		t.Fatalf("live Welcome: %d, want 130 (acked)", dur)
	}

	// The record as reprotect leaves it; a restarted server.
	d.Reverse = &reverseDetail{State: dirReprotected, VSphere: &vmReverse{Path: pathAgent, From: 120, Log: "log1"}}
	f.Detail = encodeDetail(d)
	if err := s.db.UpdateFailover(ctx, f); err != nil {
		t.Fatal(err)
	}
	// The stream's figures kept in the record (as saveStream and the
	// stop do): a restart starts from them.
	a.sent.Store(777)
	s.recordStream(ctx, a)
	s.recAgents.end(id)
	cur, err := s.db.LiveFailover(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if v := decodeDetail(cur).Reverse.VSphere; v.Streamed != 777 || v.Acked != 130 {
		t.Fatalf("the record's stream: %+v, want 777 bytes, record 130", v)
	}
	a = s.recAgents.get(s, m, cur, decodeDetail(cur), d.VSphere.Name, d.VSphere.UUID)
	c4 := &recConn{a: a}
	if dur, _ := c4.Start(hello(1, 141, "log1")); dur != 130 || !a.live || a.sent.Load() != 777 {
		t.Fatalf("Welcome after a restart: %d (live %v, %d bytes sent), want 130 (the last acknowledged)", dur, a.live, a.sent.Load())
	}
	if dur, _ := (&recConn{a: a}).Start(hello(135, 141, "log1")); dur != 134 {
		t.Fatalf("Welcome after a restart, spool from 135: %d, want 134", dur)
	}
	if dur, _ := (&recConn{a: a}).Start(hello(1, 126, "log1")); dur != 120 {
		t.Fatalf("Welcome after a restart, the agent behind the acknowledged record: %d, want 120 (the floor)", dur)
	}
	// Another log: held, and recorded so.
	if dur, _ := (&recConn{a: a}).Start(hello(1, 11, "log2")); dur != 10 || a.live || a.needsPass == "" {
		t.Fatalf("another log: Welcome %d, live %v, held %q", dur, a.live, a.needsPass)
	}
	deadline := time.Now().Add(3 * time.Minute) // a hung test
	for {
		cur, err := s.db.LiveFailover(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if p := decodeDetail(cur).Reverse.VSphere.Path; p == pathVCenter {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the hold never recorded")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if v := a.view(); v.Live || v.Held == "" {
		t.Fatalf("view %+v", v)
	}
}

// TestSameVMUUID: an Azure VM's unique id matches the guest's BIOS UUID
// as it is, case aside, or with its first three fields byte-swapped.
func TestSameVMUUID(t *testing.T) {
	t.Parallel()
	const id = "839cf249-9ce9-4f63-9c5b-6909602a6528"
	for _, c := range []struct {
		vmID, bios string
		want       bool
	}{
		{id, id, true},
		{id, strings.ToUpper(id), true},
		{id, "49f29c83-e99c-634f-9c5b-6909602a6528", true},
		{id, "49f29c83-e99c-634f-9c5b-6909602a6529", false},
		{id, "839cf249-9ce9-4f63-9c5b-6909602a6529", false},
		{"", "", false},
		{"not-a-uuid", "x", false},
	} {
		if got := sameVMUUID(c.vmID, c.bios); got != c.want {
			t.Errorf("sameVMUUID(%q, %q) = %v, want %v", c.vmID, c.bios, got, c.want)
		}
	}
}
