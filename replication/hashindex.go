package replication

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sync"

	"github.com/asrdr/asr/store/atomicfile"
)

// A resync finds what differs between a source disk and its replica by
// comparing hashes, hierarchically: a hash per 1 MiB chunk first (identical
// chunks cost one comparison), then, for the chunks that differ, the hashes
// of their 256 blocks of 4 KiB; only the blocks that differ travel. The
// hashes are SHA-256 truncated to 128 bits.
//
// HashIndex keeps the replica's block hashes beside it (in the process
// server's data directory), so a resync does not read the replica back
// from the target: the applier hashes what it writes, whole blocks from the
// record data itself; a block written in part is marked stale and re-read
// (one chunk at a time) when a resync needs it. The index is saved with the
// sequence number it describes, every so often and at a clean stop; loaded
// for another sequence number (the server stopped in between), every block
// is stale. Before a resync uses the index, a sample of its chunks is
// checked against the replica; a mismatch marks the whole index stale.

// Resync hash geometry.
const (
	HashBlock  = 4096
	HashFanout = 256
	HashChunk  = HashBlock * HashFanout // 1 MiB
)

// Hash is a block or chunk hash.
type Hash [16]byte

// HashData hashes a block (the last block of a disk may be shorter).
func HashData(b []byte) Hash {
	s := sha256.Sum256(b)
	return Hash(s[:16])
}

// ChunkHash hashes a chunk's block hashes.
func ChunkHash(leaves []Hash) Hash {
	h := sha256.New()
	for _, l := range leaves {
		h.Write(l[:])
	}
	var out Hash
	copy(out[:], h.Sum(nil))
	return out
}

// ChunkLeaves hashes the blocks of a chunk's data.
func ChunkLeaves(chunk []byte) []Hash {
	n := (len(chunk) + HashBlock - 1) / HashBlock
	leaves := make([]Hash, n)
	for i := range leaves {
		end := min((i+1)*HashBlock, len(chunk))
		leaves[i] = HashData(chunk[i*HashBlock : end])
	}
	return leaves
}

// HashIndex is the block-hash index of one replica disk.
type HashIndex struct {
	path string

	mu      sync.Mutex
	size    int64
	leaves  []Hash // in memory: 16 bytes per 4 KiB of disk
	stale   []bool // the leaf does not describe the replica
	changed bool   // differs from the file
	dirty   bool   // stale marks changed since the last save
	seq     uint64 // applied sequence number of the saved file
}

var indexMagic = [6]byte{'A', 'S', 'R', 'I', 'D', 'X'}

// OpenHashIndex loads the index at path for a disk of size bytes whose
// replica holds every record up to appliedSeq. A missing or damaged index,
// or one for another size or sequence number, starts over with every block
// stale, except for a new disk (fresh: the replica is all zeros).
func OpenHashIndex(path string, size int64, fresh bool, appliedSeq uint64) (*HashIndex, error) {
	x := &HashIndex{path: path}
	x.setSize(size)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		x.reset(fresh)
		x.changed, x.dirty = true, true
		return x, nil
	case err != nil:
		return nil, err
	}
	if err := x.decode(b); err != nil || x.seq != appliedSeq {
		x.reset(false)
		x.changed, x.dirty = true, true
	}
	return x, nil
}

func (x *HashIndex) setSize(size int64) {
	n := int((size + HashBlock - 1) / HashBlock)
	x.size = size
	x.leaves = make([]Hash, n)
	x.stale = make([]bool, n)
}

// reset makes every block zero (fresh) or stale.
func (x *HashIndex) reset(fresh bool) {
	for i := range x.leaves {
		if fresh {
			x.leaves[i], x.stale[i] = zeroHash(int64(x.blockLen(i))), false
		} else {
			x.stale[i] = true
		}
	}
}

func (x *HashIndex) blockLen(i int) int {
	return int(min(int64(HashBlock), x.size-int64(i)*HashBlock))
}

