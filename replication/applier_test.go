package replication_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/memtarget"
)

const diskSize = 1 << 20

// segBuilder makes sealed segments of records for one machine.
type segBuilder struct {
	next uint64
}

func (b *segBuilder) segment(t *testing.T, recs ...replication.Record) []byte {
	t.Helper()
	first := b.next
	var raw []byte
	for i := range recs {
		recs[i].Seq = b.next
		if recs[i].Kind.HasData() {
			recs[i].Length = uint32(len(recs[i].Data))
		}
		raw = replication.AppendRecord(raw, &recs[i])
		b.next++
	}
	f := replication.DefaultCodec().DataFrame(raw, first, uint32(len(recs)), nil)
	seg := replication.SegmentHeader(first, time.Now())
	seg = replication.AppendFrame(seg, &f)
	seal := replication.SealFrame(b.next-1, uint32(len(recs)))
	return replication.AppendFrame(seg, &seal)
}

// framedSegment is segment with its records in frames of perFrame each,
// as an agent's spool ships them.
func (b *segBuilder) framedSegment(t *testing.T, perFrame int, recs ...replication.Record) []byte {
	t.Helper()
	first := b.next
	seg := replication.SegmentHeader(first, time.Now())
	for len(recs) > 0 {
		n := min(perFrame, len(recs))
		var raw []byte
		for i := range recs[:n] {
			recs[i].Seq = b.next
			if recs[i].Kind.HasData() {
				recs[i].Length = uint32(len(recs[i].Data))
			}
			raw = replication.AppendRecord(raw, &recs[i])
			b.next++
		}
		f := replication.DefaultCodec().DataFrame(raw, b.next-uint64(n), uint32(n), nil)
		seg = replication.AppendFrame(seg, &f)
		recs = recs[n:]
	}
	seal := replication.SealFrame(b.next-1, uint32(b.next-first))
	return replication.AppendFrame(seg, &seal)
}

// A segment's frames are decoded and hashed in parallel, but its records
// land in log order: writes that overlap across frames (base chunks, the
// guest's writes, zeroes, in part and whole blocks) leave the replica and
// its checksums as the last of them says.
func TestApplyFramesInLogOrder(t *testing.T) {
	ctx := context.Background()
	const size = 1<<20 + 1000 // a short last block
	a, _, b := sumsApplier(t, memtarget.New(), size)
	model := make([]byte, size)
	r := rand.New(rand.NewPCG(7, 8))
	for seg := 0; seg < 6; seg++ {
		var recs []replication.Record
		for i := 0; i < 60; i++ {
			off := r.IntN(64 << 10) // a small area: the writes overlap
			if i%10 == 0 {
				off = size - 1 - r.IntN(5000)
			}
			n := min(1+r.IntN(20000), size-off)
			if r.IntN(6) == 0 {
				recs = append(recs, replication.Record{Kind: replication.KindZero, Offset: uint64(off), Length: uint32(n)})
				clear(model[off : off+n])
				continue
			}
			d := make([]byte, n)
			for j := range d {
				d[j] = byte(r.IntN(4)) // compressible
			}
			kind := replication.KindWrite
			if r.IntN(3) == 0 {
				kind = replication.KindBase
			}
			recs = append(recs, replication.Record{Kind: kind, Offset: uint64(off), Data: d})
			copy(model[off:], d)
		}
		if err := a.Apply(ctx, b.framedSegment(t, 3, recs...)); err != nil {
			t.Fatal(err)
		}
	}
	rd, _ := a.Disk(0)
	got := make([]byte, size)
	if _, err := rd.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("the replica differs from the writes applied in log order")
	}
	buf := make([]byte, replication.HashChunk)
	for c := int64(0); c*replication.HashChunk < size; c++ {
		if bad, err := replication.CheckChunk(rd, a.Sums(0), c, buf); err != nil || len(bad) > 0 {
			t.Fatalf("chunk %d: damaged %v, err %v", c, bad, err)
		}
	}
}

