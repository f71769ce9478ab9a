package replication

import "fmt"

// CheckData verifies a DATA frame completely without keeping its records:
// the payload decompresses to the announced length, and holds exactly the
// announced count of records, with contiguous sequence numbers from the
// frame's, each with a valid checksum, and (if disk is not nil) each on a
// disk disk knows the size of and inside it. buf is reused for the
// decompressed payload and returned. A process server calls it before it
// writes a frame to its cache, so nothing malformed or damaged is ever
// acknowledged: the agent still holds it and sends it again.
func (c *Codec) CheckData(f *Frame, buf []byte, disk func(index uint32) (size int64, ok bool)) ([]byte, error) {
	_, buf, err := c.checkData(f, buf, disk, false)
	return buf, err
}

// CheckRecords is CheckData that also returns the records, which alias
// the frame's payload (uncompressed) or the returned buffer (decompressed):
// the process server's reader hands them to the applier (FrameKey).
func (c *Codec) CheckRecords(f *Frame, buf []byte, disk func(index uint32) (size int64, ok bool)) ([]Record, []byte, error) {
	return c.checkData(f, buf, disk, true)
}

func (c *Codec) checkData(f *Frame, buf []byte, disk func(index uint32) (size int64, ok bool), keep bool) ([]Record, []byte, error) {
	if f.Type == FrameData && f.Count == 0 {
		return nil, buf, fmt.Errorf("data frame at seq %d holds no records: %w", f.Seq, ErrCorrupt)
	}
	raw, buf, err := c.payload(f, buf)
	if err != nil {
		return nil, buf, err
	}
	// A count the bytes cannot hold is refused before anything is read
	// (or allocated from it).
	if uint64(f.Count) > uint64(len(raw)/RecordHeaderSize) {
		return nil, buf, fmt.Errorf("frame at seq %d claims %d records in %d bytes: %w", f.Seq, f.Count, len(raw), ErrCorrupt)
	}
	var recs []Record
	if keep {
		recs = make([]Record, 0, f.Count)
	}
	n := uint32(0)
	for b := raw; len(b) > 0; n++ {
		r, used, err := DecodeRecord(b)
		if err != nil {
			return nil, buf, err
		}
		if want := f.Seq + uint64(n); r.Seq != want {
			return nil, buf, fmt.Errorf("record seq %d, want %d: %w", r.Seq, want, ErrCorrupt)
		}
		if disk != nil && r.Kind != KindTag {
			size, ok := disk(r.Disk)
			switch {
			case !ok:
				return nil, buf, fmt.Errorf("record %d names unknown disk %d: %w", r.Seq, r.Disk, ErrCorrupt)
			case r.Kind == KindProgress && r.Offset > uint64(size):
				return nil, buf, fmt.Errorf("record %d: progress %d past disk end %d: %w", r.Seq, r.Offset, size, ErrCorrupt)
			case r.Kind != KindProgress && r.Kind != KindResync && r.End() > uint64(size):
				return nil, buf, fmt.Errorf("record %d: %s at %d+%d past disk end %d: %w", r.Seq, r.Kind, r.Offset, r.Length, size, ErrCorrupt)
			}
		}
		if keep {
			if n >= f.Count {
				return nil, buf, fmt.Errorf("frame at seq %d holds more records than the %d its header says: %w", f.Seq, f.Count, ErrCorrupt)
			}
			recs = append(recs, r)
		}
		b = b[used:]
	}
	if n != f.Count {
		return nil, buf, fmt.Errorf("frame at seq %d holds %d records, header says %d: %w", f.Seq, n, f.Count, ErrCorrupt)
	}
	return recs, buf, nil
}
