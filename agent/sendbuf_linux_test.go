package agent

import (
	"crypto/rand"
	"runtime"
	"syscall"
	"testing"
)

// BenchmarkSendBuffer sends 256 KiB frames over TLS on loopback, each
// flushed as the shipper does, with the records gathered into 64 KiB
// writes (gathered) and written one by one as crypto/tls does alone
// (records), side by side. It reports the sending thread's CPU per frame
// (user and system, getrusage RUSAGE_THREAD: on loopback the system part
// includes the receiving side's TCP processing, which a sender's CPU pays
// there) and the socket writes per frame; ns/op is bounded by the
// receiver, in the same process.
func BenchmarkSendBuffer(b *testing.B) {
	for _, gather := range []bool{false, true} {
		name := "records"
		if gather {
			name = "gathered"
		}
		b.Run(name, func(b *testing.B) {
			tc, cc, _ := tlsPair(b, true)
			if !gather {
				tc.sb.mu.Lock()
				tc.sb.gather = false
				tc.sb.mu.Unlock()
			}
			frame := make([]byte, 256<<10)
			rand.Read(frame)
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			start := len(cc.sizes())
			var r0, r1 syscall.Rusage
			b.SetBytes(int64(len(frame)))
			b.ResetTimer()
			syscall.Getrusage(1 /* RUSAGE_THREAD */, &r0)
			for range b.N {
				if _, err := tc.Write(frame); err != nil {
					b.Fatal(err)
				}
				if err := tc.Flush(); err != nil {
					b.Fatal(err)
				}
			}
			syscall.Getrusage(1, &r1)
			b.StopTimer()
			cpu := (r1.Utime.Nano() - r0.Utime.Nano()) + (r1.Stime.Nano() - r0.Stime.Nano())
			sys := r1.Stime.Nano() - r0.Stime.Nano()
			b.ReportMetric(float64(cpu)/float64(b.N), "cpu-ns/frame")
			b.ReportMetric(float64(sys)/float64(b.N), "sys-ns/frame")
			b.ReportMetric(float64(len(cc.sizes())-start)/float64(b.N), "writes/frame")
		})
	}
}
