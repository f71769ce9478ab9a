package procserver

import (
	"errors"
	"strings"
	"testing"

	"github.com/asrdr/asr/replication"
)

// faultyCache makes the open cache file's writes (and cuts) fail.
type faultyCache struct {
	cacheFile
	writeErr, cutErr error
}

func (f *faultyCache) Write(p []byte) (int, error) {
	if f.writeErr != nil {
		n, _ := f.cacheFile.Write(p[:len(p)/2]) // a torn frame
		return n, f.writeErr
	}
	return f.cacheFile.Write(p)
}

func (f *faultyCache) Truncate(size int64) error {
	if f.cutErr != nil {
		return f.cutErr
	}
	return f.cacheFile.Truncate(size)
}

// A cache write that fails is cut back out; if the cut fails too, the
// cache stops for good (like a failed fsync): nothing more is appended
// after the garbage or acknowledged until a restart recovers the file.
func TestFailedCacheCutIsSticky(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cutErr error
	}{{"cut", nil}, {"cut fails", errors.New("injected truncate error")}} {
		t.Run(tc.name, func(t *testing.T) {
			r := mustTLSRig(t)
			a := protectWithLogA(t, r)
			m, _ := r.s.known(machineID)
			m.mu.Lock()
			ff := &faultyCache{cacheFile: m.open, writeErr: errors.New("injected write error"), cutErr: tc.cutErr}
			m.open = ff
			m.mu.Unlock()
			a.send(dataFrame(4, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("lost write")}))
			a.waitClosed()
			m.mu.Lock()
			ff.writeErr, ff.cutErr = nil, nil // the disk works again
			broken := m.broken
			m.mu.Unlock()
			b, w, err := r.hello(t, logA, 4, 5)
			if tc.cutErr == nil {
				if broken != nil || err != nil || w.DurableSeq != 3 {
					t.Fatalf("after a write that was cut back: broken %v, hello %+v %v", broken, w, err)
				}
				b.ship(4, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: []byte("sent again")}, replication.Record{Kind: replication.KindTag})
				waitApplied(t, r.s, 5)
				return
			}
			if broken == nil || err == nil || !strings.Contains(err.Error(), "could not be made durable") {
				t.Fatalf("after a failed cut: broken %v, hello %+v %v; want the cache stopped", broken, w, err)
			}
		})
	}
}
