//go:build e2e

package azure

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/google/uuid"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/targettest"
)

// testMachineLeases: the shared contract of machine leases
// (targettest.RunLeaser): the configuration server's Target, holding the
// container, beside a shared one, a scale-out process server's.
func testMachineLeases(t *testing.T, cs string) {
	targettest.RunLeaser(t, func(t *testing.T, dir string, shared bool) replication.Target {
		return mustOpen(t, Config{ConnectionString: cs, Container: containerFor(dir), Shared: shared})
	})
}

// testShared: a shared open creates nothing and takes no container lease
// (beside the configuration server's), and writes only the blobs of the
// machines it has leased: not the vault descriptor, not group points, not
// another machine's (ErrMachineLeased naming the refusal).
func testShared(t *testing.T, cs string) {
	ctx := t.Context()
	cfg := Config{ConnectionString: cs, Container: containerFor(t.TempDir())}
	sh := cfg
	sh.Shared = true
	if tg, err := Open(ctx, sh); !errors.Is(err, replication.ErrNotFound) {
		if err == nil {
			tg.Close()
		}
		t.Fatalf("shared open of a missing container: %v, want ErrNotFound", err)
	}
	cfgTarget := mustOpen(t, cfg)
	defer mustCloseTarget(t, cfgTarget)
	ps := mustOpen(t, sh)
	defer mustCloseTarget(t, ps)
	if ps.lock != nil {
		t.Fatal("a shared Target took the container's lease")
	}
	l, err := ps.LeaseMachine(ctx, "m1", "ps1")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	if err := ps.PutObject(ctx, "machines/m1/machine", []byte("1")); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"vault", "groups/g/points/00000000000000000001"} {
		if err := ps.PutObject(ctx, k, []byte("x")); !errors.Is(err, replication.ErrLocked) || !strings.Contains(err.Error(), "configuration server") {
			t.Fatalf("shared PutObject(%s): %v, want ErrLocked saying the configuration server writes it", k, err)
		}
	}
	if err := ps.PutObject(ctx, "machines/m2/machine", []byte("x")); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("shared PutObject of a machine not leased: %v, want ErrMachineLeased", err)
	}
	if _, err := ps.OpenDisk(ctx, replication.DiskKey("m2", 0), 64<<10); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("shared OpenDisk creating a machine's disk not leased: %v, want ErrMachineLeased", err)
	}
	if err := ps.DeleteObject(ctx, "machines/m2/machine"); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("shared DeleteObject of a machine not leased: %v", err)
	}
	if err := ps.DropMachineLease(ctx, "m2"); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("shared DropMachineLease: %v, want ErrLocked", err)
	}
	// The configuration server writes what it alone writes, and may
	// write (delete, prune) a machine it has not leased.
	if err := cfgTarget.PutObject(ctx, "machines/m1/segments/s", []byte("s")); err != nil {
		t.Fatal(err)
	}
	if err := cfgTarget.DeleteObject(ctx, "machines/m1/segments/s"); err != nil {
		t.Fatal(err)
	}
}

// fakeClock is a clock tests move; safe for the renewals' goroutines.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) now() time.Time      { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) add(d time.Duration) { c.ns.Add(int64(d)) }
func newFakeClock() *fakeClock           { c := &fakeClock{}; c.ns.Store(time.Now().UnixNano()); return c }
func machineLeaseOf(tg *Target, id string) *blobLease {
	tg.mmu.Lock()
	defer tg.mmu.Unlock()
	if ml := tg.machines[id]; ml != nil {
		return ml.bl
	}
	return nil
}

