package procserver

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// A frame applied directly to the replica is acknowledged only once the
// replica has committed it (the applied seq recorded with it, the
// watermark a restart resumes after): every durable seq the sync loop
// reports is at most what commit had made durable by then. A frame that
// comes while the cache holds frames not yet applied is not applied
// directly (the cache keeps the log's order); a frame after direct ones
// starts a cache file whose header names it, and the segment sealed from
// it starts there.
func TestCacheDirectAcknowledgedOnlyAfterCommit(t *testing.T) {
	dir := t.TempDir()
	var total atomic.Int64
	var mu sync.Mutex
	var written, committed uint64 // what apply wrote and commit made durable
	bad := make(chan string, 10)
	durable := make(chan uint64, 1000)
	sealed := make(chan struct{}, 10)
	c, _, err := openCache(context.Background(), cacheConfig{dir: dir, segmentBytes: 1 << 30, sealAfter: time.Hour,
		total: &total, log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		onDurable: func(seq uint64) {
			mu.Lock()
			if seq <= 40 && seq > committed { // 41 on: through the cache
				select {
				case bad <- "durable reported past the replica's commit":
				default:
				}
			}
			mu.Unlock()
			durable <- seq
		},
		onSealed: func() {
			// Under the cache's lock: the segment goes to the apply loop,
			// which must find every frame before it applied.
			mu.Lock()
			if committed < written {
				select {
				case bad <- "a segment sealed before the frames applied directly were committed":
				default:
				}
			}
			mu.Unlock()
			sealed <- struct{}{}
		},
		commit: func() (uint64, error) {
			mu.Lock()
			defer mu.Unlock()
			committed = written
			return committed, nil
		},
	}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	epoch, _, err := c.takeOver()
	if err != nil {
		t.Fatal(err)
	}
	apply := func(f *replication.Frame) func() error {
		return func() error {
			mu.Lock()
			written = f.Seq + uint64(f.Count) - 1
			mu.Unlock()
			return nil
		}
	}
	waitDurable := func(seq uint64) {
		t.Helper()
		timeout := time.After(time.Minute) // a hung test, not a slow one
		for {
			select {
			case d := <-durable:
				if d >= seq {
					return
				}
			case <-timeout:
				t.Fatalf("seq %d never reported durable", seq)
			}
		}
	}
	for seq := uint64(1); seq <= 40; seq += 2 {
		f := dataFrame(seq, writeRec(seq*4096, "a"), writeRec(seq*4096+4096, "b"))
		if ok, err := c.applyDirect(epoch, &f, seq%8 == 7 || seq == 39, apply(&f)); !ok || err != nil {
			t.Fatalf("frame %d not applied directly: %v, %v", seq, ok, err)
		}
	}
	waitDurable(40)
	// A frame through the cache, then one that may not bypass it.
	f41 := dataFrame(41, writeRec(0, "cached"))
	if err := c.append(epoch, &f41); err != nil {
		t.Fatal(err)
	}
	f42 := dataFrame(42, writeRec(0, "after"))
	if ok, err := c.applyDirect(epoch, &f42, false, func() error { t.Error("applied past a cached frame"); return nil }); ok || err != nil {
		t.Fatalf("applyDirect with a cached frame before it: %v, %v", ok, err)
	}
	if err := c.append(epoch, &f42); err != nil {
		t.Fatal(err)
	}
	waitDurable(42)
	c.sealSoon(42)
	<-sealed

	sg, ok := c.next()
	if !ok || sg.first != 41 || sg.last != 42 {
		t.Fatalf("sealed %+v, %v; want seq 41-42", sg, ok)
	}
	data, err := os.ReadFile(sg.path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := replication.PrepareSegment(data); err != nil {
		t.Fatalf("the segment after frames applied directly: %v", err)
	}
	f43 := dataFrame(43, writeRec(0, "direct"))
	if ok, err := c.applyDirect(epoch, &f43, true, apply(&f43)); ok || err != nil {
		t.Fatalf("applyDirect with a sealed segment not yet applied: %v, %v", ok, err)
	}
	c.done(sg)
	// Frames applied directly with more to come (the sync loop not woken
	// for them), then one cached and sealed at once: the seal commits
	// them first.
	if ok, err := c.applyDirect(epoch, &f43, false, apply(&f43)); !ok || err != nil {
		t.Fatalf("applyDirect: %v, %v", ok, err)
	}
	f44 := dataFrame(44, writeRec(0, "cached"))
	if err := c.append(epoch, &f44); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	err = c.sealLocked()
	c.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	<-sealed
	if sg, ok := c.next(); !ok || sg.first != 44 || sg.last != 44 {
		t.Fatalf("sealed %+v, %v; want seq 44", sg, ok)
	}
	select {
	case msg := <-bad:
		t.Fatal(msg)
	default:
	}
}

// A commit that fails stops the cache for good, as a failed fsync does:
// the frames are never acknowledged and no writer takes over until a
// restart.
func TestCacheDirectFailedCommitIsSticky(t *testing.T) {
	var total atomic.Int64
	durable := make(chan uint64, 100)
	failed := make(chan error, 10)
	c, _, err := openCache(context.Background(), cacheConfig{dir: t.TempDir(), segmentBytes: 1 << 30, sealAfter: time.Hour,
		total: &total, log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		onDurable: func(seq uint64) { durable <- seq },
		onFail:    func(err error) { failed <- err },
		commit:    func() (uint64, error) { return 0, errors.New("injected flush error") },
	}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	epoch, _, _ := c.takeOver()
	f := dataFrame(1, writeRec(0, "a"))
	if ok, err := c.applyDirect(epoch, &f, true, func() error { return nil }); !ok || err != nil {
		t.Fatalf("applyDirect: %v, %v", ok, err)
	}
	select {
	case <-failed:
	case <-time.After(time.Minute): // a hung test, not a slow one
		t.Fatal("the failed commit was not reported")
	}
	for len(durable) > 0 {
		if seq := <-durable; seq >= 1 {
			t.Fatalf("seq %d reported durable after its commit failed", seq)
		}
	}
	if _, _, err := c.takeOver(); err == nil || !strings.Contains(err.Error(), "could not be made durable") {
		t.Fatalf("takeOver after a failed commit: %v", err)
	}
}

// baseFrames makes an initial copy of n chunks of random data (base
// records, 4 to a frame, a progress record after each frame) from seq
// first, with the disk's content they give.
func baseFrames(first uint64, n int, seed uint64) ([]replication.Frame, []byte) {
	const chunk = 16 << 10
	r := rand.New(rand.NewPCG(seed, 1))
	disk := make([]byte, 1<<20)
	var frames []replication.Frame
	seq := first
	for i := 0; i < n; i += 4 {
		var recs []replication.Record
		for j := i; j < min(i+4, n); j++ {
			d := make([]byte, chunk)
			for k := range d {
				d[k] = byte(r.IntN(256))
			}
			copy(disk[j*chunk:], d)
			recs = append(recs, replication.Record{Kind: replication.KindBase, Offset: uint64(j * chunk), Data: d})
		}
		end := min(i+4, n) * chunk
		p := replication.Record{Kind: replication.KindProgress, Offset: uint64(end)}
		if end == len(disk) {
			p.Flags = replication.FlagDone
		}
		recs = append(recs, p)
		frames = append(frames, dataFrame(seq, recs...))
		seq += uint64(len(recs))
	}
	return frames, disk
}

// TestDirectInitialCopyResumesAfterARestart: the initial copy goes
// straight to the replica (no segment in the cache); the server stops with
// frames sent and not all acknowledged (its applier and cache closed
// without a commit, as a kill leaves them); the Welcome after the restart
// names a seq at least the last acknowledged and at most the last the
// replica committed, the agent sends the rest from there, and the first
// point recovers bit-exact. A watermark past the replica's content (an
// ack or an applied seq before the flush) would lose data here; one
// behind the acks would be a sequence gap (the agent dropped what was
// acknowledged).
func TestDirectInitialCopyResumesAfterARestart(t *testing.T) {
	r := mustTLSRig(t)
	a, w, err := r.hello(t, logA, 1, 1)
	if err != nil || w.DurableSeq != 0 {
		t.Fatalf("hello: %+v, %v", w, err)
	}
	frames, disk := baseFrames(1, 64, 3)
	half := len(frames) / 2
	for _, f := range frames[:half] {
		a.send(f)
	}
	last := frames[half-1].Seq + uint64(frames[half-1].Count) - 1
	for acked := uint64(0); acked < last; {
		if f := a.read(); f.Type == replication.FrameAck {
			acked = max(acked, f.Seq)
		}
	}
	st, _ := r.s.Stats(machineID)
	if st.AppliedSeq < last || st.Segments != 0 || st.BacklogBytes != 0 {
		t.Fatalf("after the acks: %+v; want applied %d, no segment and no backlog (the direct path)", st, last)
	}
	segs, _ := filepath.Glob(filepath.Join(r.cfg.CacheDir, machineID, "*.seg"))
	if len(segs) != 1 || filepath.Base(segs[0]) != openName {
		t.Fatalf("cache files %v: the initial copy passed through the cache", segs)
	}
	// More frames, then a stop before their acknowledgements are read.
	for _, f := range frames[half : half+4] {
		a.send(f)
	}
	acked := last
	r.restart(t)
	for {
		f, _, err := replication.ReadFrame(a.br, nil)
		if err != nil {
			break
		}
		if f.Type == replication.FrameAck {
			acked = max(acked, f.Seq)
		}
	}
	b, w, err := r.hello(t, logA, acked+1, frames[len(frames)-1].Seq+uint64(frames[len(frames)-1].Count))
	if err != nil || w.NewLog || w.DurableSeq < acked {
		t.Fatalf("hello after the restart: %+v, %v; acknowledged up to %d", w, err, acked)
	}
	m, _ := r.s.known(machineID)
	if applied := m.rep.appliedSeq(); w.DurableSeq > applied {
		t.Fatalf("welcome names seq %d, the replica committed %d", w.DurableSeq, applied)
	}
	t.Logf("acknowledged %d before the restart, the server resumes after %d", acked, w.DurableSeq)
	// The agent sends from the watermark on: frames are cut at it.
	for _, f := range frames {
		if end := f.Seq + uint64(f.Count) - 1; end <= w.DurableSeq {
			continue
		} else if f.Seq <= w.DurableSeq {
			t.Fatalf("watermark %d inside the frame %d-%d", w.DurableSeq, f.Seq, end)
		}
		b.send(f)
	}
	end := frames[len(frames)-1].Seq + uint64(frames[len(frames)-1].Count)
	b.ship(end, replication.Record{Kind: replication.KindTag})
	waitApplied(t, r.s, end)
	mustReplicaHolds(t, r.s, 0, disk)
	ps, err := r.cat.Points(context.Background(), machineID)
	if err != nil || len(ps) != 1 || ps[0].Seq != end {
		t.Fatalf("points %v, %v; want one at seq %d", ps, err, end)
	}
	got := make([]byte, len(disk))
	if err := r.s.WithApplier(context.Background(), machineID, func(ap *replication.Applier) error {
		rd, _ := ap.Disk(0)
		_, err := rd.ReadAt(got, 0)
		return err
	}); err != nil || !bytes.Equal(got, disk) {
		t.Fatalf("the replica after the restart differs from the source (err %v)", err)
	}
}
