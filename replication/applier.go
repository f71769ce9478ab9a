package replication

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Applier applies one machine's sealed segments, in sequence order, to its
// replica disks on a Target, takes a snapshot of every disk at each tag
// record (a recovery point), and keeps the machine's catalog entry current.
//
// Crash safety: the catalog's AppliedSeq is written only after the replica
// disks are flushed, and applying records again from AppliedSeq+1 gives the
// same replica (records are applied in order; each overwrites its range), so
// after a crash the process server simply re-applies from the catalog.
type Applier struct {
	cat   *Catalog
	codec *Codec
	log   *slog.Logger
	m     MachineCatalog
	disks map[uint32]ReplicaDisk
	sums  map[uint32]*Sums // each replica disk's block checksums (sums.go)

	// OnPoint is called after a point is durable on the target. reqID is the
	// operator request that asked for it (0 for a scheduled point).
	OnPoint func(p Point, reqID uint64)
	// OnNoPoint is called when a tag could not become a point (the machine
	// is not fully protected).
	OnNoPoint func(reqID uint64, reason string)
	// OnState is called after the catalog entry is written.
	OnState func(m MachineCatalog)
}

// OpenApplier loads (or starts) the catalog entry of a machine and opens its
// replica disks.
func OpenApplier(ctx context.Context, cat *Catalog, id, name string, log *slog.Logger) (*Applier, error) {
	a := &Applier{cat: cat, codec: DefaultCodec(), log: log, disks: map[uint32]ReplicaDisk{}, sums: map[uint32]*Sums{}}
	m, err := cat.Machine(ctx, id)
	switch {
	case errors.Is(err, ErrNotFound):
		m = MachineCatalog{ID: id, Name: name}
		if err := cat.PutMachine(ctx, &m); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	}
	if name != "" {
		m.Name = name
	}
	a.m = m
	built := false
	for i := range a.m.Disks {
		d := &a.m.Disks[i]
		rd, err := cat.T.OpenDisk(ctx, DiskKey(id, d.Index), d.Size)
		if err != nil {
			a.Close()
			return nil, fmt.Errorf("open replica of disk %s: %w", d.Name, err)
		}
		a.disks[d.Index] = rd
		sums, created, err := OpenSums(ctx, cat.T, SumKey(id, d.Index), d.Size)
		if err != nil {
			a.Close()
			return nil, fmt.Errorf("block checksums of disk %s: %w", d.Name, err)
		}
		a.sums[d.Index] = sums
		if created || !d.Sums {
			// A disk replicated before asr kept checksums (or whose
			// checksums were lost): build them from the replica as it is.
			if d.Sums {
				log.Warn("the block checksums of a replica disk are missing; rebuilding them from the replica", "machine", id, "disk", d.Name)
			} else {
				log.Info("building block checksums of a replica disk", "machine", id, "disk", d.Name, "size", d.Size)
			}
			if err := BuildSums(ctx, rd, sums); err != nil {
				a.Close()
				return nil, fmt.Errorf("build block checksums of disk %s: %w", d.Name, err)
			}
			d.Sums, built = true, true
		}
	}
	if built {
		if err := a.saveMachine(ctx); err != nil {
			a.Close()
			return nil, err
		}
	}
	return a, nil
}

// Sums returns a disk's block checksums (nil for an unknown disk).
func (a *Applier) Sums(disk uint32) *Sums { return a.sums[disk] }

// Machine returns the applier's view of the catalog entry.
func (a *Applier) Machine() MachineCatalog {
	m := a.m
	m.Disks = append([]CatalogDisk(nil), a.m.Disks...)
	return m
}

// Disk returns an open replica disk.
func (a *Applier) Disk(index uint32) (ReplicaDisk, bool) {
	d, ok := a.disks[index]
	return d, ok
}

