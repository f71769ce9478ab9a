package spool

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

func mustOpen(t *testing.T, dir string, opts Options) (*Spool, Recovered) {
	t.Helper()
	s, rec, err := Open(dir, opts, 0)
	if err != nil {
		t.Fatal(err)
	}
	return s, rec
}

func mustAppend(t *testing.T, s *Spool, disk uint32, off uint64, data []byte) uint64 {
	t.Helper()
	r := replication.Record{Time: time.Now().UnixNano(), Disk: disk, Kind: replication.KindWrite, Offset: off, Length: uint32(len(data)), Data: data}
	seq, err := s.Append(context.Background(), &r)
	if err != nil {
		t.Fatal(err)
	}
	return seq
}

func readAll(t *testing.T, s *Spool, from uint64) []replication.Record {
	t.Helper()
	rd, err := s.NewReader(from)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var out []replication.Record
	for {
		buf, first, n, err := rd.Next(context.Background(), nil, 1<<20, 0)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return out
		}
		recs, err := replication.DecodeRecords(buf, first, n)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, recs...)
	}
}

func TestShippableOnlyWhenComplete(t *testing.T) {
	s, _ := mustOpen(t, t.TempDir(), Options{})
	defer s.Close()
	a := mustAppend(t, s, 0, 0, []byte("a"))
	b := mustAppend(t, s, 1, 0, []byte("b"))
	s.Complete(b)
	if got := readAll(t, s, 1); len(got) != 0 {
		t.Fatalf("record after an incomplete one shipped: %d records", len(got))
	}
	s.Complete(a)
	if got := readAll(t, s, 1); len(got) != 2 || string(got[1].Data) != "b" {
		t.Fatalf("got %d records", len(got))
	}
}