func mustApplier(t *testing.T) (*replication.Applier, *replication.Catalog) {
	t.Helper()
	tgt := memtarget.New()
	t.Cleanup(func() { tgt.Close() })
	cat := &replication.Catalog{T: tgt, Codec: replication.PlainCodec{}}
	a, err := replication.OpenApplier(context.Background(), cat, "00aa", "vm1", slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if err := a.EnsureDisks(context.Background(), []replication.DiskInfo{{Index: 0, Name: "d0", Size: diskSize}}); err != nil {
		t.Fatal(err)
	}
	return a, cat
}

func mustRead(t *testing.T, a *replication.Applier, seq uint64) []byte {
	t.Helper()
	rd, _ := a.Disk(0)
	snap, err := rd.OpenSnapshot(context.Background(), replication.SnapshotName(seq))
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	b := make([]byte, diskSize)
	if _, err := snap.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func fill(n int, v byte) []byte { return bytes.Repeat([]byte{v}, n) }

func TestApplierPointsAreExact(t *testing.T) {
	ctx := context.Background()
	a, cat := mustApplier(t)
	b := &segBuilder{next: 1}
	model := make([]byte, diskSize)
	r := rand.New(rand.NewPCG(1, 1))
	var points []uint64
	var images [][]byte
	// Initial copy done, then writes and tags.
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindProgress, Offset: diskSize, Flags: replication.FlagDone})); err != nil {
		t.Fatal(err)
	}
	for seg := 0; seg < 20; seg++ {
		var recs []replication.Record
		for i := 0; i < 10; i++ {
			off := r.IntN(diskSize - 9000)
			switch r.IntN(5) {
			case 0:
				n := r.IntN(9000) + 1
				recs = append(recs, replication.Record{Kind: replication.KindZero, Offset: uint64(off), Length: uint32(n)})
				clear(model[off : off+n])
			default:
				d := fill(r.IntN(9000)+1, byte(r.IntN(255)+1))
				recs = append(recs, replication.Record{Kind: replication.KindWrite, Offset: uint64(off), Data: d})
				copy(model[off:], d)
			}
		}
		recs = append(recs, replication.Record{Kind: replication.KindTag})
		points = append(points, b.next+uint64(len(recs))-1)
		images = append(images, append([]byte(nil), model...))
		if err := a.Apply(ctx, b.segment(t, recs...)); err != nil {
			t.Fatal(err)
		}
	}
	ps, err := cat.Points(ctx, "00aa")
	if err != nil || len(ps) != len(points) {
		t.Fatalf("catalog has %d points (%v), want %d", len(ps), err, len(points))
	}
	for i, seq := range points {
		if got := mustRead(t, a, seq); !bytes.Equal(got, images[i]) {
			t.Fatalf("point %d (seq %d) differs from the source at that point", i, seq)
		}
	}
}

func TestApplierRejectsCorruptSegment(t *testing.T) {
	ctx := context.Background()
	a, _ := mustApplier(t)
	b := &segBuilder{next: 1}
	if err := a.Apply(ctx, b.segment(t,
		replication.Record{Kind: replication.KindProgress, Offset: diskSize, Flags: replication.FlagDone},
		replication.Record{Kind: replication.KindWrite, Offset: 0, Data: fill(4096, 1)},
		replication.Record{Kind: replication.KindTag})); err != nil {
		t.Fatal(err)
	}
	before := mustRead(t, a, 3)
	applied := a.AppliedSeq()
	seg := b.segment(t,
		replication.Record{Kind: replication.KindWrite, Offset: 0, Data: fill(4096, 2)},
		replication.Record{Kind: replication.KindWrite, Offset: 8192, Data: fill(100000, 3)},
		replication.Record{Kind: replication.KindTag})
	for _, at := range []int{replication.SegmentHeaderSize + replication.FrameHeaderSize + 10, len(seg) / 2, len(seg) - 10} {
		bad := append([]byte(nil), seg...)
		bad[at] ^= 0x01
		err := a.Apply(ctx, bad)
		if !errors.Is(err, replication.ErrCorrupt) {
			t.Fatalf("bit flip at %d: Apply = %v, want ErrCorrupt", at, err)
		}
		if a.AppliedSeq() != applied {
			t.Fatalf("applied seq moved to %d after a corrupt segment", a.AppliedSeq())
		}
	}
	// Nothing of the corrupt segment reached the replica: a point taken
	// right after seq 3 equals the one before.
	b.next = 4
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindTag})); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, a, 4); !bytes.Equal(got, before) {
		t.Fatalf("the replica changed although the segment was rejected")
	}
	// The intact segment, renumbered after the new tag, applies.
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: fill(4096, 2)}, replication.Record{Kind: replication.KindTag})); err != nil {
		t.Fatal(err)
	}
}

