package replication

import (
	"encoding/binary"
	"fmt"
	"time"
)

// A segment is an immutable file of consecutive records of one machine: a
// header, the DATA frames as they arrived from the agent, and a SEAL frame
// naming the last sequence number and the record count. Segments are named by
// their fixed-width, sortable sequence range (SegmentName).
//
// Header layout (little endian, 32 bytes):
//
//	0  magic   "ASRSEG"
//	6  version u16
//	8  first   u64 first sequence number
//	16 created i64 Unix ns
//	24 -       u32 (zero)
//	28 hcrc    u32 CRC-32C of bytes 0..27
const (
	SegmentHeaderSize = 32
	SegmentVersion    = 1
)

var segmentMagic = [6]byte{'A', 'S', 'R', 'S', 'E', 'G'}

// SegmentHeader returns the header of a segment starting at first.
func SegmentHeader(first uint64, created time.Time) []byte {
	h := make([]byte, SegmentHeaderSize)
	copy(h, segmentMagic[:])
	binary.LittleEndian.PutUint16(h[6:], SegmentVersion)
	binary.LittleEndian.PutUint64(h[8:], first)
	binary.LittleEndian.PutUint64(h[16:], uint64(created.UnixNano()))
	binary.LittleEndian.PutUint32(h[28:], Checksum(h[:28]))
	return h
}