// EnsureDisks registers the disks an agent announced. A new disk gets a
// fresh (all-zero) replica and starts initial replication. A known disk must
// keep its size.
func (a *Applier) EnsureDisks(ctx context.Context, disks []DiskInfo) error {
	// Names become file names on recovery: check them here, whatever the
	// agent claims to have checked.
	seen := map[string]bool{}
	for _, di := range disks {
		if !ValidDiskName(di.Name) {
			return fmt.Errorf("disk name %q: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'", di.Name)
		}
		if seen[di.Name] {
			return fmt.Errorf("disk name %q given twice", di.Name)
		}
		seen[di.Name] = true
	}
	changed := false
	for _, di := range disks {
		if di.Diverged != "" {
			if d, ok := a.m.Disk(di.Index); ok && d.State != StateResync {
				d.State, d.Reason, d.Ranges = StateResync, "the agent reports: "+di.Diverged, di.DivergedRanges
				changed = true
			}
		}
		if d, ok := a.m.Disk(di.Index); ok {
			if d.Name != di.Name {
				return fmt.Errorf("disk %d was %q and is now %q: disk indexes must not be reused", di.Index, d.Name, di.Name)
			}
			switch {
			case di.Size < d.Size:
				return fmt.Errorf("disk %s shrank from %d to %d bytes: a protected disk cannot shrink (as in ASR); restore its size, or disable protection and enable it again", di.Name, d.Size, di.Size)
			case di.Size > d.Size:
				// Grown: the replica grows, and the new area is resynced.
				if di.Size > MaxDiskSize {
					return fmt.Errorf("disk %s grew to %d bytes, more than asr supports (%d): %w", di.Name, di.Size, int64(MaxDiskSize), ErrDiskTooLarge)
				}
				if err := a.disks[di.Index].Resize(ctx, di.Size); err != nil {
					return fmt.Errorf("grow the replica of disk %s: %w", di.Name, err)
				}
				if err := a.sums[di.Index].Resize(ctx, di.Size); err != nil {
					return fmt.Errorf("grow the checksums of disk %s: %w", di.Name, err)
				}
				old := d.Size
				d.Size = di.Size
				if d.State == StateProtected {
					d.State, d.Reason = StateResync, fmt.Sprintf("disk grew from %d to %d bytes", old, di.Size)
					d.Ranges = []Range{{Off: old, Len: di.Size - old}}
				}
				changed = true
			}
			continue
		}
		if di.Size <= 0 {
			return fmt.Errorf("disk %s: size %d", di.Name, di.Size)
		}
		if di.Size > MaxDiskSize {
			return fmt.Errorf("disk %s of %d bytes is larger than asr supports (%d, VMware's largest virtual disk is 62 TB): %w", di.Name, di.Size, int64(MaxDiskSize), ErrDiskTooLarge)
		}
		for _, d := range a.m.Disks {
			if d.Name == di.Name {
				return fmt.Errorf("disk name %q is taken by disk %d of this machine", di.Name, d.Index)
			}
		}
		rd, err := a.cat.T.OpenDisk(ctx, DiskKey(a.m.ID, di.Index), di.Size)
		if err != nil {
			return fmt.Errorf("create replica of disk %s: %w", di.Name, err)
		}
		// A new disk's replica is all zeros, and so are its new checksums
		// (an existing sum disk here was made by a start cut short before
		// the catalog named the disk: nothing was applied to either).
		sums, _, err := OpenSums(ctx, a.cat.T, SumKey(a.m.ID, di.Index), di.Size)
		if err != nil {
			rd.Close()
			return fmt.Errorf("create the checksums of disk %s: %w", di.Name, err)
		}
		a.disks[di.Index] = rd
		a.sums[di.Index] = sums
		a.m.Disks = append(a.m.Disks, CatalogDisk{Index: di.Index, Name: di.Name, Size: di.Size, State: StateInitial, Sums: true})
		changed = true
	}
	if changed {
		return a.saveMachine(ctx)
	}
	return nil
}

func (a *Applier) saveMachine(ctx context.Context) error {
	if err := a.cat.PutMachine(ctx, &a.m); err != nil {
		return fmt.Errorf("write catalog of machine %s: %w", a.m.ID, err)
	}
	if a.OnState != nil {
		a.OnState(a.Machine())
	}
	return nil
}