func TestRotateAckReopen(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{MaxBytes: 64 << 20, FileBytes: 64 << 10})
	data := bytes.Repeat([]byte{7}, 4000)
	var last uint64
	for i := 0; i < 100; i++ {
		last = mustAppend(t, s, uint32(i%2), uint64(i)*4096, data)
		s.Complete(last)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.spool"))
	if len(files) < 5 {
		t.Fatalf("expected rotation, got %d files", len(files))
	}
	if got := readAll(t, s, 37); len(got) != 64 || got[0].Seq != 37 {
		t.Fatalf("reader from 37: %d records", len(got))
	}
	if err := s.Ack(60); err != nil {
		t.Fatal(err)
	}
	after, _ := filepath.Glob(filepath.Join(dir, "*.spool"))
	if len(after) >= len(files) {
		t.Fatalf("ack did not delete files: %d -> %d", len(files), len(after))
	}
	if s.First() > 61 {
		t.Fatalf("first %d: unacknowledged records deleted", s.First())
	}
	// Reopen without a clean close: everything not acknowledged is there,
	// and the last changes are reported.
	s2, rec, err := Open(dir, Options{MaxBytes: 64 << 20, FileBytes: 64 << 10}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if s2.Next() != last+1 {
		t.Fatalf("next %d, want %d", s2.Next(), last+1)
	}
	if got := readAll(t, s2, 61); len(got) != 40 {
		t.Fatalf("after reopen: %d records from 61", len(got))
	}
	if n := len(rec.Recent); n != min(MaxInFlight, rec.Records) || rec.Recent[n-1].Disk != 1 || rec.Recent[n-1].Offset != 99*4096 ||
		rec.Recent[n-2].Disk != 0 || rec.Recent[n-2].Offset != 98*4096 {
		t.Fatalf("recent changes %+v", rec.Recent)
	}
	s.Close()
}

func TestTornTailTruncated(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{})
	for i := 0; i < 3; i++ {
		s.Complete(mustAppend(t, s, 0, 0, []byte("hello")))
	}
	s.Close()
	files, _ := filepath.Glob(filepath.Join(dir, "*.spool"))
	f, _ := os.OpenFile(files[len(files)-1], os.O_WRONLY|os.O_APPEND, 0)
	f.Write([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9}) // half a record header
	f.Close()
	s2, rec, err := Open(dir, Options{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if rec.Truncated != 9 || s2.Next() != 4 {
		t.Fatalf("truncated %d, next %d", rec.Truncated, s2.Next())
	}
	s2.Complete(mustAppend(t, s2, 0, 0, []byte("after")))
	if got := readAll(t, s2, 1); len(got) != 4 || string(got[3].Data) != "after" {
		t.Fatalf("got %d records after repair", len(got))
	}
}

func TestCorruptMiddleRejected(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{MaxBytes: 16 << 20, FileBytes: 4096})
	for i := 0; i < 10; i++ {
		s.Complete(mustAppend(t, s, 0, 0, bytes.Repeat([]byte{1}, 3000)))
	}
	s.Close()
	files, _ := filepath.Glob(filepath.Join(dir, "*.spool"))
	b, _ := os.ReadFile(files[0])
	b[len(b)-100] ^= 0xff
	os.WriteFile(files[0], b, 0o600)
	if _, _, err := Open(dir, Options{MaxBytes: 16 << 20, FileBytes: 4096}, 0); err == nil {
		t.Fatal("damage in a full file was not detected")
	}
}

func TestBoundedAppendWaitsForAck(t *testing.T) {
	s, _ := mustOpen(t, t.TempDir(), Options{MaxBytes: 16 << 20, FileBytes: 1 << 20})
	defer s.Close()
	data := make([]byte, 1<<20)
	var last uint64
	for s.Pending()+int64(len(data))+replication.RecordHeaderSize <= 16<<20 {
		last = mustAppend(t, s, 0, 0, data)
		s.Complete(last)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	r := replication.Record{Kind: replication.KindWrite, Length: uint32(len(data)), Data: data}
	if _, err := s.Append(ctx, &r); err == nil {
		t.Fatal("append beyond the limit did not wait")
	}
	done := make(chan error, 1)
	go func() {
		_, err := s.Append(context.Background(), &r)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	if err := s.Ack(last); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("append still blocked after the spool was acknowledged")
	}
}

// faultyFile makes the append path's file operations fail on demand.
type faultyFile struct {
	appendFile
	writeErr error // a failing write puts partial bytes in the file first
	partial  int
	cutErr   error // Truncate fails with it
}

func (f *faultyFile) Write(p []byte) (int, error) {
	if f.writeErr == nil {
		return f.appendFile.Write(p)
	}
	n, _ := f.appendFile.Write(p[:f.partial])
	return n, f.writeErr
}

func (f *faultyFile) Truncate(size int64) error {
	if f.cutErr != nil {
		return f.cutErr
	}
	return f.appendFile.Truncate(size)
}

// A failed write whose torn bytes cannot be cut off breaks the spool for
// good: every later Append and Sync fails (a record appended after the
// garbage would be cut off with it by the next Open, though acknowledged
// to the guest), until a restart, whose Open cuts the torn tail.
func TestFailedCutIsSticky(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{})
	first := mustAppend(t, s, 0, 0, bytes.Repeat([]byte{1}, 4096))
	s.Complete(first)
	eio, cutEIO := errors.New("injected write error"), errors.New("injected truncate error")
	ff := &faultyFile{appendFile: s.files[len(s.files)-1].f, writeErr: eio, partial: 10, cutErr: cutEIO}
	s.files[len(s.files)-1].f = ff

	r := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindWrite, Offset: 4096, Length: 4096, Data: make([]byte, 4096)}
	if _, err := s.Append(context.Background(), &r); !errors.Is(err, eio) || !errors.Is(err, cutEIO) {
		t.Fatalf("Append with a failing write and cut = %v", err)
	}
	// The file works again, but what follows the last record is unknown.
	ff.writeErr, ff.cutErr = nil, nil
	for i := range 2 {
		r := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindWrite, Offset: 8192, Length: 4096, Data: make([]byte, 4096)}
		if seq, err := s.Append(context.Background(), &r); err == nil || !strings.Contains(err.Error(), "until the agent restarts") {
			t.Fatalf("Append %d after a failed cut = seq %d, %v; want the sticky error", i, seq, err)
		}
		if _, err := s.TryAppend(&r); err == nil || !strings.Contains(err.Error(), "until the agent restarts") {
			t.Fatalf("TryAppend %d after a failed cut = %v; want the sticky error", i, err)
		}
		if err := s.Sync(); err == nil || !strings.Contains(err.Error(), "until the agent restarts") {
			t.Fatalf("Sync %d after a failed cut = %v; want the sticky error", i, err)
		}
	}
	s.Close()

	// A restart cuts the torn bytes and goes on after the last record.
	s, rec := mustOpen(t, dir, Options{})
	defer s.Close()
	if rec.Records != 1 || rec.Truncated != 10 {
		t.Fatalf("reopen: %d records, %d bytes cut; want 1 and the 10 torn bytes", rec.Records, rec.Truncated)
	}
	second := mustAppend(t, s, 0, 8192, bytes.Repeat([]byte{2}, 4096))
	s.Complete(second)
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, s, first); len(got) != 2 || got[0].Seq != first || got[1].Seq != second || got[1].Data[0] != 2 {
		t.Fatalf("after the restart the spool holds %d records", len(got))
	}
}

