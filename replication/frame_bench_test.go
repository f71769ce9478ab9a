package replication

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// BenchmarkDataFrame: what building a 4 MiB DATA frame of 4-64 KiB
// writes costs, compressed (zstd, what an agent with --compress and the
// process server do; S2, what an agent sends its initial copy in) against
// plain, on fio's incompressible random buffers, on a repeated sentence,
// and on the bench disk's text of random words (bench/asrbench
// makeMixedDisk); and what decoding the frame costs the process server.
// b.SetBytes is the records' size: the MB/s is the churn one core frames;
// the "ratio" metric is the payload's size over the records'.
func BenchmarkDataFrame(b *testing.B) {
	r := rand.New(rand.NewPCG(5, 6))
	wr := rand.New(rand.NewPCG(1, 2))
	dict := []string{"the ", "replica ", "of ", "disk ", "block ", "journal ", "recovery ", "point ", "site ", "and ", "\n", "2026-11-26 ", "INFO ", "vm-042 "}
	mk := func(random, words bool) []byte {
		var raw []byte
		text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog 0123456789\n"), 64<<10/55+1)
		for seq := uint64(1); len(raw) < 4<<20; seq++ {
			n := (1 + r.IntN(16)) * 4096
			data := text[:n]
			if words { // fresh words for every record, as on the disk
				data = make([]byte, n)
				for j := 0; j < n; {
					j += copy(data[j:], dict[wr.IntN(len(dict))])
				}
			}
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
	}{{"random", mk(true, false)}, {"text", mk(false, false)}, {"words", mk(false, true)}} {
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
			var f Frame
			for b.Loop() {
				f = c.DataFrame(in.raw, 1, 1, dst)
				_ = Checksum(f.Payload)
			}
			b.ReportMetric(float64(len(f.Payload))/float64(len(in.raw)), "ratio")
		})
		b.Run(in.name+"/s2", func(b *testing.B) {
			var dst []byte
			b.SetBytes(int64(len(in.raw)))
			var f Frame
			for b.Loop() {
				f = S2DataFrame(in.raw, 1, 1, dst)
				if f.Compressed() {
					dst = f.Payload
				}
				_ = Checksum(f.Payload)
			}
			b.ReportMetric(float64(len(f.Payload))/float64(len(in.raw)), "ratio")
		})
		for _, codec := range []string{"zstd", "s2"} {
			b.Run(in.name+"/"+codec+"-decode", func(b *testing.B) {
				c := DefaultCodec()
				f := c.DataFrame(in.raw, 1, 1, nil)
				if codec == "s2" {
					f = S2DataFrame(in.raw, 1, 1, nil)
				}
				buf := make([]byte, 0, len(in.raw))
				b.SetBytes(int64(len(in.raw)))
				for b.Loop() {
					var err error
					if _, buf, err = c.payload(&f, buf); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
