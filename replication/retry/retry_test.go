package retry

import (
	"context"
	"testing"
	"time"
)

func TestBackoffSchedule(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		name     string
		min, max time.Duration
		want     []time.Duration
	}{
		{"doubles to the cap", 500 * ms, 5 * time.Second, []time.Duration{500 * ms, time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second}},
		{"nbd accept", 5 * ms, time.Second, []time.Duration{5 * ms, 10 * ms, 20 * ms, 40 * ms, 80 * ms, 160 * ms, 320 * ms, 640 * ms, time.Second, time.Second}},
		{"apply", time.Second, time.Minute, []time.Duration{1 * time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 32 * time.Second, time.Minute, time.Minute}},
		{"min above max", 2 * time.Second, time.Second, []time.Duration{time.Second, time.Second}},
		{"fixed", time.Second, time.Second, []time.Duration{time.Second, time.Second, time.Second}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := New(tt.min, tt.max)
			for i, want := range tt.want {
				if got := b.Next(); got != want {
					t.Fatalf("wait %d: %s, want %s", i+1, got, want)
				}
			}
		})
	}
}

func TestBackoffReset(t *testing.T) {
	b := New(time.Second, 30*time.Second)
	b.Next()
	b.Next()
	if got := b.Next(); got != 4*time.Second {
		t.Fatalf("third wait %s, want 4s", got)
	}
	b.Reset()
	if got := b.Next(); got != time.Second {
		t.Fatalf("after Reset: %s, want 1s", got)
	}
	var zero Backoff // a zero schedule never waits, and never panics
	if got := zero.Next(); got != 0 {
		t.Fatalf("zero Backoff: %s", got)
	}
}

func TestSleep(t *testing.T) {
	if err := Sleep(context.Background(), time.Millisecond); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	if err := Sleep(ctx, time.Hour); err != context.Canceled {
		t.Fatalf("Sleep after cancel: %v", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("Sleep after cancel took %s", took)
	}
}
