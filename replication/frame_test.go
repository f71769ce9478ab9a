package replication

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/asrdr/asr/replication/allocguard"
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

// mustRoundTrip writes f, reads it back and checks that it decodes to
// recs; it returns the frame read.
func mustRoundTrip(t *testing.T, f *Frame, recs []Record) Frame {
	t.Helper()
	var buf bytes.Buffer
	if err := WriteFrame(&buf, f); err != nil {
		t.Fatal(err)
	}
	got, _, err := ReadFrame(&buf, nil)
	if err != nil {
		t.Fatal(err)
	}
	out, _, err := DefaultCodec().Records(&got, nil)
	if err != nil || len(out) != len(recs) {
		t.Fatalf("%d records, %v", len(out), err)
	}
	for i := range recs {
		if !bytes.Equal(out[i].Data, recs[i].Data) || out[i].Seq != recs[i].Seq {
			t.Fatalf("record %d differs", i)
		}
	}
	return got
}

// TestS2Frame: an S2 DATA frame goes over the wire and decodes to its
// records; a payload whose S2 header announces another length than the
// frame's, a damaged payload, and a frame flagged both zstd and S2 are
// refused as corrupt; incompressible records stay plain; the process
// server does not compress an S2 frame again.
func TestS2Frame(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	recs := mustRecords(t, 100, 50, r)
	raw := encodeRecords(recs)
	f := S2DataFrame(raw, 100, uint32(len(recs)), nil)
	if f.Flags != FlagS2 || len(f.Payload) >= len(raw) || !f.Compressed() {
		t.Fatalf("flags %#x, %d bytes of %d: want S2", f.Flags, len(f.Payload), len(raw))
	}
	wire := AppendFrame(nil, &f)
	got := mustRoundTrip(t, &f, recs)
	if _, err := DefaultCodec().CheckData(&got, nil, nil); err != nil {
		t.Fatal(err)
	}
	again := got
	ServerCodec().CompressData(&again, nil)
	if again.Flags != FlagS2 || !bytes.Equal(again.Payload, got.Payload) {
		t.Fatal("an S2 frame was compressed again")
	}

	short := got
	short.RawLen--
	if _, _, err := DefaultCodec().Records(&short, nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("raw length one short of the S2 header's: %v", err)
	}
	bad := got
	bad.Payload = slices.Clone(got.Payload)
	for i := len(bad.Payload) / 2; i < len(bad.Payload); i++ {
		bad.Payload[i] ^= 0x5a
	}
	if _, err := DefaultCodec().CheckData(&bad, nil, nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("damaged S2 payload: %v", err)
	}

	both := slices.Clone(wire)
	both[6] |= FlagZstd
	binary.LittleEndian.PutUint32(both[32:], Checksum(both[:32]))
	if _, _, err := ReadFrame(bytes.NewReader(both), nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a frame flagged zstd and S2: %v", err)
	}

	noise := make([]byte, 64<<10)
	for i := range noise {
		noise[i] = byte(r.Uint32())
	}
	rec := Record{Seq: 1, Kind: KindWrite, Length: uint32(len(noise)), Data: noise}
	if p := S2DataFrame(AppendRecord(nil, &rec), 1, 1, nil); p.Compressed() {
		t.Fatal("incompressible records were sent compressed (larger)")
	}
}

// TestBaseShare: an agent's frame is counted by its records' data bytes,
// base against all.
func TestBaseShare(t *testing.T) {
	recs := []Record{
		{Seq: 1, Kind: KindBase, Length: 8192, Data: make([]byte, 8192)},
		{Seq: 2, Kind: KindZero, Length: 1 << 20},
		{Seq: 3, Kind: KindWrite, Length: 4096, Data: make([]byte, 4096)},
		{Seq: 4, Kind: KindTag},
	}
	raw := encodeRecords(recs)
	if base, all := BaseShare(raw); base != 8192 || all != 12288 {
		t.Fatalf("base %d of %d, want 8192 of 12288", base, all)
	}
	if base, all := BaseShare(raw[:RecordHeaderSize+100]); base != 0 || all != 0 {
		t.Fatalf("a cut record: base %d of %d, want nothing", base, all)
	}
}

