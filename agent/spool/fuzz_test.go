package spool

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/allocguard"
)

// fixRecords recomputes, in place, the data checksums of the records in b
// (walked by their headers' lengths) and returns it, so that mutations of
// the header fields reach Open.
func fixRecords(b []byte) []byte {
	for p := b; len(p) >= replication.RecordHeaderSize; {
		n := replication.RecordHeaderSize
		if k := replication.Kind(p[20]); k.HasData() {
			n += int(binary.LittleEndian.Uint32(p[32:]))
		}
		if n > len(p) {
			break
		}
		binary.LittleEndian.PutUint32(p[36:], replication.Checksum(p[replication.RecordHeaderSize:n]))
		p = p[n:]
	}
	return b
}

// FuzzOpen opens a spool whose file holds arbitrary records after a valid
// header (as they are, and with their checksums recomputed), as the last
// file (a torn tail is cut) or followed by another (damage is an error).
// Open must refuse damage with ErrCorrupt, allocate in proportion to the
// file whatever lengths its records claim, and hand the shipper exactly
// the records it kept.
func FuzzOpen(f *testing.F) {
	rec := func(seq uint64, kind replication.Kind, data string) []byte {
		r := replication.Record{Seq: seq, Kind: kind, Offset: 512, Data: []byte(data), Length: uint32(len(data))}
		if !kind.HasData() {
			r.Length = 4096
		}
		return replication.AppendRecord(nil, &r)
	}
	good := slices.Concat(rec(5, replication.KindWrite, "hello"), rec(6, replication.KindZero, ""), rec(7, replication.KindTag, ""))
	f.Add(uint64(5), good, false)
	f.Add(uint64(5), good, true)
	f.Add(uint64(5), good[:len(good)-3], false)
	huge := rec(5, replication.KindWrite, "x")
	binary.LittleEndian.PutUint32(huge[32:], replication.MaxRecordData) // a 32 MiB record in 41 bytes
	f.Add(uint64(5), huge, false)
	f.Add(uint64(5), huge, true)
	f.Add(uint64(1), []byte{}, false)

	base := f.TempDir()
	n := 0
	f.Fuzz(func(t *testing.T, first uint64, body []byte, another bool) {
		for _, b := range [][]byte{body, fixRecords(slices.Clone(body))} {
			n++
			dir := filepath.Join(base, fmt.Sprint(n))
			openSpool(t, dir, first, b, another)
			os.RemoveAll(dir)
		}
	})
}

func openSpool(t *testing.T, dir string, first uint64, body []byte, another bool) {
	if first == 0 || first > 1<<62 {
		return // sequence numbers start at 1; leave room for the next file's
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	name := func(seq uint64) string { return filepath.Join(dir, fmt.Sprintf("%016x%s", seq, suffix)) }
	if err := os.WriteFile(name(first), slices.Concat(header(first), body), 0o600); err != nil {
		t.Fatal(err)
	}
	if another {
		// A later file: the fuzzed one is not the last, so it may not be cut.
		if err := os.WriteFile(name(first+1<<61), header(first+1<<61), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var s *Spool
	var rec Recovered
	var err error
	allocguard.Check(t, "spool.Open", allocguard.Bound(len(body)+headerSize), func() {
		if s != nil {
			s.Close() // Check may open twice
		}
		s, rec, err = Open(dir, Options{MaxBytes: 1 << 40}, 0)
	})
	if err != nil {
		if !errors.Is(err, replication.ErrCorrupt) {
			t.Fatalf("Open error %v does not wrap ErrCorrupt", err)
		}
		return
	}
	defer s.Close()
	if another || rec.Records == 0 {
		return
	}
	rd, err := s.NewReader(first)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	buf, from, count, err := rd.Next(context.Background(), nil, len(body)+1, 0)
	if err != nil {
		t.Fatalf("reading back what Open kept: %v", err)
	}
	if from != first || int(count) != rec.Records {
		t.Fatalf("read %d records from %d, Open kept %d from %d", count, from, rec.Records, first)
	}
	if _, err := replication.DecodeRecords(buf, from, count); err != nil {
		t.Fatalf("records Open kept do not decode: %v", err)
	}
}
