package agent

import (
	"slices"
	"sync"
	"time"
)

// latency measures, for every guest change, the time from its completion
// (the NBD reply) to the process server's acknowledgement that it is durable:
// the data-loss window a disaster at that moment would open. The histogram
// has 1 ms buckets up to 60 s.
type latency struct {
	mu      sync.Mutex
	pending []latSample // changes not yet acknowledged, in seq order
	buckets [60001]uint64
	count   uint64
	max     time.Duration
}

type latSample struct {
	seq uint64
	at  time.Time
}

// maxPendingSamples bounds the memory of the tracker (32 bytes a sample:
// 2 MiB); beyond it new changes are not sampled until acknowledgements
// catch up. At 100 MB/s of 4-64 KiB writes it holds about 20 s of backlog;
// past that the histogram keeps the oldest changes, the longest waits, so
// it errs towards a higher RPO, never a lower one. (It held 2^20 samples,
// 32 MiB, the agent's largest holder under a backlog of 4 KiB writes.)
const maxPendingSamples = 1 << 16

func (l *latency) wrote(seq uint64) {
	now := time.Now()
	l.mu.Lock()
	if len(l.pending) < maxPendingSamples {
		// Changes complete out of order (those that do not overlap run
		// concurrently): keep the samples in seq order.
		i := len(l.pending)
		for i > 0 && l.pending[i-1].seq > seq {
			i--
		}
		l.pending = slices.Insert(l.pending, i, latSample{seq, now})
	}
	l.mu.Unlock()
}

func (l *latency) acked(seq uint64) {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	i := 0
	for ; i < len(l.pending) && l.pending[i].seq <= seq; i++ {
		l.observeLocked(now.Sub(l.pending[i].at))
	}
	if i > 0 {
		n := copy(l.pending, l.pending[i:])
		l.pending = l.pending[:n]
	}
}

// reset forgets the changes not yet acknowledged: a new log dropped them.
func (l *latency) reset() {
	l.mu.Lock()
	l.pending = l.pending[:0]
	l.mu.Unlock()
}

// observe adds one duration to the histogram (also used for group-cut
// holds, which have no sequence number).
func (l *latency) observe(d time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.observeLocked(d)
}

func (l *latency) observeLocked(d time.Duration) {
	b := int(d / time.Millisecond)
	if b >= len(l.buckets) {
		b = len(l.buckets) - 1
	}
	l.buckets[b]++
	l.count++
	if d > l.max {
		l.max = d
	}
}

// LatencyStats summarises the acknowledgement latency of guest changes.
type LatencyStats struct {
	Count uint64  `json:"count"`
	P50Ms float64 `json:"p50_ms"`
	P99Ms float64 `json:"p99_ms"`
	MaxMs float64 `json:"max_ms"`
}

func (l *latency) stats() LatencyStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := LatencyStats{Count: l.count, MaxMs: float64(l.max) / float64(time.Millisecond)}
	if l.count == 0 {
		return s
	}
	q := func(p float64) float64 {
		want := uint64(p * float64(l.count))
		if want == 0 {
			want = 1
		}
		var acc uint64
		for i, c := range l.buckets {
			acc += c
			if acc >= want {
				return float64(i + 1) // upper edge of the bucket
			}
		}
		return float64(len(l.buckets))
	}
	s.P50Ms, s.P99Ms = q(0.50), q(0.99)
	return s
}