// A failed write whose torn bytes are cut off fails alone: the next
// record follows the last whole one.
func TestFailedWriteCutOff(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{})
	first := mustAppend(t, s, 0, 0, bytes.Repeat([]byte{1}, 4096))
	s.Complete(first)
	eio := errors.New("injected write error")
	ff := &faultyFile{appendFile: s.files[len(s.files)-1].f, writeErr: eio, partial: 10}
	s.files[len(s.files)-1].f = ff
	r := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindWrite, Offset: 4096, Length: 4096, Data: make([]byte, 4096)}
	if _, err := s.Append(context.Background(), &r); !errors.Is(err, eio) {
		t.Fatalf("Append with a failing write = %v", err)
	}
	ff.writeErr = nil
	second := mustAppend(t, s, 0, 8192, bytes.Repeat([]byte{2}, 4096))
	s.Complete(second)
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, rec := mustOpen(t, dir, Options{})
	defer s.Close()
	if rec.Records != 2 || rec.Truncated != 0 {
		t.Fatalf("reopen: %d records, %d bytes cut; want 2 and none", rec.Records, rec.Truncated)
	}
}

// TestReset: a new log drops every record and numbers from the given seq,
// lower than the numbers given out (a file of that name may exist); the
// spool opens again as the new log, and a reset with a record in flight is
// refused and changes nothing.
func TestReset(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{MaxBytes: 64 << 20, FileBytes: 4096})
	var last uint64
	for i := range 20 {
		last = mustAppend(t, s, 0, uint64(i)*4096, bytes.Repeat([]byte{byte(i)}, 1000))
		s.Complete(last)
	}
	if names, _ := filepath.Glob(filepath.Join(dir, "*"+suffix)); len(names) < 3 {
		t.Fatalf("%d spool files: the test wants several", len(names))
	}
	inflight := mustAppend(t, s, 0, 0, []byte("in flight"))
	if err := s.Reset(5); err == nil {
		t.Fatal("Reset with a record in flight succeeded")
	}
	if s.Next() != inflight+1 || s.First() != 1 {
		t.Fatalf("a refused reset changed the spool: first %d next %d", s.First(), s.Next())
	}
	s.Complete(inflight)
	for _, next := range []uint64{5, 1} { // below the numbers given out; 1 is the first file's own name
		if err := s.Reset(next); err != nil {
			t.Fatal(err)
		}
		if s.First() != next || s.Next() != next || s.Acked() != next-1 || s.OldestPending() != 0 {
			t.Fatalf("after Reset(%d): first %d next %d acked %d oldest %d", next, s.First(), s.Next(), s.Acked(), s.OldestPending())
		}
		if got := readAll(t, s, next); len(got) != 0 {
			t.Fatalf("after Reset(%d) the spool still ships %d records", next, len(got))
		}
	}
	seq := mustAppend(t, s, 1, 8192, []byte("new log"))
	s.Complete(seq)
	if seq != 1 {
		t.Fatalf("first record of the new log has seq %d, want 1", seq)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, rec, err := Open(dir, Options{MaxBytes: 64 << 20, FileBytes: 4096}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	got := readAll(t, s2, s2.First())
	if rec.Records != 1 || len(got) != 1 || got[0].Seq != 1 || string(got[0].Data) != "new log" || s2.Next() != 2 {
		t.Fatalf("reopened after a reset: %d records recovered, %+v, next %d", rec.Records, got, s2.Next())
	}
}

// At most MaxInFlight records are appended past the first incomplete one:
// an append waits for it, and the records a kill may leave logged but not
// written are all among the last MaxInFlight, which Open reports (Recent).
func TestInFlightWindow(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{})
	first := mustAppend(t, s, 0, 0, []byte("held"))
	for i := 1; i < MaxInFlight; i++ {
		s.Complete(mustAppend(t, s, 1, uint64(i)*4096, []byte("done")))
	}
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	r := replication.Record{Kind: replication.KindWrite, Disk: 2, Length: 4, Data: []byte("more")}
	if _, err := s.Append(cancelled, &r); !errors.Is(err, context.Canceled) {
		t.Fatalf("append past the window = %v, want it to wait (context canceled)", err)
	}
	s.Complete(first)
	if _, err := s.Append(cancelled, &r); err != nil {
		t.Fatalf("append once the first record completed: %v", err)
	}
	tag := replication.Record{Kind: replication.KindResync, Disk: 2, Data: []byte("not a change"), Length: 12}
	seq, err := s.Append(context.Background(), &tag)
	if err != nil {
		t.Fatal(err)
	}
	s.Complete(seq)
	s.Close()
	_, rec := mustOpen(t, dir, Options{})
	// The last MaxInFlight records: 62 of disk 1 (from offset 2*4096),
	// disk 2's, and the resync mark (not a change).
	if len(rec.Recent) != MaxInFlight-1 {
		t.Fatalf("%d recent changes, want %d", len(rec.Recent), MaxInFlight-1)
	}
	if got := rec.Recent[0]; got.Disk != 1 || got.Offset != 2*4096 {
		t.Fatalf("first recent change %+v, want disk 1 at %d", got, 2*4096)
	}
	if got := rec.Recent[len(rec.Recent)-1]; got.Disk != 2 || got.Length != 4 {
		t.Fatalf("last recent change %+v, want disk 2's", got)
	}
}

