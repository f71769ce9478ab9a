package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

// Any point in time: a recovery point is a snapshot of the replica disks,
// and the segments applied after it are kept on the target for the policy's
// window. To recover the disks as of an instant t, the newest point at or
// before t is written out and the kept records after it are replayed, up to
// the last one whose time is at or before t. Record times never go back
// along the sequence (the agent's spool clamps them), so this is exactly a
// prefix of the machine's log: every change completed before t, and no
// change made after it. Times are the agent's clock.

// ErrTimeOutOfRange is returned when the target cannot rebuild the disks at
// the requested time.
var ErrTimeOutOfRange = errors.New("time out of the recoverable range")

// TimePlan is how RecoverTime rebuilds a machine at an instant.
type TimePlan struct {
	At       time.Time
	Base     Point
	Segments []SegmentInfo
}

// PlanTime finds the base point and the kept segments to replay for time at.
func (c *Catalog) PlanTime(ctx context.Context, machineID string, at time.Time) (TimePlan, error) {
	plan := TimePlan{At: at}
	ps, err := c.Points(ctx, machineID)
	if err != nil {
		return plan, err
	}
	base := -1
	for i, p := range ps {
		if !p.Time.After(at) {
			base = i
		}
	}
	if base < 0 {
		if len(ps) == 0 {
			return plan, fmt.Errorf("machine %s has no recovery points: %w", machineID, ErrTimeOutOfRange)
		}
		return plan, fmt.Errorf("%s is before the oldest recovery point (%s): %w", at.UTC().Format(time.RFC3339Nano), ps[0].Time.Format(time.RFC3339Nano), ErrTimeOutOfRange)
	}
	segs, err := c.Segments(ctx, machineID)
	if err != nil {
		return plan, err
	}
	full, err := c.FindPoint(ctx, machineID, ps[base].ID)
	if err != nil {
		return plan, err
	}
	plan.Base = full
	next := full.Seq + 1
	newest := full.Time
	for _, si := range segs {
		if si.Last < next {
			continue
		}
		if si.First > next {
			return plan, fmt.Errorf("the changes %d to %d after point %s are no longer kept on the target: %w", next, si.First-1, full.ID, ErrTimeOutOfRange)
		}
		plan.Segments = append(plan.Segments, si)
		next = si.Last + 1
		newest = si.LastTime
		if si.LastTime.After(at) {
			return plan, nil // this segment holds the end of the prefix
		}
	}
	// Every kept change is at or before at: changes after the last kept
	// one may exist but not be on the target yet.
	if at.After(newest) {
		return plan, fmt.Errorf("%s is after the newest change on the target (%s): %w", at.UTC().Format(time.RFC3339Nano), newest.Format(time.RFC3339Nano), ErrTimeOutOfRange)
	}
	return plan, nil
}

// RecoverTime writes every disk of a machine as of time at to
// dir/<disk>.img, straight from the target: the base point, checked against
// its block checksums (RecoverPoint), then the kept changes after it, each
// checked by its record checksum. It returns the plan used, the base
// point's disks and the sequence number of the last change included.
func RecoverTime(ctx context.Context, cat *Catalog, m MachineCatalog, at time.Time, dir string, opts RecoverOptions) (TimePlan, []RecoveredDisk, uint64, error) {
	plan, err := cat.PlanTime(ctx, m.ID, at)
	if err != nil {
		return plan, nil, 0, err
	}
	disks, err := RecoverPoint(ctx, cat, m, plan.Base, dir, opts)
	if err != nil {
		return plan, disks, 0, err
	}
	plan2, last, err := replayTime(ctx, cat, m, plan, dir)
	return plan2, disks, last, err
}

func replayTime(ctx context.Context, cat *Catalog, m MachineCatalog, plan TimePlan, dir string) (TimePlan, uint64, error) {
	files := map[uint32]*os.File{}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, d := range m.Disks {
		f, err := os.OpenFile(filepath.Join(dir, d.Name+".img"), os.O_RDWR, 0)
		if err != nil {
			return plan, 0, err
		}
		files[d.Index] = f
	}
	last, err := ReplaySegments(ctx, plan, func(si SegmentInfo) ([]byte, error) { return cat.Segment(ctx, si) }, files)
	if err != nil {
		return plan, last, err
	}
	for _, f := range files {
		if err := f.Sync(); err != nil {
			return plan, last, err
		}
	}
	return plan, last, nil
}

// ReplaySegments applies to the disk images the records of the plan's
// segments after its base point, up to the last record at or before the
// plan's time. get fetches a segment. It returns the last sequence number
// applied (the base point's if none).
func ReplaySegments(ctx context.Context, plan TimePlan, get func(SegmentInfo) ([]byte, error), files map[uint32]*os.File) (uint64, error) {
	ws := make(map[uint32]io.WriterAt, len(files))
	for k, f := range files {
		ws[k] = f
	}
	return ReplayInto(ctx, plan, get, ws)
}

// ReplayInto is ReplaySegments into any writers (a failover's overlays).
func ReplayInto(ctx context.Context, plan TimePlan, get func(SegmentInfo) ([]byte, error), files map[uint32]io.WriterAt) (uint64, error) {
	last := plan.Base.Seq
	codec := DefaultCodec()
	zero := make([]byte, 1<<20)
	for _, si := range plan.Segments {
		data, err := get(si)
		if err != nil {
			return last, fmt.Errorf("read segment %d-%d: %w", si.First, si.Last, err)
		}
		done := false
		_, err = ScanSegment(data, false, func(f *Frame) error {
			if done {
				return nil
			}
			recs, _, err := codec.Records(f, nil)
			if err != nil {
				return err
			}
			for i := range recs {
				r := &recs[i]
				if r.Seq <= last {
					continue
				}
				if time.Unix(0, r.Time).After(plan.At) {
					done = true
					return nil
				}
				if err := replay(files, r, zero); err != nil {
					return err
				}
				last = r.Seq
			}
			return ctx.Err()
		})
		if err != nil {
			return last, fmt.Errorf("segment %d-%d: %w", si.First, si.Last, err)
		}
		if done {
			break
		}
	}
	return last, nil
}

func replay(files map[uint32]io.WriterAt, r *Record, zero []byte) error {
	switch r.Kind {
	case KindWrite, KindBase, KindZero, KindTrim:
	default:
		return nil
	}
	f, ok := files[r.Disk]
	if !ok {
		return fmt.Errorf("record %d names unknown disk %d: %w", r.Seq, r.Disk, ErrCorrupt)
	}
	if r.Kind.HasData() {
		_, err := f.WriteAt(r.Data, int64(r.Offset))
		return err
	}
	for off, n := int64(r.Offset), int64(r.Length); n > 0; {
		k := min(n, int64(len(zero)))
		if _, err := f.WriteAt(zero[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}
