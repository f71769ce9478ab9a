// Package retry is the one backoff schedule of asr's retry loops: a wait
// that starts at a minimum, doubles after each failure up to a maximum,
// and starts again from the minimum once a try succeeds. It has no jitter,
// so a loop's waits are the same on every run and in every test.
package retry

import (
	"context"
	"time"
)

// Backoff is a capped exponential schedule: Next returns Min, then twice
// the previous wait, never more than Max. The zero value of its state is
// the start of the schedule; a Backoff is not safe for concurrent use (each
// loop owns its own).
type Backoff struct {
	Min, Max time.Duration
	cur      time.Duration // the last wait Next returned (0: none since Reset)
}

// New returns a Backoff from min doubling up to max.
func New(min, max time.Duration) Backoff { return Backoff{Min: min, Max: max} }

// Next returns the wait before the next try and advances the schedule.
func (b *Backoff) Next() time.Duration {
	if b.cur <= 0 {
		b.cur = min(b.Min, b.Max)
	} else {
		b.cur = min(2*b.cur, b.Max)
	}
	return b.cur
}

// Reset starts the schedule again from Min: a try succeeded.
func (b *Backoff) Reset() { b.cur = 0 }

// Sleep waits d (not at all if d <= 0), or until ctx ends; it returns
// ctx.Err() if ctx ended first (or had ended already), else nil.
func Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil || d <= 0 {
		return err
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