// Apply applies a sealed segment. Records at or below AppliedSeq are skipped
// (a segment may be re-applied after a crash); the first new record must be
// AppliedSeq+1. A segment that fails any check is not applied at all: the
// error wraps ErrCorrupt and the replica is untouched.
func (a *Applier) Apply(ctx context.Context, seg []byte) error {
	p, err := PrepareSegment(seg)
	if err != nil {
		return err
	}
	return a.ApplyPrepared(ctx, p)
}

// PreparedSegment is a sealed segment verified and decoded, its writes'
// block checksums computed: what the applier then takes in log order.
type PreparedSegment struct {
	First, Last uint64
	// LastTime is the time of its last record; Tags whether it holds a
	// tag record (one that may make a recovery point).
	LastTime time.Time
	Tags     bool
	recs     []preparedRecord
	given    bool // GiveData
}

// GiveData lets ApplyPrepared hand the records' data to replica disks
// that keep it until their next flush instead of copying it
// (OwningWriter). The caller promises that nothing changes the segment's
// bytes, or the buffers of the records its known function gave, again.
func (p *PreparedSegment) GiveData() { p.given = true }

type preparedRecord struct {
	r  Record
	be BlockEntries // write and base records: their whole blocks' checksums
}

// Empty reports whether the segment holds no records.
func (p *PreparedSegment) Empty() bool { return len(p.recs) == 0 }

// Info describes the segment as the target keeps it (DescribeSegment).
func (p *PreparedSegment) Info() SegmentInfo {
	return SegmentInfo{First: p.First, Last: p.Last, LastTime: p.LastTime}
}

// PrepareSegment verifies a sealed segment whole (frame and record
// checksums, decompression, sequence continuity) and decodes it, the
// frames decompressed and their writes hashed on every CPU. It reads no
// applier state, so it runs outside the applier's lock (and ahead of the
// segment before it); a failure wraps ErrCorrupt.
func PrepareSegment(seg []byte) (*PreparedSegment, error) {
	return PrepareSegmentFrom(seg, nil)
}

// PrepareSegmentFrom is PrepareSegment taking the records of a frame from
// known when it has them: the records that frame's payload decodes to,
// decoded and checked (record checksums, sequence numbers, count) from the
// very payload the frame holds, and still in memory since (the process
// server's reader hands them over, keyed by the frame it wrote to its
// cache). The segment is still scanned whole (every frame's header and
// payload checksum), and only a frame whose key (seq, count, lengths,
// flags and payload checksum) is known's takes its records; the others
// are decompressed and checked here. known is called from one goroutine,
// once per DATA frame, in order.
func PrepareSegmentFrom(seg []byte, known func(k FrameKey) ([]Record, bool)) (*PreparedSegment, error) {
	var frames []Frame
	var given [][]Record
	scan, err := scanKeyed(seg, false, func(f *Frame, k FrameKey) error {
		frames = append(frames, *f)
		var recs []Record
		if known != nil {
			if r, ok := known(k); ok && len(r) == int(f.Count) && r[0].Seq == f.Seq {
				recs = r
			}
		}
		given = append(given, recs)
		return nil
	})
	if err != nil {
		return nil, err
	}
	if scan.Records == 0 {
		return &PreparedSegment{First: scan.First, Last: scan.Last}, nil // nothing to apply, nothing to keep
	}
	return prepareFrames(scan.First, scan.Last, frames, given, nil)
}

