package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/pace"
)

// TestHashBatches: the pipelined, parallel reader hashes every chunk as
// ChunkLeaves/ChunkHash of the data would, in order, from the cursor on.
func TestHashBatches(t *testing.T) {
	const size = 3*replication.HashChunk + 5*4096 // a short last chunk
	d, _, _ := mustTestDisk(t, size)
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	if _, err := d.f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	offs := []int64{0, replication.HashChunk, 2 * replication.HashChunk, 3 * replication.HashChunk}
	for _, from := range []int{0, 2} {
		var got []int64
		for hb := range d.hashBatches(context.Background(), offs, from, nil) {
			if hb.err != nil {
				t.Fatal(hb.err)
			}
			for j, off := range hb.offs {
				end := min(off+replication.HashChunk, size)
				want := replication.ChunkLeaves(data[off:end])
				ch := replication.ChunkHash(want)
				if !bytes.Equal(hb.hashes[16*j:16*j+16], ch[:]) {
					t.Fatalf("chunk at %d: wrong chunk hash", off)
				}
				if len(hb.leaves[off]) != len(want) || hb.leaves[off][len(want)-1] != want[len(want)-1] {
					t.Fatalf("chunk at %d: wrong block hashes", off)
				}
				got = append(got, off)
			}
		}
		if len(got) != len(offs)-from || got[0] != offs[from] {
			t.Fatalf("from %d: hashed chunks %v", from, got)
		}
	}
}

// TestHashBatchesRate: --resync-rate paces the reads chunk by chunk (a
// lower bound: the limit must hold however fast the disk is; the first
// chunk is read at once).
func TestHashBatchesRate(t *testing.T) {
	const chunks = 8
	d, _, _ := mustTestDisk(t, chunks*replication.HashChunk)
	var offs []int64
	for i := range int64(chunks) {
		offs = append(offs, i*replication.HashChunk)
	}
	start := time.Now()
	for hb := range d.hashBatches(context.Background(), offs, 0, pace.New(16<<20)) {
		if hb.err != nil {
			t.Fatal(hb.err)
		}
	}
	if took, min := time.Since(start), (chunks-1)*time.Second/16; took < min {
		t.Fatalf("8 MiB read in %s at a limit of 16 MiB/s, want at least %s", took, min)
	}
}

// TestResyncDoneShipsLikeATag: the end of a resync makes its DATA frame
// carry FlagTag, so the server seals it at once (the disk is protected
// again without waiting for the next seal).
func TestResyncDoneShipsLikeATag(t *testing.T) {
	r, d := mustResyncer(t, 1<<20, &resyncState{Job: replication.ResyncJob{ID: 7}})
	first := r.spool.Next()
	if _, err := d.logResync(7, "test", false); err != nil {
		t.Fatal(err)
	}
	if r.tags.has(first, first) {
		t.Fatal("the start of a resync ships like a tag")
	}
	if err := r.logDone(d, 7, 1<<20, 0, false); err != nil {
		t.Fatal(err)
	}
	if !r.tags.has(first+1, first+1) {
		t.Fatal("the end of a resync does not ship like a tag")
	}
}

// mustResyncer makes the resyncer of one disk of the given size, with job
// (if any) saved as the resync in progress. It has no session.
func mustResyncer(t *testing.T, size int64, job *resyncState) (*resyncer, *Disk) {
	t.Helper()
	d, sp, dir := mustTestDisk(t, size)
	st := newStateStore(dir, &state{MachineID: "m1", Disks: []diskState{{Index: 0, Name: "d", Size: size}}, Resync: job})
	r := newResyncer(context.Background(), slog.New(slog.DiscardHandler), sp, diskSet{d}, st, &tagMarks{}, func() frameWriter { return nil }, 0)
	t.Cleanup(r.Close)
	return r, d
}

// fakeCompare is the process server's side of a resync, for the resyncer
// alone: it compares each batch of chunk hashes with a replica held in
// memory and answers with the block hashes of the chunks that differ.
type fakeCompare struct {
	r       *resyncer
	replica []byte
	mu      sync.Mutex
	batches []replication.Hashes
	// answer, if set, replaces the answer to a batch (the zero Want: no
	// answer at all).
	answer func(h replication.Hashes, w replication.Want) replication.Want
}

