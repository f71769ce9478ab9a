package replication_test

import (
	"bytes"
	"context"
	"log/slog"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/memtarget"
)

// directFrame encodes records from seq first as a DATA frame and prepares
// it as the process server's direct path does.
func directFrame(t *testing.T, first uint64, recs ...replication.Record) *replication.PreparedSegment {
	t.Helper()
	var raw []byte
	for i := range recs {
		recs[i].Seq = first + uint64(i)
		if recs[i].Kind.HasData() {
			recs[i].Length = uint32(len(recs[i].Data))
		}
		raw = replication.AppendRecord(raw, &recs[i])
	}
	codec := replication.DefaultCodec()
	f := codec.DataFrame(raw, first, uint32(len(recs)), nil)
	p, _, err := codec.PrepareFrame(&f, nil, func(uint32) (int64, bool) { return diskSize, true })
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Records applied directly are the replica's only once committed: the
// applied seq (the watermark on the target) does not move before Commit
// flushes them, so an applier opened after a crash resumes from the last
// commit, and applying the records again from there gives the same
// replica. Frames out of order, with a tag, or a segment while records
// are uncommitted are refused.
func TestApplyDirectCommitIsTheWatermark(t *testing.T) {
	ctx := context.Background()
	tgt := memtarget.New()
	t.Cleanup(func() { tgt.Close() })
	cat := &replication.Catalog{T: tgt, Codec: replication.PlainCodec{}}
	open := func() *replication.Applier {
		a, err := replication.OpenApplier(ctx, cat, "00aa", "vm1", slog.Default())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.Close() })
		if err := a.EnsureDisks(ctx, []replication.DiskInfo{{Index: 0, Name: "d0", Size: diskSize}}); err != nil {
			t.Fatal(err)
		}
		return a
	}
	a := open()
	p1 := directFrame(t, 1, replication.Record{Kind: replication.KindBase, Offset: 0, Data: fill(8192, 1)},
		replication.Record{Kind: replication.KindProgress, Offset: 8192})
	p2 := directFrame(t, 3, replication.Record{Kind: replication.KindBase, Offset: 8192, Data: fill(4096, 2)},
		replication.Record{Kind: replication.KindWrite, Offset: 100, Data: fill(50, 3)})
	if err := a.ApplyDirect(ctx, p2); err == nil {
		t.Fatal("a frame after a gap was applied")
	}
	if err := a.ApplyDirect(ctx, p1); err != nil {
		t.Fatal(err)
	}
	if seq, err := a.Commit(ctx); err != nil || seq != 2 {
		t.Fatalf("commit: %d, %v; want 2", seq, err)
	}
	if err := a.ApplyDirect(ctx, p2); err != nil {
		t.Fatal(err)
	}
	b := &segBuilder{next: 5}
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: fill(10, 9)})); err == nil {
		t.Fatal("a segment was applied over uncommitted direct records")
	}
	if tag := directFrame(t, 5, replication.Record{Kind: replication.KindTag}); a.ApplyDirect(ctx, tag) == nil {
		t.Fatal("a tag was applied directly")
	}
	if a.AppliedSeq() != 2 {
		t.Fatalf("applied seq %d before the commit, want 2", a.AppliedSeq())
	}
	// A crash now: the catalog on the target says 2.
	b2 := open()
	if b2.AppliedSeq() != 2 {
		t.Fatalf("after a crash before the commit the applied seq is %d, want 2", b2.AppliedSeq())
	}
	if err := b2.ApplyDirect(ctx, directFrame(t, 3, replication.Record{Kind: replication.KindBase, Offset: 8192, Data: fill(4096, 2)},
		replication.Record{Kind: replication.KindWrite, Offset: 100, Data: fill(50, 3)})); err != nil {
		t.Fatal(err)
	}
	if seq, err := b2.Commit(ctx); err != nil || seq != 4 {
		t.Fatalf("commit: %d, %v; want 4", seq, err)
	}
	want := make([]byte, 12288)
	copy(want, fill(8192, 1))
	copy(want[8192:], fill(4096, 2))
	copy(want[100:], fill(50, 3))
	rd, _ := b2.Disk(0)
	got := make([]byte, len(want))
	if _, err := rd.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("replica after the replay differs (err %v)", err)
	}
	if m := b2.Machine(); m.Disks[0].Cursor != 8192 {
		t.Fatalf("copy cursor %d, want 8192", m.Disks[0].Cursor)
	}
	b = &segBuilder{next: 5}
	if err := b2.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: fill(10, 9)})); err != nil {
		t.Fatalf("a segment after the commit: %v", err)
	}
}
