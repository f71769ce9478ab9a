package agent

import (
	"context"
	"sync"
)

// routines are one component's goroutines. They run under the component's
// context, derived from the agent's; Close cancels it and waits for every
// one of them, so none outlives the component. Once closed, Go starts
// nothing: a late request (a server frame read as the agent stops) cannot
// start a goroutine that nobody waits for.
type routines struct {
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex // guards closed against wg.Add racing Close's Wait
	closed bool
	wg     sync.WaitGroup
}

func newRoutines(parent context.Context) *routines {
	ctx, cancel := context.WithCancel(parent)
	return &routines{ctx: ctx, cancel: cancel}
}

// Go runs f on a new goroutine unless Close was called, and reports
// whether it did.
func (r *routines) Go(f func()) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	r.wg.Go(f)
	return true
}

// Close cancels the context and waits for the goroutines. It may be called
// more than once.
func (r *routines) Close() {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
}
