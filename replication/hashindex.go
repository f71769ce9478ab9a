package replication

import (
	"crypto/sha256"
	"io"
	"sync"
)

// A resync finds what differs between a source disk and its replica by
// comparing hashes, hierarchically: a hash per 1 MiB chunk first (identical
// chunks cost one comparison), then, for the chunks that differ, the hashes
// of their 256 blocks of 4 KiB; only the blocks that differ travel. The
// hashes are SHA-256 truncated to 128 bits. The replica's side of the
// comparison comes from its block checksums (sums.go), which the applier
// keeps on the target beside each replica disk.

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

// zeroBlockHash is the hash of a whole block of zeros, computed once: a
// chunk of a fresh replica would otherwise hash a megabyte of zeros.
var zeroBlockHash = sync.OnceValue(func() Hash { return HashData(make([]byte, HashBlock)) })

// zeroHash is the hash of n zero bytes.
func zeroHash(n int64) Hash {
	if n == HashBlock {
		return zeroBlockHash()
	}
	return HashData(make([]byte, n))
}

// ReadFull adapts an io.ReaderAt to a read function that fills p or fails.
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
