package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// TestMemoryLogUncleanStart: an agent run with a memory log is "killed"
// (its state directory copied as it is, with a guest write only in memory)
// and started again: the write's extent is marked for a resync (and only
// it), the agent starts Recovering, and its log is held (no append) until
// the first Welcome releases it. It fails if the restart trusted the
// spool, which lost the write.
func TestMemoryLogUncleanStart(t *testing.T) {
	memLog := func(c *Config) { c.MemoryLog = 1 << 20 }
	a := mustAgent(t, agentSetup{sizes: []int64{16 << 20}, cfg: memLog})
	if err := a.disks[0].WriteAt(bytes.Repeat([]byte{5}, 4096), 9<<20, false); err != nil {
		t.Fatal(err)
	}
	if a.spool.Memory() == 0 {
		t.Fatal("the write is not in the memory log")
	}
	// The kill: the state directory as the killed process leaves it.
	dir := t.TempDir()
	for _, name := range []string{stateFile, activityFile, spoolDir} {
		mustCopyTree(t, filepath.Join(a.cfg.StateDir, name), filepath.Join(dir, name))
	}
	cfg := a.cfg
	cfg.StateDir, cfg.NBD = dir, "unix:"+filepath.Join(dir, "nbd.sock")
	b, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if !b.recovering {
		t.Fatal("not Recovering after an unclean stop with the memory log")
	}
	st, err := loadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	ds := st.Disks[0]
	want := []replication.Range{{Off: 8 << 20, Len: alExtent}}
	if !strings.Contains(ds.Diverged, "memory log") || len(ds.DivergedRanges) != 1 || ds.DivergedRanges[0] != want[0] {
		t.Fatalf("disk state %+v: want the write's extent %v marked for a resync", ds, want)
	}
	// Held: an append whose context is done returns at once instead of
	// being numbered before the server's records are known.
	done, cancel := context.WithCancel(context.Background())
	cancel()
	rec := replication.Record{Time: time.Now().UnixNano(), Kind: replication.KindZero, Length: 4096}
	if _, err := b.spool.Append(done, &rec); !errors.Is(err, context.Canceled) {
		t.Fatalf("append while held = %v, want it waiting", err)
	}
	b.spool.Release()
	seq, err := b.spool.Append(done, &rec)
	if err != nil {
		t.Fatalf("append after the release: %v", err)
	}
	b.spool.Complete(seq)
}

func mustCopyTree(t *testing.T, from, to string) {
	t.Helper()
	err := filepath.Walk(from, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		dst := filepath.Join(to, rel)
		if fi.IsDir() {
			return os.MkdirAll(dst, 0o700)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
}
