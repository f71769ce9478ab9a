package procserver

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
)

// compareWait bounds how long a compare waits for the replica to catch up
// with the resync's start record.
const compareWait = 2 * time.Minute

// Damage is what a check found wrong with a replica disk: blocks whose
// contents do not match their checksums, in the current contents (Point
// "") or in a recovery point's own blocks.
type Damage struct {
	Disk   string
	Point  string
	Blocks []int64 // offsets of damaged 4 KiB blocks
	Found  string  // "scrub", "verify", "resync sample", ...
}

type compareReq struct {
	cc *agentConn
	h  replication.Hashes
}

// comparer answers a machine's resync chunk hashes (HASHES) with the
// replica's block hashes of the chunks that differ (WANT), one batch at a
// time, on its own goroutine, so the connection's reader goes on reading
// DATA meanwhile (the compare waits for the log to be applied up to the
// resync's start).
type comparer struct {
	id       string
	log      *slog.Logger
	rep      *replica
	cache    *cache
	onDamage func(d Damage)

	reqs   chan compareReq
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startComparer(parent context.Context, id string, log *slog.Logger, rep *replica, c *cache, onDamage func(Damage)) *comparer {
	if onDamage == nil {
		onDamage = func(Damage) {}
	}
	cp := &comparer{id: id, log: log, rep: rep, cache: c, onDamage: onDamage, reqs: make(chan compareReq, 4)}
	cp.ctx, cp.cancel = context.WithCancel(parent)
	cp.wg.Add(1)
	go func() { defer cp.wg.Done(); cp.loop() }()
	return cp
}

// submit queues a batch of cc's; it waits while the comparer is busy.
func (cp *comparer) submit(ctx context.Context, cc *agentConn, h replication.Hashes) error {
	select {
	case cp.reqs <- compareReq{cc, h}:
		return nil
	case <-cc.replaced:
		return errReplaced
	case <-ctx.Done():
		return ctx.Err()
	case <-cp.ctx.Done():
		return cp.ctx.Err()
	}
}

func (cp *comparer) loop() {
	for {
		select {
		case <-cp.ctx.Done():
			return
		case req := <-cp.reqs:
			w := cp.compare(req.h)
			f, err := replication.JSONFrame(replication.FrameWant, w)
			if err != nil {
				continue
			}
			select {
			case req.cc.out <- f:
			case <-req.cc.replaced:
			case <-cp.ctx.Done():
				return
			}
		}
	}
}

func (cp *comparer) close() {
	cp.cancel()
	cp.wg.Wait()
}

// compare finds the chunks of a batch whose replica hash differs: from the
// replica's block checksums, or, for a verify job (DRBD's online verify),
// from the replica's contents read back, checked against the checksums on
// the way.
func (cp *comparer) compare(h replication.Hashes) replication.Want {
	w := replication.Want{Job: h.Job, Batch: h.Batch}
	if len(h.Hashes) != 16*len(h.Offs) {
		w.Error = "malformed chunk hashes"
		return w
	}
	if err := cp.rep.waitApplied(cp.ctx, cp.cache, h.After, compareWait); err != nil {
		w.Error = err.Error()
		return w
	}
	rd, sums, ok := cp.rep.handles(h.Disk)
	if !ok {
		w.Error = fmt.Sprintf("no replica disk %d", h.Disk)
		return w
	}
	var damaged []int64
	buf := make([]byte, replication.HashChunk)
	for i, off := range h.Offs {
		if off < 0 || off%replication.HashChunk != 0 || off >= rd.Size() {
			w.Error = fmt.Sprintf("chunk offset %d not aligned or past the disk's end", off)
			return w
		}
		c := off / replication.HashChunk
		var ch replication.Hash
		var leaves []replication.Hash
		var err error
		if h.Verify {
			var bad []int64
			ch, leaves, bad, err = cp.readChunk(h.Disk, c, buf)
			damaged = append(damaged, bad...)
		} else {
			ch, leaves, err = sums.Chunk(c)
		}
		if err != nil {
			w.Error = err.Error()
			return w
		}
		if string(ch[:]) == string(h.Hashes[16*i:16*i+16]) {
			continue
		}
		wc := replication.WantChunk{Off: off, Leaves: make([]byte, 0, 16*len(leaves))}
		for _, l := range leaves {
			wc.Leaves = append(wc.Leaves, l[:]...)
		}
		w.Chunks = append(w.Chunks, wc)
	}
	if h.Verify && (len(damaged) > 0 || len(w.Chunks) > 0) {
		if err := cp.verifyFound(h.Disk, damaged, len(w.Chunks)); err != nil {
			w.Error = err.Error()
			return w
		}
	}
	return w
}

// readChunk reads chunk c of a replica disk back, hashes its blocks, and
// checks them against the disk's checksums (a damaged block is marked, so
// the answer asks the source for it).
func (cp *comparer) readChunk(disk uint32, c int64, buf []byte) (replication.Hash, []replication.Hash, []int64, error) {
	var ch replication.Hash
	var leaves []replication.Hash
	var bad []int64
	err := cp.rep.with(func(a *replication.Applier) error {
		rd, _ := a.Disk(disk)
		var err error
		if bad, err = replication.CheckChunk(rd, a.Sums(disk), c, buf); err != nil {
			return err
		}
		n := min(int64(replication.HashChunk), rd.Size()-c*replication.HashChunk)
		leaves = replication.ChunkLeaves(buf[:n])
		ch = replication.ChunkHash(leaves)
		return nil
	})
	return ch, leaves, bad, err
}

// verifyFound records what a verify found on a disk: damaged blocks are
// marked in the checksums and reported, and the disk makes no points until
// the verify's differences are resent (the job's done record ends that).
func (cp *comparer) verifyFound(disk uint32, damaged []int64, differing int) error {
	var name string
	err := cp.rep.with(func(a *replication.Applier) error {
		mc := a.Machine()
		d, ok := mc.Disk(disk)
		if !ok {
			return fmt.Errorf("no disk %d", disk)
		}
		name = d.Name
		reason := fmt.Sprintf("a verify found %d chunks that differ from the source", differing)
		if len(damaged) > 0 {
			reason = fmt.Sprintf("a verify found %d damaged blocks in the replica (first at offset %d) and %d chunks that differ from the source", len(damaged), damaged[0], differing)
		}
		return a.MarkDamage(cp.ctx, disk, damaged, reason)
	})
	if err != nil {
		return err
	}
	// Reported once the applier is let go.
	if len(damaged) > 0 {
		cp.onDamage(Damage{Disk: name, Blocks: damaged, Found: "verify"})
	}
	return nil
}

// startResync checks a sample of the disk's checksums against the replica
// (marking what is damaged, so the resync sends it again) and asks the
// agent to resync. The catalog is the truth on what the disk needs: a disk
// marked for resync is resynced for its reason, over its ranges (none: the
// whole disk); a consistent one (an operator's request, a verify) whole,
// for job.Reason.
func (m *machine) startResync(ctx context.Context, job replication.ResyncJob, ifMarked bool) error {
	var rd replication.ReplicaDisk
	var sums *replication.Sums
	var name string
	err := m.rep.with(func(a *replication.Applier) error {
		mc := a.Machine()
		d, ok := mc.Disk(job.Disk)
		disk, ok2 := a.Disk(job.Disk)
		if !ok || !ok2 || a.Sums(job.Disk) == nil {
			return fmt.Errorf("no replica disk %d", job.Disk)
		}
		if ifMarked && d.State != replication.StateResync {
			return fmt.Errorf("disk %s: %w", d.Name, ErrResyncNotNeeded)
		}
		rd, sums, name = disk, a.Sums(job.Disk), d.Name
		job.Ranges = nil
		if !job.Verify && d.State == replication.StateResync {
			job.Reason, job.Ranges = d.Reason, append([]replication.Range(nil), d.Ranges...)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !job.Verify {
		var bad []int64
		buf := make([]byte, replication.HashChunk)
		for _, c := range replication.SampleChunks(rd.Size(), 16) {
			var b []int64
			err := m.rep.with(func(*replication.Applier) error {
				var err error
				b, err = replication.CheckChunk(rd, sums, c, buf)
				return err
			})
			if err != nil {
				return fmt.Errorf("check the replica before the resync: %w", err)
			}
			bad = append(bad, b...)
		}
		if len(bad) > 0 {
			m.log.Warn("replica blocks do not match their checksums; the resync sends them again", "disk", job.Disk, "blocks", len(bad))
			if err := m.rep.with(func(a *replication.Applier) error { return a.MarkDamage(ctx, job.Disk, bad, "") }); err != nil {
				return err
			}
			if len(job.Ranges) > 0 {
				// The job compares only its ranges: add the damaged blocks.
				job.Ranges = append(job.Ranges, replication.BlockRanges(bad)...)
			}
			if m.s.cfg.OnDamage != nil {
				m.s.cfg.OnDamage(m.id, Damage{Disk: name, Blocks: bad, Found: "resync sample"})
			}
		}
	}
	f, err := replication.JSONFrame(replication.FrameResync, job)
	if err != nil {
		return err
	}
	cc := m.sess.current()
	if cc == nil {
		return fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	}
	select {
	case cc.out <- f:
		return nil
	case <-cc.replaced:
		return fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	case <-ctx.Done():
		return ctx.Err()
	}
}