// TryAppend never waits for room, also after waiting for the in-flight
// window: guest writes that queue behind a full window and then find the
// soft limit passed get ErrFull (the agent's bitmap mode), never a wait
// for the server's acknowledgement. Appends queued behind the window
// also see a failed cut that happened while they waited, and write
// nothing after its torn bytes.
func TestWindowWaitersCheckAgain(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{MaxBytes: 1 << 20})
	defer s.Close()
	var held []uint64
	for i := range MaxInFlight {
		held = append(held, mustAppend(t, s, 0, uint64(i)*512, []byte("in flight")))
	}
	const writers = 24
	type result struct {
		seq uint64
		err error
	}
	results := make(chan result, writers)
	for i := range writers {
		go func() {
			r := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindWrite, Disk: 1, Offset: uint64(i) << 16, Length: 65536, Data: make([]byte, 65536)}
			seq, err := s.TryAppend(&r)
			if err == nil {
				s.Complete(seq)
			}
			results <- result{seq, err}
		}()
	}
	waitWaiters(t, s, writers)
	for _, seq := range held {
		s.Complete(seq)
	}
	full := 0
	deadline := time.After(time.Minute) // a safety net: the bug is a wait that never ends
	for range writers {
		select {
		case r := <-results:
			if errors.Is(r.err, ErrFull) {
				full++
			} else if r.err != nil {
				t.Fatal(r.err)
			}
		case <-deadline:
			t.Fatal("a TryAppend waited for room after waiting for the in-flight window")
		}
	}
	if full == 0 {
		t.Fatalf("24 appends of 64 KiB into a 1 MiB spool: none refused")
	}

	// A failed cut while appends wait for the window: they get its error.
	dir = t.TempDir()
	s2, _ := mustOpen(t, dir, Options{})
	defer s2.Close()
	held = held[:0]
	for i := range MaxInFlight {
		held = append(held, mustAppend(t, s2, 0, uint64(i)*512, []byte("in flight")))
	}
	waiting := make(chan error, 1)
	go func() {
		r := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindWrite, Disk: 1, Length: 4, Data: []byte("late")}
		_, err := s2.Append(context.Background(), &r)
		waiting <- err
	}()
	waitWaiters(t, s2, 1)
	eio, cutEIO := errors.New("injected write error"), errors.New("injected truncate error")
	s2.mu.Lock()
	ff := &faultyFile{appendFile: s2.files[len(s2.files)-1].f, writeErr: eio, partial: 10, cutErr: cutEIO}
	s2.files[len(s2.files)-1].f = ff
	s2.mu.Unlock()
	s2.Complete(held[0]) // room in the window: the failing append or the waiter goes first
	r := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindWrite, Disk: 2, Length: 4, Data: []byte("torn")}
	_, failErr := s2.Append(context.Background(), &r)
	s2.mu.Lock()
	ff.writeErr, ff.cutErr = nil, nil
	s2.mu.Unlock()
	for _, seq := range held[1:] {
		s2.Complete(seq)
	}
	werr := <-waiting
	// Whichever went first, nothing may follow torn bytes: either the
	// waiter wrote before the failure (and the failing append failed), or
	// it failed with the sticky error.
	if failErr == nil {
		t.Fatal("the append with a failing write and cut succeeded")
	}
	if werr == nil {
		s2.mu.Lock()
		cut := s2.cutErr
		s2.mu.Unlock()
		if cut == nil {
			t.Fatal("no sticky error after a failed cut")
		}
		// It must have been written before the failure: a reopen keeps it.
		s2.Close()
		_, rec := mustOpen(t, dir, Options{})
		if rec.Records != MaxInFlight+1 {
			t.Fatalf("the waiter's record was written after the torn bytes: %d records kept, want %d", rec.Records, MaxInFlight+1)
		}
	} else if !strings.Contains(werr.Error(), "until the agent restarts") {
		t.Fatalf("the waiter got %v, want the sticky error", werr)
	}
}

