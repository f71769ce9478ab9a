package memtarget

import (
	"errors"
	"sync"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/targettest"
)

func TestConformance(t *testing.T) {
	var mu sync.Mutex
	mems := map[string]*Memory{} // the suite's dir names a Memory
	targettest.Run(t, func(t *testing.T, dir string) replication.Target {
		mu.Lock()
		m := mems[dir]
		if m == nil {
			m = NewMemory()
			mems[dir] = m
		}
		mu.Unlock()
		tg, err := Open(m)
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		return tg
	})
}

func TestOpenLocked(t *testing.T) {
	m := NewMemory()
	a, err := Open(m)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(m); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := Open(m)
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	b.Close()
}
