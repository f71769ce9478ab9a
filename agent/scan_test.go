package agent

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/asrdr/asr/replication"
)

// countingLocker is a point lock that counts its holds.
type countingLocker struct {
	sync.Mutex
	holds atomic.Int32
}

func (l *countingLocker) Lock() { l.Mutex.Lock(); l.holds.Add(1) }

// mustScanner makes the scanner of one scan-mode disk of size bytes.
func mustScanner(t *testing.T, size int64, interval time.Duration, copied func(uint32) bool) (*scanner, *Disk, *countingLocker) {
	t.Helper()
	d, sp, _ := mustTestDisk(t, size)
	d.scan = newScanState(size, interval)
	lock := &countingLocker{}
	s := newScanner(context.Background(), slog.New(slog.DiscardHandler), sp, diskSet{d}, copied, lock)
	t.Cleanup(s.Close)
	return s, d, lock
}

// A pass logs the blocks that changed since they were last sent, and only
// those.
func TestScanPassLogsChanges(t *testing.T) {
	const size = 4*scanBlock + 4096
	s, d, _ := mustScanner(t, size, time.Hour, func(uint32) bool { return true })
	if n, err := s.pass(d); err != nil || n != 5 {
		t.Fatalf("first pass: %d blocks, %v; want all 5 (nothing known sent)", n, err)
	}
	if n, err := s.pass(d); err != nil || n != 0 {
		t.Fatalf("pass without changes: %d blocks, %v", n, err)
	}
	if _, err := d.f.WriteAt([]byte{7}, 2*scanBlock+5); err != nil { // the guest writes directly
		t.Fatal(err)
	}
	first := s.spool.Next()
	if n, err := s.pass(d); err != nil || n != 1 {
		t.Fatalf("pass after one change: %d blocks, %v", n, err)
	}
	recs := spoolRecords(t, s.spool, first)
	if len(recs) != 1 || recs[0].Kind != replication.KindWrite || recs[0].Offset != 2*scanBlock || recs[0].Data[5] != 7 {
		t.Fatalf("records %+v: want block 2 as it is now", recs)
	}
}

// Only disks whose initial copy is complete are scanned, by the loop at
// their interval (under the point lock) and by passCopied.
func TestScannerLoop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var copied atomic.Bool
		s, _, lock := mustScanner(t, 2*scanBlock, 10*time.Second, func(uint32) bool { return copied.Load() })
		if err := s.passCopied(); err != nil || s.spool.Next() != 1 {
			t.Fatalf("passCopied of a disk being copied: %v, next seq %d", err, s.spool.Next())
		}
		s.start()
		time.Sleep(time.Minute)
		synctest.Wait()
		if s.spool.Next() != 1 || lock.holds.Load() != 0 {
			t.Fatal("a disk still being copied was scanned")
		}
		copied.Store(true)
		time.Sleep(25 * time.Second) // due at once, then after 10 s and 20 s
		synctest.Wait()
		if n := lock.holds.Load(); n != 3 {
			t.Fatalf("%d passes in 25 s at a 10 s interval, want 3", n)
		}
		s.Close()
		if s.spool.Next() != 3 { // the first pass sent both blocks, the others nothing
			t.Fatalf("next seq %d after the passes", s.spool.Next())
		}
	})
}
