package replication_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/localfs"
	"github.com/asrdr/asr/replication/memtarget"
)

// localTarget opens a local target in dir, for the tests that damage its
// files (replicaPath).
func localTarget(t *testing.T, dir string) replication.Target {
	t.Helper()
	tgt, err := localfs.Open(filepath.Join(dir, "target"))
	if err != nil {
		t.Fatal(err)
	}
	return tgt
}

// sumsApplier is an applier over tgt, which it closes when the test ends,
// with one disk of size bytes whose initial copy is done.
func sumsApplier(t *testing.T, tgt replication.Target, size int64) (*replication.Applier, *replication.Catalog, *segBuilder) {
	t.Helper()
	ctx := context.Background()
	t.Cleanup(func() { tgt.Close() })
	cat := &replication.Catalog{T: tgt, Codec: replication.PlainCodec{}}
	a, err := replication.OpenApplier(ctx, cat, "00aa", "vm1", slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if err := a.EnsureDisks(ctx, []replication.DiskInfo{{Index: 0, Name: "d0", Size: size}}); err != nil {
		t.Fatal(err)
	}
	b := &segBuilder{next: 1}
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindProgress, Offset: uint64(size), Flags: replication.FlagDone})); err != nil {
		t.Fatal(err)
	}
	return a, cat, b
}

func replicaPath(dir string) string {
	return filepath.Join(dir, "target", "disks", "machines", "00aa", "disks", "0.disk", "replica.img")
}

// The applier keeps every point's checksums equal to its data, whatever the
// writes (aligned, unaligned, zeroed, overlapping in one segment) and with
// more sum pages than its cache holds; recovery reads every point checked
// and bit-exact.
func TestSumsTrackTheReplica(t *testing.T) {
	ctx := context.Background()
	const size = 66<<20 + 3000 // 67 sum pages (more than the cache), a short last block
	a, cat, b := sumsApplier(t, memtarget.New(), size)
	model := make([]byte, size)
	r := rand.New(rand.NewPCG(2, 3))
	var points []uint64
	var images [][]byte
	for seg := 0; seg < 12; seg++ {
		var recs []replication.Record
		for i := 0; i < 40; i++ {
			var off, n int
			switch r.IntN(4) {
			case 0: // aligned whole blocks
				off, n = r.IntN(size/4096-4)*4096, 4096*(1+r.IntN(4))
			case 1: // the disk's short end
				off = size - 1 - r.IntN(6000)
				n = size - off
			default: // anywhere, any length
				off = r.IntN(size - 20000)
				n = 1 + r.IntN(20000)
			}
			if r.IntN(5) == 0 {
				recs = append(recs, replication.Record{Kind: replication.KindZero, Offset: uint64(off), Length: uint32(n)})
				clear(model[off : off+n])
				continue
			}
			d := make([]byte, n)
			for j := range d {
				d[j] = byte(r.IntN(256))
			}
			recs = append(recs, replication.Record{Kind: replication.KindWrite, Offset: uint64(off), Data: d})
			copy(model[off:], d)
		}
		if seg%3 == 2 {
			recs = append(recs, replication.Record{Kind: replication.KindTag})
			points = append(points, b.next+uint64(len(recs))-1)
			images = append(images, slices.Clone(model))
		}
		if err := a.Apply(ctx, b.segment(t, recs...)); err != nil {
			t.Fatal(err)
		}
	}
	m := a.Machine()
	for i, seq := range points {
		if i != 0 && i != len(points)-1 {
			continue // the first and the last are enough
		}
		p, err := cat.FindPoint(ctx, "00aa", replication.PointID(seq))
		if err != nil {
			t.Fatal(err)
		}
		if !p.Sums {
			t.Fatalf("point %s has no checksums", p.ID)
		}
		out := t.TempDir()
		disks, err := replication.RecoverPoint(ctx, cat, m, p, out, replication.RecoverOptions{})
		if err != nil {
			t.Fatalf("recover point %s: %v", p.ID, err)
		}
		if !disks[0].Checked {
			t.Fatalf("point %s recovered unchecked", p.ID)
		}
		got, err := os.ReadFile(disks[0].Path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, images[i]) {
			t.Fatalf("point %s differs from the source", p.ID)
		}
	}
	// The current contents match their checksums too, chunk by chunk.
	rd, _ := a.Disk(0)
	buf := make([]byte, replication.HashChunk)
	for c := int64(0); c*replication.HashChunk < size; c++ {
		bad, err := replication.CheckChunk(rd, a.Sums(0), c, buf)
		if err != nil || len(bad) > 0 {
			t.Fatalf("chunk %d: damaged %v, err %v", c, bad, err)
		}
	}
}

