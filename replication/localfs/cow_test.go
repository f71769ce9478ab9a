package localfs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/allocguard"
)

// cowFile builds a COW file holding records for blocks, committing c of them.
func cowFile(seq uint64, c uint64, blocks ...uint64) []byte {
	b := encodeCOWHeader(cowHeader{seq: seq, committed: c})
	for i, blk := range blocks {
		rec := make([]byte, recSize)
		for j := recHeaderSize; j < recSize; j += 97 {
			rec[j] = byte(i + j)
		}
		putRecord(rec, blk)
		b = append(b, rec...)
	}
	return b
}

func TestScanCOW(t *testing.T) {
	f := cowFile(7, 2, 3, 0, 9)
	s, err := scanCOW(bytes.NewReader(f), int64(len(f)), 10)
	if err != nil {
		t.Fatal(err)
	}
	if s.header.seq != 7 || s.records != 3 || s.validEnd != int64(len(f)) || len(s.index) != 3 || s.index[9] != recordOffset(2) {
		t.Fatalf("scan = %+v", s)
	}
	// A block past the disk is damage; in the committed part, a damaged
	// record (bit rot) that is counted and, its block unknown, skipped.
	if fc := cowFile(7, 3, 3, 0, 9); true {
		s, err := scanCOW(bytes.NewReader(fc), int64(len(fc)), 9)
		if err != nil || s.damaged != 1 || s.records != 3 || len(s.index) != 2 || s.validEnd != int64(len(fc)) {
			t.Fatalf("scan with block 9 of 9, committed = %+v, %v", s, err)
		}
	}
	s, err = scanCOW(bytes.NewReader(f), int64(len(f)), 9) // block 9 is record 2, uncommitted
	if err != nil || s.records != 2 || s.validEnd != recordOffset(2) {
		t.Fatalf("scan with an uncommitted bad tail = %+v, %v", s, err)
	}
	// A duplicate block.
	f = cowFile(1, 0, 1, 2, 1)
	if s, err := scanCOW(bytes.NewReader(f), int64(len(f)), 10); err != nil || s.records != 2 {
		t.Fatalf("scan with a duplicate in the tail = %+v, %v", s, err)
	}
	f = cowFile(1, 3, 1, 2, 1)
	if s, err := scanCOW(bytes.NewReader(f), int64(len(f)), 10); err != nil || s.damaged != 1 || s.records != 3 || s.index[1] != recordOffset(0) {
		t.Fatalf("scan with a committed duplicate = %+v, %v", s, err)
	}
	// Another version.
	f = cowFile(1, 0)
	binary.LittleEndian.PutUint16(f[6:], 2)
	binary.LittleEndian.PutUint32(f[44:], replication.Checksum(f[:44]))
	if _, err := scanCOW(bytes.NewReader(f), int64(len(f)), 10); !errors.Is(err, replication.ErrCorrupt) {
		t.Fatalf("scan of version 2 = %v", err)
	}
}

// fixCOW recomputes, in place, the checksums of a COW file's header and
// whole records and returns it, so that mutations of the fields behind
// them (committed count, block numbers) reach the parser.
func fixCOW(b []byte) []byte {
	if len(b) < cowHeaderSize {
		return b
	}
	binary.LittleEndian.PutUint32(b[44:], replication.Checksum(b[:44]))
	for p := b[cowHeaderSize:]; len(p) >= recSize; p = p[recSize:] {
		binary.LittleEndian.PutUint32(p[8:], recordCRC(p))
	}
	return b
}

// compactRec is the size of a record in a compact COW input: its 16-byte
// header and one byte its 4 KiB of data are filled with.
const compactRec = recHeaderSize + 1

// expandCOW turns a compact input into a COW file: the header as it is,
// each compactRec bytes into a record, and what is left as a torn tail.
// Fuzz inputs stay a few dozen bytes while the files hold whole records:
// mutating and minimizing a 12 KB input took the fuzzer most of a minute
// per new input.
func expandCOW(in []byte) []byte {
	if len(in) < cowHeaderSize {
		return in
	}
	out := slices.Clone(in[:cowHeaderSize])
	rest := in[cowHeaderSize:]
	for ; len(rest) >= compactRec; rest = rest[compactRec:] {
		out = append(out, rest[:recHeaderSize]...)
		out = append(out, bytes.Repeat(rest[recHeaderSize:compactRec], blockSize)...)
	}
	return append(out, rest...)
}