func TestApplierGapAndReplay(t *testing.T) {
	ctx := context.Background()
	a, _ := mustApplier(t)
	b := &segBuilder{next: 1}
	s1 := b.segment(t, replication.Record{Kind: replication.KindProgress, Offset: diskSize, Flags: replication.FlagDone},
		replication.Record{Kind: replication.KindWrite, Offset: 512, Data: fill(512, 7)})
	s2 := b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 512, Data: fill(512, 8)}, replication.Record{Kind: replication.KindTag})
	if err := a.Apply(ctx, s2); !errors.Is(err, replication.ErrCorrupt) {
		t.Fatalf("gap: %v, want ErrCorrupt", err)
	}
	for _, s := range [][]byte{s1, s1, s2, s1, s2} { // replays are no-ops
		if err := a.Apply(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	got := mustRead(t, a, 4)
	if !bytes.Equal(got[512:1024], fill(512, 8)) || a.AppliedSeq() != 4 {
		t.Fatalf("after replays: applied %d, data %v", a.AppliedSeq(), got[512:516])
	}
}

func TestApplierNoPointDuringInitialReplication(t *testing.T) {
	ctx := context.Background()
	a, cat := mustApplier(t)
	var reason string
	a.OnNoPoint = func(_ uint64, r string) { reason = r }
	b := &segBuilder{next: 1}
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindProgress, Offset: 4096},
		replication.Record{Kind: replication.KindTag, Offset: 9})); err != nil {
		t.Fatal(err)
	}
	ps, _ := cat.Points(ctx, "00aa")
	if len(ps) != 0 || reason == "" {
		t.Fatalf("points %v, reason %q: want no point and a reason", ps, reason)
	}
	m := a.Machine()
	if d, _ := m.Disk(0); d.Cursor != 4096 || d.State != replication.StateInitial {
		t.Fatalf("disk state %+v", d)
	}
}

// TestApplierNewLog: an agent's new log is to start at seq 7 while the old
// log's records 4-6 are still to be applied; the disk needed a resync of a
// part of it. The new log waits for the old one, whose records are applied
// as before (they were acknowledged to the old agent; its tag makes a
// point); then the disk is marked for a whole-disk resync for the new log,
// whose tag makes no point.
func TestApplierNewLog(t *testing.T) {
	ctx := context.Background()
	a, cat := mustApplier(t)
	var noPoint string
	a.OnNoPoint = func(_ uint64, reason string) { noPoint = reason }
	b := &segBuilder{next: 1}
	if err := a.Apply(ctx, b.segment(t,
		replication.Record{Kind: replication.KindProgress, Offset: diskSize, Flags: replication.FlagDone},
		replication.Record{Kind: replication.KindWrite, Offset: 65536, Data: fill(4096, 7)},
		replication.Record{Kind: replication.KindTag})); err != nil {
		t.Fatal(err)
	}
	old := b.segment(t,
		replication.Record{Kind: replication.KindWrite, Offset: 0, Data: fill(4096, 1)},
		replication.Record{Kind: replication.KindTag}, // seq 5
		replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: fill(4096, 2)})
	const reason = "the agent started a new log at seq 7 (test)"
	if _, err := a.StartLog(ctx, "00000000000000bb", 7, reason); !errors.Is(err, replication.ErrLogNotApplied) {
		t.Fatalf("StartLog before the old log is applied: %v, want ErrLogNotApplied", err)
	}
	if m, _ := cat.Machine(ctx, "00aa"); m.LogID != "" || !m.Protected() {
		t.Fatalf("a refused StartLog changed the catalog: %+v", m)
	}
	if err := a.Apply(ctx, old); err != nil {
		t.Fatal(err)
	}
	ps, _ := cat.Points(ctx, "00aa")
	if len(ps) != 2 || ps[1].Seq != 5 {
		t.Fatalf("points %v: want the old log's tags (seq 3 and 5)", ps)
	}
	// The agent reports a disk at risk (a part of it) as it connects.
	if err := a.EnsureDisks(ctx, []replication.DiskInfo{{Index: 0, Name: "d0", Size: diskSize, Diverged: "test",
		DivergedRanges: []replication.Range{{Off: 0, Len: 4096}}}}); err != nil {
		t.Fatal(err)
	}
	copied, err := a.StartLog(ctx, "00000000000000bb", 7, reason)
	if err != nil {
		t.Fatal(err)
	}
	if len(copied) != 1 || copied[0] != 0 {
		t.Fatalf("StartLog names disks %v as copied, want [0]", copied)
	}
	m, err := cat.Machine(ctx, "00aa")
	d0, _ := m.Disk(0)
	if err != nil || m.LogID != "00000000000000bb" || m.LogStart != 7 || m.LogReason != reason ||
		d0.State != replication.StateResync || d0.Reason != reason || d0.Ranges != nil {
		t.Fatalf("catalog after StartLog: %+v, disk %+v, %v; want a whole-disk resync for the new log", m, d0, err)
	}
	if err := a.Apply(ctx, b.segment(t,
		replication.Record{Kind: replication.KindWrite, Offset: 8192, Data: fill(4096, 3)},
		replication.Record{Kind: replication.KindTag})); err != nil { // seq 7-8: the new log
		t.Fatal(err)
	}
	if ps, _ := cat.Points(ctx, "00aa"); len(ps) != 2 {
		t.Fatalf("points %v: a point from the new log before its resync", ps)
	}
	if !strings.Contains(noPoint, "new log") {
		t.Fatalf("the new log's tag: no-point reason %q, want the resync for the new log", noPoint)
	}
	rd, _ := a.Disk(0)
	got := make([]byte, 12288)
	rd.ReadAt(got, 0)
	if !bytes.Equal(got, append(append(fill(4096, 1), fill(4096, 2)...), fill(4096, 3)...)) {
		t.Fatal("records of the old and the new log were not all applied")
	}
}

