package procserver

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// A sequence gap (the agent's spool starts after what the server holds:
// the server lost acknowledged changes) is accepted even while the open
// cache file holds records: they are sealed and applied, the log goes on
// from the agent's first record, and the applier marks the disks for a
// whole-disk resync at the gap. (It used to be refused for good whenever
// the open file held anything, and accepted after a restart.)
func TestSequenceGapWithOpenCacheFile(t *testing.T) {
	r := mustTLSRigWith(t, func(c *Config) { c.SealAfter, c.SegmentBytes = time.Hour, 1<<30 })
	a := protectWithLogA(t, r) // seq 1-3, applied
	// Seq 4, acknowledged but not sealed: it stays in the open file.
	a.send(dataFrame(4, replication.Record{Kind: replication.KindWrite, Offset: 8192, Data: []byte("in the open file")}))
	for f := a.read(); f.Type != replication.FrameAck || f.Seq < 4; f = a.read() {
	}
	a.c.Close()
	b, w, err := r.hello(t, logA, 10, 12)
	if err != nil {
		t.Fatalf("a sequence gap was refused: %v", err)
	}
	if w.NewLog || w.DurableSeq != 9 {
		t.Fatalf("welcome %+v: want the log to go on after seq 9", w)
	}
	b.ship(10, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("after the gap")},
		replication.Record{Kind: replication.KindTag})
	waitApplied(t, r.s, 11)
	m, err := r.cat.Machine(context.Background(), machineID)
	if err != nil {
		t.Fatal(err)
	}
	if m.Disks[0].State != replication.StateResync || !strings.Contains(m.Disks[0].Reason, "sequence gap") {
		t.Fatalf("disk after the gap: %+v; want a resync for the gap", m.Disks[0])
	}
	// No point is made across the gap (the tag at seq 11) before the resync.
	if ps, _ := r.cat.Points(context.Background(), machineID); len(ps) != 1 || ps[0].Seq != 3 {
		t.Fatalf("points %v: want only the one before the gap", ps)
	}
	// Seq 4 from the open file reached the replica.
	err = r.s.WithApplier(context.Background(), machineID, func(ap *replication.Applier) error {
		rd, _ := ap.Disk(0)
		got := make([]byte, 16)
		if _, err := rd.ReadAt(got, 8192); err != nil {
			return err
		}
		if !bytes.Equal(got, []byte("in the open file")) {
			t.Errorf("the open file's record is not on the replica: %q", got)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestSequenceGapSurvivesARestart: after a sequence gap the log goes on in
// an open cache file that starts past what the sealed segments hold. Its
// frames were acknowledged: a restart keeps them (it used to discard an
// open file that did not start right after the segments, losing them).
func TestSequenceGapSurvivesARestart(t *testing.T) {
	r := mustTLSRigWith(t, func(c *Config) { c.SealAfter, c.SegmentBytes = time.Hour, 1<<30 })
	a := protectWithLogA(t, r) // seq 1-3, applied
	a.c.Close()
	b, w, err := r.hello(t, logA, 10, 11)
	if err != nil || w.DurableSeq != 9 {
		t.Fatalf("hello after the gap: %+v, %v", w, err)
	}
	rec := replication.Record{Kind: replication.KindWrite, Offset: 12288, Data: []byte("after the gap, acknowledged")}
	b.send(dataFrame(10, rec))
	for f := b.read(); f.Type != replication.FrameAck || f.Seq < 10; f = b.read() {
	}
	b.c.Close()
	r.restart(t)
	c, w, err := r.hello(t, logA, 11, 12) // seq 10 was acknowledged: dropped from the spool
	if err != nil || w.NewLog || w.DurableSeq != 10 {
		t.Fatalf("hello after the restart: %+v, %v", w, err)
	}
	c.ship(11, replication.Record{Kind: replication.KindTag})
	waitApplied(t, r.s, 11)
	mustReplicaHolds(t, r.s, 12288, rec.Data)
}
