package localfs_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/localfs"
)

// Two targets on one directory, as a configuration server and a scale-out
// process server hold it: one holder per machine, the holder named to the
// one refused, the lease free again once released or once its target
// closes.
func TestLeaseMachine(t *testing.T) {
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

	a, err := cs.LeaseMachine(ctx, "aa01", "asr server")
	if err != nil {
		t.Fatal(err)
	}
	_, err = ps.LeaseMachine(ctx, "aa01", "ps1")
	if !errors.Is(err, replication.ErrMachineLeased) || !strings.Contains(err.Error(), "asr server") {
		t.Fatalf("lease held by the other: %v, want ErrMachineLeased naming the holder", err)
	}
	// In the same target too: a lease is one holder, not one process.
	if _, err := cs.LeaseMachine(ctx, "aa01", "asr server"); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("lease taken twice by one target: %v", err)
	}
	// Another machine is free.
	b, err := ps.LeaseMachine(ctx, "bb02", "ps1")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(); err != nil {
		t.Fatalf("a second release: %v", err)
	}
	a2, err := ps.LeaseMachine(ctx, "aa01", "ps1")
	if err != nil {
		t.Fatalf("after the release: %v", err)
	}
	defer a2.Release()
	defer b.Release()

	for _, bad := range []string{"", "..", "a/b", "x y"} {
		if _, err := ps.LeaseMachine(ctx, bad, "ps1"); !errors.Is(err, replication.ErrInvalidKey) {
			t.Errorf("lease %q: %v, want ErrInvalidKey", bad, err)
		}
	}
	if err := cs.DropMachineLease(ctx, "aa01"); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("drop a held lease: %v, want ErrMachineLeased", err)
	}
	a2.Release()
	if err := cs.DropMachineLease(ctx, "aa01"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "leases", "aa01")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the dropped lease's file: %v", err)
	}
	if err := cs.DropMachineLease(ctx, "zz99"); err != nil {
		t.Fatalf("drop a lease never taken: %v", err)
	}
	ps.Close()
	if _, err := ps.LeaseMachine(ctx, "cc03", "ps1"); !errors.Is(err, replication.ErrClosed) {
		t.Fatalf("lease on a closed target: %v, want ErrClosed", err)
	}
}