// waitWaiters waits until n appends wait in the spool.
func waitWaiters(t *testing.T, s *Spool, n int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		s.mu.Lock()
		w := s.waiters
		s.mu.Unlock()
		if w >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d appends wait, want %d", w, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestGroupCommit: appends made while another append gathers its batch
// share its write(2), and each returns once its record is in the file; a
// failed batch fails every append in it and gives their numbers back, and
// the next record takes the first of them.
func TestGroupCommit(t *testing.T) {
	const n = 8
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{})
	first := mustAppend(t, s, 0, 0, bytes.Repeat([]byte{1}, 4096))
	s.Complete(first)
	// appendAll appends n records at once; the first batch's writer
	// waits until all n are numbered in it.
	appendAll := func(fill byte) ([]uint64, []error) {
		base := s.Next()
		s.gathering = func() {
			for s.Next() < base+n {
				time.Sleep(time.Millisecond)
			}
		}
		seqs, errs := make([]uint64, n), make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				r := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindWrite, Offset: uint64(i) * 4096, Length: 4096, Data: bytes.Repeat([]byte{fill}, 4096)}
				seqs[i], errs[i] = s.Append(context.Background(), &r)
			})
		}
		wg.Wait()
		s.gathering = nil
		return seqs, errs
	}

	batches := s.batches
	seqs, errs := appendAll(2)
	got := map[uint64]bool{}
	for i := range n {
		if errs[i] != nil || seqs[i] <= first || seqs[i] > first+n || got[seqs[i]] {
			t.Fatalf("append %d: seq %d, %v", i, seqs[i], errs[i])
		}
		got[seqs[i]] = true
		s.Complete(seqs[i])
	}
	if w := s.batches - batches; w != 1 {
		t.Fatalf("%d records appended together took %d writes, want 1", n, w)
	}
	if recs := readAll(t, s, first); len(recs) != n+1 || recs[n].Seq != first+n || recs[n].Data[0] != 2 {
		t.Fatalf("the spool holds %d records, want %d", len(recs), n+1)
	}

	eio := errors.New("injected write error")
	ff := &faultyFile{appendFile: s.files[len(s.files)-1].f, writeErr: eio, partial: 10}
	s.files[len(s.files)-1].f = ff
	_, errs = appendAll(3)
	for i, err := range errs {
		if !errors.Is(err, eio) {
			t.Fatalf("append %d in a failed batch: %v, want the write's error", i, err)
		}
	}
	if next := s.Next(); next != first+n+1 {
		t.Fatalf("after a failed batch the next seq is %d, want %d (the batch's numbers given back)", next, first+n+1)
	}
	ff.writeErr = nil
	last := mustAppend(t, s, 0, 0, bytes.Repeat([]byte{4}, 4096))
	s.Complete(last)
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, rec := mustOpen(t, dir, Options{})
	defer s.Close()
	if rec.Records != n+2 || rec.Truncated != 0 || last != first+n+1 {
		t.Fatalf("reopen: %d records, %d bytes cut, last seq %d; want %d records, none cut, seq %d", rec.Records, rec.Truncated, last, n+2, first+n+1)
	}
}

