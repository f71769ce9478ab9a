package procserver

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// cacheRig is a machine's cache alone, with what its sync loop reports.
type cacheRig struct {
	t       *testing.T
	c       *cache
	total   atomic.Int64
	durable chan uint64
	failed  chan error
	sealed  chan struct{}
}

// mustCache opens the cache in dir, whose log is applied up to applied.
// Files are sealed only at a tag.
func mustCache(t *testing.T, dir string, applied uint64, create func(string) (cacheFile, error)) *cacheRig {
	t.Helper()
	r := &cacheRig{t: t, durable: make(chan uint64, 1000), failed: make(chan error, 100), sealed: make(chan struct{}, 100)}
	c, done, err := openCache(context.Background(), cacheConfig{dir: dir, segmentBytes: 1 << 30, sealAfter: time.Hour,
		total: &r.total, log: slog.New(slog.NewTextHandler(io.Discard, nil)), create: create,
		onDurable: func(seq uint64) {
			select {
			case r.durable <- seq:
			default:
			}
		},
		onFail:   func(err error) { r.failed <- err },
		onSealed: func() { r.sealed <- struct{}{} },
	}, applied)
	if err != nil {
		t.Fatal(err)
	}
	if len(done) > 0 {
		t.Fatalf("segments applied already: %+v", done)
	}
	r.c = c
	t.Cleanup(func() { c.close() })
	return r
}

// waitDurable waits until the sync loop reports seq durable.
func (r *cacheRig) waitDurable(seq uint64) {
	r.t.Helper()
	timeout := time.After(time.Minute) // a hung test, not a slow one
	for {
		select {
		case d := <-r.durable:
			if d >= seq {
				return
			}
		case <-timeout:
			r.t.Fatalf("seq %d never reported durable", seq)
		}
	}
}

func (r *cacheRig) mustAppend(epoch uint64, f replication.Frame) {
	r.t.Helper()
	if _, err := r.c.append(epoch, &f); err != nil {
		r.t.Fatal(err)
	}
}

func writeRec(off uint64, data string) replication.Record {
	return replication.Record{Kind: replication.KindWrite, Offset: off, Data: []byte(data)}
}

func taggedFrame(first uint64, recs ...replication.Record) replication.Frame {
	f := dataFrame(first, recs...)
	f.Flags |= replication.FlagTag
	return f
}

// Frames are durable (reported) once synced, grouped; a tag seals the
// file into a segment named by its range, which waits for the applier.
func TestCacheGroupCommitAndSeal(t *testing.T) {
	r := mustCache(t, t.TempDir(), 0, nil)
	epoch, durable, err := r.c.takeOver()
	if err != nil || durable != 0 {
		t.Fatalf("takeOver: %d, %v", durable, err)
	}
	r.mustAppend(epoch, dataFrame(1, writeRec(0, "a")))
	r.mustAppend(epoch, dataFrame(2, writeRec(4096, "b"), writeRec(8192, "c")))
	r.waitDurable(3)
	if _, ok := r.c.next(); ok {
		t.Fatal("sealed before a tag, the size or the time")
	}
	r.mustAppend(epoch, taggedFrame(4, replication.Record{Kind: replication.KindTag}))
	<-r.sealed
	sg, ok := r.c.next()
	if !ok || sg.first != 1 || sg.last != 4 {
		t.Fatalf("sealed %+v, %v; want seq 1-4", sg, ok)
	}
	data, err := os.ReadFile(sg.path)
	if err != nil {
		t.Fatal(err)
	}
	if scan, err := replication.ScanSegment(data, false, nil); err != nil || !scan.Sealed || scan.Records != 4 {
		t.Fatalf("segment file: %+v, %v", scan, err)
	}
	if st := r.c.stats(); st.durable != 4 || st.segments != 1 {
		t.Fatalf("stats %+v", st)
	}
	r.c.done(sg)
	if _, ok := r.c.next(); ok {
		t.Fatal("a done segment is still queued")
	}
}

