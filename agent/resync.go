package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/pace"
)

// Resync: the server asks (FrameResync) for a disk, or a range of it, to be
// compared with its replica. The agent logs a resync-start record (the
// replica is inconsistent from there: no points), reads the source chunk by
// chunk, and sends the chunk hashes in batches; the server answers with the
// replica's block hashes of the chunks that differ; the agent re-reads each
// such chunk under the disk's change lock and logs the blocks that differ,
// so they take their place in the log among the guest's writes. A
// resync-done record ends it. The job and its position are saved after
// every batch, so a resync cut short (agent killed, link lost) goes on from
// there.

// resyncBatch is how many chunks one Hashes frame carries.
const resyncBatch = 64

// resyncState is the saved state of the resync in progress.
type resyncState struct {
	Job      replication.ResyncJob `json:"job"`
	Started  bool                  `json:"started"`   // the start record is logged
	StartSeq uint64                `json:"start_seq"` // its sequence number
	Cursor   int64                 `json:"cursor"`    // bytes of the job's chunks done
	Compared int64                 `json:"compared"`
	Sent     int64                 `json:"sent"`
	Batch    uint64                `json:"batch"`
}

// frameWriter sends frames on the current connection to the process
// server (a ship session).
type frameWriter interface {
	write(*replication.Frame) error
}

// resyncWait is how long a batch waits for the server's answer.
const resyncWait = 5 * time.Minute

// resyncer runs resync jobs, one at a time: it owns the job's answers from
// the server and the goroutine that runs it; the job itself and its
// position are in the state file.
type resyncer struct {
	log   *slog.Logger
	spool *spool.Spool
	disks diskSet
	state *stateStore
	tags  *tagMarks // the done record ships like a tag
	// session returns the current connection, nil if there is none.
	session func() frameWriter
	rate    int64 // bytes per second read from the source (0: unlimited)

	mu    sync.Mutex // guards wants and err
	wake  chan struct{}
	wants map[uint64]chan replication.Want // by batch
	err   string

	rt *routines // the runner
}

func newResyncer(parent context.Context, log *slog.Logger, sp *spool.Spool, disks diskSet, st *stateStore, tags *tagMarks,
	session func() frameWriter, rate int64) *resyncer {
	return &resyncer{log: log, spool: sp, disks: disks, state: st, tags: tags, session: session, rate: rate,
		wake: make(chan struct{}, 1), wants: map[uint64]chan replication.Want{}, rt: newRoutines(parent)}
}

// start begins running the saved job (and those the server sends).
func (r *resyncer) start() { r.rt.Go(r.loop) }

// Close stops the job in progress; it goes on from its saved position at
// the next start.
func (r *resyncer) Close() { r.rt.Close() }

// request saves a new job (replacing an unfinished one of the same disk,
// whose work the new one repeats) and wakes the runner.
func (r *resyncer) request(job replication.ResyncJob) error {
	started, err := r.state.startResync(job)
	if err != nil {
		return err
	}
	if started {
		r.log.Info("resync requested", "disk", job.Disk, "job", job.ID, "reason", job.Reason)
	} // else already running (a resent request)
	r.kick()
	return nil
}

func (r *resyncer) kick() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// want delivers the server's answer to a batch.
func (r *resyncer) want(w replication.Want) {
	r.mu.Lock()
	ch := r.wants[w.Batch]
	r.mu.Unlock()
	if ch != nil {
		select {
		case ch <- w:
		default:
		}
	}
}

// status is the progress for the agent's status report.
func (r *resyncer) status() *replication.ResyncStatus {
	st := r.state.resyncJob()
	if st == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return &replication.ResyncStatus{Job: st.Job.ID, Disk: st.Job.Disk, Total: r.total(st.Job),
		Compared: st.Compared, Sent: st.Sent, Error: r.err}
}