// TestFirstCountsTheBatch: while the first records of an empty spool are
// being written, First names them (the agent's Hello says where its log
// starts: a number beyond them would be a gap to the server).
func TestFirstCountsTheBatch(t *testing.T) {
	s, _ := mustOpen(t, t.TempDir(), Options{})
	defer s.Close()
	var first, next uint64
	s.gathering = func() { first, next = s.First(), s.Next() }
	seq := mustAppend(t, s, 0, 0, make([]byte, 4096))
	if first != seq || next != seq+1 {
		t.Fatalf("while record %d was written: First %d, Next %d; want %d, %d", seq, first, next, seq, seq+1)
	}
}

// TestLargeRecordAfterBatch: a record of batchRecord bytes or more is
// written alone, after the batch being gathered when it came.
func TestLargeRecordAfterBatch(t *testing.T) {
	dir := t.TempDir()
	s, _ := mustOpen(t, dir, Options{})
	big := make(chan uint64, 1)
	s.gathering = func() {
		s.gathering = nil
		go func() { big <- mustAppend(t, s, 0, 1<<20, bytes.Repeat([]byte{9}, batchRecord)) }()
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Millisecond) {
			s.mu.Lock()
			w := s.waiters
			s.mu.Unlock()
			if w == 1 {
				return
			}
			if time.Now().After(deadline) {
				t.Error("the large record did not wait for the batch")
				return
			}
		}
	}
	batches := s.batches
	small := mustAppend(t, s, 0, 0, bytes.Repeat([]byte{1}, 4096))
	s.Complete(small)
	large := <-big
	s.Complete(large)
	if large != small+1 || s.batches-batches != 1 {
		t.Fatalf("small record %d, large %d, %d batches; want the large one next, alone", small, large, s.batches-batches)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, rec := mustOpen(t, dir, Options{})
	defer s.Close()
	if got := readAll(t, s, small); rec.Records != 2 || len(got) != 2 || got[1].Seq != large || got[1].Data[0] != 9 {
		t.Fatalf("reopen: %d records", rec.Records)
	}
}