// PrepareHanded is PrepareSegmentFrom for a segment first..last whose
// file need not be read: recs holds, for each of its DATA frames in
// order, the records decoded and checked from the very payload the
// segment holds for it (the process server's hand-off, which keeps the
// records of the frames it wrote, keys as written). It checks that each
// frame's records match its key (count, first seq) and that the frames
// number first to last without a gap or an overlap; a failure wraps
// ErrCorrupt (the caller then reads the file instead). entries, if not
// nil, holds each frame's RecordEntries where the hand-off computed them
// (nil for a frame whose writes are hashed here).
func PrepareHanded(first, last uint64, keys []FrameKey, recs [][]Record, entries [][]BlockEntries) (*PreparedSegment, error) {
	if len(keys) == 0 || len(keys) != len(recs) || entries != nil && len(entries) != len(recs) {
		return nil, fmt.Errorf("segment %d-%d: %d frames, records for %d: %w", first, last, len(keys), len(recs), ErrCorrupt)
	}
	for i := range entries {
		if entries[i] != nil && len(entries[i]) != len(recs[i]) {
			return nil, fmt.Errorf("segment %d-%d: frame %d has %d records, checksums for %d: %w", first, last, i, len(recs[i]), len(entries[i]), ErrCorrupt)
		}
	}
	next := first
	for i, k := range keys {
		if k.Count == 0 || k.Seq != next || len(recs[i]) != int(k.Count) || recs[i][0].Seq != k.Seq {
			return nil, fmt.Errorf("segment %d-%d: frame %d (seq %d, %d records) does not follow seq %d: %w", first, last, i, k.Seq, k.Count, next-1, ErrCorrupt)
		}
		next = k.Seq + uint64(k.Count)
	}
	if next-1 != last {
		return nil, fmt.Errorf("segment %d-%d: its frames end at seq %d: %w", first, last, next-1, ErrCorrupt)
	}
	return prepareFrames(first, last, nil, recs, entries)
}

// RecordEntries hashes the whole blocks of each write and base record of
// recs (EntriesOf; the zero BlockEntries for any other record): what the
// applier needs of them, computed ahead (PrepareHanded).
func RecordEntries(recs []Record) []BlockEntries {
	be := make([]BlockEntries, len(recs))
	for j := range recs {
		if k := recs[j].Kind; k == KindWrite || k == KindBase {
			be[j] = EntriesOf(int64(recs[j].Offset), recs[j].Data)
		}
	}
	return be
}

// Size is what be holds in memory beyond its header.
func (be BlockEntries) Size() int64 { return int64(cap(be.e)) * int64(len(Hash{})) }

// prepareFrames decodes the frames of segment first..last whose records
// are not given (given[i] nil: frames[i] is decompressed and checked)
// and hashes every write's blocks, on every CPU, but for the frames
// whose entries are given (entries[i] not nil, when entries is not).
func prepareFrames(first, last uint64, frames []Frame, given [][]Record, entries [][]BlockEntries) (*PreparedSegment, error) {
	type decoded struct {
		recs []preparedRecord
		err  error
	}
	out := make([]decoded, len(given))
	codec := DefaultCodec()
	// Frames are taken in order and none after a failure: beyond the
	// frames that decode, at most one per worker is decompressed (each
	// into at most MaxFrameRaw bytes).
	var next atomic.Int64
	var failed atomic.Bool
	var wg sync.WaitGroup
	for w := min(runtime.GOMAXPROCS(0), len(given)); w > 0; w-- {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !failed.Load() {
				i := int(next.Add(1) - 1)
				if i >= len(given) {
					return
				}
				recs := given[i]
				if recs == nil {
					// Each frame decompresses into its own buffer:
					// records alias it.
					var err error
					recs, _, err = codec.Records(&frames[i], nil)
					if err != nil {
						out[i].err = err
						failed.Store(true)
						return
					}
				}
				var be []BlockEntries
				if entries != nil {
					be = entries[i]
				}
				prs := make([]preparedRecord, len(recs))
				for j := range recs {
					prs[j].r = recs[j]
					hashed := recs[j].Kind == KindWrite || recs[j].Kind == KindBase
					switch {
					case be == nil:
						if hashed {
							prs[j].be = EntriesOf(int64(recs[j].Offset), recs[j].Data)
						}
					case !be[j].fits(int64(recs[j].Offset), len(recs[j].Data), hashed):
						out[i].err = fmt.Errorf("record %d: the checksums given are not of its blocks: %w", recs[j].Seq, ErrCorrupt)
						failed.Store(true)
						return
					default:
						prs[j].be = be[j]
					}
				}
				out[i].recs = prs
			}
		}()
	}
	wg.Wait()
	// Sized by the records decoded, never by a count the segment claims.
	n := 0
	for _, d := range out {
		if d.err != nil {
			return nil, fmt.Errorf("segment %d-%d: %w", first, last, d.err)
		}
		n += len(d.recs)
	}
	p := &PreparedSegment{First: first, Last: last, recs: make([]preparedRecord, 0, n)}
	for _, d := range out {
		for _, pr := range d.recs {
			p.Tags = p.Tags || pr.r.Kind == KindTag
		}
		p.recs = append(p.recs, d.recs...)
	}
	p.LastTime = time.Unix(0, p.recs[len(p.recs)-1].r.Time).UTC()
	return p, nil
}