// chunks returns the chunk offsets of a job, in order.
func (r *resyncer) chunks(job replication.ResyncJob, size int64) []int64 {
	ranges := job.Ranges
	if len(ranges) == 0 {
		ranges = []replication.Range{{Off: 0, Len: size}}
	}
	var offs []int64
	last := int64(-1)
	for _, rg := range ranges {
		end := min(rg.Off+rg.Len, size)
		for c := rg.Off / replication.HashChunk * replication.HashChunk; c < end; c += replication.HashChunk {
			if c > last {
				offs = append(offs, c)
				last = c
			}
		}
	}
	return offs
}

func (r *resyncer) total(job replication.ResyncJob) int64 {
	if d := r.disks.byIndex(job.Disk); d != nil {
		return int64(len(r.chunks(job, d.Size()))) * replication.HashChunk
	}
	return 0
}

// loop runs the saved job whenever there is one and a session to run it on.
func (r *resyncer) loop() {
	ctx := r.rt.ctx
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-time.After(time.Second):
		}
		st := r.state.resyncJob()
		s := r.session()
		if st == nil || s == nil {
			continue
		}
		err := r.run(s, *st)
		r.mu.Lock()
		if err != nil {
			r.err = err.Error()
		} else {
			r.err = ""
		}
		r.mu.Unlock()
		if err != nil && ctx.Err() == nil {
			r.log.Warn("resync interrupted; it goes on from where it was", "job", st.Job.ID, "err", err)
		}
	}
}

// run works through a job from its saved position.
func (r *resyncer) run(s frameWriter, st resyncState) error {
	d := r.disks.byIndex(st.Job.Disk)
	if d == nil {
		if err := r.state.dropResync(); err != nil {
			return fmt.Errorf("resync of unknown disk %d dropped, but the agent state could not be saved: %w", st.Job.Disk, err)
		}
		return fmt.Errorf("resync of unknown disk %d dropped", st.Job.Disk)
	}
	save := func(update func(*resyncState)) error {
		saved, err := r.state.updateResync(st.Job.ID, update)
		if errors.Is(err, errJobReplaced) {
			return err
		}
		st = saved
		return err
	}
	if !st.Started {
		seq, err := d.logResync(st.Job.ID, st.Job.Reason, st.Job.Verify)
		if err != nil {
			return err
		}
		// The start record is durable before the state names it: after an
		// OS crash the compare must not wait for a record that is gone.
		if err := r.spool.Sync(); err != nil {
			return err
		}
		if err := save(func(x *resyncState) { x.Started, x.StartSeq = true, seq }); err != nil {
			return err
		}
	}
	offs := r.chunks(st.Job, d.Size())
	ctx, cancel := context.WithCancel(r.rt.ctx)
	pacer := pace.New(r.rate)
	batches := d.hashBatches(ctx, offs, int(st.Cursor/replication.HashChunk), pacer)
	defer func() {
		// The readers end before the job does: none outlives Close.
		cancel()
		for range batches {
		}
	}()
	for hb := range batches {
		if hb.err != nil {
			return hb.err
		}
		h := replication.Hashes{Job: st.Job.ID, Disk: d.Index, Batch: st.Batch + 1, After: st.StartSeq, Offs: hb.offs, Hashes: hb.hashes,
			Verify: st.Job.Verify}
		w, err := r.ask(s, h)
		if err != nil {
			return err
		}
		var sent int64
		for _, wc := range w.Chunks {
			n, err := d.sendDiffering(wc, hb.leaves[wc.Off])
			if err != nil {
				return err
			}
			sent += n
			if err := pacer.Wait(ctx, n); err != nil { // what was read again
				return err
			}
		}
		dropCache(d.f, hb.offs[0], hb.offs[len(hb.offs)-1]+replication.HashChunk-hb.offs[0])
		// The batch's records are durable before the position moves past
		// them (a forced shutdown must not lose them behind the cursor).
		if err := r.spool.Sync(); err != nil {
			return err
		}
		done := int64(hb.next) * replication.HashChunk
		compared := int64(len(hb.offs)) * replication.HashChunk
		if err := save(func(x *resyncState) {
			x.Cursor, x.Batch = done, h.Batch
			x.Compared += compared
			x.Sent += sent
		}); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := r.logDone(d, st.Job.ID, st.Compared, st.Sent, st.Job.Verify); err != nil {
		return err
	}
	r.log.Info("resync complete", "disk", d.Name, "job", st.Job.ID, "compared", st.Compared, "sent", st.Sent)
	_, err := r.state.endResync(st.Job.ID)
	return err
}

// ask sends a batch of chunk hashes and waits for the answer.
func (r *resyncer) ask(s frameWriter, h replication.Hashes) (replication.Want, error) {
	ch := make(chan replication.Want, 1)
	r.mu.Lock()
	r.wants[h.Batch] = ch
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.wants, h.Batch)
		r.mu.Unlock()
	}()
	f, err := replication.JSONFrame(replication.FrameHashes, h)
	if err != nil {
		return replication.Want{}, err
	}
	if err := s.write(&f); err != nil {
		return replication.Want{}, fmt.Errorf("send hashes: %w", err)
	}
	select {
	case w := <-ch:
		if w.Error != "" {
			return w, fmt.Errorf("server: %s", w.Error)
		}
		return w, nil
	case <-time.After(resyncWait):
		return replication.Want{}, errors.New("no answer to the chunk hashes")
	case <-r.rt.ctx.Done():
		return replication.Want{}, r.rt.ctx.Err()
	}
}

