package agent

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// mustNewLogAgent makes an agent with disks of the given sizes (filled by
// fill, if set) and a spool of spoolMax bytes, without a server.
func mustNewLogAgent(t *testing.T, spoolMax int64, fill func(i int, f *os.File), sizes ...int64) *Agent {
	t.Helper()
	return mustAgent(t, agentSetup{spoolMax: spoolMax, fill: fill, sizes: sizes})
}

// spoolRecords returns every record the spool holds from seq on.
func spoolRecords(t *testing.T, sp *spool.Spool, from uint64) []replication.Record {
	t.Helper()
	rd, err := sp.NewReader(from)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var out []replication.Record
	for {
		buf, first, n, err := rd.Next(context.Background(), nil, 4<<20, 0)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return out
		}
		if first != from+uint64(len(out)) {
			t.Fatalf("spool records from %d, want %d", first, from+uint64(len(out)))
		}
		recs, err := replication.DecodeRecords(buf, first, n) // checks the sequence
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			r.Data = append([]byte(nil), r.Data...)
			out = append(out, r)
		}
	}
}

// TestNewLogResetUnderWrites: the switch to a new log while the guest
// writes to both disks and points are tagged: the spool then holds exactly
// the changes after the switch, numbered from the server's durable seq + 1,
// so the disks as they were at the switch (what the resync compares) plus
// the new log are the disks at the end: no write is lost. What referred to
// the dropped numbers is forgotten, and the state says where the log
// starts and which disks are copied.
func TestNewLogResetUnderWrites(t *testing.T) {
	const size = 4 << 20
	a := mustNewLogAgent(t, 1<<30, nil, size, size)
	for i := range 50 { // the old numbering: seq 1-51, with a tag and a progress mark
		if err := a.disks[i%2].WriteAt(bytes.Repeat([]byte{byte(i)}, 4096), int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.points.point(0, false); err != nil {
		t.Fatal(err)
	}
	a.copies.marks = append(a.copies.marks, progressMark{seq: 51, disk: 1, cursor: 1 << 20})

	var writes atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			data := rand.NewChaCha8([32]byte{byte(w)})
			for {
				select {
				case <-stop:
					return
				default:
				}
				d := a.disks[rng.IntN(2)]
				n := int64(rng.IntN(16)+1) * 4096
				off := int64(rng.IntN(size/4096-16)) * 4096
				var err error
				if rng.IntN(8) == 0 {
					err = d.WriteZeroes(off, n, false)
				} else {
					b := make([]byte, n)
					data.Read(b)
					err = d.WriteAt(b, off, false)
				}
				if err != nil {
					t.Error(err)
					return
				}
				writes.Add(1)
			}
		}()
	}
	wg.Add(1)
	go func() { // points, as the server asks for them
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := a.points.point(0, false); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	waitWrites := func(n int64) {
		deadline := time.Now().Add(time.Minute)
		for writes.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("the writers are stuck at %d writes", writes.Load())
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitWrites(200)
	// The disks as they are when the new log starts.
	var images [][]byte
	testHookNewLog = func() {
		for _, d := range a.disks {
			b, err := os.ReadFile(d.Path)
			if err != nil {
				t.Error(err)
			}
			images = append(images, b)
		}
	}
	const durable = 20 // below the numbers the spool gave out
	if err := a.startNewLog(replication.Welcome{DurableSeq: durable, NewLog: true, Copied: []uint32{0}}); err != nil {
		t.Fatal(err)
	}
	after := writes.Load()
	waitWrites(after + 200)
	close(stop)
	wg.Wait()

	if a.spool.First() != durable+1 || a.spool.Acked() != durable {
		t.Fatalf("spool after the switch: first %d acked %d, want the new log from %d", a.spool.First(), a.spool.Acked(), durable+1)
	}
	recs := spoolRecords(t, a.spool, durable+1)
	tags := 0
	for _, r := range recs {
		switch r.Kind {
		case replication.KindWrite:
			copy(images[r.Disk][r.Offset:], r.Data)
		case replication.KindZero, replication.KindTrim:
			clear(images[r.Disk][r.Offset:r.End()])
		case replication.KindTag:
			tags++
		default:
			t.Fatalf("record %d of kind %s in the new log", r.Seq, r.Kind)
		}
	}
	for i, d := range a.disks {
		b, _ := os.ReadFile(d.Path)
		if !bytes.Equal(images[i], b) {
			t.Fatalf("disk %d: the disk at the switch plus the new log (%d records) is not the disk: a write was lost", i, len(recs))
		}
	}
	if len(recs) < 200 {
		t.Fatalf("%d records in the new log for at least 200 writes", len(recs))
	}
	// Only the new log's numbers are remembered.
	marks := a.tags.pending()
	nt := len(marks)
	first := uint64(0)
	if nt > 0 {
		first = marks[0]
	}
	if nt != tags || (nt > 0 && first <= durable) {
		t.Fatalf("%d tag marks (first %d) for %d tags in the new log", nt, first, tags)
	}
	if len(a.copies.marks) != 0 {
		t.Fatalf("progress marks of the dropped log kept: %+v", a.copies.marks)
	}
	a.lat.mu.Lock()
	for _, s := range a.lat.pending {
		if s.seq <= durable {
			t.Errorf("latency sample of dropped seq %d kept", s.seq)
		}
	}
	a.lat.mu.Unlock()
	st, err := loadState(a.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Acked != durable || !st.Disks[0].Done || st.Disks[0].Cursor != size || st.Disks[1].Done || st.Disks[1].Cursor != 0 {
		t.Fatalf("saved state: acked %d, disks %+v", st.Acked, st.Disks)
	}
	c := a.copies
	if !c.done[0].Load() || c.cursors[0].Load() != size || c.done[1].Load() || c.cursors[1].Load() != 0 {
		t.Fatal("disk 0 must count as copied and disk 1 be copied again")
	}
}

// TestNewLogRestartsCopy: the initial copy of disk 0 is under way when the
// new log starts, naming disk 0 copied: the copy logs nothing more of it,
// and goes on with disk 1, from its start.
func TestNewLogRestartsCopy(t *testing.T) {
	const size = 16 << 20
	fill := func(i int, f *os.File) {
		b := bytes.Repeat([]byte{byte(i + 1)}, size)
		f.WriteAt(b, 0)
	}
	// No server acknowledges: the copy stops at half the spool.
	a := mustNewLogAgent(t, 16<<20, fill, size, size)
	a.copies.start()
	defer a.copies.Close()
	deadline := time.Now().Add(time.Minute)
	for a.copies.cursors[0].Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the initial copy did not start")
		}
		time.Sleep(time.Millisecond)
	}
	const durable = 1000
	if err := a.startNewLog(replication.Welcome{DurableSeq: durable, NewLog: true, Copied: []uint32{0}}); err != nil {
		t.Fatal(err)
	}
	var recs []replication.Record
	for len(recs) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the copy of disk 1 did not start after the new log")
		}
		time.Sleep(time.Millisecond)
		recs = spoolRecords(t, a.spool, durable+1)
	}
	if r := recs[0]; r.Disk != 1 || r.Kind != replication.KindBase || r.Offset != 0 {
		t.Fatalf("first record of the new log: disk %d %s at %d; want disk 1's copy from its start", r.Disk, r.Kind, r.Offset)
	}
	a.copies.Close()
	for _, r := range spoolRecords(t, a.spool, durable+1) {
		if r.Disk == 0 {
			t.Fatalf("record %d (%s) of disk 0, which the new log does not copy", r.Seq, r.Kind)
		}
	}
	if !a.copies.isDone(0) || a.copies.cursors[0].Load() != size {
		t.Fatal("disk 0 is not counted as copied")
	}
}
