package replication

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
)

// Failback's reverse direction (docs/PROTOCOL.md, "Failback"): after a
// planned failover the original agent is frozen (FREEZE), and the server
// writes the failed-over machine's changes back into its disks with
// REVERSE frames, each acknowledged by a REVERSE_ACK once it is durable
// on the original disk. The frames travel on the agent's ordinary data
// connection; the agent accepts them only for the failover it is frozen
// under.

// MaxReverseData bounds the data one REVERSE frame carries.
const MaxReverseData = 1 << 20

// reverseHeader is the fixed part of a REVERSE payload after the id.
const reverseHeader = 4 + 8 + 4 // disk, offset, crc

// ReverseData is one REVERSE frame: Data to be written at Off of disk Disk
// of the machine frozen under failover ID. Its sequence number is the
// frame's Seq.
type ReverseData struct {
	ID   string
	Disk uint32
	Off  int64
	Data []byte
}

// ReverseFrame builds the REVERSE frame of d with sequence number seq.
// Payload: id length (1 byte), id, disk (4), offset (8), CRC-32C of the
// data (4), data.
func ReverseFrame(seq uint64, d ReverseData) (Frame, error) {
	if err := d.Validate(); err != nil {
		return Frame{}, err
	}
	p := make([]byte, 1+len(d.ID)+reverseHeader+len(d.Data))
	p[0] = byte(len(d.ID))
	n := 1 + copy(p[1:], d.ID)
	binary.LittleEndian.PutUint32(p[n:], d.Disk)
	binary.LittleEndian.PutUint64(p[n+4:], uint64(d.Off))
	binary.LittleEndian.PutUint32(p[n+12:], Checksum(d.Data))
	copy(p[n+16:], d.Data)
	return Frame{Type: FrameReverse, Seq: seq, Payload: p, RawLen: uint32(len(p))}, nil
}

// DecodeReverse decodes and checks a REVERSE frame's payload. Data aliases
// the frame's payload.
func DecodeReverse(f *Frame) (ReverseData, error) {
	var d ReverseData
	p := f.Payload
	if f.Compressed() {
		return d, &ProtocolError{"reverse frame: compressed payload"}
	}
	if len(p) < 1 {
		return d, &ProtocolError{"reverse frame: empty payload"}
	}
	idn := int(p[0])
	if len(p) < 1+idn+reverseHeader {
		return d, &ProtocolError{fmt.Sprintf("reverse frame: %d bytes, under its header", len(p))}
	}
	d.ID = string(p[1 : 1+idn])
	h := p[1+idn:]
	d.Disk = binary.LittleEndian.Uint32(h)
	off := binary.LittleEndian.Uint64(h[4:])
	crc := binary.LittleEndian.Uint32(h[12:])
	if off > uint64(MaxDiskSize) {
		return d, &ProtocolError{fmt.Sprintf("reverse frame: offset %d past %d", off, MaxDiskSize)}
	}
	d.Off = int64(off)
	d.Data = h[reverseHeader:]
	if err := d.Validate(); err != nil {
		return d, &ProtocolError{err.Error()}
	}
	if Checksum(d.Data) != crc {
		return d, &ProtocolError{"reverse frame: data checksum mismatch"}
	}
	return d, nil
}

// Validate checks a ReverseData's bounds: a valid failover id, 1 to
// MaxReverseData bytes, the range inside MaxDiskSize.
func (d *ReverseData) Validate() error {
	if !ValidFreezeID(d.ID) {
		return validationError("reverse", "id %q: want %s", d.ID, MachineNameRule)
	}
	if len(d.Data) == 0 || len(d.Data) > MaxReverseData {
		return validationError("reverse", "%d bytes of data: want 1 to %d", len(d.Data), MaxReverseData)
	}
	if d.Off < 0 || d.Off > MaxDiskSize-int64(len(d.Data)) {
		return validationError("reverse", "range %d+%d outside %d", d.Off, len(d.Data), MaxDiskSize)
	}
	return nil
}

// ReverseSum is the payload of FrameReverseSum: the server asks for the
// SHA-256 of the whole of disk Disk of the machine frozen under ID; the
// answer is a ReverseAck with the same Seq.
//
// With Block set it asks instead for the block sums of Count blocks of
// Block bytes from Off (the last one cut at the disk's end, none past
// it): the checksum compare of an unplanned failover's failback, which
// finds the blocks where the original disk differs from the failed-over
// one. The answer's Hashes holds one BlockSum per block.
type ReverseSum struct {
	ID    string `json:"id"`
	Seq   uint64 `json:"seq"`
	Disk  uint32 `json:"disk"`
	Off   int64  `json:"off,omitempty"`
	Block int64  `json:"block,omitempty"`
	Count int    `json:"count,omitempty"`
	// Leaves asks, with Block = HashBlock, for each block's resync leaf
	// hash (HashData) rather than its BlockSum: the WANT of a resync run
	// by a recovered VM's agent against the original disks (the server's
	// failback_agent_resync.go). An agent older than it ignores the field
	// and answers BlockSums, which differ from every leaf: the whole
	// chunk is then sent, correct but larger.
	Leaves bool `json:"leaves,omitempty"`
}

