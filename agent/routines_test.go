package agent

import (
	"context"
	"sync/atomic"
	"testing"
	"testing/synctest"
)

// Close cancels the routines' context and returns only once every
// goroutine has; afterwards nothing starts.
func TestRoutinesCloseWaits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRoutines(context.Background())
		release := make(chan struct{})
		var ended atomic.Int32
		for range 3 {
			if !r.Go(func() {
				<-r.ctx.Done()
				<-release // still busy after the cancel
				ended.Add(1)
			}) {
				t.Fatal("Go refused before Close")
			}
		}
		closed := make(chan struct{})
		go func() { r.Close(); close(closed) }()
		synctest.Wait()
		select {
		case <-closed:
			t.Fatal("Close returned while its goroutines ran")
		default:
		}
		close(release)
		<-closed
		if ended.Load() != 3 {
			t.Fatalf("%d goroutines ended before Close returned, want 3", ended.Load())
		}
		if r.Go(func() { t.Error("ran after Close") }) {
			t.Fatal("Go started a goroutine after Close")
		}
		r.Close() // again: a no-op
	})
}

// The parent's cancellation reaches the routines' context.
func TestRoutinesParentCancel(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	r := newRoutines(parent)
	defer r.Close()
	cancel()
	<-r.ctx.Done()
}
