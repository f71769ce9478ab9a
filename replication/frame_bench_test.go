package replication

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// BenchmarkDataFrame: what building a 4 MiB DATA frame of 4-64 KiB
// writes costs, compressed (zstd, what an agent with --compress and the
// process server do) against plain (what an agent does by default), on
// fio's incompressible random buffers and on text-like data. b.SetBytes
// is the records' size: the MB/s is the guest's churn one core frames.
func BenchmarkDataFrame(b *testing.B) {
	r := rand.New(rand.NewPCG(5, 6))
	mk := func(random bool) []byte {
		var raw []byte
		text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog 0123456789\n"), 64<<10/55+1)
		for seq := uint64(1); len(raw) < 4<<20; seq++ {
			n := (1 + r.IntN(16)) * 4096
			data := text[:n]
			if random {
				data = make([]byte, n)
				for i := range data {
					data[i] = byte(r.Uint32())
				}
			}
			rec := Record{Seq: seq, Kind: KindWrite, Offset: uint64(r.IntN(1<<20)) * 4096, Length: uint32(n), Data: data}
			raw = AppendRecord(raw, &rec)
		}
		return raw
	}
	for _, in := range []struct {
		name string
		raw  []byte
	}{{"random", mk(true)}, {"text", mk(false)}} {
		b.Run(in.name+"/plain", func(b *testing.B) {
			b.SetBytes(int64(len(in.raw)))
			for b.Loop() {
				f := PlainDataFrame(in.raw, 1, 1)
				_ = Checksum(f.Payload) // what the frame header costs either way
			}
		})
		b.Run(in.name+"/zstd", func(b *testing.B) {
			c := DefaultCodec()
			dst := make([]byte, 0, len(in.raw))
			b.SetBytes(int64(len(in.raw)))
			for b.Loop() {
				f := c.DataFrame(in.raw, 1, 1, dst)
				_ = Checksum(f.Payload)
			}
		})
	}
}