func (f *fakeCompare) write(fr *replication.Frame) error {
	if fr.Type != replication.FrameHashes {
		return fmt.Errorf("unexpected %s frame", fr.Type)
	}
	var h replication.Hashes
	if err := replication.DecodeJSON(fr, &h); err != nil {
		return err
	}
	f.mu.Lock()
	f.batches = append(f.batches, h)
	f.mu.Unlock()
	w := replication.Want{Job: h.Job, Batch: h.Batch}
	for j, off := range h.Offs {
		leaves := replication.ChunkLeaves(f.replica[off:min(off+replication.HashChunk, int64(len(f.replica)))])
		ch := replication.ChunkHash(leaves)
		if !bytes.Equal(ch[:], h.Hashes[16*j:16*j+16]) {
			var lb []byte
			for _, l := range leaves {
				lb = append(lb, l[:]...)
			}
			w.Chunks = append(w.Chunks, replication.WantChunk{Off: off, Leaves: lb})
		}
	}
	if f.answer != nil {
		w = f.answer(h, w)
	}
	if w.Batch != 0 {
		f.r.want(w) // ask registered the batch before writing
	}
	return nil
}

// applyRecords replays the writes and zeroes of recs onto img.
func applyRecords(img []byte, recs []replication.Record) {
	for _, r := range recs {
		switch r.Kind {
		case replication.KindWrite, replication.KindBase:
			copy(img[r.Offset:], r.Data)
		case replication.KindZero, replication.KindTrim:
			clear(img[r.Offset:r.End()])
		}
	}
}

// TestResyncSendsTheDifferences: a job logs its start, the blocks that
// differ from the replica (and only those), and a done record that ships
// like a tag; the replica plus the log is then the disk, and the job is
// over.
func TestResyncSendsTheDifferences(t *testing.T) {
	const size = 3*replication.HashChunk + 5*4096
	r, d := mustResyncer(t, size, &resyncState{Job: replication.ResyncJob{ID: 7, Reason: "test"}})
	disk := make([]byte, size)
	rand.NewChaCha8([32]byte{3}).Read(disk)
	if _, err := d.f.WriteAt(disk, 0); err != nil {
		t.Fatal(err)
	}
	replica := bytes.Clone(disk)
	clear(replica[replication.HashChunk+8192 : replication.HashChunk+3*4096]) // 1 block of chunk 1
	replica[size-1] ^= 1                                                      // the short last chunk's last block
	const differing = 2 * 4096
	first := r.spool.Next()
	f := &fakeCompare{r: r, replica: bytes.Clone(replica)}
	if err := r.run(f, *r.state.resyncJob()); err != nil {
		t.Fatal(err)
	}
	recs := spoolRecords(t, r.spool, first)
	if len(recs) < 2 || recs[0].Kind != replication.KindResync || recs[0].Flags&replication.FlagDone != 0 || recs[0].Offset != 7 {
		t.Fatalf("first record %+v, want the resync's start", recs[0])
	}
	last := recs[len(recs)-1]
	if last.Kind != replication.KindResync || last.Flags&replication.FlagDone == 0 || last.Offset != 7 {
		t.Fatalf("last record %+v, want the resync's end", last)
	}
	if !r.tags.has(last.Seq, last.Seq) {
		t.Fatal("the done record does not ship like a tag")
	}
	var sent int64
	for _, rec := range recs[1 : len(recs)-1] {
		sent += int64(rec.Length)
	}
	if sent != differing {
		t.Fatalf("%d bytes logged for %d differing", sent, differing)
	}
	applyRecords(replica, recs)
	if !bytes.Equal(replica, disk) {
		t.Fatal("the replica plus the resync's records is not the disk")
	}
	if r.state.resyncJob() != nil {
		t.Fatal("the job is still in progress after its done record")
	}
	if len(f.batches) != 1 || f.batches[0].After != recs[0].Seq || len(f.batches[0].Offs) != 4 {
		t.Fatalf("batches %+v: want one of the 4 chunks, after the start record %d", f.batches, recs[0].Seq)
	}
}