// zeroBlockHash is the hash of a whole block of zeros, computed once: a new
// or grown replica, and every zeroed range, would otherwise hash megabytes
// of zeros (a 2 GiB disk: 1.4 s of SHA-256 before its first byte arrives).
var zeroBlockHash = sync.OnceValue(func() Hash { return HashData(make([]byte, HashBlock)) })

// zeroHash is the hash of n zero bytes.
func zeroHash(n int64) Hash {
	if n == HashBlock {
		return zeroBlockHash()
	}
	return HashData(make([]byte, n))
}

// File: magic, version u16, size u64, count u64, seq u64, then per block
// [stale u8][hash 16], then CRC-32C of all before.
func (x *HashIndex) encode(seq uint64) []byte {
	b := make([]byte, 0, 32+len(x.leaves)*17+4)
	b = append(b, indexMagic[:]...)
	b = binary.LittleEndian.AppendUint16(b, 1)
	b = binary.LittleEndian.AppendUint64(b, uint64(x.size))
	b = binary.LittleEndian.AppendUint64(b, uint64(len(x.leaves)))
	b = binary.LittleEndian.AppendUint64(b, seq)
	for i, h := range x.leaves {
		s := byte(0)
		if x.stale[i] {
			s = 1
		}
		b = append(b, s)
		b = append(b, h[:]...)
	}
	return binary.LittleEndian.AppendUint32(b, Checksum(b))
}

func (x *HashIndex) decode(b []byte) error {
	if len(b) < 36 || [6]byte(b[:6]) != indexMagic || binary.LittleEndian.Uint16(b[6:]) != 1 {
		return fmt.Errorf("hash index %s: bad header: %w", x.path, ErrCorrupt)
	}
	if Checksum(b[:len(b)-4]) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return fmt.Errorf("hash index %s: checksum: %w", x.path, ErrCorrupt)
	}
	size, n := int64(binary.LittleEndian.Uint64(b[8:])), binary.LittleEndian.Uint64(b[16:])
	if size != x.size || n != uint64(len(x.leaves)) || len(b) != 32+int(n)*17+4 {
		return fmt.Errorf("hash index %s: for another disk size: %w", x.path, ErrCorrupt)
	}
	x.seq = binary.LittleEndian.Uint64(b[24:])
	p := b[32:]
	for i := range x.leaves {
		x.stale[i] = p[0] == 1
		copy(x.leaves[i][:], p[1:17])
		p = p[17:]
	}
	return nil
}

// Save writes the index durably, as describing the replica with every
// record up to seq applied.
func (x *HashIndex) Save(seq uint64) error {
	x.mu.Lock()
	if !x.changed && !x.dirty && x.seq == seq {
		x.mu.Unlock()
		return nil
	}
	b := x.encode(seq)
	x.seq = seq
	x.changed, x.dirty = false, false
	x.mu.Unlock()
	if err := os.MkdirAll(dirOf(x.path), 0o700); err != nil {
		return err
	}
	return atomicfile.Write(x.path, b, 0o600)
}

func dirOf(path string) string {
	for i := len(path) - 1; i >= 0; i-- {
		if path[i] == '/' {
			return path[:i]
		}
	}
	return "."
}

// Grow extends the index for a grown disk; the new area is zero.
func (x *HashIndex) Grow(size int64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if size <= x.size {
		return
	}
	oldN := len(x.leaves)
	// The old last block may have been short: it is now followed by zeros.
	if oldN > 0 && x.size%HashBlock != 0 {
		x.stale[oldN-1] = true
	}
	n := int((size + HashBlock - 1) / HashBlock)
	x.size = size
	for i := oldN; i < n; i++ {
		x.leaves = append(x.leaves, Hash{})
		x.stale = append(x.stale, false)
		x.leaves[i] = zeroHash(int64(x.blockLen(i)))
	}
	x.changed = true
}