// A failed fsync stops the cache for good: the frame is never reported
// durable, nothing more is appended, no writer takes over, even once the
// disk works again. A restart (opening the cache again) recovers the
// frames the file holds.
func TestCacheFailedFsyncIsSticky(t *testing.T) {
	dir := t.TempDir()
	fs := &faults{}
	r := mustCache(t, dir, 0, fs.create)
	epoch, _, err := r.c.takeOver()
	if err != nil {
		t.Fatal(err)
	}
	fs.failSyncs(errors.New("injected fsync error"))
	r.mustAppend(epoch, dataFrame(1, writeRec(0, "a")))
	<-r.failed
	if r.c.brokenErr() == nil {
		t.Fatal("not broken after a failed fsync")
	}
	fs.failSyncs(nil) // the disk works again
	f := dataFrame(2, writeRec(0, "b"))
	if _, err := r.c.append(epoch, &f); err == nil {
		t.Fatal("appended after a failed fsync")
	}
	if _, _, err := r.c.takeOver(); err == nil {
		t.Fatal("taken over after a failed fsync")
	}
	select {
	case d := <-r.durable:
		if d >= 1 {
			t.Fatalf("seq %d reported durable after its fsync failed", d)
		}
	default:
	}
	r.c.close()

	again := mustCache(t, dir, 0, nil)
	if st := again.c.stats(); st.durable != 1 {
		t.Fatalf("after the restart: %+v; want the frame recovered", st)
	}
	if sg, ok := again.c.next(); !ok || sg.first != 1 || sg.last != 1 {
		t.Fatalf("recovered segment %+v, %v", sg, ok)
	}
}

// A writer that takes over makes what the previous one appended durable
// (it names it) and fences it; fence ends a writer too.
func TestCacheTakeOverFencesTheOldWriter(t *testing.T) {
	fs := &faults{}
	r := mustCache(t, t.TempDir(), 0, fs.create)
	first, _, _ := r.c.takeOver()
	parked, release := fs.holdNextSync() // the sync loop's
	defer release()
	r.mustAppend(first, dataFrame(1, writeRec(0, "a")))
	<-parked
	second, durable, err := r.c.takeOver()
	if err != nil || durable != 1 {
		t.Fatalf("takeOver: durable %d, %v; want 1, appended by the first writer", durable, err)
	}
	f := dataFrame(2, writeRec(0, "late"))
	if _, err := r.c.append(first, &f); !errors.Is(err, errReplaced) {
		t.Fatalf("the old writer appended: %v", err)
	}
	r.mustAppend(second, f)
	r.c.fence(second)
	f = dataFrame(3, writeRec(0, "after the end"))
	if _, err := r.c.append(second, &f); !errors.Is(err, errReplaced) {
		t.Fatalf("a fenced writer appended: %v", err)
	}
}

// A sequence gap: the cache seals what it holds and goes on after the
// gap in a file of its own; a restart recovers both sides of it.
func TestCacheSkipTo(t *testing.T) {
	dir := t.TempDir()
	r := mustCache(t, dir, 0, nil)
	epoch, _, _ := r.c.takeOver()
	r.mustAppend(epoch, dataFrame(1, writeRec(0, "a"), writeRec(4096, "b")))
	if err := r.c.skipTo(epoch+1, 9); !errors.Is(err, errReplaced) {
		t.Fatalf("skipTo of another writer: %v", err)
	}
	if err := r.c.skipTo(epoch, 9); err != nil {
		t.Fatal(err)
	}
	if sg, ok := r.c.next(); !ok || sg.first != 1 || sg.last != 2 {
		t.Fatalf("sealed before the gap: %+v, %v", sg, ok)
	}
	f := dataFrame(3, writeRec(0, "c"))
	var pe *replication.ProtocolError
	if _, err := r.c.append(epoch, &f); !errors.As(err, &pe) {
		t.Fatalf("a frame inside the gap: %v", err)
	}
	r.mustAppend(epoch, dataFrame(10, writeRec(0, "after the gap")))
	r.waitDurable(10)
	r.c.close()

	again := mustCache(t, dir, 0, nil)
	if st := again.c.stats(); st.durable != 10 || st.segments != 2 {
		t.Fatalf("after a restart: %+v; want both sides of the gap, durable 10", st)
	}
}
