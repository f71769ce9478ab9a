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
	"testing"

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
	if err := repairLog(dir, false, spool.Recovered{}, diskSet{d}, sp, slog.Default()); err != nil {
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
