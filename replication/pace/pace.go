// Package pace spaces work to a byte rate: the agent's --max-rate (frames
// on the wire) and --resync-rate (a resync's reads of the source).
package pace

import (
	"context"
	"sync"
	"time"

	"github.com/asrdr/asr/replication/retry"
)

// Pacer spaces work to at most Rate bytes per second (0 or less:
// unlimited). Each Wait takes its bytes' share of time after the previous
// one's: the first goes at once, the next n/Rate later. Time not used (the
// caller was busy elsewhere) is not saved up, so no burst follows a stall.
// A nil *Pacer never waits. It is safe for concurrent use.
type Pacer struct {
	rate int64
	mu   sync.Mutex
	next time.Time // when the next piece of work may start
}

// New returns a Pacer at rate bytes per second (0: unlimited).
func New(rate int64) *Pacer { return &Pacer{rate: rate} }

// Wait blocks until n more bytes may go, or ctx ends (its error).
func (p *Pacer) Wait(ctx context.Context, n int64) error {
	if p == nil || p.rate <= 0 {
		return ctx.Err()
	}
	p.mu.Lock()
	now := time.Now()
	at := now
	if p.next.After(now) {
		at = p.next
	}
	p.next = at.Add(time.Duration(float64(n) / float64(p.rate) * float64(time.Second)))
	p.mu.Unlock()
	return retry.Sleep(ctx, at.Sub(now))
}
