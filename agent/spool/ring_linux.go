package spool

import "syscall"

// newRing maps the memory log's ring outside the Go heap: a ring of tens of
// MiB on the heap counted against the agent's soft memory limit (`asr
// agent --memory-limit`, 40 MiB by default) and kept the garbage collector
// running back to back, and each collection emptied the NBD server's
// buffer pool (BENCHMARKS.md, "Steady state (2026-12-06, late)"). Pages
// are touched, and counted in the RSS, only as far as the log has reached.
func newRing(n int) ([]byte, error) {
	return syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
}

// freeRing unmaps a ring of newRing; nothing may refer to it any more.
func freeRing(b []byte) error {
	return syscall.Munmap(b)
}

// releaseRing gives b's pages (a part of a ring of newRing that holds no
// record) back to the system: they read as zeros when touched again.
func releaseRing(b []byte) error {
	return syscall.Madvise(b, syscall.MADV_DONTNEED)
}