// logDone logs the end of a resync, with what it compared and sent.
// The record ships like a tag (FlagTag), so the server seals it at once and
// the disk is protected again without waiting for the next seal.
func (r *resyncer) logDone(d *Disk, id uint64, compared, sent int64, verify bool) error {
	data := binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, uint64(compared)), uint64(sent))
	rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindResync, Offset: id,
		Flags: replication.FlagDone, Data: data, Length: uint32(len(data))}
	if verify {
		rec.Flags |= replication.FlagVerify
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	// Only the job the agent holds may end: the server takes a done record
	// as "the disk is consistent again", and a job replaced meanwhile (by
	// a new log, or a newer job) did not make it so.
	if !r.state.resyncCurrent(id) {
		return errJobReplaced
	}
	seq, err := d.spool.Append(d.ctx, &rec)
	if err != nil {
		return err
	}
	r.tags.mark(seq)
	d.spool.Complete(seq)
	return nil
}

// logResync logs the start of a resync (or of a verify, which leaves the
// disk consistent unless it finds differences), with its reason, and
// returns the record's sequence number.
func (d *Disk) logResync(id uint64, reason string, verify bool) (uint64, error) {
	rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindResync, Offset: id,
		Data: []byte(reason), Length: uint32(len(reason))}
	if verify {
		rec.Flags = replication.FlagVerify
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	seq, err := d.spool.Append(d.ctx, &rec)
	if err != nil {
		return 0, err
	}
	d.spool.Complete(seq)
	return seq, nil
}

// hashedBatch is a batch of chunks read and hashed: their offsets, chunk
// hashes (16 bytes each) and block hashes; next is the index of the chunk
// after the batch.
type hashedBatch struct {
	offs   []int64
	hashes []byte
	leaves map[int64][]replication.Hash
	next   int
	err    error
}

// hashReaders is how many chunks are read and hashed at once: enough to
// keep the disk's queue and both cores of a small machine busy.
const hashReaders = 2