// ApplyPrepared applies a prepared segment (see Apply): every record is
// checked against the machine's disks before the first write, then the
// records are applied in log order.
func (a *Applier) ApplyPrepared(ctx context.Context, p *PreparedSegment) error {
	if p.Last <= a.m.AppliedSeq {
		return nil
	}
	if p.First > a.m.AppliedSeq+1 {
		return fmt.Errorf("segment %d-%d leaves a gap after applied seq %d: %w", p.First, p.Last, a.m.AppliedSeq, ErrCorrupt)
	}
	for i := range p.recs {
		if err := a.check(&p.recs[i].r); err != nil {
			return fmt.Errorf("segment %d-%d: %w", p.First, p.Last, err)
		}
	}
	dirty := false
	for i := range p.recs {
		pr := &p.recs[i]
		if pr.r.Seq <= a.m.AppliedSeq {
			continue
		}
		if err := a.apply(ctx, &pr.r, pr.be, p.given); err != nil {
			return err
		}
		dirty = true
	}
	if !dirty {
		return nil
	}
	return a.checkpoint(ctx, p.Last)
}

// check validates a record against the machine's disks.
func (a *Applier) check(r *Record) error {
	if r.Kind == KindTag {
		return nil
	}
	d, ok := a.m.Disk(r.Disk)
	if !ok {
		return fmt.Errorf("record %d names unknown disk %d: %w", r.Seq, r.Disk, ErrCorrupt)
	}
	if r.Kind == KindResync {
		return nil // Offset is the resync's id
	}
	if r.Kind == KindProgress {
		if r.Offset > uint64(d.Size) {
			return fmt.Errorf("record %d: progress %d past disk end %d: %w", r.Seq, r.Offset, d.Size, ErrCorrupt)
		}
		return nil
	}
	if r.End() > uint64(d.Size) {
		return fmt.Errorf("record %d: %s at %d+%d past disk end %d: %w", r.Seq, r.Kind, r.Offset, r.Length, d.Size, ErrCorrupt)
	}
	return nil
}

// apply applies one record; with given, its data may be kept by the
// replica disk (PreparedSegment.GiveData).
func (a *Applier) apply(ctx context.Context, r *Record, be BlockEntries, given bool) error {
	switch r.Kind {
	case KindWrite, KindBase:
		rd := a.disks[r.Disk]
		var err error
		if ow, ok := rd.(OwningWriter); ok && given {
			err = ow.WriteAtOwned(r.Data, int64(r.Offset))
		} else {
			err = rd.WriteAt(r.Data, int64(r.Offset))
		}
		if err != nil {
			return fmt.Errorf("apply record %d to disk %d: %w", r.Seq, r.Disk, err)
		}
		if err := a.sums[r.Disk].NoteEntries(int64(r.Offset), r.Data, be); err != nil {
			return fmt.Errorf("apply record %d to the checksums of disk %d: %w", r.Seq, r.Disk, err)
		}
	case KindZero, KindTrim:
		if err := a.disks[r.Disk].ZeroAt(int64(r.Offset), int64(r.Length)); err != nil {
			return fmt.Errorf("apply record %d to disk %d: %w", r.Seq, r.Disk, err)
		}
		if err := a.sums[r.Disk].NoteZero(int64(r.Offset), int64(r.Length)); err != nil {
			return fmt.Errorf("apply record %d to the checksums of disk %d: %w", r.Seq, r.Disk, err)
		}
	case KindProgress:
		d, _ := a.m.Disk(r.Disk)
		if d.State == StateInitial {
			d.Cursor = int64(r.Offset)
			if r.Flags&FlagDone != 0 {
				d.Cursor = d.Size
				d.State = StateProtected
				a.log.Info("initial replication complete", "machine", a.m.ID, "disk", d.Name, "seq", r.Seq)
			}
		}
	case KindTag:
		return a.tag(ctx, r)
	case KindResync:
		d, _ := a.m.Disk(r.Disk)
		if r.Flags&FlagDone != 0 {
			d.LastResync = r.Offset
			if len(r.Data) == 16 {
				d.LastResyncCompared = int64(binary.LittleEndian.Uint64(r.Data))
				d.LastResyncSent = int64(binary.LittleEndian.Uint64(r.Data[8:]))
			}
			if d.State == StateResync {
				d.State, d.Reason, d.Ranges = StateProtected, "", nil
				a.log.Info("resync complete", "machine", a.m.ID, "disk", d.Name, "seq", r.Seq)
			}
		} else if d.State != StateInitial && r.Flags&FlagVerify == 0 {
			// A resync starts: the replica is inconsistent from here. A
			// verify leaves the disk as it is unless it finds differences
			// (the process server then marks it).
			d.State, d.Reason = StateResync, string(r.Data)
		}
	}
	return nil
}