// TestCompressData: the process server compresses a plain DATA frame
// (its tag flag kept, its records unchanged), leaves a compressed one as
// it is, and an incompressible one plain.
func TestCompressData(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	recs := mustRecords(t, 7, 20, r)
	raw := encodeRecords(recs)
	c := ServerCodec()
	f := PlainDataFrame(raw, 7, uint32(len(recs)))
	f.Flags = FlagTag
	c.CompressData(&f, nil)
	if f.Flags != FlagZstd|FlagTag || len(f.Payload) >= len(raw) || f.RawLen != uint32(len(raw)) {
		t.Fatalf("flags %#x, %d bytes of %d: want compressed, the tag flag kept", f.Flags, len(f.Payload), len(raw))
	}
	mustRoundTrip(t, &f, recs)
	again := f
	c.CompressData(&again, nil)
	if !bytes.Equal(again.Payload, f.Payload) || again.Flags != f.Flags {
		t.Fatal("a compressed frame was compressed again")
	}
	noise := make([]byte, 64<<10)
	for i := range noise {
		noise[i] = byte(r.Uint32())
	}
	rec := Record{Seq: 1, Kind: KindWrite, Length: uint32(len(noise)), Data: noise}
	plain := PlainDataFrame(AppendRecord(nil, &rec), 1, 1)
	c.CompressData(&plain, nil)
	if plain.Flags&FlagZstd != 0 {
		t.Fatal("incompressible records were stored compressed (larger)")
	}
}

