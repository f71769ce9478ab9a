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
	if f.Type == FrameData && f.Count == 0 {
		return buf, fmt.Errorf("data frame at seq %d holds no records: %w", f.Seq, ErrCorrupt)
	}
	raw, buf, err := c.payload(f, buf)
	if err != nil {
		return buf, err
	}
	// A count the bytes cannot hold is refused before anything is read.
	if uint64(f.Count) > uint64(len(raw)/RecordHeaderSize) {
		return buf, fmt.Errorf("frame at seq %d claims %d records in %d bytes: %w", f.Seq, f.Count, len(raw), ErrCorrupt)
	}
	n := uint32(0)
	for b := raw; len(b) > 0; n++ {
		r, used, err := DecodeRecord(b)
		if err != nil {
			return buf, err
		}
		if want := f.Seq + uint64(n); r.Seq != want {
			return buf, fmt.Errorf("record seq %d, want %d: %w", r.Seq, want, ErrCorrupt)
		}
		if disk != nil && r.Kind != KindTag {
			size, ok := disk(r.Disk)
			switch {
			case !ok:
				return buf, fmt.Errorf("record %d names unknown disk %d: %w", r.Seq, r.Disk, ErrCorrupt)
			case r.Kind == KindProgress && r.Offset > uint64(size):
				return buf, fmt.Errorf("record %d: progress %d past disk end %d: %w", r.Seq, r.Offset, size, ErrCorrupt)
			case r.Kind != KindProgress && r.Kind != KindResync && r.End() > uint64(size):
				return buf, fmt.Errorf("record %d: %s at %d+%d past disk end %d: %w", r.Seq, r.Kind, r.Offset, r.Length, size, ErrCorrupt)
			}
		}
		b = b[used:]
	}
	if n != f.Count {
		return buf, fmt.Errorf("frame at seq %d holds %d records, header says %d: %w", f.Seq, n, f.Count, ErrCorrupt)
	}
	return buf, nil
}
