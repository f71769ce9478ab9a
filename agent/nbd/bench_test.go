package nbd

import (
	"math/rand/v2"
	"testing"
)

// BenchmarkServer measures request round trips over a unix socket, with
// goroutines sharing one pipelined connection.
func BenchmarkServer(b *testing.B) {
	const size = 64 << 20
	for _, bc := range []struct {
		name  string
		block int
		write bool
	}{
		{"write4k", 4 << 10, true},
		{"read4k", 4 << 10, false},
		{"write1m", 1 << 20, true},
		{"read1m", 1 << 20, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			lookup, list := exports(map[string]Backend{"disk": newMemBackend(size)})
			logger, _ := newTestLogger()
			addr := mustServe(b, &Server{Lookup: lookup, List: list, Logger: logger})
			c := mustDial(b, addr, "disk")
			b.SetBytes(int64(bc.block))
			b.SetParallelism(4)
			b.RunParallel(func(pb *testing.PB) {
				r := rand.New(rand.NewPCG(rand.Uint64(), 0))
				p := make([]byte, bc.block)
				for pb.Next() {
					off := int64(r.IntN(size/bc.block) * bc.block)
					var err error
					if bc.write {
						err = c.WriteAt(p, off)
					} else {
						err = c.ReadAt(p, off)
					}
					if err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
