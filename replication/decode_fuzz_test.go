package replication

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/asrdr/asr/replication/allocguard"
)

// Fuzzers for the decoders of untrusted bytes beyond the wire's frames:
// segments (cache files, kept segments on the target), catalog objects and
// the JSON control messages. Each checks that a call allocates no more
// than its input justifies (replication/allocguard), which is how an
// allocation sized from an unchecked count shows up.

// seedSegment builds a sealed segment of frames of small records from first.
func seedSegment(c *Codec, first uint64, frames, per int) []byte {
	seg := SegmentHeader(first, time.Unix(1, 0))
	next := first
	for range frames {
		recs := seedRecords(next, per)
		f := c.DataFrame(encodeRecords(recs), next, uint32(per), nil)
		seg = AppendFrame(seg, &f)
		next += uint64(per)
	}
	seal := SealFrame(next-1, uint32(frames*per))
	return AppendFrame(seg, &seal)
}

// fixSegment recomputes, in place, the checksums of a segment's header and
// frames and returns it.
func fixSegment(b []byte) []byte {
	if len(b) < SegmentHeaderSize {
		return b
	}
	binary.LittleEndian.PutUint32(b[28:], Checksum(b[:28]))
	fixFrames(b[SegmentHeaderSize:])
	return b
}

// FuzzScanSegment feeds segment files to ScanSegment (sealed and with a
// torn tail allowed, the two ways the process server reads them),
// decoding every DATA frame, and to DescribeSegment (how a segment is kept
// on the target). Each input is tried as it is and with its checksums
// recomputed.
func FuzzScanSegment(f *testing.F) {
	c := warmCodec(f)
	good := seedSegment(c, 10, 2, 2)
	seal := good[len(good)-FrameHeaderSize:]
	f.Add(good)
	f.Add(good[:len(good)-FrameHeaderSize])    // unsealed
	f.Add(good[:len(good)-FrameHeaderSize-7])  // torn
	f.Add(SegmentHeader(5, time.Unix(0, 0)))   // empty
	f.Add(append(slices.Clone(good), seal...)) // a frame after the seal
	for _, bad := range hugeCountFrames(f) {
		f.Add(hugeCountSegment(bad)) // issue 8: the cached segment of the bad frame
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		scanSegment(t, c, data)
		scanSegment(t, c, fixSegment(slices.Clone(data)))
	})
}

func scanSegment(t *testing.T, c *Codec, data []byte) {
	bound := allocguard.Bound(len(data))
	var s SegmentScan
	var err error
	allocguard.Check(t, "ScanSegment", bound, func() { s, err = ScanSegment(data, true, nil) })
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("ScanSegment error %v does not wrap ErrCorrupt", err)
		}
		return
	}
	if s.ValidLen < SegmentHeaderSize || s.ValidLen > len(data) {
		t.Fatalf("valid length %d of %d bytes", s.ValidLen, len(data))
	}
	// The valid prefix scans the same.
	again, err := ScanSegment(data[:s.ValidLen], true, nil)
	if err != nil || again != s {
		t.Fatalf("rescan of the valid part: %+v, %v; first scan %+v", again, err, s)
	}
	var n uint32
	var raw uint64
	_, err = ScanSegment(data, false, func(f *Frame) error {
		recs := decodeFrame(t, c, f)
		if recs == nil {
			return ErrCorrupt
		}
		n += uint32(len(recs))
		raw += uint64(f.RawLen)
		return nil
	})
	// PrepareSegment (how the applier reads a cached segment) holds every
	// frame decoded (its records, their bytes, the checksums of their 4 KiB
	// blocks) and, after a frame that fails, no more than one frame's
	// buffer per worker (as DescribeSegment's one frame): nothing a count
	// in the segment claims.
	var p *PreparedSegment
	var perr error
	inFlight := uint64(runtime.GOMAXPROCS(0)) * MaxFrameRaw
	allocguard.Check(t, "PrepareSegment", bound+2*allocguard.PerByte*raw+inFlight, func() { p, perr = PrepareSegment(data) })
	if (perr == nil) != (err == nil) || perr != nil && !errors.Is(perr, ErrCorrupt) {
		t.Fatalf("PrepareSegment: %v; the sealed scan and decoding: %v", perr, err)
	}
	if err != nil {
		return
	}
	if !s.Sealed || n != s.Records {
		t.Fatalf("sealed scan decoded %d records; scan says %+v", n, s)
	}
	if p.First != s.First || p.Last != s.Last || len(p.recs) != int(n) {
		t.Fatalf("PrepareSegment %d-%d with %d records, scan %d-%d with %d", p.First, p.Last, len(p.recs), s.First, s.Last, n)
	}
	// Taking the records a process server's reader checked (the
	// hand-off, keyed by each frame as it was written) prepares the same.
	known := map[FrameKey][]Record{}
	ScanSegment(data, false, func(f *Frame) error {
		var h [FrameHeaderSize]byte
		if recs, _, err := c.CheckRecords(f, nil, nil); err == nil {
			known[EncodeFrameHeader(&h, f)] = recs
		}
		return nil
	})
	taken := 0
	p2, err := PrepareSegmentFrom(data, func(k FrameKey) ([]Record, bool) {
		r, ok := known[k]
		if ok {
			taken++
		}
		return r, ok
	})
	if err != nil || taken != len(known) || !reflect.DeepEqual(p, p2) {
		t.Fatalf("PrepareSegmentFrom with the checked records (%d of %d taken): %v, or another segment", taken, len(known), err)
	}
	var si SegmentInfo
	allocguard.Check(t, "DescribeSegment", bound+MaxFrameRaw, func() { si, err = DescribeSegment(data) })
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("DescribeSegment error %v does not wrap ErrCorrupt", err)
		}
		return
	}
	if si.First != s.First || si.Last != s.Last {
		t.Fatalf("DescribeSegment %d-%d, scan %d-%d", si.First, si.Last, s.First, s.Last)
	}
}

