package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// BenchmarkSplitterWrite measures the write-splitter alone (spool append,
// backing write, completion), without NBD or shipping: the cost the guest
// pays per write for being replicated.
func BenchmarkSplitterWrite(b *testing.B) {
	for _, bs := range []int{4 << 10, 1 << 20} {
		b.Run(byteSize(bs), func(b *testing.B) {
			dir := b.TempDir()
			path := filepath.Join(dir, "d.img")
			f, _ := os.Create(path)
			f.Truncate(1 << 30)
			f.Close()
			sp, _, err := spool.Open(filepath.Join(dir, "spool"), spool.Options{MaxBytes: 64 << 30}, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer sp.Close()
			d, err := openDisk(context.Background(), 0, "d", path, sp, &latency{}, slog.Default())
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			buf := make([]byte, bs)
			r := rand.New(rand.NewPCG(1, 1))
			b.SetBytes(int64(bs))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				off := r.Int64N((1<<30)/int64(bs)) * int64(bs)
				if err := d.WriteAt(buf, off, false); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSplitterWriteParallel is BenchmarkSplitterWrite with 8 writers
// (fio's iodepth 8 through the NBD server) and the activity log: what the
// guest pays when its requests are in flight together.
func BenchmarkSplitterWriteParallel(b *testing.B) {
	for _, bs := range []int{4 << 10, 1 << 20} {
		b.Run(byteSize(bs), func(b *testing.B) {
			dir := b.TempDir()
			path := filepath.Join(dir, "d.img")
			f, _ := os.Create(path)
			f.Truncate(1 << 30)
			f.Close()
			sp, _, err := spool.Open(filepath.Join(dir, "spool"), spool.Options{MaxBytes: 64 << 30}, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer sp.Close()
			d, err := openDisk(context.Background(), 0, "d", path, sp, &latency{}, slog.Default())
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			d.al = openActivityLog(context.Background(), dir, slog.Default(), nil)
			defer d.al.Close()
			var seed atomic.Uint64
			b.SetBytes(int64(bs))
			b.SetParallelism((8 + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, bs)
				r := rand.New(rand.NewPCG(seed.Add(1), 1))
				for pb.Next() {
					off := r.Int64N((1<<30)/int64(bs)) * int64(bs)
					if err := d.WriteAt(buf, off, false); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

func byteSize(n int) string {
	if n >= 1<<20 {
		return "1M"
	}
	return "4k"
}

func mustTestDisk(t *testing.T, size int64) (*Disk, *spool.Spool, string) {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "d.img")
	f, _ := os.Create(path)
	f.Truncate(size)
	f.Close()
	sp, _, err := spool.Open(filepath.Join(dir, "spool"), spool.Options{MaxBytes: 1 << 30}, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sp.Close() })
	d, err := openDisk(context.Background(), 0, "d", path, sp, &latency{}, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, sp, dir
}

// readFrames ships everything in the spool as the agent's sender would and
// returns the frames.
func readFrames(t *testing.T, sp *spool.Spool) []replication.Frame {
	t.Helper()
	rd, err := sp.NewReader(sp.First())
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var frames []replication.Frame
	for {
		buf, first, n, err := rd.Next(context.Background(), nil, frameRaw, 0)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return frames
		}
		// the sender's linger step: more records appended to the batch
		if len(buf) < lingerBelow {
			var m uint32
			if buf, _, m, err = rd.Next(context.Background(), buf, frameRaw, 0); err != nil {
				t.Fatal(err)
			}
			n += m
		}
		frames = append(frames, replication.DefaultCodec().DataFrame(buf, first, n, nil))
	}
}

// A guest write larger than a frame may carry (32 MiB of random data, which
// does not compress) is logged in pieces that always fit the wire's limit.
func TestLargeIncompressibleWriteFitsFrames(t *testing.T) {
	d, sp, _ := mustTestDisk(t, 64<<20)
	small := make([]byte, 4096)
	if err := d.WriteAt(small, 0, false); err != nil { // a record before it in the batch
		t.Fatal(err)
	}
	big := make([]byte, 32<<20)
	rand.NewChaCha8([32]byte{1}).Read(big)
	if err := d.WriteAt(big, 8<<20, false); err != nil {
		t.Fatal(err)
	}
	var total int
	for _, f := range readFrames(t, sp) {
		if len(f.Payload) > replication.MaxFramePayload || f.RawLen > replication.MaxFrameRaw {
			t.Fatalf("frame at seq %d: %d bytes (raw %d), over the wire limits", f.Seq, len(f.Payload), f.RawLen)
		}
		recs, _, err := replication.DefaultCodec().Records(&f, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			total += len(r.Data)
		}
	}
	if total != len(big)+len(small) {
		t.Fatalf("frames carry %d bytes of data, want %d", total, len(big)+len(small))
	}
}

// An unclean stop in the middle of the repair of an earlier unclean stop:
// the saved repair list makes the next start re-log the whole range, not
// only the piece logged last.
func TestInterruptedRepairIsRedone(t *testing.T) {
	d, sp, dir := mustTestDisk(t, 16<<20)
	// The disk holds 0x11 over 0-8 MiB; the log claims a write of 0x22
	// that never reached the disk (agent killed after logging it).
	content := bytes.Repeat([]byte{0x11}, 8<<20)
	if _, err := d.f.WriteAt(content, 0); err != nil {
		t.Fatal(err)
	}
	claimed := replication.Record{Kind: replication.KindWrite, Offset: 0, Length: 8 << 20, Data: bytes.Repeat([]byte{0x22}, 8<<20)}
	seq, err := sp.Append(context.Background(), &claimed)
	if err != nil {
		t.Fatal(err)
	}
	sp.Complete(seq)
	// The first repair saved its list, re-logged 1 MiB and was killed.
	list, _ := json.Marshal([]spool.Tail{{Disk: 0, Kind: replication.KindWrite, Offset: 0, Length: 8 << 20}})
	os.WriteFile(filepath.Join(dir, repairFile), list, 0o600)
	if err := d.Relog(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	// This start is clean as far as the marker goes and the spool's tail
	// is the 1 MiB piece: only the saved list knows the whole range.
	if err := repairLog(dir, false, spool.Recovered{}, &state{}, diskSet{d}, sp, slog.Default()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, repairFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("repair list not removed: %v", err)
	}
	// Replaying the log over zeros must give the disk's contents.
	replica := make([]byte, 16<<20)
	for _, f := range readFrames(t, sp) {
		recs, _, err := replication.DefaultCodec().Records(&f, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			switch r.Kind {
			case replication.KindWrite:
				copy(replica[r.Offset:], r.Data)
			case replication.KindZero:
				clear(replica[r.Offset:r.End()])
			}
		}
	}
	if !bytes.Equal(replica[:8<<20], content) {
		t.Fatal("the replayed log does not match the disk: the repair missed part of the range")
	}
}

// A repair whose ranges do not fit in what is left of the spool never
// waits for room (nothing ships before it: it would wait forever): the
// ranges are marked for a resync instead, and the repair list goes. After
// a stop during an overflow (the whole disk is resynced) nothing is
// re-logged either.
func TestRepairWithTheSpoolFullMarksAResync(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "d.img")
	if err := os.WriteFile(path, bytes.Repeat([]byte{7}, 8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	sp, _, err := spool.Open(filepath.Join(dir, "spool"), spool.Options{MaxBytes: 4 << 20}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	d, err := openDisk(context.Background(), 0, "d", path, sp, &latency{}, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for i := range 3 {
		r := replication.Record{Kind: replication.KindWrite, Offset: uint64(i) << 20, Length: 1 << 20, Data: make([]byte, 1<<20)}
		seq, err := sp.Append(context.Background(), &r)
		if err != nil {
			t.Fatal(err)
		}
		sp.Complete(seq)
	}
	st := &state{Disks: []diskState{{Index: 0, Name: "d", Path: path, Size: 8 << 20}}}
	recent := []spool.Tail{{Disk: 0, Kind: replication.KindWrite, Offset: 0, Length: 2 << 20}, {Disk: 0, Kind: replication.KindWrite, Offset: 4 << 20, Length: 1 << 20}}
	before := sp.Next()
	if err := repairLog(dir, true, spool.Recovered{Recent: recent}, st, diskSet{d}, sp, slog.Default()); err != nil {
		t.Fatal(err)
	}
	if sp.Next() != before {
		t.Fatalf("%d records re-logged into a full spool", sp.Next()-before)
	}
	want := []replication.Range{{Off: 0, Len: 2 << 20}, {Off: 4 << 20, Len: 1 << 20}}
	if ds := st.Disks[0]; ds.Diverged == "" || !slices.Equal(ds.DivergedRanges, want) {
		t.Fatalf("disk state %+v, want the ranges %v marked for a resync", ds, want)
	}
	if _, err := os.Stat(filepath.Join(dir, repairFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("repair list not removed: %v", err)
	}
	st2, err := loadState(dir)
	if err != nil || len(st2.Disks) != 1 || !slices.Equal(st2.Disks[0].DivergedRanges, want) {
		t.Fatalf("the marked ranges are not saved: %+v %v", st2, err)
	}

	// Stopped during an overflow: nothing re-logged, nothing marked here
	// (the whole disk is, by afterForcedShutdown).
	st = &state{Overflow: true, Disks: []diskState{{Index: 0, Name: "d", Path: path, Size: 8 << 20}}}
	if err := repairLog(dir, true, spool.Recovered{Recent: recent[1:]}, st, diskSet{d}, sp, slog.Default()); err != nil {
		t.Fatal(err)
	}
	if sp.Next() != before || len(st.Disks[0].DivergedRanges) != 0 {
		t.Fatalf("after an overflow: %d records re-logged, ranges %v", sp.Next()-before, st.Disks[0].DivergedRanges)
	}
}

// replayLog applies every record in the spool, in order, to an image of
// size bytes of zeros, as the replica would.
func replayLog(t *testing.T, sp *spool.Spool, size int64) []byte {
	t.Helper()
	img := make([]byte, size)
	for _, f := range readFrames(t, sp) {
		recs, _, err := replication.DefaultCodec().Records(&f, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			switch r.Kind {
			case replication.KindWrite, replication.KindBase:
				copy(img[r.Offset:], r.Data)
			case replication.KindZero, replication.KindTrim:
				clear(img[r.Offset:r.End()])
			}
		}
	}
	return img
}

// Changes run concurrently, but one that overlaps a change in flight waits
// for it, so the log's order is the disk's order: change A is held after
// it was logged and before it reaches the disk; B, over the same range,
// must not be logged before A is on the disk (without the range lock B
// would be logged and written first, A would then overwrite it on the disk
// while the log says B came last). C, elsewhere, completes meanwhile.
func TestOverlappingChangesKeepLogOrder(t *testing.T) {
	const size = 1 << 20
	d, sp, _ := mustTestDisk(t, size)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	aLogged, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	d.afterLog = func(uint64) {
		first := false
		once.Do(func() { first = true })
		if first {
			close(aLogged)
			<-release
		}
	}
	a := bytes.Repeat([]byte{'a'}, 8192)
	b := bytes.Repeat([]byte{'b'}, 4096)
	c := bytes.Repeat([]byte{'c'}, 4096)
	errs := make(chan error, 3)
	go func() { errs <- d.WriteAt(a, 0, false) }()
	<-aLogged
	var bDone atomic.Bool
	go func() { err := d.WriteAt(b, 4096, false); bDone.Store(true); errs <- err }()
	cErr := make(chan error, 1)
	go func() { cErr <- d.WriteAt(c, 65536, false) }()
	select {
	case err := <-cErr:
		if err != nil {
			t.Fatal(err)
		}
	case <-ctx.Done():
		t.Fatal("a change that overlaps nothing in flight did not complete while another was held")
	}
	waitFor(t, "the overlapping change to wait or finish", func() bool { return d.ranges.waiters() > 0 || bDone.Load() })
	close(release)
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	disk := make([]byte, size)
	if _, err := d.f.ReadAt(disk, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(disk[4096:8192], b) {
		t.Fatal("the disk does not hold the later change B")
	}
	if !bytes.Equal(replayLog(t, sp, size), disk) {
		t.Fatal("replaying the log does not give the disk: overlapping changes were logged in another order than written")
	}
}

// Many concurrent changes, overlapping at random: replaying the log gives
// the disk.
func TestConcurrentChangesReplayToTheDisk(t *testing.T) {
	const size = 256 << 10
	d, sp, _ := mustTestDisk(t, size)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			for i := range 300 {
				off := r.Int64N(size/512-16) * 512
				n := (1 + r.Int64N(16)) * 512
				var err error
				switch i % 10 {
				case 9:
					err = d.WriteZeroes(off, n, false)
				default:
					err = d.WriteAt(bytes.Repeat([]byte{byte(w*31 + i)}, int(n)), off, false)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	disk := make([]byte, size)
	if _, err := d.f.ReadAt(disk, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(replayLog(t, sp, size), disk) {
		t.Fatal("replaying the log does not give the disk")
	}
}

// After an unclean stop, every change among the spool's last records may
// have been logged without reaching the disk (changes run concurrently),
// not only each disk's last one: the repair re-logs them all.
func TestRepairRelogsEveryChangeInFlight(t *testing.T) {
	const size = 1 << 20
	d, sp, dir := mustTestDisk(t, size)
	disk := make([]byte, size)
	copy(disk[0:], bytes.Repeat([]byte{0x11}, 4096))
	copy(disk[8192:], bytes.Repeat([]byte{0x11}, 4096))
	copy(disk[65536:], bytes.Repeat([]byte{0x44}, 4096))
	if _, err := d.f.WriteAt(disk, 0); err != nil {
		t.Fatal(err)
	}
	// Logged: two writes the disk never got, then one it did.
	for _, c := range []struct {
		off int64
		b   byte
	}{{0, 0x22}, {8192, 0x33}, {65536, 0x44}} {
		r := replication.Record{Kind: replication.KindWrite, Offset: uint64(c.off), Length: 4096, Data: bytes.Repeat([]byte{c.b}, 4096)}
		seq, err := sp.Append(context.Background(), &r)
		if err != nil {
			t.Fatal(err)
		}
		sp.Complete(seq)
	}
	rec := spool.Recovered{Recent: []spool.Tail{
		{Kind: replication.KindWrite, Offset: 0, Length: 4096},
		{Kind: replication.KindWrite, Offset: 8192, Length: 4096},
		{Kind: replication.KindWrite, Offset: 65536, Length: 4096},
	}}
	if err := repairLog(dir, true, rec, &state{}, diskSet{d}, sp, slog.Default()); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(replayLog(t, sp, size), disk) {
		t.Fatal("the replayed log does not match the disk: a change in flight was not repaired")
	}
}

func TestMergeTails(t *testing.T) {
	w := replication.KindWrite
	got := mergeTails([]spool.Tail{
		{Disk: 1, Kind: w, Offset: 8192, Length: 4096},
		{Disk: 0, Kind: replication.KindZero, Offset: 0, Length: 8192},
		{Disk: 1, Kind: w, Offset: 0, Length: 4096},
		{Disk: 0, Kind: w, Offset: 4096, Length: 8192},
		{Disk: 1, Kind: w, Offset: 4096, Length: 4096},
		{Disk: 1, Kind: w, Offset: 1 << 20, Length: 4096},
	})
	want := []spool.Tail{
		{Disk: 0, Kind: w, Offset: 0, Length: 12288},
		{Disk: 1, Kind: w, Offset: 0, Length: 12288},
		{Disk: 1, Kind: w, Offset: 1 << 20, Length: 4096},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("mergeTails = %+v, want %+v", got, want)
	}
}

// A range read from the log whose 64-bit offset is past any disk (negative
// as an int64) is not on the disk: nothing is read or logged, and the
// repair that asked goes on (it used to fail at every start).
func TestRelogOfAnOffsetPastAnyDisk(t *testing.T) {
	d, sp, _ := mustTestDisk(t, 1<<20)
	before := sp.Next()
	for _, off := range []int64{-4096, 1 << 20} {
		if err := d.Relog(off, 4096); err != nil || sp.Next() != before {
			t.Fatalf("offset %d: %v, %d records logged", off, err, sp.Next()-before)
		}
	}
}
