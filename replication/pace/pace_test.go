package pace

import (
	"context"
	"testing"
	"time"
)

// TestPacerRate: n bytes at rate r take at least (n-first)/r (the first
// piece goes at once).
func TestPacerRate(t *testing.T) {
	p := New(16 << 20)
	ctx := context.Background()
	start := time.Now()
	for range 5 {
		if err := p.Wait(ctx, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	if took, want := time.Since(start), 4*time.Second/16; took < want {
		t.Fatalf("5 MiB at 16 MiB/s in %s, want at least %s", took, want)
	}
}

// TestPacerNoBurstAfterStall: time not used is not saved up.
func TestPacerNoBurstAfterStall(t *testing.T) {
	p := New(1 << 20)
	ctx := context.Background()
	p.Wait(ctx, 1<<20)                    // the next may start in 1 s
	p.next = time.Now().Add(-time.Minute) // as after a long stall
	p.Wait(ctx, 1<<20)
	start := time.Now()
	p.Wait(ctx, 1<<20) // must wait about 1 s, not run on credit
	if took := time.Since(start); took < 900*time.Millisecond {
		t.Fatalf("a read after a stall waited %s, want about 1 s", took)
	}
}

func TestPacerUnlimitedAndCancel(t *testing.T) {
	ctx := context.Background()
	var nilPacer *Pacer
	for _, p := range []*Pacer{nilPacer, New(0)} {
		start := time.Now()
		for range 100 {
			if err := p.Wait(ctx, 1<<30); err != nil {
				t.Fatal(err)
			}
		}
		if took := time.Since(start); took > time.Second {
			t.Fatalf("unlimited pacer waited %s", took)
		}
	}
	p := New(1)
	p.Wait(ctx, 1<<20) // the next in 12 days
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := p.Wait(cctx, 1); err != context.Canceled {
		t.Fatalf("Wait after cancel: %v", err)
	}
}
