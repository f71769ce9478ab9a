package procserver

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/localfs"
	"github.com/asrdr/asr/replication/memtarget"
)

const machineID = "00aa"

func mustCatalog(t *testing.T) *replication.Catalog {
	t.Helper()
	tgt := memtarget.New()
	t.Cleanup(func() { tgt.Close() })
	return &replication.Catalog{T: tgt, Codec: replication.PlainCodec{}}
}

// dataFrame encodes records first.. as one DATA frame.
func dataFrame(first uint64, recs ...replication.Record) replication.Frame {
	var raw []byte
	for i := range recs {
		recs[i].Seq = first + uint64(i)
		if recs[i].Kind.HasData() {
			recs[i].Length = uint32(len(recs[i].Data))
		}
		raw = replication.AppendRecord(raw, &recs[i])
	}
	return replication.DefaultCodec().DataFrame(raw, first, uint32(len(recs)), nil)
}

func mustServer(t *testing.T, cacheDir string, cat *replication.Catalog) *Server {
	t.Helper()
	s, err := New(context.Background(), Config{CacheDir: cacheDir, Catalog: cat,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// prepare registers the machine's disk and applies its initial copy, as a
// first agent connection would, then closes the server.
func prepare(t *testing.T, cacheDir string, cat *replication.Catalog) {
	t.Helper()
	ctx := context.Background()
	a, err := replication.OpenApplier(ctx, cat, machineID, "vm", slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.EnsureDisks(ctx, []replication.DiskInfo{{Index: 0, Name: "d", Size: 1 << 20}}); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(cacheDir, machineID), 0o700)
}

// waitApplied waits until the machine's applier has applied up to seq.
func waitApplied(t *testing.T, s *Server, seq uint64) MachineStats {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, ok := s.Stats(machineID)
		if ok && st.AppliedSeq >= seq {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("applied %d, want %d: %+v", st.AppliedSeq, seq, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A server killed between writing the SEAL frame and renaming the file
// leaves a sealed open.seg: recovery keeps it as it is (sealing it again
// would make a corrupt segment and force a resync).
func TestRecoverSealedOpenFile(t *testing.T) {
	cat := mustCatalog(t)
	cache := t.TempDir()
	prepare(t, cache, cat)
	seg := replication.SegmentHeader(1, time.Now())
	f := dataFrame(1,
		replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone},
		replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("hello")})
	seg = replication.AppendFrame(seg, &f)
	seal := replication.SealFrame(2, 2)
	seg = replication.AppendFrame(seg, &seal)
	if err := os.WriteFile(filepath.Join(cache, machineID, openName), seg, 0o600); err != nil {
		t.Fatal(err)
	}
	s := mustServer(t, cache, cat)
	defer s.Close()
	st := waitApplied(t, s, 2)
	if st.ApplyError != "" {
		t.Fatalf("apply error: %s", st.ApplyError)
	}
	m, _ := cat.Machine(context.Background(), machineID)
	if !m.Protected() {
		t.Fatalf("machine not protected after recovery: %+v", m.Disks)
	}
}

// A torn tail (a frame cut short by the crash, never acknowledged) is cut
// off; the complete frames before it are kept and applied.
func TestRecoverTornOpenFile(t *testing.T) {
	cat := mustCatalog(t)
	cache := t.TempDir()
	prepare(t, cache, cat)
	seg := replication.SegmentHeader(1, time.Now())
	f1 := dataFrame(1, replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone})
	f2 := dataFrame(2, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: make([]byte, 8192)})
	seg = replication.AppendFrame(seg, &f1)
	torn := replication.AppendFrame(nil, &f2)
	seg = append(seg, torn[:len(torn)-7]...)
	os.WriteFile(filepath.Join(cache, machineID, openName), seg, 0o600)
	s := mustServer(t, cache, cat)
	defer s.Close()
	st := waitApplied(t, s, 1)
	if st.DurableSeq != 1 || st.ApplyError != "" {
		t.Fatalf("after recovery: %+v", st)
	}
}

// A cached segment holding a frame that claims 0xFFFFFFFF records around
// one real one (written by a version that acknowledged it) used to crash
// the server at every start: it is now moved aside with an event, never
// applied, the disks are marked for resync, and the server goes on.
func TestBadCachedSegmentQuarantined(t *testing.T) {
	cat := mustCatalog(t)
	cache := t.TempDir()
	prepare(t, cache, cat)
	good := dataFrame(1, replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone})
	seg := replication.SegmentHeader(1, time.Now())
	seg = replication.AppendFrame(seg, &good)
	seal := replication.SealFrame(1, 1)
	seg = replication.AppendFrame(seg, &seal)
	if err := os.WriteFile(filepath.Join(cache, machineID, replication.SegmentName(1, 1)), seg, 0o600); err != nil {
		t.Fatal(err)
	}
	rec := replication.Record{Seq: 2, Kind: replication.KindWrite, Offset: 0, Data: []byte("one real record"), Length: 15}
	bad := replication.Frame{Type: replication.FrameData, Seq: 2, Count: 0xFFFFFFFF}
	bad.Payload = replication.AppendRecord(nil, &rec)
	bad.RawLen = uint32(len(bad.Payload))
	seg = replication.SegmentHeader(2, time.Now())
	seg = replication.AppendFrame(seg, &bad)
	last := uint64(2) + 0xFFFFFFFF - 1
	seal = replication.SealFrame(last, 0xFFFFFFFF)
	seg = replication.AppendFrame(seg, &seal)
	name := replication.SegmentName(2, last)
	if err := os.WriteFile(filepath.Join(cache, machineID, name), seg, 0o600); err != nil {
		t.Fatal(err)
	}
	quarantined := make(chan string, 10)
	s, err := New(context.Background(), Config{CacheDir: cache, Catalog: cat, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnQuarantine: func(id, path, reason string) { quarantined <- path + ": " + reason }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	select {
	case q := <-quarantined:
		if !strings.Contains(q, filepath.Join("bad", name)) {
			t.Fatalf("quarantined %s; want the bad segment moved to bad/", q)
		}
	case <-time.After(time.Minute): // a hung test, not a slow one
		t.Fatal("the bad segment was not quarantined")
	}
	waitApplied(t, s, last)
	if _, err := os.Stat(filepath.Join(cache, machineID, "bad", name)); err != nil {
		t.Fatal(err)
	}
	m, _ := cat.Machine(context.Background(), machineID)
	if m.Disks[0].State != replication.StateResync {
		t.Fatalf("disk %+v: want it marked for resync", m.Disks[0])
	}
}

// A resync the server scheduled is started only while the catalog still
// marks the disk (the server's row may lag behind a done record just
// applied); an operator's is started whatever the catalog says.
func TestStartResyncOnlyIfMarked(t *testing.T) {
	cat := mustCatalog(t)
	cache := t.TempDir()
	prepare(t, cache, cat)
	seg := replication.SegmentHeader(1, time.Now())
	f := dataFrame(1, replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone})
	seg = replication.AppendFrame(seg, &f)
	seal := replication.SealFrame(1, 1)
	seg = replication.AppendFrame(seg, &seal)
	if err := os.WriteFile(filepath.Join(cache, machineID, openName), seg, 0o600); err != nil {
		t.Fatal(err)
	}
	s := mustServer(t, cache, cat)
	defer s.Close()
	waitApplied(t, s, 1)
	ctx := context.Background()
	job := replication.ResyncJob{ID: 7, Disk: 0, Reason: "scheduled before the done record"}
	if err := s.StartResync(ctx, machineID, job, true); !errors.Is(err, ErrResyncNotNeeded) {
		t.Fatalf("a scheduled resync of a consistent disk: %v, want ErrResyncNotNeeded", err)
	}
	// An operator's goes on to the agent (not connected here).
	if err := s.StartResync(ctx, machineID, job, false); errors.Is(err, ErrResyncNotNeeded) || err == nil {
		t.Fatalf("an operator's resync of a consistent disk: %v, want it sent to the agent", err)
	}
}

// Two process servers on one local target (the configuration server's
// and a scale-out one): a machine is opened by one at a time, the other
// refused with the holder's name until the first closes it.
func TestMachineLeaseKeepsOneWriter(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	t1, err := localfs.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer t1.Close()
	t2, err := localfs.Open(dir, localfs.Shared())
	if err != nil {
		t.Fatal(err)
	}
	defer t2.Close()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	s1, err := New(ctx, Config{CacheDir: t.TempDir(), Catalog: &replication.Catalog{T: t1, Codec: replication.PlainCodec{}}, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	s2, err := New(ctx, Config{Name: "ps2", CacheDir: t.TempDir(), Catalog: &replication.Catalog{T: t2, Codec: replication.PlainCodec{}}, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	const id = "ab01"
	defer func(w time.Duration) { leaseWait = w }(leaseWait)
	leaseWait = 0 // refused at once: the test is about who holds it
	noop := func(*replication.Applier) error { return nil }
	if err := s1.WithApplier(ctx, id, noop); err != nil {
		t.Fatal(err)
	}
	err = s2.WithApplier(ctx, id, noop)
	if !errors.Is(err, replication.ErrMachineLeased) || !strings.Contains(err.Error(), "asr server") {
		t.Fatalf("second process server opened the machine: %v", err)
	}
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s2.WithApplier(ctx, id, noop); err != nil {
		t.Fatalf("after the first closed: %v", err)
	}
	// And now the first, started again, is the one refused.
	s3, err := New(ctx, Config{CacheDir: t.TempDir(), Catalog: &replication.Catalog{T: t1, Codec: replication.PlainCodec{}}, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if err := s3.WithApplier(ctx, id, noop); !errors.Is(err, replication.ErrMachineLeased) || !strings.Contains(err.Error(), "ps2") {
		t.Fatalf("the machine held by ps2: %v", err)
	}
}
