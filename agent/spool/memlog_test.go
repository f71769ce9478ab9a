package spool

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/asrdr/asr/replication"
)

// spoolFileBytes is the size of the spool's files (headers included).
func spoolFileBytes(t *testing.T, dir string) int64 {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*"+suffix))
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, name := range names {
		st, err := os.Stat(name)
		if err != nil {
			t.Fatal(err)
		}
		n += st.Size()
	}
	return n
}

// TestMemoryLogSteadyStateWritesNothing: with the server keeping up (each
// record acknowledged soon after it is read), the memory log never writes a
// record to the files.
func TestMemoryLogSteadyStateWritesNothing(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{MaxBytes: 64 << 20, MemBytes: 1 << 20})
	defer s.Close()
	data := bytes.Repeat([]byte{7}, 4096)
	rd, err := s.NewReader(1)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	for i := range 2000 { // 8 MiB through a 1 MiB memory log
		seq := mustAppend(t, s, 0, uint64(i)*4096, data)
		s.Complete(seq)
		buf, first, n, err := rd.Next(context.Background(), nil, 1<<20, 0)
		if err != nil || n != 1 || first != seq {
			t.Fatalf("read seq %d: first %d, %d records, %v", seq, first, n, err)
		}
		if _, err := replication.DecodeRecords(buf, first, n); err != nil {
			t.Fatal(err)
		}
		if err := s.Ack(seq); err != nil {
			t.Fatal(err)
		}
	}
	if got := spoolFileBytes(t, dir); got != headerSize {
		t.Fatalf("the spool's files hold %d bytes in steady state, want only a header (%d)", got, headerSize)
	}
	if m := s.Memory(); m != 0 {
		t.Fatalf("memory log holds %d bytes with everything acknowledged", m)
	}
	if w := s.Written(); w != 0 {
		t.Fatalf("Written says %d bytes went to the files in steady state, want 0", w)
	}
}

// TestWrittenCountsFileBytes: Written counts the record bytes written to
// the files: every record with the spool log, only the spills with the
// memory log (the agent's stats report it; asrbench prints it).
func TestWrittenCountsFileBytes(t *testing.T) {
	data := bytes.Repeat([]byte{9}, 8192)
	rec := int64(len(data) + replication.RecordHeaderSize)
	for _, c := range []struct {
		name string
		mem  int64
		want int64
	}{{"spool log", 0, 100 * rec}, {"memory log", 20 * rec, 80 * rec}} {
		s, _ := mustOpen(t, t.TempDir(), Options{MaxBytes: 64 << 20, MemBytes: c.mem})
		for i := range 100 { // nothing acknowledged: a backlog
			s.Complete(mustAppend(t, s, 0, uint64(i)*8192, data))
		}
		// The memory log spills down to three quarters of its bound (15
		// records) whenever a record does not fit: after the first 20,
		// every fifth append spills five, and the last 20 stay in memory.
		if w := s.Written(); w != c.want {
			t.Fatalf("%s: Written %d, want %d", c.name, w, c.want)
		}
		s.Close()
	}
}

