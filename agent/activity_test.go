package agent

import (
	"context"
	"log/slog"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/asrdr/asr/replication"
)

// The log names, durably, every extent with a change not yet synced; a
// checkpoint drops those synced, but not one changed while it synced.
func TestActivityLogCheckpoint(t *testing.T) {
	dir := t.TempDir()
	al := openActivityLog(context.Background(), dir, slog.New(slog.DiscardHandler), nil)
	defer al.Close()
	if err := al.touch(0, 0, 4096); err != nil {
		t.Fatal(err)
	}
	if err := al.touch(2, 3*alExtent-1, 2); err != nil { // across two extents
		t.Fatal(err)
	}
	risk, ok := atRisk(dir)
	want := map[uint32][]replication.Range{0: {{Off: 0, Len: alExtent}}, 2: {{Off: 2 * alExtent, Len: alExtent}, {Off: 3 * alExtent, Len: alExtent}}}
	if !ok || len(risk) != 2 || !slices.Equal(risk[0], want[0]) || !slices.Equal(risk[2], want[2]) {
		t.Fatalf("at risk %v (%v), want %v", risk, ok, want)
	}
	synced := false
	err := al.checkpoint(func() error {
		synced = true
		return al.touch(0, 100, 1) // a change while the sync runs
	})
	if err != nil || !synced {
		t.Fatalf("checkpoint = %v (synced %v)", err, synced)
	}
	risk, ok = atRisk(dir)
	if !ok || len(risk) != 1 || !slices.Equal(risk[0], want[0]) {
		t.Fatalf("after the checkpoint, at risk %v: want disk 0's extent only", risk)
	}
}

// The checkpoint loop runs every alCheckpoint and stops with Close.
func TestActivityLogLoop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		syncs := 0
		al := openActivityLog(context.Background(), dir, slog.New(slog.DiscardHandler), func() error { syncs++; return nil })
		al.start()
		if err := al.touch(1, 0, 1); err != nil {
			t.Fatal(err)
		}
		time.Sleep(alCheckpoint + time.Millisecond)
		synctest.Wait()
		if risk, ok := atRisk(dir); syncs != 1 || !ok || len(risk) != 0 {
			t.Fatalf("after a checkpoint interval: %d syncs, at risk %v", syncs, risk)
		}
		time.Sleep(3 * alCheckpoint) // nothing at risk: no sync
		al.Close()
		if syncs != 1 {
			t.Fatalf("%d syncs with nothing at risk", syncs)
		}
	})
}