// hashBatches reads and hashes the chunks at offs from index from on, a
// batch at a time and one batch ahead of the compare, so that reading the
// disk overlaps the round trip to the server and the sending of
// differences, each read spaced by pacer. The channel closes after the last
// batch, an error, or when ctx ends.
func (d *Disk) hashBatches(ctx context.Context, offs []int64, from int, pacer *pace.Pacer) <-chan hashedBatch {
	out := make(chan hashedBatch, 1)
	go func() {
		defer close(out)
		bufs := make([][]byte, hashReaders)
		for i := range bufs {
			bufs[i] = make([]byte, replication.HashChunk)
		}
		for i := from; i < len(offs); i += resyncBatch {
			batch := offs[i:min(i+resyncBatch, len(offs))]
			hb := hashedBatch{offs: batch, hashes: make([]byte, 16*len(batch)),
				leaves: make(map[int64][]replication.Hash, len(batch)), next: i + len(batch)}
			leaves := make([][]replication.Hash, len(batch))
			errs := make([]error, hashReaders)
			var wg sync.WaitGroup
			for w := range hashReaders {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := bufs[w]
					for j := w; j < len(batch); j += hashReaders {
						n := min(int64(replication.HashChunk), d.Size()-batch[j])
						if err := pacer.Wait(ctx, n); err != nil {
							errs[w] = err
							return
						}
						if _, err := d.f.ReadAt(buf[:n], batch[j]); err != nil && err != io.EOF {
							errs[w] = fmt.Errorf("read disk %s at %d: %w", d.Name, batch[j], err)
							return
						}
						leaves[j] = replication.ChunkLeaves(buf[:n])
						ch := replication.ChunkHash(leaves[j])
						copy(hb.hashes[16*j:], ch[:])
					}
				}()
			}
			wg.Wait()
			hb.err = errors.Join(errs...)
			for j, off := range batch {
				hb.leaves[off] = leaves[j]
			}
			select {
			case out <- hb:
			case <-ctx.Done():
				return
			}
			if hb.err != nil {
				return
			}
		}
	}()
	return out
}

// sendDiffering logs the blocks of a chunk whose hash, as read for the
// compare, differs from the replica's, in runs, reading them again under
// the disk's change lock. It returns the bytes logged.
//
// A block changed by the guest since the compare read it is right either
// way: if it is sent, it is sent as it is now; if not, the guest's write
// is in the log before this point and reaches the replica.
func (d *Disk) sendDiffering(wc replication.WantChunk, leaves []replication.Hash) (int64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := min(int64(replication.HashChunk), d.size-wc.Off)
	if n <= 0 {
		return 0, fmt.Errorf("chunk at %d past the disk's end", wc.Off)
	}
	if leaves == nil || len(wc.Leaves) != 16*len(leaves) {
		return 0, fmt.Errorf("the server sent %d block hashes for a chunk of %d", len(wc.Leaves)/16, len(leaves))
	}
	var sent int64
	flush := func(first, last int) error { // blocks [first, last)
		if first >= last {
			return nil
		}
		lo, hi := int64(first)*replication.HashBlock, min(int64(last)*replication.HashBlock, n)
		data := make([]byte, hi-lo)
		if _, err := d.f.ReadAt(data, wc.Off+lo); err != nil && err != io.EOF {
			return fmt.Errorf("read disk %s at %d: %w", d.Name, wc.Off+lo, err)
		}
		rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindWrite,
			Offset: uint64(wc.Off + lo), Length: uint32(len(data)), Data: data}
		if replication.IsZero(data) {
			rec.Kind, rec.Data = replication.KindZero, nil
		}
		seq, err := d.spool.Append(d.ctx, &rec)
		if err != nil {
			return err
		}
		d.spool.Complete(seq)
		sent += int64(len(data))
		return nil
	}
	run := -1
	for i, l := range leaves {
		differs := string(l[:]) != string(wc.Leaves[16*i:16*i+16])
		switch {
		case differs && run < 0:
			run = i
		case !differs && run >= 0:
			if err := flush(run, i); err != nil {
				return sent, err
			}
			run = -1
		}
	}
	if run >= 0 {
		if err := flush(run, len(leaves)); err != nil {
			return sent, err
		}
	}
	return sent, nil
}