// testMachineLeaseLost: a process server's machine lease is lost while it
// writes (an operator breaks it, another process server takes the
// machine): once a renewal finds it lost, every write of the machine's
// blobs fails with ErrMachineLeased, unflushed data included, while its
// other machine and reads go on; and a lease not renewed for 5/6 of its
// duration refuses writes until a renewal succeeds.
func testMachineLeaseLost(t *testing.T, cs string) {
	ctx := t.Context()
	cfg := Config{ConnectionString: cs, Container: containerFor(t.TempDir())}
	cfgTarget := mustOpen(t, cfg)
	defer mustCloseTarget(t, cfgTarget)
	sh := cfg
	sh.Shared = true
	ps := mustOpen(t, sh)
	clock := newFakeClock()
	ps.now = clock.now // before any lease: each lease takes the Target's clock
	l1, err := ps.LeaseMachine(ctx, "m1", "ps1")
	if err != nil {
		t.Fatal(err)
	}
	l2, err := ps.LeaseMachine(ctx, "m2", "ps1")
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Release()
	d, err := ps.OpenDisk(ctx, replication.DiskKey("m1", 0), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt([]byte("flushed"), 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}

	// Not renewed for 51 s of 60: writes wait for a renewal.
	clock.add(51 * time.Second)
	if err := ps.PutObject(ctx, "machines/m1/machine", []byte("x")); err == nil || !strings.Contains(err.Error(), "may lapse") {
		t.Fatalf("write under a lease not renewed for 51 s: %v", err)
	}
	if err := machineLeaseOf(ps, "m1").renew(ctx); err != nil {
		t.Fatal(err)
	}
	if err := machineLeaseOf(ps, "m2").renew(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ps.PutObject(ctx, "machines/m1/machine", []byte("1")); err != nil {
		t.Fatalf("after a renewal: %v", err)
	}
	if err := d.WriteAt([]byte("unflushed"), 0); err != nil {
		t.Fatal(err)
	}

	// An operator breaks the lease; the configuration server's built-in
	// process server takes the machine.
	bl, err := lease.NewBlobClient(ps.cc.NewBlockBlobClient(leasesPrefix+"m1"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bl.BreakLease(ctx, &lease.BlobBreakOptions{BreakPeriod: to.Ptr[int32](0)}); err != nil {
		t.Fatal(err)
	}
	taken, err := cfgTarget.LeaseMachine(ctx, "m1", "asr server")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Release()

	if err := machineLeaseOf(ps, "m1").renew(ctx); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("renewal of a lease another holder has: %v, want ErrMachineLeased", err)
	}
	if err := ps.PutObject(ctx, "machines/m1/machine", []byte("2")); !errors.Is(err, replication.ErrMachineLeased) || !strings.Contains(err.Error(), "lease is lost") {
		t.Fatalf("PutObject after losing the lease: %v, want ErrMachineLeased saying it is lost", err)
	}
	if err := d.WriteAt([]byte("x"), 0); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("WriteAt after losing the lease: %v", err)
	}
	if err := d.Flush(ctx); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("Flush after losing the lease: %v", err)
	}
	if err := ps.DeleteDisk(ctx, replication.DiskKey("m1", 1)); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("DeleteDisk after losing the lease: %v", err)
	}
	got := make([]byte, 7)
	if _, err := cfgTarget.openAndRead(ctx, replication.DiskKey("m1", 0), got); err != nil || string(got) != "flushed" {
		t.Fatalf("the replica after the lost write: %q, %v (want what was flushed under the lease)", got, err)
	}
	if err := ps.PutObject(ctx, "machines/m2/machine", []byte("2")); err != nil {
		t.Fatalf("the machine whose lease is held: %v", err)
	}
	if b, err := ps.GetObject(ctx, "machines/m1/machine"); err != nil || string(b) != "1" {
		t.Fatalf("reads go on: %q, %v", b, err)
	}
	// The new holder writes.
	if err := cfgTarget.PutObject(ctx, "machines/m1/machine", []byte("3")); err != nil {
		t.Fatal(err)
	}
	// Releasing a lost lease gives nothing up (it is the new holder's);
	// the disk's close reports what it could not write.
	if err := l1.Release(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("Close with unflushed data after losing the lease: %v", err)
	}
	if _, err := ps.LeaseMachine(ctx, "m1", "ps1"); !errors.Is(err, replication.ErrMachineLeased) || !strings.Contains(err.Error(), "asr server") {
		t.Fatalf("taking back a lease another holder has: %v", err)
	}
	if err := ps.Close(); err != nil {
		t.Fatal(err)
	}
}

