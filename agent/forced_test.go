package agent

import (
	"bytes"
	"testing"

	"github.com/asrdr/asr/replication"
)

// TestForcedShutdownKeepsWritesBeforeWelcome: after a forced shutdown the
// server holds records the spool lost, under the numbers the guest's writes
// since the start took. Those writes are dropped by the Rebase, so the
// Hello must name their extents for a resync, and a write made between the
// Hello and the Welcome must wait and be logged after the server's records.
func TestForcedShutdownKeepsWritesBeforeWelcome(t *testing.T) {
	const size = 64 << 20
	a := mustAgent(t, agentSetup{sizes: []int64{size, size}})
	a.recovering, a.divergeFirst = true, true
	// A change of the run before the crash that the spool kept: the
	// server holds it under the same number, it is not resynced.
	if err := a.disks[0].WriteAt(bytes.Repeat([]byte{6}, 4096), 48<<20, false); err != nil {
		t.Fatal(err)
	}
	a.runFirst = a.spool.Next()
	// Writes since the start, before any connection: extents 1 and 9 of
	// disk 0, extent 3 of disk 1 (a write across two extents).
	writes := []struct {
		disk int
		off  int64
		n    int
	}{{0, 4<<20 + 8192, 4096}, {0, 9 << 20, 65536}, {1, 16<<20 - 4096, 8192}}
	for _, w := range writes {
		if err := a.disks[w.disk].WriteAt(bytes.Repeat([]byte{7}, w.n), w.off, false); err != nil {
			t.Fatal(err)
		}
	}
	next := a.spool.Next()
	hello := a.hello()
	want := map[uint32][]replication.Range{
		0: {{Off: 4 << 20, Len: 4 << 20}, {Off: 8 << 20, Len: 4 << 20}},
		1: {{Off: 12 << 20, Len: 4 << 20}, {Off: 16 << 20, Len: 4 << 20}},
	}
	for _, di := range hello.Disks {
		if di.Index == 0 && rangesCover(di.DivergedRanges, []replication.Range{{Off: 48 << 20, Len: 4096}}) {
			t.Fatalf("disk 0 in the Hello: ranges %v name the change the spool kept from before the crash", di.DivergedRanges)
		}
		if di.Diverged == "" || !rangesCover(di.DivergedRanges, want[di.Index]) {
			t.Fatalf("disk %d in the Hello: diverged %q ranges %v, want %v named for a resync", di.Index, di.Diverged, di.DivergedRanges, want[di.Index])
		}
	}
	// A write after the Hello waits for the Welcome.
	done := make(chan error, 1)
	go func() { done <- a.disks[0].WriteAt(bytes.Repeat([]byte{8}, 4096), 40<<20, false) }()
	durable := next + 10 // the server holds more than the spool kept
	if err := a.welcome(hello, replication.Welcome{DurableSeq: durable}); err != nil {
		t.Fatal(err)
	}
	a.handshakeEnded()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if a.spool.First() != durable+1 {
		t.Fatalf("spool starts at %d after the Welcome, want %d", a.spool.First(), durable+1)
	}
	recs := spoolRecords(t, a.spool, durable+1)
	if len(recs) != 1 || recs[0].Offset != 40<<20 {
		t.Fatalf("records after the server's: %+v, want the write made after the Hello", recs)
	}
	// The server was told: the next Hello names nothing more.
	for _, di := range a.hello().Disks {
		if di.Diverged != "" {
			t.Fatalf("disk %d still diverged after the Welcome: %q", di.Index, di.Diverged)
		}
	}
}

// rangesCover reports whether every range of want lies within one of rs.
func rangesCover(rs, want []replication.Range) bool {
	for _, w := range want {
		ok := false
		for _, r := range rs {
			ok = ok || r.Off <= w.Off && w.Off+w.Len <= r.Off+r.Len
		}
		if !ok {
			return false
		}
	}
	return true
}