// TestApplierNewLogRestartsCopy: a disk still in its initial copy when a new
// log starts is copied again from the start, on a zeroed replica (the copy
// skips chunks of zeros, which a fresh replica holds).
func TestApplierNewLogRestartsCopy(t *testing.T) {
	ctx := context.Background()
	a, cat := mustApplier(t)
	b := &segBuilder{next: 1}
	if err := a.Apply(ctx, b.segment(t,
		replication.Record{Kind: replication.KindBase, Offset: 0, Data: fill(8192, 9)},
		replication.Record{Kind: replication.KindProgress, Offset: 8192})); err != nil {
		t.Fatal(err)
	}
	copied, err := a.StartLog(ctx, "00000000000000bb", 3, "new log")
	if err != nil || len(copied) != 0 {
		t.Fatalf("StartLog: copied %v, %v; want none (the disk is in its initial copy)", copied, err)
	}
	m, _ := cat.Machine(ctx, "00aa")
	if d, _ := m.Disk(0); d.State != replication.StateInitial || d.Cursor != 0 {
		t.Fatalf("after the new log started: disk %+v; want the copy started again", d)
	}
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindBase, Offset: 0, Data: fill(4096, 5)})); err != nil {
		t.Fatal(err)
	}
	rd, _ := a.Disk(0)
	got := make([]byte, 8192)
	if _, err := rd.ReadAt(got, 0); err != nil || !bytes.Equal(got, append(fill(4096, 5), make([]byte, 4096)...)) {
		t.Fatalf("the replica was not cleared for the new copy (%v)", err)
	}
}

// MarkResync asks for a whole-disk resync: a resync already due over some
// ranges (a diverged part) becomes one of the whole disk, as its callers
// (a sequence gap, a corrupt segment, failback's writes) know no more of
// what changed.
func TestApplierMarkResyncIsWholeDisk(t *testing.T) {
	ctx := context.Background()
	a, cat := mustApplier(t)
	b := &segBuilder{next: 1}
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindProgress, Offset: diskSize, Flags: replication.FlagDone})); err != nil {
		t.Fatal(err)
	}
	if err := a.EnsureDisks(ctx, []replication.DiskInfo{{Index: 0, Name: "d0", Size: diskSize, Diverged: "test",
		DivergedRanges: []replication.Range{{Off: 0, Len: 4096}}}}); err != nil {
		t.Fatal(err)
	}
	if m, _ := cat.Machine(ctx, "00aa"); len(m.Disks) != 1 || m.Disks[0].State != replication.StateResync || len(m.Disks[0].Ranges) != 1 {
		t.Fatalf("a diverged range: %+v", m.Disks)
	}
	if err := a.MarkResync(ctx, -1, "failback of failover f writes the original disks"); err != nil {
		t.Fatal(err)
	}
	m, _ := cat.Machine(ctx, "00aa")
	if d := m.Disks[0]; d.State != replication.StateResync || d.Ranges != nil || !strings.Contains(d.Reason, "failback") {
		t.Fatalf("after MarkResync: %+v, want a whole-disk resync", d)
	}
}

