package procserver

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// A machine's stats count the cache bytes of the segments applied (the
// metrics' applied-bytes counter) and show no backlog once all is applied.
func TestStatsCountAppliedBytes(t *testing.T) {
	cat := mustCatalog(t)
	cache := t.TempDir()
	prepare(t, cache, cat)
	seg := replication.SegmentHeader(1, time.Now())
	f := dataFrame(1,
		replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone},
		replication.Record{Kind: replication.KindWrite, Offset: 8192, Data: make([]byte, 4096)})
	seg = replication.AppendFrame(seg, &f)
	seal := replication.SealFrame(2, 2)
	seg = replication.AppendFrame(seg, &seal)
	if err := os.WriteFile(filepath.Join(cache, machineID, openName), seg, 0o600); err != nil {
		t.Fatal(err)
	}
	s := mustServer(t, cache, cat)
	defer s.Close()
	st := waitApplied(t, s, 2)
	if st.ApplyError != "" {
		t.Fatalf("apply error: %s", st.ApplyError)
	}
	// The applied seq advances before the segment leaves the cache.
	deadline := time.Now().Add(10 * time.Second)
	for st.BacklogBytes != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		st, _ = s.Stats(machineID)
	}
	if st.AppliedBytes != int64(len(seg)) || st.BacklogBytes != 0 || !st.BacklogSince.IsZero() {
		t.Fatalf("stats after applying a %d-byte segment: applied %d, backlog %d since %v", len(seg), st.AppliedBytes, st.BacklogBytes, st.BacklogSince)
	}
}
