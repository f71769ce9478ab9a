package localfs

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkWriteFlush writes random 4 KiB blocks to a 1 GiB disk, flushing
// every 64 writes and taking a snapshot every `every` writes (keeping the
// last 8), as an applier does.
//
//	go test -run '^$' -bench . -benchtime 20000x ./replication/localfs/
func BenchmarkWriteFlush(b *testing.B) {
	for _, every := range []int{0, 256, 4096} {
		b.Run(fmt.Sprintf("snapshotEvery=%d", every), func(b *testing.B) {
			const size = 1 << 30
			tg := mustOpen(b, b.TempDir())
			d := mustDisk(b, tg, "d", size)
			defer d.Close()
			rng := rand.New(rand.NewPCG(1, 2))
			p := make([]byte, blockSize)
			var snaps []string
			b.SetBytes(blockSize)
			b.ResetTimer()
			for i := range b.N {
				for j := range p {
					p[j] = byte(i + j)
				}
				if err := d.WriteAt(p, rng.Int64N(size/blockSize)*blockSize); err != nil {
					b.Fatal(err)
				}
				if i%64 == 63 {
					if err := d.Flush(b.Context()); err != nil {
						b.Fatal(err)
					}
				}
				if every > 0 && i%every == every-1 {
					name := fmt.Sprintf("%016x", i)
					mustFlushSnap(b, d, name)
					snaps = append(snaps, name)
					if len(snaps) > 8 {
						if err := d.DeleteSnapshot(b.Context(), snaps[0]); err != nil {
							b.Fatal(err)
						}
						snaps = snaps[1:]
					}
				}
			}
			if err := d.Flush(b.Context()); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkSnapshotRead reads a 64 MiB disk through its oldest snapshot (a
// fifth of its blocks come from undo logs, ten epochs deep) and its newest
// (all from the replica) in 1 MiB reads.
func BenchmarkSnapshotRead(b *testing.B) {
	const size = 64 << 20
	tg := mustOpen(b, b.TempDir())
	d := mustDisk(b, tg, "d", size)
	defer d.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	p := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(p)) {
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		if err := d.WriteAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
	mustFlushSnap(b, d, "e00")
	for e := 1; e <= 10; e++ {
		for range 350 {
			if err := d.WriteAt(p[:blockSize], rng.Int64N(size/blockSize)*blockSize); err != nil {
				b.Fatal(err)
			}
		}
		mustFlushSnap(b, d, fmt.Sprintf("e%02d", e))
	}
	for _, name := range []string{"e00", "e10"} {
		b.Run(name, func(b *testing.B) {
			r, err := d.OpenSnapshot(b.Context(), name)
			if err != nil {
				b.Fatal(err)
			}
			defer r.Close()
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for i := range b.N {
				off := int64(i) * int64(len(buf)) % size
				if _, err := r.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
