// Package replication holds the core of asr's data path: the change records an
// agent captures, the framed wire protocol that carries them, the segment files
// a process server seals them into, the catalog of machines, disks and recovery
// points, and the applier that turns segments into replica disks and recovery
// points on a Target.
//
// Everything here is transport- and storage-neutral: the agent, the process
// server and the operator CLI all build on it, and the storage adapters
// (replication/localfs, azure) implement the Target interface declared here.
package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Kind says what a Record does to its disk.
type Kind uint8

// Record kinds. The numeric values are persisted (spool, wire, segments): never
// renumber them.
const (
	// KindWrite writes Data at Offset.
	KindWrite Kind = 1
	// KindZero makes Length bytes at Offset read as zero (NBD WRITE_ZEROES).
	KindZero Kind = 2
	// KindTrim discards Length bytes at Offset; asr's splitter punches a hole,
	// so the range reads as zero and the replica does the same.
	KindTrim Kind = 3
	// KindBase carries initial-replication data read from the source disk.
	KindBase Kind = 4
	// KindProgress records that initial replication of Disk has read the source
	// up to Offset. With FlagDone the whole disk has been read.
	KindProgress Kind = 5
	// KindTag marks a recovery point: every record before it, on every disk of
	// the machine, belongs to the point. Offset carries the request id (0 for a
	// scheduled point) and Flags the point kind.
	KindTag Kind = 6
	// KindResync marks a resync of Disk: without FlagDone it starts (Data is
	// the reason; the replica is inconsistent from here, no points), with
	// FlagDone every difference has been logged before it (the disk is
	// consistent again). Offset carries the resync id.
	KindResync Kind = 7
)

