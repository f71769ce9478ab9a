package agent

import (
	"context"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
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
	mustTouchDone(t, al, 0, 0, 4096)
	mustTouchDone(t, al, 2, 3*alExtent-1, 2) // across two extents
	risk, ok := atRisk(dir)
	want := map[uint32][]replication.Range{0: {{Off: 0, Len: alExtent}}, 2: {{Off: 2 * alExtent, Len: alExtent}, {Off: 3 * alExtent, Len: alExtent}}}
	if !ok || len(risk) != 2 || !slices.Equal(risk[0], want[0]) || !slices.Equal(risk[2], want[2]) {
		t.Fatalf("at risk %v (%v), want %v", risk, ok, want)
	}
	synced := false
	err := al.checkpoint(func() error {
		synced = true
		_, err := al.touch(0, 100, 1) // a change while the sync runs
		return err
	})
	if err != nil || !synced {
		t.Fatalf("checkpoint = %v (synced %v)", err, synced)
	}
	risk, ok = atRisk(dir)
	if !ok || len(risk) != 1 || !slices.Equal(risk[0], want[0]) {
		t.Fatalf("after the checkpoint, at risk %v: want disk 0's extent only", risk)
	}
}

// The checkpoint loop runs every alCheckpoint and stops with Close. It
// syncs the spool and the disks itself only while more than hot extents
// are at risk; below that an extent leaves once a flush of its disk that
// began after its last change ended.
func TestActivityLogLoop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		syncs := 0
		al := openActivityLog(context.Background(), dir, slog.New(slog.DiscardHandler), func() error { syncs++; return nil })
		al.hot = 3
		al.start()
		risk := func(want map[uint32]int, wantSyncs int) {
			t.Helper()
			time.Sleep(alCheckpoint)
			synctest.Wait()
			r, ok := atRisk(dir)
			got := map[uint32]int{}
			for d, rs := range r {
				for _, x := range rs {
					got[d] += int(x.Len / alExtent)
				}
			}
			if !ok || syncs != wantSyncs || !maps.Equal(got, want) {
				t.Fatalf("extents at risk %v, %d syncs; want %v, %d syncs", got, syncs, want, wantSyncs)
			}
		}
		mustTouchDone(t, al, 1, 0, 1)
		mustTouchDone(t, al, 2, 0, 1)
		risk(map[uint32]int{1: 1, 2: 1}, 0) // not over hot: no sync, nothing durable
		al.flushedDisk(1, al.completed())
		risk(map[uint32]int{2: 1}, 0) // disk 1's flush covers its extent only
		// A change in flight when a flush begins is not covered by it.
		g, err := al.touch(1, alExtent, 1)
		if err != nil {
			t.Fatal(err)
		}
		al.flushedDisk(1, al.completed())
		al.done(g)
		risk(map[uint32]int{1: 1, 2: 1}, 0)
		al.flushedDisk(1, al.completed())
		risk(map[uint32]int{2: 1}, 0)
		// Over hot: the checkpoint syncs and everything done leaves.
		mustTouchDone(t, al, 1, 0, 3*alExtent)
		risk(map[uint32]int{}, 1)
		time.Sleep(3 * alCheckpoint) // nothing at risk: no sync
		al.Close()
		if syncs != 1 {
			t.Fatalf("%d syncs with nothing at risk", syncs)
		}
	})
}

func mustTouchDone(t *testing.T, al *activityLog, disk uint32, off, n int64) {
	t.Helper()
	g, err := al.touch(disk, off, n)
	if err != nil {
		t.Fatal(err)
	}
	al.done(g)
}

// A change in flight when a checkpoint's sync begins may reach the spool
// or the disk after the fsync: its extent stays in the log until a later
// checkpoint, once the change is done.
func TestActivityLogKeepsChangesInFlight(t *testing.T) {
	dir := t.TempDir()
	al := openActivityLog(context.Background(), dir, slog.New(slog.DiscardHandler), nil)
	defer al.Close()
	mustTouchDone(t, al, 1, 0, 4096)        // done
	g, err := al.touch(1, 5*alExtent, 4096) // in flight
	if err != nil {
		t.Fatal(err)
	}
	sync := func() error { return nil }
	if err := al.checkpoint(sync); err != nil {
		t.Fatal(err)
	}
	risk, ok := atRisk(dir)
	if !ok || !slices.Equal(risk[1], []replication.Range{{Off: 5 * alExtent, Len: alExtent}}) {
		t.Fatalf("at risk %v (%v), want only the extent in flight", risk, ok)
	}
	al.done(g)
	if err := al.checkpoint(sync); err != nil {
		t.Fatal(err)
	}
	if risk, ok := atRisk(dir); !ok || len(risk) != 0 {
		t.Fatalf("at risk %v (%v) after the change was done and synced", risk, ok)
	}
}

