package agent

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/asrdr/asr/agent/spool"
)

// BenchmarkSplitterWrite measures the write-splitter alone (spool append,
// backing write, completion), without NBD or shipping: the cost the guest
// pays per write for being replicated.
func BenchmarkSplitterWrite(b *testing.B) {
	for _, bs := range []int{4 << 10, 1 << 20} {
		b.Run(byteSize(bs), func(b *testing.B) {
			dir := b.TempDir()
			path := filepath.Join(dir, "d.img")
			f, _ := os.Create(path)
			f.Truncate(1 << 30)
			f.Close()
			sp, _, err := spool.Open(filepath.Join(dir, "spool"), spool.Options{MaxBytes: 64 << 30}, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer sp.Close()
			d, err := openDisk(context.Background(), 0, "d", path, sp, &latency{}, slog.Default())
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			buf := make([]byte, bs)
			r := rand.New(rand.NewPCG(1, 1))
			b.SetBytes(int64(bs))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				off := r.Int64N((1<<30)/int64(bs)) * int64(bs)
				if err := d.WriteAt(buf, off, false); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func byteSize(n int) string {
	if n >= 1<<20 {
		return "1M"
	}
	return "4k"
}
