package procserver

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"
)

func TestMeterRate(t *testing.T) {
	var m meter
	t0 := time.Unix(1_000_000, 0)
	for i := range 20 {
		m.add(1000, t0.Add(time.Duration(i)*time.Second))
	}
	// At t0+19.5 s the last 9 full seconds each had 1000 bytes.
	if r := m.rate(t0.Add(19*time.Second + 500*time.Millisecond)); r != 1000 {
		t.Fatalf("rate %v, want 1000", r)
	}
	// Quiet for longer than the window: nothing.
	if r := m.rate(t0.Add(time.Minute)); r != 0 {
		t.Fatalf("rate after a quiet minute %v, want 0", r)
	}
}

// TestCacheStates: the cache disk's free space gives warning under 30% and
// critical under 25%; each change is reported once; while critical, reading
// from agents waits once the cache holds more than a little.
func TestCacheStates(t *testing.T) {
	var mu sync.Mutex
	free := uint64(50)
	var statErr error
	var got []string
	s, err := New(context.Background(), Config{CacheDir: t.TempDir(), Catalog: nil,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		DiskFree: func(string) (uint64, uint64, error) {
			mu.Lock()
			defer mu.Unlock()
			return free, 100, statErr
		},
		OnCacheState: func(state string, _, _ uint64) {
			mu.Lock()
			got = append(got, state)
			mu.Unlock()
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	set := func(f uint64) {
		mu.Lock()
		free = f
		mu.Unlock()
		s.sampleCache()
	}
	for _, c := range []struct {
		free  uint64
		state string
	}{{50, CacheOK}, {29, CacheWarning}, {31, CacheWarning}, {24, CacheCritical}, {26, CacheCritical}, {28, CacheWarning},
		{40, CacheOK}} {
		set(c.free)
		if f := s.Figures(); f.CacheState != c.state || f.CacheFree != float64(c.free)/100 {
			t.Fatalf("%d%% free: %+v, want %s", c.free, f, c.state)
		}
	}
	mu.Lock()
	if want := []string{CacheWarning, CacheCritical, CacheWarning, CacheOK}; !slices.Equal(got, want) {
		t.Fatalf("reported %v, want %v", got, want)
	}
	mu.Unlock()

	s.cacheBytes.Store(criticalCacheBytes + 1)
	if s.cacheFull() {
		t.Fatal("a cache with room on its disk refuses data")
	}
	set(10)
	if !s.cacheFull() {
		t.Fatal("a critical cache disk takes more data")
	}
	s.cacheBytes.Store(criticalCacheBytes / 2)
	if s.cacheFull() {
		t.Fatal("a critical cache disk stops even a nearly empty cache")
	}
	// A disk that cannot be measured is unknown and holds nothing back.
	s.cacheBytes.Store(criticalCacheBytes + 1)
	mu.Lock()
	statErr = errors.New("statfs: input/output error")
	mu.Unlock()
	s.sampleCache()
	if f := s.Figures(); f.CacheState != CacheUnknown || f.CacheError == "" || s.cacheFull() {
		t.Fatalf("unmeasurable cache disk: %+v, full %v", f, s.cacheFull())
	}
	s.cacheBytes.Store(0)
}