// fixObject recomputes, in place, the trailing checksum of a PlainCodec
// object and returns it.
func fixObject(b []byte) []byte {
	if len(b) >= 4 {
		binary.LittleEndian.PutUint32(b[len(b)-4:], Checksum(b[:len(b)-4]))
	}
	return b
}

// FuzzObjectOpen feeds stored catalog objects to the plain and the sealed
// codecs: they must refuse what is damaged, with ErrCorrupt or
// ErrNotSealed, and allocate no more than the object's size.
func FuzzObjectOpen(f *testing.F) {
	key := bytes.Repeat([]byte{7}, 32)
	sc, err := NewSealedCodec(key)
	if err != nil {
		f.Fatal(err)
	}
	plain, _ := PlainCodec{}.Seal("machines/m/machine", "machine", []byte(`{"id":"m"}`))
	sealed, err := sc.Seal("machines/m/machine", "machine", []byte(`{"id":"m"}`))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(plain, "machine")
	f.Add(sealed, "machine")
	f.Add(plain[:13], "machine")
	f.Add([]byte("ASROBJ\x01\x00\xff\xff"), "")
	f.Fuzz(func(t *testing.T, data []byte, kind string) {
		const key = "machines/m/machine"
		bound := allocguard.Bound(len(data) + len(kind))
		for _, b := range [][]byte{data, fixObject(slices.Clone(data))} {
			var p []byte
			var err error
			allocguard.Check(t, "PlainCodec.Open", bound, func() { p, err = PlainCodec{}.Open(key, kind, b) })
			if err == nil {
				if again, _ := (PlainCodec{}).Seal(key, kind, p); !bytes.Equal(again, b) {
					t.Fatalf("accepted object does not re-seal to its bytes")
				}
			} else if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("PlainCodec.Open error %v does not wrap ErrCorrupt", err)
			}
			allocguard.Check(t, "SealedCodec.Open", bound, func() { p, err = sc.Open(key, kind, b) })
			if err != nil && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNotSealed) {
				t.Fatalf("SealedCodec.Open error %v wraps neither ErrCorrupt nor ErrNotSealed", err)
			}
		}
	})
}

// jsonBound is the allocation bound of decoding a JSON control message of
// n bytes: encoding/json grows a slice by appending (up to about five
// times its final size along the way), and a 3-byte element ("{},") can
// be a 72-byte DiskInfo. The payload is at most MaxControlPayload.
func jsonBound(n int) uint64 { return 400*uint64(n) + allocguard.Slack }

// controlMessage returns a new value of the message type a frame of type t
// carries, or nil for a frame without a JSON payload.
func controlMessage(t FrameType) interface{ Validate() error } {
	switch t {
	case FrameHello:
		return &Hello{}
	case FrameWelcome:
		return &Welcome{}
	case FrameStatus:
		return &Status{}
	case FramePolicy:
		return &AgentPolicy{}
	case FrameResync:
		return &ResyncJob{}
	case FrameHashes:
		return &Hashes{}
	case FrameWant:
		return &Want{}
	case FrameFreeze, FrameThaw:
		return &Freeze{}
	}
	return nil
}