func (k Kind) String() string {
	switch k {
	case KindWrite:
		return "write"
	case KindZero:
		return "zero"
	case KindTrim:
		return "trim"
	case KindBase:
		return "base"
	case KindProgress:
		return "progress"
	case KindTag:
		return "tag"
	case KindResync:
		return "resync"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// HasData reports whether records of kind k carry a payload.
func (k Kind) HasData() bool { return k == KindWrite || k == KindBase || k == KindResync }

// Record flags.
const (
	// FlagDone on a KindProgress record: initial replication of the disk is complete.
	FlagDone uint8 = 1 << 0
	// FlagApp on a KindTag record: the point is application-consistent.
	FlagApp uint8 = 1 << 1
	// FlagScan on a KindTag record: the machine has scan-mode disks, copied
	// by periodic scans rather than write by write, and the point was not
	// taken during a freeze: it is not crash-consistent.
	FlagScan uint8 = 1 << 2
	// FlagVerify on a KindResync record: the resync is a verify (an
	// operator's or a scheduled check of a consistent disk): its start does
	// not make the disk inconsistent; the process server marks the disk
	// only if the compare finds differences.
	FlagVerify uint8 = 1 << 3
	// FlagCut on a KindTag record: the point is this machine's part of a
	// replication group's cut, whose id is the record's Offset (the same
	// on every member; Point.Cut).
	FlagCut uint8 = 1 << 4
)

// MaxRecordData bounds the payload of one record (the NBD request limit).
const MaxRecordData = 32 << 20

// RecordHeaderSize is the encoded size of a record header.
const RecordHeaderSize = 40

// Record is one entry of a machine's ordered change log. Seq is the machine's
// sequence number (one sequence across all its disks), Time the agent's clock
// (Unix nanoseconds) when the change completed.
type Record struct {
	Seq    uint64
	Time   int64
	Disk   uint32
	Kind   Kind
	Flags  uint8
	Offset uint64
	Length uint32 // bytes affected; equals len(Data) for kinds with data
	Data   []byte
}

// End is the first byte after the range the record affects.
func (r *Record) End() uint64 { return r.Offset + uint64(r.Length) }

// EncodedSize is the number of bytes AppendRecord writes for r.
func (r *Record) EncodedSize() int { return RecordHeaderSize + len(r.Data) }

// castagnoli is the CRC-32C table used by every asr checksum.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum returns the CRC-32C asr uses everywhere.
func Checksum(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// ErrCorrupt is returned (wrapped) when bytes fail a checksum, a magic number
// or a structural check. Callers branch on it with errors.Is.
var ErrCorrupt = errors.New("corrupt data")

// Record header layout (little endian):
//
//	0  seq    u64
//	8  time   i64
//	16 disk   u32
//	20 kind   u8
//	21 flags  u8
//	22 -      u16 (zero)
//	24 offset u64
//	32 length u32
//	36 crc    u32  CRC-32C of Data
func putRecordHeader(b []byte, r *Record, crc uint32) {
	binary.LittleEndian.PutUint64(b[0:], r.Seq)
	binary.LittleEndian.PutUint64(b[8:], uint64(r.Time))
	binary.LittleEndian.PutUint32(b[16:], r.Disk)
	b[20] = byte(r.Kind)
	b[21] = r.Flags
	b[22], b[23] = 0, 0
	binary.LittleEndian.PutUint64(b[24:], r.Offset)
	binary.LittleEndian.PutUint32(b[32:], r.Length)
	binary.LittleEndian.PutUint32(b[36:], crc)
}

// AppendRecord appends the encoding of r to dst. The checksum of the data is
// computed here, once, at the source; every later stage verifies it.
func AppendRecord(dst []byte, r *Record) []byte {
	n := len(dst)
	dst = append(dst, make([]byte, RecordHeaderSize)...)
	putRecordHeader(dst[n:], r, Checksum(r.Data))
	return append(dst, r.Data...)
}

// EncodeRecordHeader writes r's header, with the given data checksum, to b,
// which must hold RecordHeaderSize bytes. It lets a writer checksum and write
// the data separately (no copy of large payloads).
func EncodeRecordHeader(b []byte, r *Record, dataCRC uint32) { putRecordHeader(b, r, dataCRC) }

// BaseShare returns how many data bytes of the encoded records in raw
// belong to base (initial-copy) records, and how many data bytes they hold
// in all. It reads only the record headers, so raw must be records this
// process encoded (an agent's frame before it is sent); a header whose
// length runs past raw ends the count.
func BaseShare(raw []byte) (base, all int) {
	for len(raw) >= RecordHeaderSize {
		k := Kind(raw[20])
		n := RecordHeaderSize
		if k.HasData() {
			l := int(binary.LittleEndian.Uint32(raw[32:]))
			if l > len(raw)-n {
				break
			}
			n += l
			all += l
			if k == KindBase {
				base += l
			}
		}
		raw = raw[n:]
	}
	return base, all
}

// DecodeRecord decodes one record from the front of b and returns it with the
// number of bytes consumed. Data aliases b. The data checksum and the
// structure (kind, lengths) are verified; a failure wraps ErrCorrupt.
func DecodeRecord(b []byte) (Record, int, error) {
	var r Record
	if len(b) < RecordHeaderSize {
		return r, 0, fmt.Errorf("record header: %d bytes: %w", len(b), ErrCorrupt)
	}
	r.Seq = binary.LittleEndian.Uint64(b[0:])
	r.Time = int64(binary.LittleEndian.Uint64(b[8:]))
	r.Disk = binary.LittleEndian.Uint32(b[16:])
	r.Kind = Kind(b[20])
	r.Flags = b[21]
	r.Offset = binary.LittleEndian.Uint64(b[24:])
	r.Length = binary.LittleEndian.Uint32(b[32:])
	crc := binary.LittleEndian.Uint32(b[36:])
	if b[22] != 0 || b[23] != 0 {
		return r, 0, fmt.Errorf("record %d: reserved bytes set: %w", r.Seq, ErrCorrupt)
	}
	if r.Kind < KindWrite || r.Kind > KindResync {
		return r, 0, fmt.Errorf("record %d: unknown kind %d: %w", r.Seq, r.Kind, ErrCorrupt)
	}
	if r.Length > MaxRecordData && r.Kind.HasData() {
		return r, 0, fmt.Errorf("record %d: length %d over limit: %w", r.Seq, r.Length, ErrCorrupt)
	}
	if r.Offset+uint64(r.Length) < r.Offset {
		return r, 0, fmt.Errorf("record %d: range overflows: %w", r.Seq, ErrCorrupt)
	}
	n := RecordHeaderSize
	if r.Kind.HasData() {
		if len(b)-n < int(r.Length) {
			return r, 0, fmt.Errorf("record %d: data truncated (%d of %d bytes): %w", r.Seq, len(b)-n, r.Length, ErrCorrupt)
		}
		r.Data = b[n : n+int(r.Length)]
		n += int(r.Length)
	}
	if got := Checksum(r.Data); got != crc {
		return r, 0, fmt.Errorf("record %d: data checksum %08x, want %08x: %w", r.Seq, got, crc, ErrCorrupt)
	}
	return r, n, nil
}

// DecodeRecords decodes a batch of consecutive records. The sequence numbers
// must be contiguous starting at first, and the batch must hold count records
// and nothing else. count comes from a frame header: a count that b cannot
// hold (every record takes at least RecordHeaderSize bytes) is refused
// before anything is allocated from it.
func DecodeRecords(b []byte, first uint64, count uint32) ([]Record, error) {
	if uint64(count) > uint64(len(b)/RecordHeaderSize) {
		return nil, fmt.Errorf("batch of %d bytes cannot hold the %d records its header says: %w", len(b), count, ErrCorrupt)
	}
	recs := make([]Record, 0, count)
	for len(b) > 0 {
		r, n, err := DecodeRecord(b)
		if err != nil {
			return nil, err
		}
		if want := first + uint64(len(recs)); r.Seq != want {
			return nil, fmt.Errorf("record seq %d, want %d: %w", r.Seq, want, ErrCorrupt)
		}
		recs = append(recs, r)
		b = b[n:]
	}
	if uint32(len(recs)) != count {
		return nil, fmt.Errorf("batch holds %d records, header says %d: %w", len(recs), count, ErrCorrupt)
	}
	return recs, nil
}
