package targettest

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/asrdr/asr/replication"
)

// LeaserOpenFunc opens a Target over the storage named dir that implements
// replication.MachineLeaser, failing t if it cannot: the configuration
// server's (shared false: it holds the whole target, and made it) or a
// scale-out process server's beside it (shared true). Each call is a
// separate holder, as separate processes are.
type LeaserOpenFunc func(t *testing.T, dir string, shared bool) replication.Target

// RunLeaser runs the contract of replication.MachineLeaser against two
// targets on one storage, as a configuration server and a scale-out process
// server hold it: one holder per machine, refused at once with
// ErrMachineLeased naming the holder (in the same target too), the lease
// free again once released or once its target closes, each holder writing
// its machine's objects and disks, DropMachineLease refused while held, and
// key and closed checks. What a target does when its holder stops without
// a word (a process killed; an Azure lease not renewed) is its own tests'.
func RunLeaser(t *testing.T, open LeaserOpenFunc) {
	ctx := t.Context()
	dir := t.TempDir()
	cs := open(t, dir, false)
	defer cs.Close()
	ps := open(t, dir, true)
	defer ps.Close()
	csl, psl := cs.(replication.MachineLeaser), ps.(replication.MachineLeaser)

	a, err := csl.LeaseMachine(ctx, "aa01", "asr server")
	if err != nil {
		t.Fatal(err)
	}
	_, err = psl.LeaseMachine(ctx, "aa01", "ps1")
	if !errors.Is(err, replication.ErrMachineLeased) || !strings.Contains(err.Error(), "asr server") {
		t.Fatalf("lease held by the other: %v, want ErrMachineLeased naming the holder", err)
	}
	// In the same target too: a lease is one holder, not one process.
	if _, err := csl.LeaseMachine(ctx, "aa01", "asr server"); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("lease taken twice by one target: %v", err)
	}
	// Another machine is free, and its holder writes it.
	b, err := psl.LeaseMachine(ctx, "bb02", "ps1")
	if err != nil {
		t.Fatal(err)
	}
	mustWriteMachine(t, ps, "bb02", 1)
	mustWriteMachine(t, cs, "aa01", 2)
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(); err != nil {
		t.Fatalf("a second release: %v", err)
	}
	a2, err := psl.LeaseMachine(ctx, "aa01", "ps1")
	if err != nil {
		t.Fatalf("after the release: %v", err)
	}
	mustWriteMachine(t, ps, "aa01", 3)

	for _, bad := range []string{"", "..", "a/b", "x y"} {
		if _, err := psl.LeaseMachine(ctx, bad, "ps1"); !errors.Is(err, replication.ErrInvalidKey) {
			t.Errorf("lease %q: %v, want ErrInvalidKey", bad, err)
		}
	}
	if err := csl.DropMachineLease(ctx, "aa01"); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("drop a held lease: %v, want ErrMachineLeased", err)
	}
	a2.Release()
	if err := csl.DropMachineLease(ctx, "aa01"); err != nil {
		t.Fatal(err)
	}
	if err := csl.DropMachineLease(ctx, "zz99"); err != nil {
		t.Fatalf("drop a lease never taken: %v", err)
	}
	// Dropped, a lease can be taken again (a machine protected anew).
	a3, err := csl.LeaseMachine(ctx, "aa01", "asr server")
	if err != nil {
		t.Fatalf("after the drop: %v", err)
	}
	a3.Release()

	// Contenders at once, in both targets: one holder.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var won []replication.Lease
	for i := range 8 {
		l := csl
		if i%2 == 1 {
			l = psl
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			lease, err := l.LeaseMachine(ctx, "dd04", fmt.Sprintf("contender %d", i))
			if err != nil && !errors.Is(err, replication.ErrMachineLeased) {
				t.Errorf("contender %d: %v", i, err)
			}
			if err == nil {
				mu.Lock()
				won = append(won, lease)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(won) != 1 {
		t.Fatalf("%d of 8 contenders hold machine dd04's lease, want 1", len(won))
	}
	won[0].Release()

	// Closing a target lets its leases go.
	if err := ps.Close(); err != nil {
		t.Fatal(err)
	}
	b.Release() // after its target's close: nil or not, it must not hang
	if _, err := psl.LeaseMachine(ctx, "cc03", "ps1"); !errors.Is(err, replication.ErrClosed) {
		t.Fatalf("lease on a closed target: %v, want ErrClosed", err)
	}
	b2, err := csl.LeaseMachine(ctx, "bb02", "asr server")
	if err != nil {
		t.Fatalf("a closed target's lease: %v", err)
	}
	b2.Release()
}

// mustWriteMachine writes an object and a disk of machine id, as the
// holder of its lease does.
func mustWriteMachine(t *testing.T, tg replication.Target, id string, v byte) {
	t.Helper()
	ctx := t.Context()
	if err := tg.PutObject(ctx, "machines/"+id+"/machine", []byte{v}); err != nil {
		t.Fatalf("%s writes machine %s's object: %v", tg, id, err)
	}
	d, err := tg.OpenDisk(ctx, replication.DiskKey(id, 0), 64<<10)
	if err != nil {
		t.Fatalf("%s opens machine %s's disk: %v", tg, id, err)
	}
	defer d.Close()
	if err := d.WriteAt([]byte{v}, 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatalf("%s writes machine %s's disk: %v", tg, id, err)
	}
}
