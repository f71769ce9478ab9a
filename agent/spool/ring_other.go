//go:build !linux

package spool

// newRing allocates the memory log's ring on the Go heap (ring_linux.go
// maps it outside, which the agent's soft memory limit needs).
func newRing(n int) ([]byte, error) {
	return make([]byte, n), nil
}

// freeRing leaves a ring of newRing to the garbage collector.
func freeRing([]byte) error { return nil }

// releaseRing keeps the pages of a ring on the heap.
func releaseRing([]byte) error { return nil }