// AdoptLog records the id of the agent log the machine's sequence numbers
// belong to: the machine's first agent log, or one the catalog names none
// for yet (a vault from before log ids, or a log that ended before anything
// was held).
func (a *Applier) AdoptLog(ctx context.Context, id string) error {
	prevID, prevEnded := a.m.LogID, a.m.LogEnded
	a.m.LogID, a.m.LogEnded = id, ""
	if err := a.saveMachine(ctx); err != nil {
		a.m.LogID, a.m.LogEnded = prevID, prevEnded
		return err
	}
	return nil
}

// EndLog records that the machine's log ended, and why (the machine was
// re-registered): the next agent's log is taken as a new one whatever its
// id, even in a vault from before log ids.
func (a *Applier) EndLog(ctx context.Context, reason string) error {
	prev := a.m.LogEnded
	a.m.LogEnded = reason
	if err := a.saveMachine(ctx); err != nil {
		a.m.LogEnded = prev
		return err
	}
	return nil
}

// ErrLogNotApplied is returned by StartLog while the old log is not
// applied to its end.
var ErrLogNotApplied = errors.New("the old log is not applied to its end")

// StartLog records that the agent log id is a new log that starts at
// sequence number start, right after the old log, which must be applied
// to its end (start-1) first: its records were acknowledged to the old
// agent, and its tags made their points. It marks the disks and returns
// those the new log does not copy again: the ones whose replica is
// complete or being resynced are marked for a whole-disk resync (a checksum
// compare sends only what differs), the others start their initial copy
// again on a zeroed replica (the copy skips chunks of zeros, which a fresh
// replica holds). So nothing of the new log is joined to the old one by
// sequence number, and no point is made from it before the resync. The
// catalog is written before StartLog returns.
func (a *Applier) StartLog(ctx context.Context, id string, start uint64, reason string) ([]uint32, error) {
	if start != a.m.AppliedSeq+1 {
		return nil, fmt.Errorf("new log of machine %s at seq %d: the replica is applied up to %d: %w", a.m.ID, start, a.m.AppliedSeq, ErrLogNotApplied)
	}
	prev := a.Machine()
	copied := []uint32{}
	for i := range a.m.Disks {
		d := &a.m.Disks[i]
		if d.State == StateProtected || d.State == StateResync {
			d.State, d.Reason, d.Ranges = StateResync, reason, nil
			copied = append(copied, d.Index)
			continue
		}
		// Flushed before the catalog can say so.
		rd := a.disks[d.Index]
		if err := rd.ZeroAt(0, d.Size); err != nil {
			a.m = prev
			return nil, fmt.Errorf("clear the replica of disk %s for its new copy: %w", d.Name, err)
		}
		if err := rd.Flush(ctx); err != nil {
			a.m = prev
			return nil, fmt.Errorf("clear the replica of disk %s for its new copy: %w", d.Name, err)
		}
		if err := a.sums[d.Index].Clear(ctx); err != nil {
			a.m = prev
			return nil, fmt.Errorf("clear the checksums of disk %s for its new copy: %w", d.Name, err)
		}
		d.State, d.Cursor, d.Reason, d.Ranges = StateInitial, 0, "", nil
	}
	a.m.LogID, a.m.LogStart, a.m.LogReason, a.m.LogEnded = id, start, reason, ""
	if err := a.saveMachine(ctx); err != nil {
		a.m = prev
		return nil, err
	}
	a.log.Warn("the agent's new log starts: disks marked", "machine", a.m.ID, "seq", start, "resync", copied, "reason", reason)
	return copied, nil
}