// TestPrepareSegmentFrom: the records a frame's key is known for are
// taken instead of a decode (and records known for another key never
// are); the key is that of the frame as EncodeFrameHeader wrote it, and
// CheckRecords returns what a decode of the frame returns.
func TestPrepareSegmentFrom(t *testing.T) {
	ctx := context.Background()
	cat := &replication.Catalog{T: memtarget.New(), Codec: replication.PlainCodec{}}
	a, err := replication.OpenApplier(ctx, cat, "m1", "vm", slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.EnsureDisks(ctx, []replication.DiskInfo{{Index: 0, Name: "d", Size: diskSize}}); err != nil {
		t.Fatal(err)
	}
	var b segBuilder
	b.next = 1
	seg := b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("in the segment")},
		replication.Record{Kind: replication.KindTag})
	var f replication.Frame
	if _, err := replication.ScanSegment(seg, false, func(g *replication.Frame) error { f = *g; return nil }); err != nil {
		t.Fatal(err)
	}
	var h [replication.FrameHeaderSize]byte
	key := replication.EncodeFrameHeader(&h, &f)
	recs, _, err := replication.DefaultCodec().CheckRecords(&f, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	decoded, _, err := replication.DefaultCodec().Records(&f, nil)
	if err != nil || len(decoded) != len(recs) || !bytes.Equal(decoded[0].Data, recs[0].Data) || decoded[1].Seq != recs[1].Seq {
		t.Fatalf("CheckRecords %+v, Records %+v (%v)", recs, decoded, err)
	}
	// Known records with their own data, to see which were applied.
	known := []replication.Record{recs[0], recs[1]}
	known[0].Data = []byte("from the hand-off")
	known[0].Length = uint32(len(known[0].Data))
	asked := 0
	other := key
	other.PCRC++
	p, err := replication.PrepareSegmentFrom(seg, func(k replication.FrameKey) ([]replication.Record, bool) {
		asked++
		return known, k == other
	})
	if err != nil || asked != 1 {
		t.Fatalf("prepare: %v, asked %d times", err, asked)
	}
	if err := a.ApplyPrepared(ctx, p); err != nil {
		t.Fatal(err)
	}
	rd, _ := a.Disk(0)
	got := make([]byte, len("in the segment"))
	rd.ReadAt(got, 0)
	if string(got) != "in the segment" {
		t.Fatalf("replica %q: records known for another key were applied", got)
	}
	seg2 := b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("in the segment")})
	if _, err := replication.ScanSegment(seg2, false, func(g *replication.Frame) error { f = *g; return nil }); err != nil {
		t.Fatal(err)
	}
	key2 := replication.EncodeFrameHeader(&h, &f)
	hand := []replication.Record{{Seq: 3, Kind: replication.KindWrite, Offset: 4096, Length: 14, Data: []byte("from hand-off!")}}
	p, err = replication.PrepareSegmentFrom(seg2, func(k replication.FrameKey) ([]replication.Record, bool) { return hand, k == key2 })
	if err != nil {
		t.Fatal(err)
	}
	if err := a.ApplyPrepared(ctx, p); err != nil {
		t.Fatal(err)
	}
	rd.ReadAt(got, 4096)
	if string(got) != "from hand-off!" {
		t.Fatalf("replica %q: the records known for the frame's key were not taken", got)
	}
}

// TestApplierCheckpointNotRecorded: a segment whose checkpoint the catalog
// cannot record (the target full) is not applied as far as anyone can
// tell: the applied seq stays, so the process server keeps the segment in
// its cache and tries again; the retry applies it whole once the catalog
// takes the checkpoint, and the catalog then holds the new applied seq.
func TestApplierCheckpointNotRecorded(t *testing.T) {
	ctx := context.Background()
	tgt := &failingPuts{Target: memtarget.New(), left: 1 << 30} // seal_test.go
	a, cat, b := sumsApplier(t, tgt, diskSize)                  // seq 1: the initial copy done
	s2 := b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: fill(4096, 9)})
	tgt.left = 0
	if err := a.Apply(ctx, s2); err == nil {
		t.Fatal("applied with the catalog failing")
	}
	if got := a.AppliedSeq(); got != 1 {
		t.Fatalf("applied seq %d after a checkpoint the catalog refused: want 1", got)
	}
	tgt.left = 1 << 30
	if err := a.Apply(ctx, s2); err != nil {
		t.Fatal(err)
	}
	m, err := cat.Machine(ctx, "00aa")
	if err != nil {
		t.Fatal(err)
	}
	if a.AppliedSeq() != 2 || m.AppliedSeq != 2 {
		t.Fatalf("after the retry: applied seq %d, the catalog's %d: want 2", a.AppliedSeq(), m.AppliedSeq)
	}
	rd, _ := a.Disk(0)
	got := make([]byte, 4096)
	if _, err := rd.ReadAt(got, 4096); err != nil || !bytes.Equal(got, fill(4096, 9)) {
		t.Fatalf("the retried segment's write is not on the replica (%v)", err)
	}
}
