package replication

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"time"
)

func mustRecords(t testing.TB, first uint64, n int, r *rand.Rand) []Record {
	t.Helper()
	recs := make([]Record, n)
	for i := range recs {
		rec := Record{Seq: first + uint64(i), Time: int64(i), Disk: uint32(r.IntN(3)), Offset: uint64(r.IntN(1000)) * 512}
		switch r.IntN(4) {
		case 0:
			rec.Kind = KindZero
			rec.Length = 4096
		case 1:
			rec.Kind = KindTag
			rec.Offset = uint64(r.IntN(100))
		default:
			rec.Kind = KindWrite
			rec.Data = make([]byte, 1+r.IntN(8192))
			for j := range rec.Data {
				rec.Data[j] = byte(j / 7)
			}
			rec.Length = uint32(len(rec.Data))
		}
		recs[i] = rec
	}
	return recs
}

func encodeRecords(recs []Record) []byte {
	var b []byte
	for i := range recs {
		b = AppendRecord(b, &recs[i])
	}
	return b
}

func TestFrameRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	recs := mustRecords(t, 100, 50, r)
	raw := encodeRecords(recs)
	c := DefaultCodec()
	f := c.DataFrame(raw, 100, uint32(len(recs)), nil)
	if f.Flags&FlagZstd == 0 {
		t.Fatalf("compressible payload was not compressed")
	}
	var buf bytes.Buffer
	if err := WriteFrame(&buf, &f); err != nil {
		t.Fatal(err)
	}
	got, _, err := ReadFrame(&buf, nil)
	if err != nil {
		t.Fatal(err)
	}
	out, _, err := c.Records(&got, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != len(recs) {
		t.Fatalf("got %d records, want %d", len(out), len(recs))
	}
	for i := range recs {
		if out[i].Seq != recs[i].Seq || out[i].Kind != recs[i].Kind || !bytes.Equal(out[i].Data, recs[i].Data) || out[i].Offset != recs[i].Offset {
			t.Fatalf("record %d differs: %+v vs %+v", i, out[i], recs[i])
		}
	}
	if _, _, err := ReadFrame(&buf, nil); err != io.EOF {
		t.Fatalf("at end: %v, want io.EOF", err)
	}
}

func TestFrameRejects(t *testing.T) {
	f, _ := JSONFrame(FrameHello, Hello{MachineID: "ab"})
	good := AppendFrame(nil, &f)
	cases := map[string]func(b []byte) []byte{
		"bad magic":        func(b []byte) []byte { b[0] = 'X'; return b },
		"header bit flip":  func(b []byte) []byte { b[17] ^= 1; return b },
		"payload bit flip": func(b []byte) []byte { b[len(b)-1] ^= 1; return b },
		"truncated header": func(b []byte) []byte { return b[:10] },
		"truncated body":   func(b []byte) []byte { return b[:len(b)-2] },
		"unknown version": func(b []byte) []byte {
			b[4] = 9
			return fixHeaderCRC(b)
		},
		"unknown type": func(b []byte) []byte {
			b[5] = 200
			return fixHeaderCRC(b)
		},
		"huge length": func(b []byte) []byte {
			b[8], b[9], b[10], b[11] = 0xff, 0xff, 0xff, 0x7f
			return fixHeaderCRC(b)
		},
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			b := mutate(append([]byte(nil), good...))
			_, _, err := ReadFrame(bytes.NewReader(b), nil)
			if err == nil || !errors.Is(err, ErrCorrupt) {
				t.Fatalf("got %v, want a protocol error", err)
			}
		})
	}
}

func fixHeaderCRC(b []byte) []byte {
	var h [4]byte
	crc := Checksum(b[:32])
	h[0], h[1], h[2], h[3] = byte(crc), byte(crc>>8), byte(crc>>16), byte(crc>>24)
	copy(b[32:36], h[:])
	return b
}

func TestRecordChecksumDetected(t *testing.T) {
	rec := Record{Seq: 1, Kind: KindWrite, Data: []byte("hello world"), Length: 11}
	b := AppendRecord(nil, &rec)
	b[len(b)-1] ^= 0x40
	if _, _, err := DecodeRecord(b); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("flipped data bit: %v, want ErrCorrupt", err)
	}
}

