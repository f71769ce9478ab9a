package agent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// The send counters carry on from the last run's stats file (none: zero).
func TestSendCountersCarryOn(t *testing.T) {
	dir := t.TempDir()
	if c := loadSendCounters(dir); c.bytesSent.Load() != 0 {
		t.Fatal("counters without a stats file")
	}
	b, _ := json.Marshal(Stats{BytesSent: 10, RawSent: 20, Frames: 3, FramesZstd: 2, FramesS2: 1, Records: 40, Writes: 99, Connected: true})
	os.WriteFile(filepath.Join(dir, statsFileName), b, 0o644)
	c := loadSendCounters(dir)
	if c.bytesSent.Load() != 10 || c.rawSent.Load() != 20 || c.frames.Load() != 3 || c.framesZstd.Load() != 2 || c.framesS2.Load() != 1 || c.records.Load() != 40 || c.connected.Load() {
		t.Fatalf("counters %d %d %d %d %v", c.bytesSent.Load(), c.rawSent.Load(), c.frames.Load(), c.records.Load(), c.connected.Load())
	}
}

// The stats file is written every second while it runs, and on request.
func TestStatsFile(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		var n atomic.Int64
		s := newStatsFile(context.Background(), dir, func() Stats { return Stats{Writes: n.Add(1)} })
		read := func() int64 {
			t.Helper()
			var st Stats
			b, err := os.ReadFile(filepath.Join(dir, statsFileName))
			if err != nil || json.Unmarshal(b, &st) != nil {
				t.Fatalf("stats file: %v", err)
			}
			return st.Writes
		}
		s.start()
		time.Sleep(3500 * time.Millisecond)
		synctest.Wait()
		if got := read(); got != 3 {
			t.Fatalf("after 3.5 s the file holds snapshot %d, want the 3rd", got)
		}
		s.Close()
		time.Sleep(5 * time.Second)
		if n.Load() != 3 {
			t.Fatal("written after Close")
		}
		s.save()
		if got := read(); got != 4 {
			t.Fatalf("save wrote snapshot %d", got)
		}
	})
}

// TestLatencySamplesBounded: the changes waiting for an acknowledgement
// are sampled up to maxPendingSamples, whatever the backlog; the ones
// sampled are counted once acknowledged.
func TestLatencySamplesBounded(t *testing.T) {
	l := &latency{}
	for seq := uint64(1); seq <= maxPendingSamples+100; seq++ {
		l.wrote(seq)
	}
	if n := len(l.pending); n != maxPendingSamples {
		t.Fatalf("%d samples pending, bound %d", n, maxPendingSamples)
	}
	l.acked(maxPendingSamples + 100)
	if st := l.stats(); st.Count != maxPendingSamples || len(l.pending) != 0 {
		t.Fatalf("%d counted, %d pending: want %d and 0", st.Count, len(l.pending), maxPendingSamples)
	}
}
