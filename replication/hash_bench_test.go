package replication

import (
	"crypto/sha256"
	"math/rand/v2"
	"testing"

	"lukechampine.com/blake3"
)

// The block hash (HashData, SHA-256 truncated to 128 bits) against BLAKE3
// (lukechampine.com/blake3, AVX-512/AVX2 assembly) on the sizes the
// replica index and a resync hash: 4 KiB blocks, 64 KiB writes, 1 MiB
// chunks (issue 13; figures in BENCHMARKS.md). BLAKE3 is only a
// dependency of this benchmark.
func BenchmarkBlockHash(b *testing.B) {
	for _, size := range []struct {
		name string
		n    int
	}{{"4KiB", 4 << 10}, {"64KiB", 64 << 10}, {"1MiB", 1 << 20}} {
		buf := make([]byte, size.n)
		rand.NewChaCha8([32]byte{7}).Read(buf)
		b.Run("sha256/"+size.name, func(b *testing.B) {
			b.SetBytes(int64(size.n))
			for b.Loop() {
				_ = sha256.Sum256(buf)
			}
		})
		b.Run("blake3/"+size.name, func(b *testing.B) {
			b.SetBytes(int64(size.n))
			for b.Loop() {
				_ = blake3.Sum256(buf)
			}
		})
	}
}