// TestMemoryLogBacklogLosesNothing: while the server falls behind, the
// memory log spills its oldest records to the files; a reader interleaved
// with the appends (positioned in memory when a spill moves its next record
// to a file) and a reader started afresh from the first record both read
// every record, in order, with its data; a reopen after a clean close holds
// them all too. It fails if a record is lost or repeated in a spill.
func TestMemoryLogBacklogLosesNothing(t *testing.T) {
	dir := t.TempDir()
	opts := Options{MaxBytes: 256 << 20, FileBytes: 2 << 20, MemBytes: 256 << 10}
	s, _ := mustOpen(t, dir, opts)
	rng := rand.New(rand.NewPCG(1, 2))
	var want [][]byte
	rd, err := s.NewReader(1)
	if err != nil {
		t.Fatal(err)
	}
	var got []replication.Record
	read := func(max int) {
		t.Helper()
		buf, first, n, err := rd.Next(context.Background(), nil, max, 0)
		if err != nil {
			t.Fatal(err)
		}
		recs, err := replication.DecodeRecords(buf, first, n)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, recs...)
	}
	var acked uint64
	for i := range 3000 {
		data := make([]byte, 512*(1+rng.IntN(64)))
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		want = append(want, data)
		seq := mustAppend(t, s, 0, uint64(i)<<20, data)
		s.Complete(seq)
		if rng.IntN(3) == 0 {
			read(1 + rng.IntN(64<<10)) // the reader lags and reads in small batches
		}
		if rng.IntN(50) == 0 && len(got) > 0 {
			// An acknowledgement of part of what was read.
			a := got[rng.IntN(len(got))].Seq
			if a > acked {
				if err := s.Ack(a); err != nil {
					t.Fatal(err)
				}
				acked = a
			}
		}
		if s.Memory() > opts.MemBytes {
			t.Fatalf("memory log holds %d bytes, more than its %d", s.Memory(), opts.MemBytes)
		}
	}
	for {
		before := len(got)
		read(1 << 20)
		if len(got) == before {
			break
		}
	}
	rd.Close()
	check := func(what string, recs []replication.Record, from uint64) {
		t.Helper()
		if len(recs) != len(want)-int(from-1) {
			t.Fatalf("%s: read %d records, want %d", what, len(recs), len(want)-int(from-1))
		}
		for i, r := range recs {
			if r.Seq != from+uint64(i) || !bytes.Equal(r.Data, want[r.Seq-1]) {
				t.Fatalf("%s: record %d is seq %d with %d bytes, want seq %d with %d bytes", what, i, r.Seq, len(r.Data), from+uint64(i), len(want[from-1+uint64(i)]))
			}
		}
	}
	check("interleaved reader", got, 1)
	if spoolFileBytes(t, dir) <= headerSize {
		t.Fatal("nothing was spilled to the files under a backlog")
	}
	check("fresh reader", readAll(t, s, acked+1), acked+1)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, rec, err := Open(dir, opts, acked)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if rec.Truncated != 0 {
		t.Fatalf("a clean close left a torn tail of %d bytes", rec.Truncated)
	}
	check("after a clean close", readAll(t, s2, acked+1), acked+1)
}

// TestMemoryLogKillKeepsSpilledPrefix: a process that stops without Close
// loses the records in memory, never one that was spilled, and the spool
// it leaves opens as the prefix of the log (the agent resyncs the rest).
func TestMemoryLogKillKeepsSpilledPrefix(t *testing.T) {
	dir := t.TempDir()
	opts := Options{MaxBytes: 64 << 20, MemBytes: 64 << 10}
	s, _ := mustOpen(t, dir, opts)
	data := bytes.Repeat([]byte{9}, 4096)
	for i := range 100 {
		s.Complete(mustAppend(t, s, 0, uint64(i)*4096, data))
	}
	inMem := uint64(len(s.mem))
	if inMem == 0 || inMem == 100 {
		t.Fatalf("%d records in memory: want some spilled and some not", inMem)
	}
	// The "kill": the files as they are, without Close.
	s2, _, err := Open(dir, opts, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got, want := s2.Next(), 101-inMem; got != want {
		t.Fatalf("reopened spool continues at seq %d, want %d (after the spilled records)", got, want)
	}
	recs := readAll(t, s2, 1)
	if len(recs) != int(100-inMem) {
		t.Fatalf("reopened spool holds %d records, want the %d spilled", len(recs), 100-inMem)
	}
	s.closeFiles()
}

// TestMemoryLogAckedUnspilledThenSpill: records acknowledged while still
// in memory are never written; a later spill starts the files again at
// the memory's first record, and a reopen reads them in order.
func TestMemoryLogAckedUnspilledThenSpill(t *testing.T) {
	dir := t.TempDir()
	opts := Options{MaxBytes: 64 << 20, MemBytes: 64 << 10}
	s, _ := mustOpen(t, dir, opts)
	data := bytes.Repeat([]byte{3}, 4096)
	for i := range 10 {
		s.Complete(mustAppend(t, s, 0, uint64(i)*4096, data))
	}
	if err := s.Ack(10); err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		s.Complete(mustAppend(t, s, 0, uint64(i)*4096, data))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, _, err := Open(dir, opts, 10)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if f := s2.First(); f != 11 {
		t.Fatalf("first held seq %d, want 11", f)
	}
	if recs := readAll(t, s2, 11); len(recs) != 100 || recs[0].Seq != 11 {
		t.Fatalf("read %d records from 11", len(recs))
	}
}
