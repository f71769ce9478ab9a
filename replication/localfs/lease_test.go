package localfs_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/localfs"
	"github.com/asrdr/asr/replication/targettest"
)

// Two targets on one directory, as a configuration server and a scale-out
// process server hold it: the shared contract of machine leases
// (targettest.RunLeaser), then what is the local target's own: one
// exclusive open, a shared one beside it only over an existing target, and
// a dropped lease's file gone.
func TestLeaseMachine(t *testing.T) {
	targettest.RunLeaser(t, func(t *testing.T, dir string, shared bool) replication.Target {
		var opts []localfs.Option
		if shared {
			opts = append(opts, localfs.Shared())
		}
		tg, err := localfs.Open(dir, opts...)
		if err != nil {
			t.Fatal(err)
		}
		return tg
	})

	ctx := context.Background()
	dir := t.TempDir()
	cs, err := localfs.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	if _, err := localfs.Open(dir); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("a second exclusive open: %v, want ErrLocked", err)
	}
	ps, err := localfs.Open(dir, localfs.Shared())
	if err != nil {
		t.Fatalf("shared open beside the exclusive one: %v", err)
	}
	defer ps.Close()
	if _, err := localfs.Open(t.TempDir(), localfs.Shared()); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("shared open of an empty directory: %v, want ErrNotFound (a process server creates no target)", err)
	}
	a, err := ps.LeaseMachine(ctx, "aa01", "ps1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "leases", "aa01")); err != nil {
		t.Fatalf("the lease's file: %v", err)
	}
	a.Release()
	if err := cs.DropMachineLease(ctx, "aa01"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "leases", "aa01")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the dropped lease's file: %v", err)
	}
}