// ParseSegmentHeader validates a segment header and returns its first sequence number.
func ParseSegmentHeader(h []byte) (uint64, error) {
	if len(h) < SegmentHeaderSize {
		return 0, fmt.Errorf("segment header: %d bytes: %w", len(h), ErrCorrupt)
	}
	if [6]byte(h[0:6]) != segmentMagic {
		return 0, fmt.Errorf("segment header: bad magic: %w", ErrCorrupt)
	}
	if got, want := Checksum(h[:28]), binary.LittleEndian.Uint32(h[28:]); got != want {
		return 0, fmt.Errorf("segment header checksum %08x, want %08x: %w", got, want, ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(h[6:]); v != SegmentVersion {
		return 0, fmt.Errorf("segment version %d not supported (this build reads %d): %w", v, SegmentVersion, ErrCorrupt)
	}
	return binary.LittleEndian.Uint64(h[8:]), nil
}

// SealFrame returns the frame that closes a segment.
func SealFrame(last uint64, count uint32) Frame {
	return Frame{Type: FrameSeal, Seq: last, Count: count}
}

// SegmentName is the object and file name of a segment holding [first, last].
func SegmentName(first, last uint64) string {
	return fmt.Sprintf("%016x-%016x.seg", first, last)
}

// ParseSegmentName is the inverse of SegmentName.
func ParseSegmentName(name string) (first, last uint64, ok bool) {
	if len(name) != 16+1+16+4 || name[16] != '-' || name[33:] != ".seg" {
		return 0, 0, false
	}
	if _, err := fmt.Sscanf(name[:33], "%016x-%016x", &first, &last); err != nil || last < first {
		return 0, 0, false
	}
	return first, last, true
}

// SegmentScan is what ScanSegment learned about a segment's bytes.
type SegmentScan struct {
	First, Last uint64 // sequence range of the complete DATA frames (Last = First-1 if none)
	Records     uint32
	Frames      int
	ValidLen    int  // bytes up to the end of the last complete frame
	Sealed      bool // a SEAL frame matching the content ends the segment
}

// ScanSegment walks the frames of a segment, calling fn (if not nil) for each
// DATA frame in order; the frame's Payload aliases data. In a sealed segment any damage is an error wrapping
// ErrCorrupt. With allowTail, the scan instead stops quietly at the first
// incomplete or damaged frame: that is how an unsealed cache file is recovered
// after a crash (the damaged tail was never acknowledged).
func ScanSegment(data []byte, allowTail bool, fn func(f *Frame) error) (SegmentScan, error) {
	var kfn func(*Frame, FrameKey) error
	if fn != nil {
		kfn = func(f *Frame, _ FrameKey) error { return fn(f) }
	}
	return scanKeyed(data, allowTail, kfn)
}

// scanKeyed is ScanSegment, fn also given each DATA frame's key.
func scanKeyed(data []byte, allowTail bool, fn func(f *Frame, k FrameKey) error) (SegmentScan, error) {
	var s SegmentScan
	first, err := ParseSegmentHeader(data)
	if err != nil {
		return s, err
	}
	s.First, s.Last = first, first-1
	s.ValidLen = SegmentHeaderSize
	for rest := data[SegmentHeaderSize:]; len(rest) > 0; {
		f, n, err := sliceFrame(rest)
		if err != nil {
			if allowTail {
				return s, nil
			}
			return s, fmt.Errorf("segment frame %d at byte %d: %v: %w", s.Frames, s.ValidLen, err, ErrCorrupt)
		}
		h := rest[:FrameHeaderSize]
		rest = rest[n:]
		end := len(data) - len(rest)
		switch f.Type {
		case FrameData:
			if f.Seq != s.Last+1 || f.Count == 0 || s.Records+f.Count < s.Records || s.Last+uint64(f.Count) < s.Last {
				if allowTail {
					return s, nil
				}
				return s, fmt.Errorf("segment frame %d: seq %d count %d, want seq %d: %w", s.Frames, f.Seq, f.Count, s.Last+1, ErrCorrupt)
			}
			if fn != nil {
				if err := fn(&f, headerKey(h)); err != nil {
					return s, err
				}
			}
			s.Last += uint64(f.Count)
			s.Records += f.Count
			s.Frames++
			s.ValidLen = end
		case FrameSeal:
			if f.Seq != s.Last || f.Count != s.Records || len(rest) != 0 {
				return s, fmt.Errorf("segment seal says last %d count %d, content has last %d count %d: %w", f.Seq, f.Count, s.Last, s.Records, ErrCorrupt)
			}
			s.Sealed = true
			s.ValidLen = end
			return s, nil
		default:
			if allowTail {
				return s, nil
			}
			return s, fmt.Errorf("segment holds a %s frame: %w", f.Type, ErrCorrupt)
		}
	}
	if !allowTail {
		return s, fmt.Errorf("segment %d-%d is not sealed: %w", s.First, s.Last, ErrCorrupt)
	}
	return s, nil
}

// sliceFrame verifies the frame at the front of b and returns it, its
// Payload aliasing b, with the bytes it takes. The payload length is checked
// against the bytes present before anything else is done with it.
func sliceFrame(b []byte) (Frame, int, error) {
	if len(b) < FrameHeaderSize {
		return Frame{}, 0, &ProtocolError{"truncated header"}
	}
	f, n, err := ParseFrameHeader(b[:FrameHeaderSize])
	if err != nil {
		return f, 0, err
	}
	if n > len(b)-FrameHeaderSize {
		return f, 0, &ProtocolError{fmt.Sprintf("truncated payload (%d of %d bytes)", len(b)-FrameHeaderSize, n)}
	}
	p := b[FrameHeaderSize : FrameHeaderSize+n]
	if got, want := Checksum(p), frameCRC(b); got != want {
		return f, 0, &ProtocolError{fmt.Sprintf("payload checksum %08x, want %08x", got, want)}
	}
	f.Payload = p
	return f, FrameHeaderSize + n, nil
}

// DescribeSegment verifies a sealed segment and returns its range and the
// time of its last record (decoding only the last frame's records).
func DescribeSegment(seg []byte) (SegmentInfo, error) {
	var last Frame
	scan, err := ScanSegment(seg, false, func(f *Frame) error {
		last = *f
		return nil
	})
	if err != nil {
		return SegmentInfo{}, err
	}
	if scan.Records == 0 {
		return SegmentInfo{}, fmt.Errorf("segment %d holds no records: %w", scan.First, ErrCorrupt)
	}
	recs, _, err := DefaultCodec().Records(&last, nil)
	if err != nil {
		return SegmentInfo{}, err
	}
	return SegmentInfo{First: scan.First, Last: scan.Last, LastTime: time.Unix(0, recs[len(recs)-1].Time).UTC()}, nil
}
