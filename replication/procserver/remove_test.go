package procserver

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// writeOpenFile leaves an unsealed cache file holding the initial copy's
// end and a write, as a stop before its seal does.
func writeOpenFile(t *testing.T, cache string) {
	t.Helper()
	seg := replication.SegmentHeader(1, time.Now())
	f := dataFrame(1,
		replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone},
		replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("acknowledged")})
	seg = replication.AppendFrame(seg, &f)
	if err := os.WriteFile(filepath.Join(cache, machineID, openName), seg, 0o600); err != nil {
		t.Fatal(err)
	}
}

// A removed machine is never opened (Config.Removed at the start, nor by a
// request later); Remove with drain applies what its cache holds first,
// then removes the cache; Remove again is nil.
func TestRemoveDrainsTheCache(t *testing.T) {
	ctx := context.Background()
	cat := mustCatalog(t)
	cache := t.TempDir()
	prepare(t, cache, cat)
	writeOpenFile(t, cache)
	s, err := New(ctx, Config{CacheDir: cache, Catalog: cat, Removed: []string{machineID}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, ok := s.Stats(machineID); ok {
		t.Fatal("a removed machine was opened at the start")
	}
	if err := s.WithApplier(ctx, machineID, func(*replication.Applier) error { return nil }); !errors.Is(err, ErrRemoved) {
		t.Fatalf("WithApplier of a removed machine: %v", err)
	}
	for range 2 {
		if err := s.Remove(ctx, machineID, true); err != nil {
			t.Fatal(err)
		}
	}
	m, err := cat.Machine(ctx, machineID)
	if err != nil {
		t.Fatal(err)
	}
	if m.AppliedSeq != 2 || !m.Protected() {
		t.Fatalf("after the drain: applied %d, disks %+v", m.AppliedSeq, m.Disks)
	}
	if _, err := os.Stat(filepath.Join(cache, machineID)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the cache directory: %v", err)
	}
	if _, ok := s.Stats(machineID); ok {
		t.Fatal("the removed machine is open")
	}
	if n := s.cacheBytes.Load(); n != 0 {
		t.Fatalf("cache bytes counted after the removal: %d", n)
	}
	// Its points are read from the target directly.
	p := replication.Point{ID: "2", Seq: 2, Time: time.Now(), Kind: replication.PointCrash}
	if _, err := s.OpenPoint(ctx, machineID, p, "d", false); err == nil {
		t.Fatal("a point that does not exist opened")
	}
}

// Remove without drain, of an open machine, discards the cache (nothing of
// it is applied) and closes the replica disks, so they can be deleted.
func TestRemoveWithoutDrain(t *testing.T) {
	ctx := context.Background()
	cat := mustCatalog(t)
	cache := t.TempDir()
	prepare(t, cache, cat)
	s := mustServer(t, cache, cat)
	defer s.Close()
	if _, ok := s.Stats(machineID); !ok {
		t.Fatal("the machine is not open")
	}
	s.mu.Lock()
	m := s.machines[machineID]
	s.mu.Unlock()
	rec := replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("never applied")}
	f := dataFrame(1, rec)
	epoch, _, err := m.cache.takeOver()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.cache.append(epoch, &f); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, machineID, false); err != nil {
		t.Fatal(err)
	}
	if mc, _ := cat.Machine(ctx, machineID); mc.AppliedSeq != 0 {
		t.Fatalf("applied %d after a removal without drain", mc.AppliedSeq)
	}
	if _, err := m.cache.append(epoch, &f); err == nil {
		t.Fatal("the removed machine's cache took a frame")
	}
	if err := cat.DeleteMachine(ctx, machineID); err != nil {
		t.Fatalf("delete the removed machine's replica: %v", err)
	}
	if _, err := os.Stat(filepath.Join(cache, machineID)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the cache directory: %v", err)
	}
	if n := s.cacheBytes.Load(); n != 0 {
		t.Fatalf("cache bytes counted after the removal: %d", n)
	}
}