// TestAdaptiveCompressor: a frame that does not compress makes the
// compressor leave the next frames untried, 1, 3, 7 ... at most 63 of them;
// a frame that compresses starts it over; a small frame is always tried.
func TestAdaptiveCompressor(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	noise := make([]byte, 128<<10)
	for i := range noise {
		noise[i] = byte(r.Uint32())
	}
	text := bytes.Repeat([]byte("abc"), 128<<10/3)
	a := AdaptiveCompressor{Codec: ServerCodec()}
	compressed := func(data []byte) bool {
		rec := Record{Seq: 1, Kind: KindWrite, Length: uint32(len(data)), Data: data}
		f := PlainDataFrame(AppendRecord(nil, &rec), 1, 1)
		a.Compress(&f, nil)
		return f.Flags&FlagZstd != 0
	}
	// untried counts the text frames left plain before one is compressed.
	untried := func() int {
		n := 0
		for !compressed(text) {
			if n++; n > 100 {
				t.Fatal("text never compressed again")
			}
		}
		return n
	}
	if !compressed(text) {
		t.Fatal("text not compressed")
	}
	for i, want := range []int{1, 3, 7, 15, 31, 63, 63} {
		// i+1 noise frames, each tried after the window the one before
		// opened: the window grows to 2^(i+1)-1, then text waits it out.
		a.backoff, a.skip = 0, 0
		for range i + 1 {
			compressed(noise)
			for a.skip > 0 {
				compressed(noise)
			}
		}
		if i == 6 {
			compressed(noise) // past the cap
			for a.skip > 0 {
				compressed(noise)
			}
		}
		// The last noise frame opened the window: text now waits.
		a.skip = a.backoff
		if got := untried(); got != want {
			t.Fatalf("after %d frames that did not compress: %d frames left untried, want %d", i+1, got, want)
		}
		if a.backoff != 0 {
			t.Fatal("a frame that compressed did not start it over")
		}
	}
	// Small frames are always tried and leave the window as it is.
	a.backoff, a.skip = 7, 7
	small := bytes.Repeat([]byte("abc"), 1000)
	if !compressed(small) || a.skip != 7 || a.backoff != 7 {
		t.Fatalf("a small frame: skip %d, backoff %d", a.skip, a.backoff)
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
		"type after the last": func(b []byte) []byte {
			b[5] = byte(FrameReverseSum) + 1
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

// TestControlFrameTypes: every control frame type, the newest included,
// has its name and goes through the reader; FREEZE and THAW carry a
// Freeze.
func TestControlFrameTypes(t *testing.T) {
	want := map[FrameType]string{FrameWant: "want", FrameFreeze: "freeze", FrameThaw: "thaw"}
	for ft, name := range want {
		if ft.String() != name {
			t.Errorf("%d.String() = %q, want %q", uint8(ft), ft.String(), name)
		}
	}
	if FrameFreeze != 17 || FrameThaw != 18 {
		t.Fatal("frame types renumbered")
	}
	for _, ft := range []FrameType{FrameFreeze, FrameThaw} {
		f, err := JSONFrame(ft, Freeze{ID: "planned-1", Req: 9})
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := ReadFrame(bytes.NewReader(AppendFrame(nil, &f)), nil)
		if err != nil {
			t.Fatalf("%s: %v", ft, err)
		}
		var fr Freeze
		if err := DecodeJSON(&got, &fr); err != nil || fr != (Freeze{ID: "planned-1", Req: 9}) || fr.Validate() != nil {
			t.Fatalf("%s: decoded %+v, %v", ft, fr, err)
		}
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

// TestHugeCountRefused is issue 8 as a plain test: a DATA frame that says
// it holds 0xFFFFFFFF records and holds one is corrupt, on the wire and in
// a segment, and costs no more than its bytes.
func TestHugeCountRefused(t *testing.T) {
	c := warmCodec(t)
	for _, f := range hugeCountFrames(t) {
		b := AppendFrame(nil, &f)
		got, _, err := ReadFrame(bytes.NewReader(b), nil)
		if err != nil {
			t.Fatalf("the frame's header is valid: %v", err)
		}
		allocguard.Check(t, "Codec.Records", allocguard.Bound(len(b))+uint64(got.RawLen), func() {
			_, _, err = c.Records(&got, nil)
		})
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("flags %#x: Records = %v, want ErrCorrupt", f.Flags, err)
		}
		seg := hugeCountSegment(f)
		allocguard.Check(t, "DescribeSegment", allocguard.Bound(len(seg))+uint64(got.RawLen), func() {
			_, err = DescribeSegment(seg)
		})
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("flags %#x: DescribeSegment = %v, want ErrCorrupt", f.Flags, err)
		}
	}
}

// hugeCountSegment is a sealed segment holding one of hugeCountFrames, its
// seal consistent with the frame's count.
func hugeCountSegment(f Frame) []byte {
	seg := SegmentHeader(f.Seq, time.Unix(0, 0))
	seg = AppendFrame(seg, &f)
	seal := SealFrame(f.Seq+uint64(f.Count)-1, f.Count)
	return AppendFrame(seg, &seal)
}

// FuzzReadFrame feeds arbitrary bytes to the frame reader and, for frames
// that pass, to the record decoder: nothing may panic or allocate beyond the
// limits, and whatever is accepted must re-encode to the same bytes. Each
// input is read twice: as it is, and with every checksum recomputed
// (fixFrames), so that mutations of the header fields behind the CRCs
// (count, lengths, flags) reach the decoders.
func FuzzReadFrame(f *testing.F) {
	c := warmCodec(f)
	raw := encodeRecords(seedRecords(1, 5))
	df := c.DataFrame(raw, 1, 5, nil)
	f.Add(AppendFrame(nil, &df))
	sf := S2DataFrame(raw, 1, 5, nil)
	f.Add(AppendFrame(nil, &sf))
	hf, _ := JSONFrame(FrameHello, Hello{MachineID: "00ff", Disks: []DiskInfo{{Index: 0, Name: "d", Size: 4096}}})
	f.Add(AppendFrame(nil, &hf))
	ack := Frame{Type: FrameAck, Seq: 42}
	f.Add(AppendFrame(nil, &ack))
	f.Add([]byte("ASRF"))
	for _, bad := range hugeCountFrames(f) {
		f.Add(AppendFrame(nil, &bad))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		readFrames(t, c, data)
		readFrames(t, c, fixFrames(slices.Clone(data)))
	})
}

// readFrames reads every frame of data, decoding DATA frames' records,
// each call within its allocation bound.
func readFrames(t *testing.T, c *Codec, data []byte) {
	rd := bytes.NewReader(data)
	for {
		var fr Frame
		var err error
		at := rd.Size() - int64(rd.Len())
		allocguard.Check(t, "ReadFrame", allocguard.Bound(len(data)), func() {
			rd.Seek(at, io.SeekStart) // Check may read twice
			fr, _, err = ReadFrame(rd, nil)
		})
		if err != nil {
			if err != io.EOF && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("ReadFrame error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if len(fr.Payload) > MaxFramePayload || (fr.Type != FrameData && len(fr.Payload) > MaxControlPayload) {
			t.Fatalf("%s payload of %d bytes accepted", fr.Type, len(fr.Payload))
		}
		again := AppendFrame(nil, &fr)
		if !bytes.Equal(again[FrameHeaderSize:], fr.Payload) {
			t.Fatalf("re-encoding changed the payload")
		}
		if fr.Type == FrameData {
			decodeFrame(t, c, &fr)
		}
	}
}

// decodeFrame decodes a DATA frame's records within the bound: the input,
// plus the raw length the header announces (checked against MaxFrameRaw)
// for a compressed payload.
func decodeFrame(t *testing.T, c *Codec, fr *Frame) []Record {
	bound := allocguard.Bound(len(fr.Payload))
	if fr.Compressed() {
		bound += uint64(min(fr.RawLen, MaxFrameRaw))
	}
	var recs, checked []Record
	var err, cerr error
	allocguard.Check(t, "Codec.Records", bound, func() { recs, _, err = c.Records(fr, nil) })
	// The process server's check, whose records the applier may take
	// instead of its own decode (the hand-off): the same verdict and the
	// same records (a frame of no records is refused there).
	allocguard.Check(t, "Codec.CheckRecords", bound, func() { checked, _, cerr = c.CheckRecords(fr, nil, nil) })
	if cerr != nil && !errors.Is(cerr, ErrCorrupt) {
		t.Fatalf("CheckRecords error %v does not wrap ErrCorrupt", cerr)
	}
	if (err == nil && fr.Count > 0) != (cerr == nil) {
		t.Fatalf("Records says %v, CheckRecords %v", err, cerr)
	}
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Records error %v does not wrap ErrCorrupt", err)
		}
		return nil
	}
	if uint32(len(recs)) != fr.Count {
		t.Fatalf("decoded %d records, header says %d", len(recs), fr.Count)
	}
	if cerr == nil && !bytes.Equal(encodeRecords(checked), encodeRecords(recs)) {
		t.Fatal("CheckRecords and Records decoded different records")
	}
	return recs
}

// fixFrames recomputes, in place, the checksums of the frames in b (header
// and, where the payload is all there, payload) and returns b.
func fixFrames(b []byte) []byte {
	for p := b; len(p) >= FrameHeaderSize; {
		n := int(binary.LittleEndian.Uint32(p[8:]))
		if n <= len(p)-FrameHeaderSize {
			binary.LittleEndian.PutUint32(p[28:], Checksum(p[FrameHeaderSize:FrameHeaderSize+n]))
		}
		binary.LittleEndian.PutUint32(p[32:], Checksum(p[:32]))
		if n > len(p)-FrameHeaderSize {
			break
		}
		p = p[FrameHeaderSize+n:]
	}
	return b
}

// hugeCountFrames are DATA frames that hold one real record and say they
// hold more (issue 8), checksums right: 1<<20 records (a decoder that
// allocates from the count asks for 64 MiB, which the allocation guard
// reports), then 0xFFFFFFFF, plain and compressed (256 GiB: the process
// dies of it).
func hugeCountFrames(tb testing.TB) []Frame {
	tb.Helper()
	rec := Record{Seq: 1, Time: 1, Kind: KindWrite, Offset: 4096, Data: bytes.Repeat([]byte("asr "), 32)}
	rec.Length = uint32(len(rec.Data))
	raw := AppendRecord(nil, &rec)
	frame := func(count uint32) Frame {
		return Frame{Type: FrameData, Seq: 1, Count: count, RawLen: uint32(len(raw)), Payload: raw}
	}
	comp := DefaultCodec().DataFrame(raw, 1, 0xFFFFFFFF, nil)
	if comp.Flags&FlagZstd == 0 {
		tb.Fatal("the record did not compress")
	}
	return []Frame{frame(1 << 20), frame(0xFFFFFFFF), comp}
}

// seedRecords returns n small records from first for fuzz seeds: a
// mutation of a small input is more likely to matter, and minimizing one
// takes moments (a coverage-increasing input of 20 KB kept the fuzz
// workers minimizing, reporting 0 execs/s, for most of a minute).
func seedRecords(first uint64, n int) []Record {
	recs := make([]Record, n)
	for i := range recs {
		r := Record{Seq: first + uint64(i), Time: int64(i), Disk: uint32(i % 2), Offset: uint64(i) * 512}
		switch i % 3 {
		case 0:
			r.Kind, r.Data = KindWrite, []byte(fmt.Sprintf("data of record %d", i))
			r.Length = uint32(len(r.Data))
		case 1:
			r.Kind, r.Length = KindZero, 4096
		default:
			r.Kind = KindTag
		}
		recs[i] = r
	}
	return recs
}

// warmCodec returns the default codec after a few decodes, so that the
// decoders' own buffers, made at first use, are not counted against the
// first inputs.
func warmCodec(tb testing.TB) *Codec {
	tb.Helper()
	c := DefaultCodec()
	raw := encodeRecords(mustRecords(tb, 1, 20, rand.New(rand.NewPCG(1, 1))))
	f := c.DataFrame(raw, 1, 20, nil)
	for range 4 * runtime.GOMAXPROCS(0) {
		if _, _, err := c.Records(&f, nil); err != nil {
			tb.Fatal(err)
		}
	}
	return c
}

// batchInput encodes a FuzzDecodeRecords input: the count and first
// sequence number as a frame header carries them, then the records.
func batchInput(count uint32, first uint64, records []byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, count)
	b = binary.LittleEndian.AppendUint64(b, first)
	return append(b, records...)
}