// FuzzControlMessage decodes JSON control payloads the way both ends do
// (DecodeJSON, then Validate): no panic, an allocation in proportion to
// the payload, and what Validate accepts keeps the protocol's limits.
func FuzzControlMessage(f *testing.F) {
	add := func(t FrameType, v any) {
		fr, err := JSONFrame(t, v)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(t), fr.Payload)
	}
	add(FrameHello, Hello{MachineID: "00ff", Disks: []DiskInfo{{Index: 0, Name: "d0", Size: 1 << 30,
		Diverged: "forced shutdown", DivergedRanges: []Range{{Off: 0, Len: 4 << 20}}}}, NextSeq: 9, SpoolFirst: 1})
	add(FrameWelcome, Welcome{DurableSeq: 3, Policy: &AgentPolicy{CrashInterval: int64(time.Minute), Group: "g"}})
	add(FrameStatus, Status{Disks: []DiskProgress{{Index: 0, Cursor: 5}}, Events: []AgentEvent{{Kind: "k", Message: "m"}}})
	add(FrameResync, ResyncJob{ID: 1, Disk: 0, Reason: "r", Ranges: []Range{{Off: 1 << 20, Len: 1 << 20}}})
	add(FrameHashes, Hashes{Job: 1, Batch: 1, Offs: []int64{0, HashChunk}, Hashes: make([]byte, 32)})
	add(FrameWant, Want{Job: 1, Batch: 1, Chunks: []WantChunk{{Off: HashChunk, Leaves: make([]byte, 32)}}})
	add(FrameFreeze, Freeze{ID: "planned-1", Req: 7})
	add(FrameThaw, Freeze{ID: "planned-1"})
	add(FrameStatus, Status{Failover: "planned-1"})
	f.Add(uint8(FrameFreeze), []byte(`{"id":"../x","req":-1}`))
	f.Add(uint8(FrameHello), []byte(`{"disks":[{},{},{},{},{},{},{},{}]}`))
	f.Add(uint8(FrameHashes), []byte(`{"offs":[0,0,0,0],"hashes":"AAAA"}`))
	f.Fuzz(func(t *testing.T, typ uint8, payload []byte) {
		v := controlMessage(FrameType(typ))
		if v == nil || len(payload) > MaxControlPayload {
			return
		}
		fr := Frame{Type: FrameType(typ), Payload: payload}
		var err error
		allocguard.Check(t, "DecodeJSON", jsonBound(len(payload)), func() { err = DecodeJSON(&fr, v) })
		if err != nil {
			return
		}
		if err := v.Validate(); err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Validate error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		checkLimits(t, v)
	})
}

// checkLimits fails t if an accepted message breaks a limit.
func checkLimits(t *testing.T, v any) {
	t.Helper()
	rangesOK := func(rs []Range) bool {
		for _, r := range rs {
			if r.Off < 0 || r.Len <= 0 || r.Off+r.Len > MaxDiskSize {
				return false
			}
		}
		return len(rs) <= MaxDivergedRanges
	}
	switch m := v.(type) {
	case *Hello:
		if len(m.Disks) > MaxDisks {
			t.Fatalf("hello with %d disks accepted", len(m.Disks))
		}
		for _, d := range m.Disks {
			if !ValidDiskName(d.Name) || d.Size < 0 || d.Size > MaxDiskSize || !rangesOK(d.DivergedRanges) {
				t.Fatalf("hello disk %+v accepted", d)
			}
		}
	case *Status:
		if len(m.Disks) > MaxDisks || len(m.Events) > MaxStatusEvents {
			t.Fatalf("status with %d disks, %d events accepted", len(m.Disks), len(m.Events))
		}
		if m.Failover != "" && !ValidFreezeID(m.Failover) {
			t.Fatalf("status with failover id %q accepted", m.Failover)
		}
	case *Freeze:
		if !ValidFreezeID(m.ID) {
			t.Fatalf("freeze id %q accepted", m.ID)
		}
	case *ResyncJob:
		if !rangesOK(m.Ranges) {
			t.Fatalf("resync job ranges %v accepted", m.Ranges)
		}
	case *Hashes:
		if len(m.Offs) > MaxHashBatch || len(m.Hashes) != 16*len(m.Offs) {
			t.Fatalf("hashes of %d chunks, %d bytes accepted", len(m.Offs), len(m.Hashes))
		}
	case *Want:
		if len(m.Chunks) > MaxHashBatch {
			t.Fatalf("want of %d chunks accepted", len(m.Chunks))
		}
		for _, c := range m.Chunks {
			if len(c.Leaves)%16 != 0 || len(c.Leaves) > 16*HashFanout || c.Off < 0 {
				t.Fatalf("want chunk at %d with %d bytes of leaves accepted", c.Off, len(c.Leaves))
			}
		}
	}
}