// One flipped byte in the replica (bit rot) fails the recovery of every
// point built on that block, naming the disk, the offset and the points;
// --accept-damage writes what is there and lists the block; a point that
// does not share the block recovers.
func TestRecoverDetectsBitRot(t *testing.T) {
	ctx := context.Background()
	const size = 4 << 20
	dir := t.TempDir()
	a, cat, b := sumsApplier(t, localTarget(t, dir), size)
	const rot = 40 * 4096
	// Point A: blocks 10 and 300 written. Point B: block 300 rewritten.
	// Then block 10 is rewritten (after B), and point C taken.
	steps := [][]replication.Record{
		{{Kind: replication.KindWrite, Offset: rot, Data: bytes.Repeat([]byte{1}, 4096)},
			{Kind: replication.KindWrite, Offset: 300 * 4096, Data: bytes.Repeat([]byte{2}, 4096)}, {Kind: replication.KindTag}},
		{{Kind: replication.KindWrite, Offset: 300 * 4096, Data: bytes.Repeat([]byte{3}, 4096)}, {Kind: replication.KindTag}},
		{{Kind: replication.KindWrite, Offset: 900 * 4096, Data: bytes.Repeat([]byte{4}, 4096)}, {Kind: replication.KindTag}},
	}
	var ids []string
	for _, recs := range steps {
		if err := a.Apply(ctx, b.segment(t, recs...)); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, replication.PointID(b.next-1))
	}
	f, err := os.OpenFile(replicaPath(dir), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0x5a}, rot+123); err != nil {
		t.Fatal(err)
	}
	f.Close()
	m := a.Machine()
	for i, id := range ids {
		p, err := cat.FindPoint(ctx, "00aa", id)
		if err != nil {
			t.Fatal(err)
		}
		out := t.TempDir()
		_, err = replication.RecoverPoint(ctx, cat, m, p, out, replication.RecoverOptions{})
		var de *replication.DamageError
		if !errors.As(err, &de) || !errors.Is(err, replication.ErrDamaged) {
			t.Fatalf("point %s: recover = %v, want a DamageError", id, err)
		}
		if de.Disk != "d0" || de.Offset != rot || de.Point != id {
			t.Fatalf("point %s: damage reported as %+v", id, de)
		}
		var want []string
		for j, other := range ids {
			if j != i {
				want = append(want, other)
			}
		}
		want = append(want, "current")
		if !slices.Equal(de.Also, want) {
			t.Fatalf("point %s: damage also in %v, want %v", id, de.Also, want)
		}
		if _, err := os.Stat(filepath.Join(out, "d0.img")); !os.IsNotExist(err) {
			t.Fatalf("a failed recovery left an image behind: %v", err)
		}
		disks, err := replication.RecoverPoint(ctx, cat, m, p, out, replication.RecoverOptions{AcceptDamage: true})
		if err != nil {
			t.Fatalf("point %s with accepted damage: %v", id, err)
		}
		if !slices.Equal(disks[0].Damaged, []int64{rot}) {
			t.Fatalf("point %s: damaged %v, want [%d]", id, disks[0].Damaged, rot)
		}
	}
}

// Damage in a snapshot's saved blocks (its undo log) fails that point only.
func TestRecoverDetectsDamagedSnapshot(t *testing.T) {
	ctx := context.Background()
	const size = 4 << 20
	dir := t.TempDir()
	a, cat, b := sumsApplier(t, localTarget(t, dir), size)
	old := bytes.Repeat([]byte("old block 77 "), 400)[:4096]
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 77 * 4096, Data: old},
		replication.Record{Kind: replication.KindTag})); err != nil {
		t.Fatal(err)
	}
	first := replication.PointID(b.next - 1)
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 77 * 4096, Data: bytes.Repeat([]byte{9}, 4096)},
		replication.Record{Kind: replication.KindTag})); err != nil {
		t.Fatal(err)
	}
	second := replication.PointID(b.next - 1)
	// The first point's undo log holds the old block 77: flip a byte of it.
	snapDir := filepath.Join(filepath.Dir(replicaPath(dir)), "snap")
	ents, _ := os.ReadDir(snapDir)
	found := false
	for _, e := range ents {
		path := filepath.Join(snapDir, e.Name())
		data, _ := os.ReadFile(path)
		if i := bytes.Index(data, old[:64]); i >= 0 {
			data[i+10] ^= 0xff
			os.WriteFile(path, data, 0o600)
			found = true
		}
	}
	if !found {
		t.Fatal("the old block is in no snapshot log")
	}
	m := a.Machine()
	p1, _ := cat.FindPoint(ctx, "00aa", first)
	_, err := replication.RecoverPoint(ctx, cat, m, p1, t.TempDir(), replication.RecoverOptions{})
	var de *replication.DamageError
	if !errors.As(err, &de) || de.Offset != 77*4096 || de.Point != first {
		t.Fatalf("recover point %s = %v, want damage at %d", first, err, 77*4096)
	}
	p2, _ := cat.FindPoint(ctx, "00aa", second)
	if _, err := replication.RecoverPoint(ctx, cat, m, p2, t.TempDir(), replication.RecoverOptions{}); err != nil {
		t.Fatalf("point %s, which does not share the damaged copy: %v", second, err)
	}
}