// compactCOW is cowFile in compact form: records for blocks, c committed,
// each block's data filled with its position.
func compactCOW(seq, c uint64, blocks ...uint64) []byte {
	b := encodeCOWHeader(cowHeader{seq: seq, committed: c})
	for i, blk := range blocks {
		fill := byte(i + 1)
		rec := bytes.Repeat([]byte{fill}, recSize)
		putRecord(rec, blk)
		b = append(append(b, rec[:recHeaderSize]...), fill)
	}
	return b
}

// FuzzScanCOW feeds the COW parser arbitrary files: each input as it is
// and expanded from its compact form (expandCOW), each of those as it is
// and with its checksums recomputed. The parser must not panic, must
// allocate in proportion to the file, and what it accepts must be
// consistent.
func FuzzScanCOW(f *testing.F) {
	f.Add(compactCOW(1, 0))
	f.Add(compactCOW(2, 1, 0, 5))
	f.Add(compactCOW(3, 3, 7, 1, 2))
	f.Add(append(compactCOW(4, 0, 1, 2), 1, 2, 3))                  // a torn tail
	f.Add(append(compactCOW(5, 1, 3), make([]byte, compactRec)...)) // a zero record
	f.Add([]byte("ASRCOW"))
	f.Add(compactCOW(6, 1<<40, 1)) // commits more records than the file holds
	f.Add(compactCOW(7, 2, 4, 4))  // a block saved twice
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, b := range [][]byte{data, expandCOW(data)} {
			checkScanCOW(t, b)
			checkScanCOW(t, fixCOW(slices.Clone(b)))
		}
	})
}

func checkScanCOW(t *testing.T, data []byte) {
	t.Helper()
	const nblocks = 8
	var s cowScan
	var err error
	allocguard.Check(t, "scanCOW", allocguard.Bound(len(data)), func() {
		s, err = scanCOW(bytes.NewReader(data), int64(len(data)), nblocks)
	})
	if err != nil {
		if !errors.Is(err, replication.ErrCorrupt) {
			t.Fatalf("error without ErrCorrupt: %v", err)
		}
		return
	}
	if s.validEnd > int64(len(data)) || s.validEnd != recordOffset(s.records) {
		t.Fatalf("validEnd %d, records %d, %d bytes", s.validEnd, s.records, len(data))
	}
	if s.header.committed > uint64(s.records) {
		t.Fatalf("committed %d > records %d", s.header.committed, s.records)
	}
	if int64(len(s.index)) > s.records || int64(len(s.index)) < s.records-s.damaged {
		t.Fatalf("index holds %d, records %d, damaged %d", len(s.index), s.records, s.damaged)
	}
	bad := int64(0)
	for b, off := range s.index {
		if off < cowHeaderSize || off+recSize > s.validEnd || (off-cowHeaderSize)%recSize != 0 {
			t.Fatalf("block %d at bad offset %d", b, off)
		}
		if got, err := checkRecord(data[off:off+recSize], nblocks); err != nil || got != b {
			bad++ // a damaged committed record, indexed so reads of it fail
			if off >= recordOffset(int64(s.header.committed)) {
				t.Fatalf("record at %d past the committed ones: block %d, %v; indexed as %d", off, got, err, b)
			}
		}
	}
	if bad > s.damaged {
		t.Fatalf("%d damaged records indexed, %d counted", bad, s.damaged)
	}
	// Truncating to validEnd gives a file that scans the same.
	s2, err := scanCOW(bytes.NewReader(data[:s.validEnd]), s.validEnd, nblocks)
	if err != nil || s2.records != s.records {
		t.Fatalf("rescan of the valid part: %d records, %v", s2.records, err)
	}
}
