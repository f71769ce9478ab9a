package localfs

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/asrdr/asr/replication"
)

// COW file constants; the format is described in the package comment.
const (
	blockSize     = 4096
	cowHeaderSize = 48
	recHeaderSize = 16
	recSize       = recHeaderSize + blockSize
	cowVersion    = 1
)

var cowMagic = [6]byte{'A', 'S', 'R', 'C', 'O', 'W'}

// castagnoli is the CRC-32C table; replication.Checksum uses the same
// polynomial, but a record's checksum spans two slices.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// cowHeader is the decoded header of a COW file.
type cowHeader struct {
	seq       uint64 // chain order
	committed uint64 // records known durable (a lower bound)
}

func encodeCOWHeader(h cowHeader) []byte {
	b := make([]byte, cowHeaderSize)
	copy(b, cowMagic[:])
	binary.LittleEndian.PutUint16(b[6:], cowVersion)
	binary.LittleEndian.PutUint32(b[8:], blockSize)
	binary.LittleEndian.PutUint64(b[16:], h.seq)
	binary.LittleEndian.PutUint64(b[24:], h.committed)
	binary.LittleEndian.PutUint32(b[44:], replication.Checksum(b[:44]))
	return b
}

func parseCOWHeader(b []byte) (cowHeader, error) {
	var h cowHeader
	if len(b) < cowHeaderSize {
		return h, fmt.Errorf("cow header: %d bytes: %w", len(b), replication.ErrCorrupt)
	}
	if [6]byte(b[:6]) != cowMagic {
		return h, fmt.Errorf("cow header: bad magic: %w", replication.ErrCorrupt)
	}
	if got, want := replication.Checksum(b[:44]), binary.LittleEndian.Uint32(b[44:]); got != want {
		return h, fmt.Errorf("cow header checksum %08x, want %08x: %w", got, want, replication.ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(b[6:]); v != cowVersion {
		return h, fmt.Errorf("cow version %d not supported (this build reads %d): %w", v, cowVersion, replication.ErrCorrupt)
	}
	if bs := binary.LittleEndian.Uint32(b[8:]); bs != blockSize {
		return h, fmt.Errorf("cow block size %d, want %d: %w", bs, blockSize, replication.ErrCorrupt)
	}
	h.seq = binary.LittleEndian.Uint64(b[16:])
	h.committed = binary.LittleEndian.Uint64(b[24:])
	return h, nil
}

// recordCRC is the checksum of a record: its block index, then its data.
func recordCRC(rec []byte) uint32 {
	c := crc32.Update(0, castagnoli, rec[0:8])
	return crc32.Update(c, castagnoli, rec[recHeaderSize:recSize])
}

// putRecord fills rec[:recSize] with the header for block; the data must be
// in rec[recHeaderSize:recSize] already.
func putRecord(rec []byte, block uint64) {
	binary.LittleEndian.PutUint64(rec[0:], block)
	binary.LittleEndian.PutUint32(rec[12:], 0)
	binary.LittleEndian.PutUint32(rec[8:], recordCRC(rec))
}

var errBadRecord = errors.New("bad record")

// checkRecord verifies rec (recSize bytes) and returns its block index.
func checkRecord(rec []byte, nblocks uint64) (uint64, error) {
	block := binary.LittleEndian.Uint64(rec[0:])
	if binary.LittleEndian.Uint32(rec[12:]) != 0 {
		return block, fmt.Errorf("block %d: reserved bytes set: %w", block, errBadRecord)
	}
	if got, want := recordCRC(rec), binary.LittleEndian.Uint32(rec[8:]); got != want {
		return block, fmt.Errorf("block %d: checksum %08x, want %08x: %w", block, got, want, errBadRecord)
	}
	if block >= nblocks {
		return block, fmt.Errorf("block %d past the disk's %d blocks: %w", block, nblocks, errBadRecord)
	}
	return block, nil
}

// recordOffset is the file offset of record i.
func recordOffset(i int64) int64 { return cowHeaderSize + i*recSize }

// cowScan is what scanCOW learned about a COW file.
type cowScan struct {
	header   cowHeader
	index    map[uint64]int64 // block -> record offset
	records  int64            // valid records (damaged committed ones included)
	validEnd int64            // bytes up to the end of the last valid record
	damaged  int64            // committed records that fail their checksum
}

// scanCOW reads a COW file of size bytes for a disk of nblocks blocks and
// indexes its records. A damaged committed record is counted and indexed
// (reads of its block fail); damage after them is a torn tail: the scan
// stops there and validEnd says where to truncate.
func scanCOW(r io.Reader, size int64, nblocks uint64) (cowScan, error) {
	var s cowScan
	br := bufio.NewReaderSize(r, int(min(max(size, 16), 256*recSize)))
	hb := make([]byte, cowHeaderSize)
	if _, err := io.ReadFull(br, hb); err != nil {
		return s, fmt.Errorf("cow header: %v: %w", err, replication.ErrCorrupt)
	}
	h, err := parseCOWHeader(hb)
	if err != nil {
		return s, err
	}
	s.header = h
	s.index = map[uint64]int64{}
	s.validEnd = cowHeaderSize
	complete := (size - cowHeaderSize) / recSize
	if h.committed > uint64(max(complete, 0)) {
		return s, fmt.Errorf("cow header commits %d records, file holds %d: %w", h.committed, complete, replication.ErrCorrupt)
	}
	rec := make([]byte, recSize)
	for i := int64(0); ; i++ {
		committed := uint64(i) < h.committed
		if _, err := io.ReadFull(br, rec); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				if committed {
					return s, fmt.Errorf("cow record %d: truncated: %w", i, replication.ErrCorrupt)
				}
				return s, nil
			}
			return s, fmt.Errorf("cow record %d: %w", i, err)
		}
		block, err := checkRecord(rec, nblocks)
		if err == nil {
			if _, dup := s.index[block]; dup {
				err = fmt.Errorf("block %d saved twice: %w", block, errBadRecord)
			}
		}
		if err != nil {
			if !committed {
				return s, nil // torn tail
			}
			// A committed record damaged since it was written (bit rot).
			// It stays indexed under its block, so reading that block of
			// the snapshot fails (ErrCorrupt) as it would after the open;
			// the rest of the disk stays usable. If its block index is
			// what was damaged, the block is unknown and the record is
			// skipped; the block checksums the applier keeps beside every
			// disk (replication/sums.go) catch the loss when it is read.
			s.damaged++
			if _, dup := s.index[block]; block < nblocks && !dup {
				s.index[block] = recordOffset(i)
			}
			s.records = i + 1
			s.validEnd = recordOffset(i + 1)
			continue
		}
		s.index[block] = recordOffset(i)
		s.records = i + 1
		s.validEnd = recordOffset(i + 1)
	}
}