// The journal: a change to an extent already in the log writes nothing; a
// new extent appends one record; a torn last record is ignored; a
// checkpoint rewrites the file; it holds one record per extent at risk.
func TestActivityLogJournal(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, activityFile)
	al := openActivityLog(context.Background(), dir, slog.New(slog.DiscardHandler), nil)
	defer al.Close()
	size := func() int64 {
		t.Helper()
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	mustTouchDone(t, al, 0, 0, 4096)
	first := size()
	if first != alHeaderSize+alRecordSize {
		t.Fatalf("journal of one extent is %d bytes", first)
	}
	for i := range 100 {
		mustTouchDone(t, al, 0, int64(i)*4096, 4096) // same extent
	}
	if size() != first {
		t.Fatalf("changes to an extent in the log grew the journal to %d bytes", size())
	}
	mustTouchDone(t, al, 0, alExtent, 2*alExtent) // two new extents, one transaction
	if size() != first+2*alRecordSize {
		t.Fatalf("journal is %d bytes after two more extents", size())
	}
	// A torn record after them (a crash during an append whose change
	// never started) is ignored, and so is a zero-filled tail.
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint32][]replication.Range{0: {{Off: 0, Len: alExtent}, {Off: alExtent, Len: alExtent}, {Off: 2 * alExtent, Len: alExtent}}}
	for _, tail := range [][]byte{appendALRecord(nil, alKey{0, 9})[:13], make([]byte, alRecordSize), []byte("garbage garbage garbage garbage")} {
		if err := os.WriteFile(path, append(slices.Clone(b), tail...), 0o600); err != nil {
			t.Fatal(err)
		}
		risk, ok := atRisk(dir)
		if !ok || !maps.EqualFunc(risk, want, slices.Equal) {
			t.Fatalf("with a torn tail %q: at risk %v (%v), want %v", tail, risk, ok, want)
		}
	}
	bad := slices.Clone(b)
	bad[0] = 'X'
	if err := os.WriteFile(path, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, ok := atRisk(dir); ok {
		t.Fatal("a journal with a damaged header was read")
	}
	// A checkpoint that drops extents rewrites the journal whole.
	if err := al.checkpoint(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	if size() != alHeaderSize {
		t.Fatalf("journal is %d bytes after a checkpoint with nothing at risk", size())
	}
	// Bounded: every record is an extent at risk (records are appended
	// only for extents not in the log, and dropped only by a rewrite).
	for i := range 1000 {
		mustTouchDone(t, al, 1, int64(i)*alExtent, 1)
		mustTouchDone(t, al, 1, int64(i)*alExtent+8192, 1)
	}
	if err := al.checkpoint(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		mustTouchDone(t, al, 1, int64(i)*alExtent, 1)
	}
	if size() != alHeaderSize+10*alRecordSize {
		t.Fatalf("journal is %d bytes for 10 extents at risk", size())
	}
}

// A change to extents already durable in the log never waits for the
// journal's writes (an fsync or a compaction in progress).
func TestActivityLogHotExtentDoesNotWaitForTheJournal(t *testing.T) {
	al := openActivityLog(context.Background(), t.TempDir(), slog.New(slog.DiscardHandler), nil)
	defer al.Close()
	mustTouchDone(t, al, 0, 0, 4096)
	al.wmu.Lock() // a journal write in progress
	done := make(chan error, 1)
	go func() {
		g, err := al.touch(0, 8192, 4096)
		al.done(g)
		done <- err
	}()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-ctx.Done():
		t.Fatal("a change to an extent in the log waited for the journal")
	}
	al.wmu.Unlock()
}

// With the memory log, a checkpoint keeps every extent with a change not
// yet acknowledged by the server, however synced: a kill loses the records
// in memory, and the extents named here are all a restart resyncs. It
// fails if an unacknowledged extent is dropped.
func TestActivityLogKeepsUnacknowledged(t *testing.T) {
	dir := t.TempDir()
	al := openActivityLog(context.Background(), dir, slog.New(slog.DiscardHandler), nil)
	defer al.Close()
	var acked, next uint64 = 0, 1
	al.seqs = func() (uint64, uint64) { return acked, next }
	change := func(disk uint32, off int64) {
		t.Helper()
		mustTouchDone(t, al, disk, off, 4096)
		next++ // the change was logged as seq next
	}
	sync := func() error { return nil }
	change(0, 0)          // seq 1
	change(1, 5*alExtent) // seq 2
	if err := al.checkpoint(sync); err != nil {
		t.Fatal(err)
	}
	if risk, ok := atRisk(dir); !ok || len(risk[0]) != 1 || len(risk[1]) != 1 {
		t.Fatalf("synced, nothing acknowledged: at risk %v, want both extents", risk)
	}
	acked = 1 // only the first change: not yet the extent of the second
	if err := al.checkpoint(sync); err != nil {
		t.Fatal(err)
	}
	if risk, ok := atRisk(dir); !ok || len(risk[0]) != 1 || len(risk[1]) != 1 {
		t.Fatalf("seq 1 of 2 acknowledged: at risk %v, want both extents (the checkpoint knows only that changes up to seq 2 were logged)", risk)
	}
	change(2, 0) // seq 3, after the last checkpoint
	acked = 2
	if err := al.checkpoint(sync); err != nil {
		t.Fatal(err)
	}
	risk, ok := atRisk(dir)
	if !ok || len(risk[0]) != 0 || len(risk[1]) != 0 || len(risk[2]) != 1 {
		t.Fatalf("seq 2 of 3 acknowledged: at risk %v, want only disk 2's extent", risk)
	}
	acked = 3
	if err := al.checkpoint(sync); err != nil {
		t.Fatal(err)
	}
	if risk, ok := atRisk(dir); !ok || len(risk) != 0 {
		t.Fatalf("everything acknowledged: at risk %v", risk)
	}
}
