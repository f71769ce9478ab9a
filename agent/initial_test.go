package agent

import (
	"bytes"
	"context"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// mustCopier makes the copier of one disk of size bytes whose chunks at
// the given MiB hold data (the rest is a hole), resuming from from.
func mustCopier(t *testing.T, size int64, dataMiB []int64, from copyPos) (*copier, *Disk) {
	t.Helper()
	d, sp, _ := mustTestDisk(t, size)
	for _, m := range dataMiB {
		if _, err := d.f.WriteAt(bytes.Repeat([]byte{byte(m + 1)}, initialChunk), m<<20); err != nil {
			t.Fatal(err)
		}
	}
	c := newCopier(context.Background(), slog.New(slog.DiscardHandler), sp, diskSet{d}, &tagMarks{}, map[uint32]copyPos{0: from})
	t.Cleanup(c.Close)
	return c, d
}

// waitCopied waits until every disk's copy is done.
func waitCopied(t *testing.T, c *copier) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !c.allDone() {
		if time.Now().After(deadline) {
			t.Fatalf("the copy did not complete: %+v", c.progress())
		}
		time.Sleep(time.Millisecond)
	}
}

// The copy logs the chunks that hold data (not holes, not zeros), its
// progress every 16 MiB and its end; the acknowledged progress marks are
// handed over in order.
func TestCopierCopiesData(t *testing.T) {
	const size = 40 << 20
	c, d := mustCopier(t, size, []int64{0, 1, 20, 30, 39}, copyPos{})
	if _, err := d.f.WriteAt(make([]byte, initialChunk), 30<<20); err != nil { // data, but zeros
		t.Fatal(err)
	}
	c.start()
	waitCopied(t, c)
	c.Close()
	var base []uint64
	var marks []replication.Record
	for _, r := range spoolRecords(t, c.spool, c.spool.First()) {
		switch r.Kind {
		case replication.KindBase:
			base = append(base, r.Offset>>20)
		case replication.KindProgress:
			marks = append(marks, r)
		default:
			t.Fatalf("record %+v in an initial copy", r)
		}
	}
	if want := []uint64{0, 1, 20, 39}; !equalU64(base, want) {
		t.Fatalf("copied chunks at MiB %v, want %v", base, want)
	}
	if len(marks) < 3 || marks[len(marks)-1].Offset != size || marks[len(marks)-1].Flags&replication.FlagDone == 0 {
		t.Fatalf("progress records %+v: want one every 16 MiB and the end", marks)
	}
	// The end ships like a tag (the server seals it at once); the
	// progress marks before it do not.
	if got, want := c.tags.pending(), []uint64{marks[len(marks)-1].Seq}; !equalU64(got, want) {
		t.Fatalf("records marked to ship like a tag %v, want the end's %v", got, want)
	}
	// A restart reads again at most 16 MiB (holes are skipped, not read).
	for i := 1; i < len(marks); i++ {
		read := 0
		for _, m := range base {
			if m<<20 >= marks[i-1].Offset && m<<20 < marks[i].Offset {
				read++
			}
		}
		if marks[i].Offset <= marks[i-1].Offset || read > progressEvery/initialChunk {
			t.Fatalf("progress from %d to %d: %d chunks read between", marks[i-1].Offset, marks[i].Offset, read)
		}
	}
	if p := c.progress(); len(p) != 1 || p[0].Cursor != size || !p[0].Done {
		t.Fatalf("progress %+v", p)
	}
	got := c.acked(marks[0].Seq)
	if len(got) != 1 || got[0].cursor != int64(marks[0].Offset) || got[0].done {
		t.Fatalf("acked(%d) = %+v", marks[0].Seq, got)
	}
	got = c.acked(c.spool.Next())
	if len(got) != len(marks)-1 || !got[len(got)-1].done {
		t.Fatalf("acked(all) = %+v", got)
	}
	if c.acked(c.spool.Next()) != nil {
		t.Fatal("marks handed over twice")
	}
}

// A copy resumes from its cursor; a disk already done is not read again.
func TestCopierResumes(t *testing.T) {
	c, _ := mustCopier(t, 8<<20, []int64{1, 5, 7}, copyPos{cursor: 4 << 20})
	c.start()
	waitCopied(t, c)
	c.Close()
	var base []uint64
	for _, r := range spoolRecords(t, c.spool, c.spool.First()) {
		if r.Kind == replication.KindBase {
			base = append(base, r.Offset>>20)
		}
	}
	if !equalU64(base, []uint64{5, 7}) {
		t.Fatalf("resumed copy logged chunks at MiB %v, want 5 and 7", base)
	}

	c, _ = mustCopier(t, 8<<20, []int64{1}, copyPos{cursor: 8 << 20, done: true})
	c.start()
	c.Close()
	if n := len(spoolRecords(t, c.spool, c.spool.First())); n != 0 {
		t.Fatalf("a copied disk logged %d records", n)
	}
}

// restart (a new log) makes the copy start over, or count as done.
func TestCopierRestart(t *testing.T) {
	c, d := mustCopier(t, 4<<20, []int64{0, 3}, copyPos{})
	c.start()
	waitCopied(t, c)
	first := c.spool.Next()
	d.mu.Lock() // as the new log holds every disk's change lock
	c.restart(map[uint32]bool{})
	d.mu.Unlock()
	if c.isDone(0) {
		t.Fatal("a disk to copy again counts as done")
	}
	waitCopied(t, c)
	var base int
	for _, r := range spoolRecords(t, c.spool, first) {
		if r.Kind == replication.KindBase {
			base++
		}
	}
	if base != 2 {
		t.Fatalf("the copy after the restart logged %d chunks, want 2", base)
	}
	d.mu.Lock()
	c.restart(map[uint32]bool{0: true})
	d.mu.Unlock()
	if p := c.progress(); !p[0].Done || p[0].Cursor != 4<<20 {
		t.Fatalf("a disk the new log counts as copied: %+v", p)
	}
}

func equalU64(a, b []uint64) bool { return slices.Equal(a, b) }