// A disk replicated before asr kept checksums gets them when its applier
// opens; its old points recover unchecked, new ones checked.
func TestSumsBuiltForOldDisk(t *testing.T) {
	ctx := context.Background()
	const size = 3 << 20
	a, cat, b := sumsApplier(t, memtarget.New(), size)
	data := bytes.Repeat([]byte("legacy"), 10000)
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 5000, Data: data},
		replication.Record{Kind: replication.KindTag})); err != nil {
		t.Fatal(err)
	}
	a.Close()
	// Make it look as an older asr left it: no sum disk, nothing says so.
	m, _ := cat.Machine(ctx, "00aa")
	m.Disks[0].Sums = false
	if err := cat.PutMachine(ctx, &m); err != nil {
		t.Fatal(err)
	}
	p, _ := cat.FindPoint(ctx, "00aa", replication.PointID(b.next-1))
	if err := cat.DeletePoint(ctx, "00aa", p); err != nil {
		t.Fatal(err)
	}
	p.Sums = false
	if err := cat.PutPoint(ctx, "00aa", p); err != nil {
		t.Fatal(err)
	}
	if err := cat.T.DeleteDisk(ctx, replication.SumKey("00aa", 0)); err != nil {
		t.Fatal(err)
	}
	a2, err := replication.OpenApplier(ctx, cat, "00aa", "vm1", slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	if m2 := a2.Machine(); !m2.Disks[0].Sums {
		t.Fatal("the disk was not given checksums")
	}
	rd, _ := a2.Disk(0)
	buf := make([]byte, replication.HashChunk)
	for c := int64(0); c < 3; c++ {
		if bad, err := replication.CheckChunk(rd, a2.Sums(0), c, buf); err != nil || len(bad) > 0 {
			t.Fatalf("chunk %d: damaged %v, err %v", c, bad, err)
		}
	}
	disks, err := replication.RecoverPoint(ctx, cat, a2.Machine(), p, t.TempDir(), replication.RecoverOptions{})
	if err != nil || disks[0].Checked {
		t.Fatalf("old point: %v, checked %v; want recovered unchecked", err, disks)
	}
}

// A disk larger than asr supports is refused with a clear error; nothing
// is created.
func TestDiskTooLarge(t *testing.T) {
	ctx := context.Background()
	a, cat := mustApplier(t)
	err := a.EnsureDisks(ctx, []replication.DiskInfo{{Index: 0, Name: "d0", Size: diskSize}, {Index: 1, Name: "huge", Size: replication.MaxDiskSize + 4096}})
	if !errors.Is(err, replication.ErrDiskTooLarge) {
		t.Fatalf("EnsureDisks = %v, want ErrDiskTooLarge", err)
	}
	if _, err := cat.T.OpenDisk(ctx, replication.DiskKey("00aa", 1), 0); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("a replica was created for the refused disk: %v", err)
	}
	if m := a.Machine(); len(m.Disks) != 1 {
		t.Fatalf("catalog disks %+v", m.Disks)
	}
}

// The checked reader returns the same bytes as the snapshot for reads at
// any offset and length.
func TestCheckedReaderUnaligned(t *testing.T) {
	ctx := context.Background()
	const size = 3<<20 + 777
	a, cat, b := sumsApplier(t, memtarget.New(), size)
	r := rand.New(rand.NewPCG(5, 5))
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(r.IntN(256))
	}
	if err := a.Apply(ctx, b.segment(t, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: data[:2<<20]},
		replication.Record{Kind: replication.KindWrite, Offset: 2 << 20, Data: data[2<<20:]},
		replication.Record{Kind: replication.KindTag})); err != nil {
		t.Fatal(err)
	}
	p, _ := cat.FindPoint(ctx, "00aa", "latest")
	rd, _ := a.Disk(0)
	cr, err := replication.OpenPointDisk(ctx, a.Machine(), p, 0, rd, a.Sums(0).Disk(), false)
	if err != nil {
		t.Fatal(err)
	}
	defer cr.Close()
	for i := 0; i < 200; i++ {
		off := r.Int64N(size)
		n := 1 + r.IntN(3<<20)
		got := make([]byte, n)
		k, err := cr.ReadAt(got, off)
		want := data[off:min(off+int64(n), size)]
		if k != len(want) || !bytes.Equal(got[:k], want) || (k < n && err == nil) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", n, off, k, err)
		}
	}
}
