// Package allocguard lets fuzz targets and tests fail an input that makes a
// decoder allocate far more memory than the input holds: the sign of a count
// or length read from untrusted bytes and trusted before the bytes it
// announces are there. Such an input does not crash a fuzzer (a large
// allocation of untouched memory is cheap until it is not); it stalls it, or
// kills the process later, far from the line at fault. Measuring the bytes
// each call allocates turns it into a plain, reproducible failure.
//
// Only tests import this package.
package allocguard

import (
	"runtime"
	"runtime/metrics"
	"testing"
)

// allocsMetric counts the bytes allocated on the heap since the process
// started, by every goroutine.
const allocsMetric = "/gc/heap/allocs:bytes"

// Slack is the allowance every bound includes for the fixed costs of a call
// (small buffers, maps, the runtime's per-P allocation caches being
// refilled): 1 MiB.
const Slack = 1 << 20

// PerByte is how many bytes a decoder may allocate per input byte under
// Bound: decoded structures are larger than their encoding (a 40-byte
// record header becomes a 64-byte Record), but never by much.
const PerByte = 64

// Bound is the default budget for a call that decodes n bytes of untrusted
// input: PerByte bytes per input byte plus Slack.
func Bound(n int) uint64 { return PerByte*uint64(max(n, 0)) + Slack }

// Allocated returns the bytes allocated on the heap while fn ran. It counts
// every goroutine's allocations, so fn's helpers are included; nothing else
// should run meanwhile (a fuzz worker runs one input at a time).
//
// Large allocations are counted as they happen. Small ones are counted
// span by span, when a P's allocation cache hands a span back: the count
// can include up to a span per size class allocated before fn ran, or
// miss some of fn's own. Check allows for both.
func Allocated(fn func()) uint64 {
	s := []metrics.Sample{{Name: allocsMetric}}
	metrics.Read(s)
	before := s[0].Value.Uint64()
	fn()
	metrics.Read(s)
	return s[0].Value.Uint64() - before
}

// Check runs fn and fails t if fn allocated more than limit bytes. what
// names the call in the failure.
//
// A call measured a little over the limit (by at most noise) runs again
// after a garbage collection, which empties the allocation caches, so that
// what they held from before is not counted against fn; it fails only if
// it is over the limit again. fn must therefore give the same result when
// run twice (a decoder does). A call far over the limit fails at once:
// collecting, or running again, with gigabytes allocated is how a fuzzer
// stalls.
func Check(t testing.TB, what string, limit uint64, fn func()) {
	t.Helper()
	n := Allocated(fn)
	if n <= limit {
		return
	}
	if n <= limit+noise {
		runtime.GC()
		if n = Allocated(fn); n <= limit {
			return
		}
	}
	t.Fatalf("%s allocated %d bytes, over its bound of %d: a count or length from the input was trusted before the bytes were there", what, n, limit)
}

// noise bounds what Allocated may count that fn did not allocate: the
// small-object spans cached per P when fn started (a span per size class).
const noise = 16 << 20
