package procserver

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// replicaRig is a machine's applier and apply loop alone, fed by its cache.
type replicaRig struct {
	cat   *replication.Catalog
	dir   string
	rep   *replica
	cache *cache
}

// writeSegment writes records first.. as a sealed segment file in dir.
func writeSegment(t *testing.T, dir string, first uint64, recs ...replication.Record) {
	t.Helper()
	f := dataFrame(first, recs...)
	seg := replication.SegmentHeader(first, time.Now())
	seg = replication.AppendFrame(seg, &f)
	last := first + uint64(len(recs)) - 1
	seal := replication.SealFrame(last, uint32(len(recs)))
	seg = replication.AppendFrame(seg, &seal)
	if err := os.WriteFile(filepath.Join(dir, replication.SegmentName(first, last)), seg, 0o600); err != nil {
		t.Fatal(err)
	}
}

// mustReplica opens the machine's applier (one disk of 2 MiB, its initial
// copy done at seq 1) and starts its apply loop on the cache in dir,
// after prepare has written the segments it finds there.
func mustReplica(t *testing.T, prepare func(dir string)) *replicaRig {
	t.Helper()
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	r := &replicaRig{cat: mustCatalog(t), dir: t.TempDir()}
	a, err := replication.OpenApplier(ctx, r.cat, machineID, "vm", log)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.EnsureDisks(ctx, []replication.DiskInfo{{Index: 0, Name: "d", Size: 2 << 20}}); err != nil {
		t.Fatal(err)
	}
	writeSegment(t, r.dir, 1, replication.Record{Kind: replication.KindProgress, Offset: 2 << 20, Flags: replication.FlagDone})
	if prepare != nil {
		prepare(r.dir)
	}
	r.rep = newReplica(machineID, r.dir, r.cat, a, log)
	r.rep.handoff = newHandoff(&handoffBudget{max: 64 << 20})
	var total atomic.Int64
	var done []sealedSeg
	r.cache, done, err = openCache(ctx, cacheConfig{dir: r.dir, segmentBytes: 1 << 30, sealAfter: time.Hour, total: &total, log: log,
		onSealed: r.rep.kick}, a.AppliedSeq())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.rep.keepApplied(ctx, done); err != nil {
		t.Fatal(err)
	}
	r.rep.start(ctx, r.cache)
	t.Cleanup(func() { r.rep.close(); r.cache.close() })
	return r
}

func (r *replicaRig) waitApplied(t *testing.T, seq uint64) {
	t.Helper()
	if err := r.rep.waitApplied(context.Background(), r.cache, seq, time.Minute); err != nil {
		t.Fatal(err)
	}
}

// The apply loop applies the cache's sealed segments in order; one that
// starts past the applied seq (a sequence gap: the records between were
// lost) marks every disk for a whole-disk resync, and what follows the gap
// is applied but makes no point before the resync.
func TestApplyLoopMarksASequenceGap(t *testing.T) {
	after := replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("after the gap")}
	r := mustReplica(t, func(dir string) {
		writeSegment(t, dir, 2, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("before")},
			replication.Record{Kind: replication.KindTag})
		writeSegment(t, dir, 6, after, replication.Record{Kind: replication.KindTag})
	})
	r.waitApplied(t, 7)
	m := r.rep.machine()
	if m.Disks[0].State != replication.StateResync || !strings.Contains(m.Disks[0].Reason, "changes 4 to 5 were lost") {
		t.Fatalf("disk after the gap: %+v", m.Disks[0])
	}
	ps, _ := r.cat.Points(context.Background(), machineID)
	if len(ps) != 1 || ps[0].Seq != 3 {
		t.Fatalf("points %v: want only the one before the gap", ps)
	}
	rd, _, _ := r.rep.handles(0)
	got := make([]byte, len(after.Data))
	rd.ReadAt(got, 4096)
	if !bytes.Equal(got, after.Data) {
		t.Fatalf("replica after the gap: %q", got)
	}
	// An applied segment leaves the cache just after the applied sequence
	// moves (waitApplied returns on the latter): wait for that state.
	for deadline := time.Now().Add(time.Minute); ; {
		st := r.cache.stats()
		if st.segments == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("applied segments left in the cache: %+v", st)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if e := r.rep.lastErr(); e != "" {
		t.Fatalf("apply error %q", e)
	}
}

