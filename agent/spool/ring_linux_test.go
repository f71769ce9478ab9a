package spool

import (
	"bytes"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// TestMemoryLogRingOutsideHeap: the memory log's ring is not on the Go
// heap, where it counted against the agent's soft memory limit (40 MiB by
// default) and kept the garbage collector running back to back. It fails
// if the ring is allocated with make.
func TestMemoryLogRingOutsideHeap(t *testing.T) {
	const size = 64 << 20
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	s, _ := mustOpen(t, t.TempDir(), Options{MaxBytes: 1 << 30, MemBytes: size})
	data := make([]byte, 64<<10)
	for i := range 2 * size / len(data) { // twice through the ring
		seq := mustAppend(t, s, 0, uint64(i)*uint64(len(data)), data)
		s.Complete(seq)
		if err := s.Ack(seq); err != nil {
			t.Fatal(err)
		}
	}
	after := heap()
	runtime.KeepAlive(data)
	if grown := int64(after) - int64(before); grown > size/4 {
		t.Fatalf("the Go heap grew by %d bytes with a %d-byte memory log: the ring is on the heap", grown, size)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestMemoryLogRingReleaseKeepsRecords: once a backlog is acknowledged the
// ring's pages past ringKeep are given back, and records written there
// afterwards (on pages the system hands back zeroed) read back whole. It
// fails if the release drops a page that holds a record or never runs.
func TestMemoryLogRingReleaseKeepsRecords(t *testing.T) {
	const size = 16 << 20
	s, _ := mustOpen(t, t.TempDir(), Options{MaxBytes: 1 << 30, MemBytes: size})
	defer s.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 64<<10)
	backlog := func(round int) {
		// A backlog of 3/4 of the ring, acknowledged half-way through
		// (the log does not empty: nothing is released) and at the end.
		var want [][]byte
		first := s.Next()
		for i := range size * 3 / 4 / (len(data) + replication.RecordHeaderSize) {
			for j := range data {
				data[j] = byte(rng.Uint32())
			}
			want = append(want, bytes.Clone(data))
			s.Complete(mustAppend(t, s, 0, uint64(i)*uint64(len(data)), data))
		}
		got := readAll(t, s, first)
		if len(got) != len(want) {
			t.Fatalf("round %d: read %d records, want %d", round, len(got), len(want))
		}
		for i, r := range got {
			if !bytes.Equal(r.Data, want[i]) {
				t.Fatalf("round %d: record %d differs", round, r.Seq)
			}
		}
		if err := s.Ack(first + uint64(len(want)/2)); err != nil {
			t.Fatal(err)
		}
		if err := s.Ack(s.Next() - 1); err != nil {
			t.Fatal(err)
		}
	}
	backlog(1)
	s.mu.Lock()
	high := s.ringHigh
	s.mu.Unlock()
	if high != ringKeep {
		t.Fatalf("after a backlog of %d bytes was acknowledged the ring is touched up to %d, want it released down to %d", size*3/4, high, ringKeep)
	}
	s.mu.Lock()
	s.ringReleased = time.Time{} // the next release is due at once
	s.mu.Unlock()
	backlog(2) // on the released pages
}

// TestMemoryLogRingReusesTouchedPages: under continuous churn, with a few
// records in flight and the log never empty, appends start again at the
// ring's start rather than walk on through pages never touched, so the
// touched part (the RSS the ring costs) stays near what is in flight, not
// the ring's size; and every record still reads back whole. It fails if
// appends go on to the ring's end.
func TestMemoryLogRingReusesTouchedPages(t *testing.T) {
	const size = 16 << 20
	s, _ := mustOpen(t, t.TempDir(), Options{MaxBytes: 1 << 30, MemBytes: size})
	defer s.Close()
	rng := rand.New(rand.NewPCG(5, 6))
	const inFlight = 16 // records of 64 KiB: 1 MiB in flight
	data := make([]byte, 64<<10)
	var seqs []uint64
	want := map[uint64][]byte{}
	for i := range 4 * size / len(data) { // four times the ring's size
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		seq := mustAppend(t, s, 0, uint64(i%64)*uint64(len(data)), data)
		s.Complete(seq)
		seqs = append(seqs, seq)
		want[seq] = bytes.Clone(data)
		if len(seqs) > inFlight {
			// What is still in flight reads back whole.
			got := readAll(t, s, seqs[0])
			if len(got) != len(seqs) {
				t.Fatalf("read %d records from %d, want %d", len(got), seqs[0], len(seqs))
			}
			for _, r := range got {
				if !bytes.Equal(r.Data, want[r.Seq]) {
					t.Fatalf("record %d differs", r.Seq)
				}
			}
			// The oldest half is acknowledged: the log never empties.
			acked := seqs[len(seqs)/2-1]
			if err := s.Ack(acked); err != nil {
				t.Fatal(err)
			}
			for _, q := range seqs[:len(seqs)/2] {
				delete(want, q)
			}
			seqs = seqs[len(seqs)/2:]
		}
	}
	s.mu.Lock()
	high, mem := s.ringHigh, len(s.mem)
	s.mu.Unlock()
	if mem == 0 {
		t.Fatal("the log emptied: the test did not keep records in flight")
	}
	if limit := 4 * (inFlight + 1) * (len(data) + replication.RecordHeaderSize); high > limit {
		t.Fatalf("with at most %d records of %d bytes in flight the ring was touched up to %d of %d bytes, want at most %d", inFlight+1, len(data), high, size, limit)
	}
}