// FuzzDecodeRecords checks the record decoder on arbitrary bytes: it must
// refuse what is malformed, accept only what re-encodes to the input, and
// allocate in proportion to the input, whatever count it is given. The
// count and the first sequence number are the input's first 12 bytes, not
// parameters of their own: the fuzzer mutates an integer parameter by
// adding or subtracting at most 100, so a count seeded at 3 never becomes
// large, while bytes get the values that matter (0xFFFFFFFF, 1<<31, ...).
func FuzzDecodeRecords(f *testing.F) {
	f.Add(batchInput(3, 7, encodeRecords(seedRecords(7, 3))))
	f.Add(batchInput(0, 1, nil))
	one := encodeRecords(seedRecords(1, 1))
	f.Add(batchInput(1<<20, 1, one))      // issue 8: 64 MiB from the count
	f.Add(batchInput(0xFFFFFFFF, 1, one)) // issue 8: 256 GiB
	f.Add(batchInput(2, 1, one))
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 12 {
			return
		}
		count, first, data := binary.LittleEndian.Uint32(in), binary.LittleEndian.Uint64(in[4:]), in[12:]
		var recs []Record
		var err error
		allocguard.Check(t, "DecodeRecords", allocguard.Bound(len(data)), func() { recs, err = DecodeRecords(data, first, count) })
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if uint32(len(recs)) != count {
			t.Fatalf("decoded %d records, count says %d", len(recs), count)
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

// TestPrepareHanded: a segment prepared from records handed over for
// each of its frames (PrepareHanded) is the segment PrepareSegment makes
// from its bytes (same records, block checksums, range, time); frames
// that do not number first to last without a gap or an overlap, or whose
// records do not match their key, are refused with ErrCorrupt.
func TestPrepareHanded(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	c := DefaultCodec()
	seg := SegmentHeader(10, time.Now())
	var keys []FrameKey
	var handed [][]Record
	next := uint64(10)
	for range 3 {
		recs := mustRecords(t, next, 4, r)
		f := c.DataFrame(encodeRecords(recs), next, 4, nil)
		var h [FrameHeaderSize]byte
		keys = append(keys, EncodeFrameHeader(&h, &f))
		got, _, err := c.CheckRecords(&f, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		handed = append(handed, got)
		seg = AppendFrame(seg, &f)
		next += 4
	}
	seal := SealFrame(next-1, 12)
	seg = AppendFrame(seg, &seal)
	want, err := PrepareSegment(seg)
	if err != nil {
		t.Fatal(err)
	}
	got, err := PrepareHanded(10, 21, keys, handed, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.First != want.First || got.Last != want.Last || !got.LastTime.Equal(want.LastTime) || got.Tags != want.Tags || len(got.recs) != len(want.recs) {
		t.Fatalf("prepared from the hand-off %d-%d (%d records, %v), from the bytes %d-%d (%d records, %v)",
			got.First, got.Last, len(got.recs), got.LastTime, want.First, want.Last, len(want.recs), want.LastTime)
	}
	// The blocks' checksums computed ahead, for two frames of three.
	entries := [][]BlockEntries{RecordEntries(handed[0]), nil, RecordEntries(handed[2])}
	ahead, err := PrepareHanded(10, 21, keys, handed, entries)
	if err != nil {
		t.Fatal(err)
	}
	for _, got := range []*PreparedSegment{got, ahead} {
		for i := range want.recs {
			g, w := got.recs[i], want.recs[i]
			if g.r.Seq != w.r.Seq || g.r.Kind != w.r.Kind || g.r.Offset != w.r.Offset || !bytes.Equal(g.r.Data, w.r.Data) || g.be.first != w.be.first || !slices.Equal(g.be.e, w.be.e) {
				t.Fatalf("record %d differs: %+v against %+v", i, g.r, w.r)
			}
		}
	}
	if _, err := PrepareHanded(10, 21, keys, handed, entries[:2]); !errors.Is(err, ErrCorrupt) {
		t.Errorf("checksums for two frames of three: %v, want ErrCorrupt", err)
	}
	if _, err := PrepareHanded(10, 21, keys, handed, [][]BlockEntries{nil, entries[0], nil}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("checksums of another frame: %v, want ErrCorrupt", err)
	}
	for name, tc := range map[string]struct {
		first, last uint64
		keys        []FrameKey
		recs        [][]Record
	}{
		"no frames":          {10, 21, nil, nil},
		"a frame left out":   {10, 21, []FrameKey{keys[0], keys[2]}, [][]Record{handed[0], handed[2]}},
		"out of order":       {10, 21, []FrameKey{keys[1], keys[0], keys[2]}, [][]Record{handed[1], handed[0], handed[2]}},
		"ends early":         {10, 25, keys, handed},
		"starts late":        {9, 21, keys, handed},
		"records of another": {10, 21, keys, [][]Record{handed[0], handed[2], handed[1]}},
		"a record short":     {10, 21, keys, [][]Record{handed[0], handed[1][:3], handed[2]}},
		"keys and records":   {10, 21, keys, handed[:2]},
	} {
		if _, err := PrepareHanded(tc.first, tc.last, tc.keys, tc.recs, nil); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", name, err)
		}
	}
}