// FuzzReadFrame feeds arbitrary bytes to the frame reader and, for frames
// that pass, to the record decoder: nothing may panic or allocate beyond the
// limits, and whatever is accepted must re-encode to the same bytes.
func FuzzReadFrame(f *testing.F) {
	r := rand.New(rand.NewPCG(3, 4))
	c := DefaultCodec()
	raw := encodeRecords(mustRecords(f, 1, 5, r))
	df := c.DataFrame(raw, 1, 5, nil)
	f.Add(AppendFrame(nil, &df))
	hf, _ := JSONFrame(FrameHello, Hello{MachineID: "00ff", Disks: []DiskInfo{{Index: 0, Name: "d", Size: 4096}}})
	f.Add(AppendFrame(nil, &hf))
	ack := Frame{Type: FrameAck, Seq: 42}
	f.Add(AppendFrame(nil, &ack))
	f.Add([]byte("ASRF"))
	f.Fuzz(func(t *testing.T, data []byte) {
		rd := bytes.NewReader(data)
		for {
			fr, _, err := ReadFrame(rd, nil)
			if err != nil {
				return
			}
			if len(fr.Payload) > MaxFramePayload {
				t.Fatalf("payload of %d bytes accepted", len(fr.Payload))
			}
			again := AppendFrame(nil, &fr)
			if !bytes.Equal(again[FrameHeaderSize:], fr.Payload) {
				t.Fatalf("re-encoding changed the payload")
			}
			if fr.Type == FrameData {
				recs, _, err := c.Records(&fr, nil)
				if err == nil && uint32(len(recs)) != fr.Count {
					t.Fatalf("decoded %d records, header says %d", len(recs), fr.Count)
				}
			}
		}
	})
}

// FuzzDecodeRecords checks the record decoder on arbitrary bytes.
func FuzzDecodeRecords(f *testing.F) {
	r := rand.New(rand.NewPCG(5, 6))
	f.Add(encodeRecords(mustRecords(f, 7, 3, r)), uint64(7), uint32(3))
	f.Add([]byte{}, uint64(1), uint32(0))
	f.Fuzz(func(t *testing.T, data []byte, first uint64, count uint32) {
		recs, err := DecodeRecords(data, first, count)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if !bytes.Equal(encodeRecords(recs), data) {
			t.Fatalf("accepted records do not re-encode to the input")
		}
	})
}

func TestSegmentScan(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	c := DefaultCodec()
	seg := SegmentHeader(10, time.Now())
	next := uint64(10)
	for i := 0; i < 3; i++ {
		recs := mustRecords(t, next, 4, r)
		f := c.DataFrame(encodeRecords(recs), next, 4, nil)
		seg = AppendFrame(seg, &f)
		next += 4
	}
	unsealed := append([]byte(nil), seg...)
	seal := SealFrame(next-1, 12)
	seg = AppendFrame(seg, &seal)
	s, err := ScanSegment(seg, false, nil)
	if err != nil || !s.Sealed || s.First != 10 || s.Last != 21 || s.Records != 12 {
		t.Fatalf("scan = %+v, %v", s, err)
	}
	if _, err := ScanSegment(unsealed, false, nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("unsealed segment accepted as sealed: %v", err)
	}
	// A torn tail in an unsealed cache file is cut at the last whole frame.
	torn := unsealed[:len(unsealed)-5]
	s, err = ScanSegment(torn, true, nil)
	if err != nil || s.Last != 17 || s.Frames != 2 {
		t.Fatalf("torn scan = %+v, %v", s, err)
	}
	// One flipped bit anywhere in a sealed segment is detected.
	for _, at := range []int{5, SegmentHeaderSize + 20, len(seg) / 2, len(seg) - 3} {
		bad := append([]byte(nil), seg...)
		bad[at] ^= 0x10
		if _, err := ScanSegment(bad, false, nil); !errors.Is(err, ErrCorrupt) {
			t.Errorf("bit flip at %d not detected: %v", at, err)
		}
	}
	if f, l, ok := ParseSegmentName(SegmentName(10, 21)); !ok || f != 10 || l != 21 {
		t.Fatalf("segment name round trip: %d %d %v", f, l, ok)
	}
}