// tag makes a recovery point after record r-1: flush, snapshot every disk,
// then (only then) record the point and the checkpoint.
func (a *Applier) tag(ctx context.Context, r *Record) error {
	if !a.m.Protected() {
		reason := "initial replication is not complete"
		for _, d := range a.m.Disks {
			if d.State == StateResync {
				reason = fmt.Sprintf("disk %s needs a resync: %s", d.Name, d.Reason)
			}
		}
		if a.OnNoPoint != nil {
			a.OnNoPoint(r.Offset, reason)
		}
		return nil
	}
	p := Point{ID: PointID(r.Seq), Seq: r.Seq, Time: time.Unix(0, r.Time).UTC(), Kind: PointCrash}
	if r.Flags&FlagCut != 0 {
		p.Cut = r.Offset
	}
	switch {
	case r.Flags&FlagApp != 0:
		p.Kind = PointApp
	case r.Flags&FlagScan != 0:
		p.Kind = PointInconsistent
	}
	if err := a.flush(ctx); err != nil {
		return fmt.Errorf("point %s: %w", p.ID, err)
	}
	p.Sums = true
	for _, d := range a.m.Disks {
		if err := a.disks[d.Index].Snapshot(ctx, SnapshotName(r.Seq)); err != nil {
			return fmt.Errorf("snapshot disk %s for point %s: %w", d.Name, p.ID, err)
		}
		if err := a.sums[d.Index].Snapshot(ctx, SnapshotName(r.Seq)); err != nil {
			return fmt.Errorf("snapshot the checksums of disk %s for point %s: %w", d.Name, p.ID, err)
		}
		p.Disks = append(p.Disks, d.Index)
		if p.Sizes == nil {
			p.Sizes = map[uint32]int64{}
		}
		p.Sizes[d.Index] = d.Size
	}
	if err := a.cat.PutPoint(ctx, a.m.ID, p); err != nil {
		return fmt.Errorf("record point %s: %w", p.ID, err)
	}
	if err := a.checkpoint(ctx, r.Seq); err != nil {
		return err
	}
	a.log.Debug("recovery point", "machine", a.m.ID, "point", p.ID, "kind", p.Kind)
	if a.OnPoint != nil {
		a.OnPoint(p, r.Offset)
	}
	return nil
}

// checkpoint flushes the replica disks and records seq as applied. If the
// catalog cannot record it (the target full or out of reach), the applied
// seq stays where the catalog has it: a retry applies the records again
// (as a restart would: applying is idempotent from applied_seq), and the
// cache keeps the segment until the catalog says it is applied. Before
// this an applied seq advanced in memory only made the retry skip the
// segment as applied, and the cache dropped it without the catalog
// knowing (a restart then found a sequence gap).
func (a *Applier) checkpoint(ctx context.Context, seq uint64) error {
	if err := a.flush(ctx); err != nil {
		return err
	}
	was := a.m.AppliedSeq
	a.m.AppliedSeq = seq
	if err := a.saveMachine(ctx); err != nil {
		a.m.AppliedSeq = was
		return err
	}
	return nil
}

// flush flushes the replica disks, then hashes the blocks written in part
// (read back from the flushed replica) and flushes the checksums.
func (a *Applier) flush(ctx context.Context) error {
	for idx, rd := range a.disks {
		if err := rd.Flush(ctx); err != nil {
			return fmt.Errorf("flush replica of disk %d: %w", idx, err)
		}
	}
	for idx, s := range a.sums {
		if err := s.Settle(ReadFull(a.disks[idx])); err != nil {
			return fmt.Errorf("checksums of disk %d: %w", idx, err)
		}
		if err := s.Flush(ctx); err != nil {
			return fmt.Errorf("flush the checksums of disk %d: %w", idx, err)
		}
	}
	return nil
}

