package spool

import (
	"context"
	"math/rand/v2"
	"runtime"
	"runtime/debug"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// BenchmarkSteadyState is the agent's path of a change with the server
// keeping up, through the spool files (spool) and through a 64 MiB memory
// log (memlog), side by side: append (the splitter), complete, read (the
// shipper, frames of up to 4 MiB) and acknowledge, 16 records of 4-64 KiB
// at a time, under the soft memory limit `asr agent` sets by default
// (--memory-limit 40MiB). It reports the CPU per record (ns/op), the
// allocations per record and the garbage collections per 1000 records: a
// memory log whose ring counted against the limit kept the collector
// running without a pause (the agent's CPU 2.6-3.1x the spool's in the
// churn bench, BENCHMARKS.md "Steady state (2026-12-06, late)").
func BenchmarkSteadyState(b *testing.B) {
	for _, c := range []struct {
		name string
		mem  int64
	}{{"spool", 0}, {"memlog", 64 << 20}} {
		b.Run(c.name, func(b *testing.B) {
			defer debug.SetMemoryLimit(debug.SetMemoryLimit(40 << 20))
			s, rd := benchSpool(b, c.mem)
			rng := rand.New(rand.NewPCG(1, 2))
			// The guest's data comes in buffers from a sync.Pool, as the
			// NBD server's (agent/nbd/bufpool.go): a collection empties
			// the pool, and every buffer is then allocated anew.
			var pool sync.Pool
			var buf []byte
			var bytes int64
			const batch = 16
			ctx := context.Background()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			gcs := ms.NumGC
			b.ReportAllocs()
			b.ResetTimer()
			for done := 0; done < b.N; {
				n := min(batch, b.N-done)
				for range n {
					l := 4<<10 + rng.IntN(60<<10+1)
					data, ok := pool.Get().(*[]byte)
					if !ok {
						d := make([]byte, 64<<10)
						data = &d
					}
					(*data)[0] = byte(done)
					r := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindWrite,
						Offset: rng.Uint64N(1<<30) &^ 4095, Length: uint32(l), Data: (*data)[:l]}
					seq, err := s.Append(ctx, &r)
					if err != nil {
						b.Fatal(err)
					}
					pool.Put(data)
					s.Complete(seq)
					bytes += int64(l)
				}
				for got := 0; got < n; {
					var count int
					buf, count = shipFrame(b, s, rd, buf)
					got += count
				}
				done += n
			}
			b.StopTimer()
			runtime.ReadMemStats(&ms)
			b.ReportMetric(float64(ms.NumGC-gcs)*1000/float64(b.N), "GCs/1000rec")
			b.SetBytes(bytes / int64(b.N))
		})
	}
}

// BenchmarkBacklog is the agent's path of 1 MiB changes while the server
// falls behind: every record is read and acknowledged only once 256 MiB
// more were appended after it, so the memory log (32 MiB, memlog) spills
// all but its last 32 MiB to the files, and the spool log (spool) writes
// everything there. Side by side: the CPU per record of appending,
// reading and acknowledging.
func BenchmarkBacklog(b *testing.B) {
	for _, c := range []struct {
		name string
		mem  int64
	}{{"spool", 0}, {"memlog", 32 << 20}} {
		b.Run(c.name, func(b *testing.B) {
			s, rd := benchSpool(b, c.mem)
			const size, lag = 1 << 20, 256
			data := make([]byte, size)
			rng := rand.New(rand.NewPCG(1, 2))
			for j := range data {
				data[j] = byte(rng.Uint32())
			}
			ctx := context.Background()
			var buf []byte
			read := 0
			b.SetBytes(size)
			b.ResetTimer()
			for i := range b.N {
				r := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindWrite,
					Offset: uint64(i%1024) * size, Length: size, Data: data}
				seq, err := s.Append(ctx, &r)
				if err != nil {
					b.Fatal(err)
				}
				s.Complete(seq)
				for read+lag <= i || (i == b.N-1 && read <= i) {
					var count int
					buf, count = shipFrame(b, s, rd, buf)
					read += count
				}
			}
		})
	}
}

// benchSpool opens a spool of 1 GiB with a memory log of mem bytes (0:
// none) and a reader from its first record, both closed when b ends.
func benchSpool(b *testing.B, mem int64) (*Spool, *Reader) {
	s, _, err := Open(b.TempDir(), Options{MaxBytes: 1 << 30, MemBytes: mem}, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	rd, err := s.NewReader(1)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rd.Close() })
	return s, rd
}

// shipFrame reads a frame of up to 4 MiB of records into buf, as the
// shipper does, and acknowledges them; it returns buf and their count.
func shipFrame(b *testing.B, s *Spool, rd *Reader, buf []byte) ([]byte, int) {
	buf, first, count, err := rd.Next(context.Background(), buf[:0], 4<<20, 0)
	if err != nil || count == 0 {
		b.Fatalf("read: %d records, %v", count, err)
	}
	if err := s.Ack(first + uint64(count) - 1); err != nil {
		b.Fatal(err)
	}
	return buf, int(count)
}