// openAndRead reads p at offset 0 of the disk at key.
func (t *Target) openAndRead(ctx context.Context, key string, p []byte) (int, error) {
	d, err := t.OpenDisk(ctx, key, 0)
	if err != nil {
		return 0, err
	}
	defer d.Close()
	return d.ReadAt(p, 0)
}

// crash stops tg's renewals, as a killed process's stop. (Its Close, at
// the test's end, releases under its lease ID what another holder has
// taken since: the service refuses that, and Close ignores the refusal.)
func crash(tg *Target) {
	tg.mmu.Lock()
	var ls []*blobLease
	for _, ml := range tg.machines {
		if ml.bl != nil {
			ls = append(ls, ml.bl)
		}
	}
	tg.mmu.Unlock()
	for _, l := range ls {
		l.stop()
	}
}

// testMachineLeaseLapse: with 15 s machine leases, a process server that
// crashes keeps its machine from another one (refused at once, naming it),
// takes it back at once when restarted with its lease ID, and once it
// crashes for good its lease lapses and the other takes the machine over;
// the crashed one's writes are refused from 5/6 of the duration on.
func testMachineLeaseLapse(t *testing.T, cs string) {
	ctx := t.Context()
	cfg := Config{ConnectionString: cs, Container: containerFor(t.TempDir()), MachineLease: 15 * time.Second}
	cfgTarget := mustOpen(t, cfg)
	defer mustCloseTarget(t, cfgTarget)
	ps1cfg := cfg
	ps1cfg.Shared, ps1cfg.LeaseID = true, uuid.NewString()
	ps2cfg := ps1cfg
	ps2cfg.LeaseID = uuid.NewString()

	ps1 := mustOpen(t, ps1cfg)
	if _, err := ps1.LeaseMachine(ctx, "m1", "ps1"); err != nil {
		t.Fatal(err)
	}
	if err := ps1.PutObject(ctx, "machines/m1/machine", []byte("1")); err != nil {
		t.Fatal(err)
	}
	crash(ps1)
	defer ps1.Close()
	ps2 := mustOpen(t, ps2cfg)
	defer mustCloseTarget(t, ps2)
	if _, err := ps2.LeaseMachine(ctx, "m1", "ps2"); !errors.Is(err, replication.ErrMachineLeased) || !strings.Contains(err.Error(), "ps1") ||
		!strings.Contains(err.Error(), "15 s") {
		t.Fatalf("a crashed holder's lease: %v, want ErrMachineLeased naming ps1 and the 15 s lapse", err)
	}

	// Restarted with its lease ID: its own lease back, at once.
	ps1b := mustOpen(t, ps1cfg)
	if _, err := ps1b.LeaseMachine(ctx, "m1", "ps1"); err != nil {
		t.Fatalf("the restarted holder: %v", err)
	}
	if err := ps1b.PutObject(ctx, "machines/m1/machine", []byte("2")); err != nil {
		t.Fatal(err)
	}
	crash(ps1b)
	defer ps1b.Close()

	// It lapses: ps2 gets it (asked until then, bounded).
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		l, err := ps2.LeaseMachine(wctx, "m1", "ps2")
		if err == nil {
			defer l.Release()
			break
		}
		if !errors.Is(err, replication.ErrMachineLeased) || wctx.Err() != nil {
			t.Fatalf("waiting for the crashed holder's lease to lapse: %v", err)
		}
		select {
		case <-wctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
	if err := ps2.PutObject(ctx, "machines/m1/machine", []byte("3")); err != nil {
		t.Fatalf("the new holder: %v", err)
	}
	// The crashed holder, were it still writing, is refused: its lease was
	// not renewed for longer than it is trusted.
	if err := ps1b.PutObject(ctx, "machines/m1/machine", []byte("x")); err == nil || !strings.Contains(err.Error(), "may lapse") {
		t.Fatalf("the holder whose lease lapsed: %v, want a refusal saying it may lapse", err)
	}
	if b, err := ps2.GetObject(ctx, "machines/m1/machine"); err != nil || string(b) != "3" {
		t.Fatalf("the machine's object: %q, %v", b, err)
	}
}