// Write records that data was written at off: whole blocks are hashed from
// the data, partly written ones marked stale.
func (x *HashIndex) Write(off int64, data []byte) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.note(off, int64(len(data)), func(i int, b0, b1 int64) {
		x.leaves[i], x.stale[i] = HashData(data[b0-off:b1-off]), false
	})
}

// Zero records that n bytes at off now read as zero.
func (x *HashIndex) Zero(off, n int64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.note(off, n, func(i int, b0, b1 int64) {
		x.leaves[i], x.stale[i] = zeroHash(b1-b0), false
	})
}

// note calls whole(i, start, end) for each block wholly in [off, off+n) and
// marks the blocks it covers only in part stale.
func (x *HashIndex) note(off, n int64, whole func(i int, b0, b1 int64)) {
	if n <= 0 {
		return
	}
	end := min(off+n, x.size)
	for i := int(off / HashBlock); i < len(x.leaves) && int64(i)*HashBlock < end; i++ {
		b0, b1 := int64(i)*HashBlock, int64(i)*HashBlock+int64(x.blockLen(i))
		if b0 >= off && b1 <= end {
			whole(i, b0, b1)
		} else {
			x.stale[i] = true
		}
	}
	x.changed, x.dirty = true, true
}

// Chunk returns the hash of chunk c and its block hashes, refreshing stale
// blocks from the replica first (read reads the replica's current
// contents).
func (x *HashIndex) Chunk(c int, read func(p []byte, off int64) error) (Hash, []Hash, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	first := c * HashFanout
	if first >= len(x.leaves) {
		return Hash{}, nil, fmt.Errorf("chunk %d past the disk's end", c)
	}
	last := min(first+HashFanout, len(x.leaves))
	stale := false
	for i := first; i < last; i++ {
		stale = stale || x.stale[i]
	}
	if stale {
		off := int64(first) * HashBlock
		buf := make([]byte, min(int64(HashChunk), x.size-off))
		if err := read(buf, off); err != nil {
			return Hash{}, nil, fmt.Errorf("refresh chunk %d from the replica: %w", c, err)
		}
		for i, h := range ChunkLeaves(buf) {
			x.leaves[first+i], x.stale[first+i] = h, false
		}
		x.changed, x.dirty = true, true
	}
	leaves := append([]Hash(nil), x.leaves[first:last]...)
	return ChunkHash(leaves), leaves, nil
}

// Verify checks n random chunks against the replica; on any mismatch the
// whole index is marked stale (it will be rebuilt as resyncs read it) and
// the number of bad chunks is returned.
func (x *HashIndex) Verify(n int, read func(p []byte, off int64) error) (int, error) {
	x.mu.Lock()
	chunks := (len(x.leaves) + HashFanout - 1) / HashFanout
	x.mu.Unlock()
	bad := 0
	for k := 0; k < n && chunks > 0; k++ {
		c := rand.IntN(chunks)
		x.mu.Lock()
		first, last := c*HashFanout, min((c+1)*HashFanout, len(x.leaves))
		known := true
		for i := first; i < last; i++ {
			known = known && !x.stale[i]
		}
		want := append([]Hash(nil), x.leaves[first:last]...)
		size := x.size
		x.mu.Unlock()
		if !known {
			continue
		}
		off := int64(first) * HashBlock
		buf := make([]byte, min(int64(HashChunk), size-off))
		if err := read(buf, off); err != nil {
			return bad, err
		}
		got := ChunkLeaves(buf)
		for i := range got {
			if got[i] != want[i] {
				bad++
				break
			}
		}
	}
	if bad > 0 {
		x.mu.Lock()
		for i := range x.stale {
			x.stale[i] = true
		}
		x.changed, x.dirty = true, true
		x.mu.Unlock()
	}
	return bad, nil
}

// ReadFull adapts an io.ReaderAt to the read functions above.
func ReadFull(r io.ReaderAt) func(p []byte, off int64) error {
	return func(p []byte, off int64) error {
		n, err := r.ReadAt(p, off)
		if n == len(p) {
			return nil
		}
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
}
