package localfs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"testing"

	"github.com/asrdr/asr/internal/allocguard"
	"github.com/asrdr/asr/replication"
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
	// A block past the disk is damage; in the committed part, corruption.
	if fc := cowFile(7, 3, 3, 0, 9); true {
		if _, err := scanCOW(bytes.NewReader(fc), int64(len(fc)), 9); !errors.Is(err, replication.ErrCorrupt) {
			t.Fatalf("scan with block 9 of 9, committed = %v", err)
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
	if _, err := scanCOW(bytes.NewReader(f), int64(len(f)), 10); !errors.Is(err, replication.ErrCorrupt) {
		t.Fatalf("scan with a committed duplicate = %v", err)
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

// FuzzScanCOW feeds the COW parser arbitrary bytes, as they are and with
// their checksums recomputed: it must not panic, must allocate in
// proportion to the file, and what it accepts must be consistent.
func FuzzScanCOW(f *testing.F) {
	f.Add(cowFile(1, 0))
	f.Add(cowFile(2, 1, 0, 5))
	f.Add(cowFile(3, 3, 7, 1, 2))
	f.Add(cowFile(4, 0, 1, 2)[:cowHeaderSize+recSize+100])
	f.Add(append(cowFile(5, 1, 3), make([]byte, recSize)...))
	f.Add([]byte("ASRCOW"))
	f.Add(cowFile(6, 1<<40, 1)) // commits more records than the file holds
	f.Fuzz(func(t *testing.T, data []byte) {
		checkScanCOW(t, data)
		checkScanCOW(t, fixCOW(slices.Clone(data)))
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
	if int64(len(s.index)) != s.records {
		t.Fatalf("index holds %d, records %d", len(s.index), s.records)
	}
	for b, off := range s.index {
		if off < cowHeaderSize || off+recSize > s.validEnd || (off-cowHeaderSize)%recSize != 0 {
			t.Fatalf("block %d at bad offset %d", b, off)
		}
		if got, err := checkRecord(data[off:off+recSize], nblocks); err != nil || got != b {
			t.Fatalf("record at %d: block %d, %v; indexed as %d", off, got, err, b)
		}
	}
	// Truncating to validEnd gives a file that scans the same.
	s2, err := scanCOW(bytes.NewReader(data[:s.validEnd]), s.validEnd, nblocks)
	if err != nil || s2.records != s.records {
		t.Fatalf("rescan of the valid part: %d records, %v", s2.records, err)
	}
}