// TestResyncResumesWhereItWas: the position is saved after every batch; a
// job cut short (here: the server could not compare the second batch)
// goes on from the batch after the last one done, without logging its
// start again.
func TestResyncResumesWhereItWas(t *testing.T) {
	const chunks = resyncBatch + 3
	r, _ := mustResyncer(t, chunks*replication.HashChunk, &resyncState{Job: replication.ResyncJob{ID: 9}})
	f := &fakeCompare{r: r, replica: make([]byte, chunks*replication.HashChunk)}
	f.answer = func(h replication.Hashes, w replication.Want) replication.Want {
		if h.Batch == 2 {
			w.Error = "replica busy"
		}
		return w
	}
	if err := r.run(f, *r.state.resyncJob()); err == nil || !strings.Contains(err.Error(), "replica busy") {
		t.Fatalf("run = %v, want the server's error", err)
	}
	st := r.state.resyncJob()
	if st == nil || !st.Started || st.Batch != 1 || st.Cursor != resyncBatch*replication.HashChunk || st.Compared != st.Cursor {
		t.Fatalf("saved job %+v: want one batch done", st)
	}
	// Reloaded as a restart would.
	saved, err := loadState(r.state.dir)
	if err != nil || saved.Resync == nil || saved.Resync.Cursor != st.Cursor {
		t.Fatalf("state file: %+v, %v", saved, err)
	}
	f.answer = nil
	f.batches = nil
	startsBefore := r.spool.Next()
	if err := r.run(f, *st); err != nil {
		t.Fatal(err)
	}
	if len(f.batches) != 1 || f.batches[0].Batch != 2 || f.batches[0].Offs[0] != resyncBatch*replication.HashChunk {
		t.Fatalf("resumed with batches %+v", f.batches)
	}
	for _, rec := range spoolRecords(t, r.spool, startsBefore) {
		if rec.Kind == replication.KindResync && rec.Flags&replication.FlagDone == 0 {
			t.Fatal("the resumed job logged its start again")
		}
	}
}

// TestResyncReplacedJobEndsWithoutDone: a job replaced while it runs (a
// newer job, a new log) must not log its done record: the server would
// take the disk as consistent again.
func TestResyncReplacedJobEndsWithoutDone(t *testing.T) {
	r, _ := mustResyncer(t, 2*replication.HashChunk, &resyncState{Job: replication.ResyncJob{ID: 7}})
	f := &fakeCompare{r: r, replica: make([]byte, 2*replication.HashChunk)}
	f.answer = func(h replication.Hashes, w replication.Want) replication.Want {
		if _, err := r.state.startResync(replication.ResyncJob{ID: 8}); err != nil {
			t.Error(err)
		}
		return w
	}
	first := r.spool.Next()
	if err := r.run(f, *r.state.resyncJob()); !errors.Is(err, errJobReplaced) {
		t.Fatalf("run = %v, want errJobReplaced", err)
	}
	for _, rec := range spoolRecords(t, r.spool, first) {
		if rec.Kind == replication.KindResync && rec.Flags&replication.FlagDone != 0 {
			t.Fatal("a replaced job logged its done record")
		}
	}
	if st := r.state.resyncJob(); st == nil || st.Job.ID != 8 {
		t.Fatalf("job in progress %+v, want the new one", st)
	}
}

// TestResyncerLoop: the runner takes a requested job once there is a
// session, reports it in the status while it runs, and ends with Close,
// also in the middle of a job whose answer never comes.
func TestResyncerLoop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r, _ := mustResyncer(t, 2*replication.HashChunk, nil)
		f := &fakeCompare{r: r, replica: make([]byte, 2*replication.HashChunk)}
		var session frameWriter
		var mu sync.Mutex
		r.session = func() frameWriter {
			mu.Lock()
			defer mu.Unlock()
			return session
		}
		r.start()
		if err := r.request(replication.ResyncJob{ID: 1, Disk: 0}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if st := r.status(); st == nil || st.Job != 1 || st.Total != 2*replication.HashChunk {
			t.Fatalf("status without a session: %+v", st)
		}
		mu.Lock()
		session = f
		mu.Unlock()
		time.Sleep(time.Second) // the runner looks again
		synctest.Wait()
		if r.status() != nil || len(f.batches) != 1 {
			t.Fatalf("job not done with a session: status %+v, %d batches", r.status(), len(f.batches))
		}
		// A job whose answer never comes is stopped by Close.
		f.answer = func(replication.Hashes, replication.Want) replication.Want { return replication.Want{} }
		if err := r.request(replication.ResyncJob{ID: 2, Disk: 0}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if len(f.batches) != 2 {
			t.Fatalf("%d batches sent, want the second job's", len(f.batches))
		}
		r.Close()
		if st := r.state.resyncJob(); st == nil || st.Job.ID != 2 || !st.Started {
			t.Fatalf("the interrupted job %+v is not kept to resume", st)
		}
	})
}