// waitApplied returns once the log is applied up to seq, having the open
// file sealed at once if it holds seq; it gives up after its timeout.
func TestWaitAppliedSealsTheOpenFile(t *testing.T) {
	r := mustReplica(t, nil)
	r.waitApplied(t, 1)
	epoch, _, _ := r.cache.takeOver()
	f := dataFrame(2, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("in the open file")})
	if _, err := r.cache.append(epoch, &f); err != nil {
		t.Fatal(err)
	}
	r.waitApplied(t, 2) // sealed on request: the file would wait an hour
	if err := r.rep.waitApplied(context.Background(), r.cache, 3, 50*time.Millisecond); err == nil {
		t.Fatal("seq 3, never sent, is applied")
	}
}

// The initial copy is not kept on the target as any-point-in-time
// segments: nothing before a machine's first point is ever replayed (a
// replay starts from a point), so a segment is kept only from the first
// point on, or when it holds a tag that may make one. Recovery to a time
// after the first point still replays what follows it.
func TestSegmentsBeforeTheFirstPointAreNotKept(t *testing.T) {
	ctx := context.Background()
	cat := mustCatalog(t)
	cache := t.TempDir()
	prepare(t, cache, cat)
	dir := filepath.Join(cache, machineID)
	at := func(s int64) int64 { return time.Unix(s, 0).UnixNano() }
	base := bytes.Repeat([]byte("base data "), 6554)[:64<<10]
	later := []byte("written after the first point")
	writeSegment(t, dir, 1,
		replication.Record{Kind: replication.KindBase, Offset: 0, Data: base, Time: at(1)},
		replication.Record{Kind: replication.KindBase, Offset: 512 << 10, Data: base, Time: at(1)})
	writeSegment(t, dir, 3, replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone, Time: at(2)})
	writeSegment(t, dir, 4,
		replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("before the point"), Time: at(3)},
		replication.Record{Kind: replication.KindTag, Time: at(4)})
	writeSegment(t, dir, 6, replication.Record{Kind: replication.KindWrite, Offset: 8192, Data: later, Time: at(5)})
	s := mustServer(t, cache, cat)
	defer s.Close()
	if st := waitApplied(t, s, 6); st.ApplyError != "" {
		t.Fatalf("apply error: %s", st.ApplyError)
	}
	segs, err := cat.Segments(ctx, machineID)
	if err != nil {
		t.Fatal(err)
	}
	var ranges []string
	for _, si := range segs {
		ranges = append(ranges, fmt.Sprintf("%d-%d", si.First, si.Last))
	}
	if got := strings.Join(ranges, " "); got != "4-5 6-6" {
		t.Fatalf("kept segments %q, want the one holding the first point's tag and those after it (4-5 6-6)", got)
	}
	m, err := cat.Machine(ctx, machineID)
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	if _, _, last, err := replication.RecoverTime(ctx, cat, m, time.Unix(5, 0), out, replication.RecoverOptions{}); err != nil || last != 6 {
		t.Fatalf("recover to a time after the first point: last seq %d, %v", last, err)
	}
	img, err := os.ReadFile(filepath.Join(out, "d.img"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img[:4096], base[:4096]) || !bytes.Equal(img[512<<10:512<<10+len(base)], base) ||
		!bytes.Equal(img[8192:8192+len(later)], later) {
		t.Fatal("the disk recovered to a time is not the initial copy plus the changes up to that time")
	}
}