// MaxReverseHashes bounds the block sums one REVERSE_SUM asks for.
const MaxReverseHashes = 1024

// Validate checks a ReverseSum: a valid id; for block sums, a block of
// HashBlock to MaxReverseData bytes in whole HashBlocks, 1 to
// MaxReverseHashes of them, from an offset aligned to the block inside
// MaxDiskSize; without Block, no Off or Count.
func (r *ReverseSum) Validate() error {
	if !ValidFreezeID(r.ID) {
		return validationError("reverse-sum", "id %q: want %s", r.ID, MachineNameRule)
	}
	if r.Leaves && r.Block != HashBlock {
		return validationError("reverse-sum", "leaf hashes of %d-byte blocks: want %d", r.Block, HashBlock)
	}
	if r.Block == 0 {
		if r.Off != 0 || r.Count != 0 {
			return validationError("reverse-sum", "offset %d and count %d without a block size", r.Off, r.Count)
		}
		return nil
	}
	if r.Block < HashBlock || r.Block > MaxReverseData || r.Block%HashBlock != 0 {
		return validationError("reverse-sum", "block of %d bytes: want %d to %d in steps of %d", r.Block, HashBlock, MaxReverseData, HashBlock)
	}
	if r.Count < 1 || r.Count > MaxReverseHashes {
		return validationError("reverse-sum", "%d blocks: want 1 to %d", r.Count, MaxReverseHashes)
	}
	if r.Off < 0 || r.Off >= MaxDiskSize || r.Off%r.Block != 0 {
		return validationError("reverse-sum", "offset %d: want a multiple of %d under %d", r.Off, r.Block, MaxDiskSize)
	}
	return nil
}

// BlockSum is the sum of one block in a REVERSE_SUM's answer: the
// resync's hash tree over it (ChunkHash of its 4 KiB blocks' hashes), so
// both sides compute it as the resync does.
func BlockSum(p []byte) Hash { return ChunkHash(ChunkLeaves(p)) }

// ReverseBlocks is how many block sums the answer to a block-sum
// REVERSE_SUM holds on a disk of size bytes: the blocks from Off, cut at
// the disk's end; 0 if Off is at or past it.
func (r *ReverseSum) ReverseBlocks(size int64) int {
	if r.Block <= 0 || r.Off >= size {
		return 0
	}
	end := min(r.Off+r.Block*int64(r.Count), size)
	return int((end - r.Off + r.Block - 1) / r.Block)
}

// ReverseAck is the payload of FrameReverseAck: the REVERSE frame (or
// REVERSE_SUM) with sequence number Seq was carried out: for REVERSE its
// data is durable on the original disk; for REVERSE_SUM, Sum (64 hex
// digits) and Size describe the disk, or Hashes holds the block sums
// asked for (and Size is the disk's). Error set: it was refused, and
// nothing was written.
type ReverseAck struct {
	ID   string `json:"id"`
	Seq  uint64 `json:"seq"`
	Sum  string `json:"sum,omitempty"`
	Size int64  `json:"size,omitempty"`
	// Hashes is a block-sum REVERSE_SUM's answer: 16 bytes per block.
	Hashes []byte `json:"hashes,omitempty"`
	Error  string `json:"error,omitempty"`
}

// Validate checks a ReverseAck: a valid id, a sum of 64 hex digits if
// any, a size inside MaxDiskSize, whole block sums and at most
// MaxReverseHashes of them, an error message of at most 4 KiB.
func (r *ReverseAck) Validate() error {
	if !ValidFreezeID(r.ID) {
		return validationError("reverse-ack", "id %q: want %s", r.ID, MachineNameRule)
	}
	if r.Sum != "" {
		if b, err := hex.DecodeString(r.Sum); err != nil || len(b) != 32 {
			return validationError("reverse-ack", "sum %q: want 64 hex digits", r.Sum)
		}
	}
	if r.Size < 0 || r.Size > MaxDiskSize {
		return validationError("reverse-ack", "size %d outside 0..%d", r.Size, MaxDiskSize)
	}
	if len(r.Hashes)%len(Hash{}) != 0 || len(r.Hashes) > MaxReverseHashes*len(Hash{}) {
		return validationError("reverse-ack", "%d bytes of block sums: want whole sums of %d bytes, at most %d of them", len(r.Hashes), len(Hash{}), MaxReverseHashes)
	}
	if len(r.Error) > 4096 {
		return validationError("reverse-ack", "error message of %d bytes", len(r.Error))
	}
	return nil
}