// SkipTo records every record up to seq as handled without applying it: after
// a segment is lost or corrupt the replica can no longer be proven equal to
// the source (the disks are marked for resync first), but later segments can
// still be applied so the cache drains.
func (a *Applier) SkipTo(ctx context.Context, seq uint64) error {
	if seq <= a.m.AppliedSeq {
		return nil
	}
	if a.m.Protected() {
		return fmt.Errorf("skip to seq %d: machine %s is not marked for resync", seq, a.m.ID)
	}
	return a.checkpoint(ctx, seq)
}

// AppliedSeq returns the last applied sequence number.
func (a *Applier) AppliedSeq() uint64 { return a.m.AppliedSeq }

// MarkResync records that a disk (or, with index < 0, every disk) of the
// machine needs a resync of the whole disk, and why: the ranges a resync
// already due was limited to go (its callers know no more of what
// changed: a sequence gap, a corrupt segment, failback's writes).
func (a *Applier) MarkResync(ctx context.Context, index int64, reason string) error {
	for i := range a.m.Disks {
		if index < 0 || int64(a.m.Disks[i].Index) == index {
			a.m.Disks[i].State = StateResync
			a.m.Disks[i].Reason = reason
			a.m.Disks[i].Ranges = nil
		}
	}
	return a.saveMachine(ctx)
}

// MarkDamage records replica blocks found not to match their checksums
// (offsets of 4 KiB blocks of disk idx): their checksums are marked damaged
// and flushed at once, so recovery fails on them and the next compare asks
// the source for them again. With a reason, the disk is also marked for a
// resync of those blocks (added to the ranges of a resync already due).
func (a *Applier) MarkDamage(ctx context.Context, idx uint32, blocks []int64, reason string) error {
	s, ok := a.sums[idx]
	d, ok2 := a.m.Disk(idx)
	if !ok || !ok2 {
		return fmt.Errorf("mark damage: no disk %d", idx)
	}
	for _, off := range blocks {
		if err := s.MarkDamaged(off / HashBlock); err != nil {
			return err
		}
	}
	if err := a.flush(ctx); err != nil {
		return err
	}
	if reason == "" || d.State == StateInitial {
		return nil
	}
	if d.State != StateResync {
		d.State, d.Reason, d.Ranges = StateResync, reason, BlockRanges(blocks)
	} else if len(d.Ranges) > 0 {
		// Already due for some ranges: add these (due for the whole disk,
		// nothing to add).
		d.Ranges = append(d.Ranges, BlockRanges(blocks)...)
		d.Reason = reason + "; " + d.Reason
	}
	return a.saveMachine(ctx)
}

// DeletePoint prunes a point: its catalog entry first (so it is never listed
// without its snapshots), then the disk snapshots.
func (a *Applier) DeletePoint(ctx context.Context, p Point) error {
	if err := a.cat.DeletePoint(ctx, a.m.ID, p); err != nil {
		return err
	}
	// Every disk of the machine (deleting a missing snapshot is a no-op), so
	// a point listed without its disk list is pruned whole.
	for idx, rd := range a.disks {
		if err := rd.DeleteSnapshot(ctx, SnapshotName(p.Seq)); err != nil {
			return fmt.Errorf("delete snapshot of point %s on disk %d: %w", p.ID, idx, err)
		}
		if err := a.sums[idx].DeleteSnapshot(ctx, SnapshotName(p.Seq)); err != nil {
			return fmt.Errorf("delete the checksums of point %s on disk %d: %w", p.ID, idx, err)
		}
	}
	return nil
}

// Close closes the replica disks.
func (a *Applier) Close() error {
	var first error
	for _, rd := range a.disks {
		if err := rd.Close(); err != nil && first == nil {
			first = err
		}
	}
	for _, s := range a.sums {
		if err := s.Close(); err != nil && first == nil {
			first = err
		}
	}
	a.disks, a.sums = map[uint32]ReplicaDisk{}, map[uint32]*Sums{}
	return first
}
