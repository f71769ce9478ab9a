//go:build e2e

package azure

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"
	"github.com/google/uuid"

	"github.com/asrdr/asr/azure/azuritetest"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/diskcore"
	"github.com/asrdr/asr/replication/targettest"
)

// TestAzurite runs the Azure target against Azurite, started here: the
// conformance suite, then what only this target has.
func TestAzurite(t *testing.T) {
	cs := azuritetest.Start(t)
	t.Run("Conformance", func(t *testing.T) {
		targettest.Run(t, func(t *testing.T, dir string) replication.Target {
			return mustOpen(t, Config{ConnectionString: cs, Container: containerFor(dir)})
		})
	})
	t.Run("Lease", func(t *testing.T) { testLease(t, cs) })
	t.Run("LeaseLost", func(t *testing.T) { testLeaseLost(t, cs) })
	t.Run("MachineLeases", func(t *testing.T) { testMachineLeases(t, cs) })
	t.Run("Shared", func(t *testing.T) { testShared(t, cs) })
	t.Run("MachineLeaseLost", func(t *testing.T) { testMachineLeaseLost(t, cs) })
	t.Run("MachineLeaseLapse", func(t *testing.T) { testMachineLeaseLapse(t, cs) })
	t.Run("WrongKey", func(t *testing.T) { testWrongKey(t, cs) })
	t.Run("MissingContainer", func(t *testing.T) { testMissingContainer(t, cs) })
	t.Run("NoCreate", func(t *testing.T) { testNoCreate(t, cs) })
	t.Run("SAS", func(t *testing.T) { testContainerSAS(t, cs) })
	t.Run("BufferBound", func(t *testing.T) { testBufferBound(t, cs) })
	t.Run("LargeZero", func(t *testing.T) { testLargeZero(t, cs) })
	t.Run("HeldSnapshotAfterCrash", func(t *testing.T) { testHeldAfterCrash(t, cs) })
}

// containerFor names a container after a test directory.
func containerFor(dir string) string {
	h := sha256.Sum256([]byte(dir))
	return "asr-" + hex.EncodeToString(h[:12])
}

func mustOpen(t *testing.T, cfg Config) *Target {
	t.Helper()
	tg, err := Open(t.Context(), cfg)
	if err != nil {
		t.Fatalf("Open(%v): %v", cfg, err)
	}
	return tg
}

func mustCloseTarget(t *testing.T, tg *Target) {
	t.Helper()
	if err := tg.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// testLease: a second server is locked out at once, with an error that says
// why; the lease's holder, restarted with the same lease ID, is not.
func testLease(t *testing.T, cs string) {
	cfg := Config{ConnectionString: cs, Container: containerFor(t.TempDir()), LeaseID: uuid.NewString()}
	a := mustOpen(t, cfg)
	defer mustCloseTarget(t, a)

	other := cfg
	other.LeaseID = uuid.NewString()
	start := time.Now()
	b, err := Open(t.Context(), other)
	if err == nil {
		b.Close()
		t.Fatal("a second server opened a leased container")
	}
	if !errors.Is(err, replication.ErrLocked) || !strings.Contains(err.Error(), "another asr server holds the container") || !strings.Contains(err.Error(), "60 s") {
		t.Fatalf("second server: %v, want ErrLocked saying another asr server holds it and the lease expires within 60 s", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the refusal took %s", d)
	}

	// The same lease ID takes the lease back at once, as a restarted
	// server does; the old Target keeps renewing the same lease.
	start = time.Now()
	c := mustOpen(t, cfg)
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("reopening with the same lease ID took %s", d)
	}
	if err := c.PutObject(t.Context(), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if err := a.lock.renew(t.Context()); err != nil {
		t.Fatalf("renewal of a lease taken back with its own ID: %v", err)
	}
	mustCloseTarget(t, c)

	// Closed, c released the lease: another server gets it at once.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b = mustOpen(t, other)
	mustCloseTarget(t, b)
}

// testLeaseLost: once a renewal finds the lease taken, writes fail with
// ErrLocked, reads go on, and Close works.
func testLeaseLost(t *testing.T, cs string) {
	cfg := Config{ConnectionString: cs, Container: containerFor(t.TempDir())}
	a := mustOpen(t, cfg)
	d, err := a.OpenDisk(t.Context(), "d", 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.PutObject(t.Context(), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt([]byte("unflushed"), 0); err != nil {
		t.Fatal(err)
	}

	// An operator breaks the lease; another server takes it.
	bl, err := lease.NewBlobClient(a.cc.NewBlockBlobClient(lockBlob), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bl.BreakLease(t.Context(), &lease.BlobBreakOptions{BreakPeriod: to.Ptr[int32](0)}); err != nil {
		t.Fatal(err)
	}
	b := mustOpen(t, cfg)
	defer mustCloseTarget(t, b)

	if err := a.lock.renew(t.Context()); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("renewal of a lease another server holds: %v, want ErrLocked", err)
	}
	if err := a.PutObject(t.Context(), "k", []byte("w")); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("PutObject after losing the lease: %v, want ErrLocked", err)
	}
	if err := d.WriteAt([]byte("x"), 0); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("WriteAt after losing the lease: %v, want ErrLocked", err)
	}
	if err := d.Flush(t.Context()); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("Flush after losing the lease: %v, want ErrLocked", err)
	}
	if got, err := a.GetObject(t.Context(), "k"); err != nil || string(got) != "v" {
		t.Fatalf("GetObject after losing the lease = %q, %v", got, err)
	}
	// Close reports the unflushed data it could not write, and ends.
	if err := a.Close(); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("Close with unflushed data after losing the lease: %v, want ErrLocked", err)
	}
	if err := b.PutObject(t.Context(), "k", []byte("b")); err != nil {
		t.Fatalf("the new holder: %v", err)
	}
}

// testWrongKey: a wrong key fails fast and says so.
func testWrongKey(t *testing.T, cs string) {
	bad := strings.Replace(cs, "AccountKey="+azuritetest.Key, "AccountKey="+strings.Repeat("A", 86)+"==", 1)
	if bad == cs {
		t.Fatal("no key in the connection string")
	}
	start := time.Now()
	tg, err := Open(t.Context(), Config{ConnectionString: bad, Container: containerFor(t.TempDir())})
	if err == nil {
		tg.Close()
		t.Fatal("Open with a wrong key succeeded")
	}
	if !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "storage account rejected the credentials") {
		t.Fatalf("wrong key: %v, want ErrAuth", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the refusal took %s: retried?", d)
	}
	t.Logf("wrong key: %v", err)
}

// testMissingContainer: Open creates the container and the vault's blobs.
func testMissingContainer(t *testing.T, cs string) {
	cfg := Config{ConnectionString: cs, Container: containerFor(t.TempDir())}
	tg := mustOpen(t, cfg)
	if _, err := tg.cc.GetProperties(t.Context(), nil); err != nil {
		t.Fatalf("container after Open: %v", err)
	}
	if l, err := tg.ListObjects(t.Context(), ""); err != nil || len(l) != 0 {
		t.Fatalf("a new vault lists %v, %v", l, err)
	}
	for _, name := range []string{formatBlob, lockBlob} {
		if _, err := tg.cc.NewBlobClient(name).GetProperties(t.Context(), nil); err != nil {
			t.Fatalf("blob %s: %v", name, err)
		}
	}
	mustCloseTarget(t, tg)
	mustCloseTarget(t, mustOpen(t, cfg)) // and it opens again
}

// testNoCreate: a NoCreate open (a reader's) of a container that does not
// exist, or holds no vault, fails with a clear ErrNotFound and creates
// nothing, not even the container or the lock blob; of a vault it works.
func testNoCreate(t *testing.T, cs string) {
	cfg := Config{ConnectionString: cs, Container: containerFor(t.TempDir()), NoCreate: true}
	rc, err := cfg.resolve()
	if err != nil {
		t.Fatal(err)
	}
	cc, err := newContainerClient(rc)
	if err != nil {
		t.Fatal(err)
	}
	open := func(why string) {
		t.Helper()
		tg, err := Open(t.Context(), cfg)
		if err == nil {
			tg.Close()
			t.Fatalf("NoCreate Open of a container with %s succeeded", why)
		}
		if !errors.Is(err, replication.ErrNotFound) || !strings.Contains(err.Error(), "holds no asr vault ("+why+")") {
			t.Fatalf("NoCreate Open of a container with %s = %v, want an ErrNotFound that says so", why, err)
		}
	}

	open("no such container")
	if _, err := cc.GetProperties(t.Context(), nil); !bloberror.HasCode(err, bloberror.ContainerNotFound) {
		t.Fatalf("the container after a NoCreate Open: %v (want ContainerNotFound)", err)
	}

	if _, err := cc.Create(t.Context(), nil); err != nil {
		t.Fatal(err)
	}
	open("no format blob in the container")
	pager := cc.NewListBlobsFlatPager(nil)
	for pager.More() {
		page, err := pager.NextPage(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range page.Segment.BlobItems {
			t.Errorf("a NoCreate Open left blob %s in an empty container", *b.Name)
		}
	}

	w := cfg
	w.NoCreate = false
	tg := mustOpen(t, w)
	if err := tg.PutObject(t.Context(), "vault", []byte("v")); err != nil {
		t.Fatal(err)
	}
	mustCloseTarget(t, tg)
	tg = mustOpen(t, cfg)
	defer mustCloseTarget(t, tg)
	if b, err := tg.GetObject(t.Context(), "vault"); err != nil || string(b) != "v" {
		t.Fatalf("GetObject after a NoCreate Open: %q, %v", b, err)
	}
}

// containerSAS signs a SAS token for one container with Azurite's key.
func containerSAS(t *testing.T, name string) string {
	t.Helper()
	cred, err := container.NewSharedKeyCredential(azuritetest.Account, azuritetest.Key)
	if err != nil {
		t.Fatal(err)
	}
	q, err := sas.BlobSignatureValues{
		Protocol:      sas.ProtocolHTTPSandHTTP,
		ExpiryTime:    time.Now().Add(time.Hour),
		ContainerName: name,
		Permissions:   (&sas.ContainerPermissions{Read: true, Add: true, Create: true, Write: true, Delete: true, List: true}).String(),
	}.SignWithSharedKey(cred)
	if err != nil {
		t.Fatal(err)
	}
	return q.Encode()
}

// testContainerSAS: a container SAS works on an existing container; on a missing one,
// which it cannot create, Open says so.
func testContainerSAS(t *testing.T, cs string) {
	endpoint := ""
	for part := range strings.SplitSeq(cs, ";") {
		if v, ok := strings.CutPrefix(part, "BlobEndpoint="); ok {
			endpoint = v
		}
	}
	name := containerFor(t.TempDir())
	cfg := Config{Account: azuritetest.Account, Container: name, Endpoint: endpoint, SAS: containerSAS(t, name)}
	_, err := Open(t.Context(), cfg)
	if err == nil || !strings.Contains(err.Error(), "the container does not exist and the SAS token cannot create it") {
		t.Fatalf("SAS on a missing container: %v", err)
	}
	t.Logf("SAS on a missing container: %v", err)

	mustCloseTarget(t, mustOpen(t, Config{ConnectionString: cs, Container: name})) // made with the key
	tg := mustOpen(t, cfg)
	defer mustCloseTarget(t, tg)
	if err := tg.PutObject(t.Context(), "a/b", []byte("sas")); err != nil {
		t.Fatal(err)
	}
	if got, err := tg.GetObject(t.Context(), "a/b"); err != nil || string(got) != "sas" {
		t.Fatalf("GetObject = %q, %v", got, err)
	}
	d, err := tg.OpenDisk(t.Context(), "d", 8192)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt([]byte("x"), 100); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := d.Snapshot(t.Context(), "s"); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// testBufferBound: WriteAt flushes by itself once the buffer is full.
func testBufferBound(t *testing.T, cs string) {
	old := bufferLimit
	bufferLimit = 1 << 20
	defer func() { bufferLimit = old }()
	tg := mustOpen(t, Config{ConnectionString: cs, Container: containerFor(t.TempDir())})
	defer mustCloseTarget(t, tg)
	const size = 4 << 20
	h, err := tg.OpenDisk(t.Context(), "d", size)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	d := diskcore.StorageOf(h).(*disk)
	want := make([]byte, size)
	for off := 0; off < size; off += 100 << 10 {
		p := bytes.Repeat([]byte{byte(off>>10) | 1}, min(100<<10, size-off))
		if err := h.WriteAt(p, int64(off)); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
		if b := d.buffered(); b >= bufferLimit {
			t.Fatalf("buffer at %d bytes, over its bound %d", b, bufferLimit)
		}
	}
	got := make([]byte, size)
	if _, err := h.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("contents differ after automatic flushes (%v)", err)
	}
}

// testLargeZero: zeroing a large disk is one Clear Pages, buffered as a span,
// and reads of it skip the unwritten pages.
func testLargeZero(t *testing.T, cs string) {
	tg := mustOpen(t, Config{ConnectionString: cs, Container: containerFor(t.TempDir())})
	defer mustCloseTarget(t, tg)
	const size = 64 << 30
	h, err := tg.OpenDisk(t.Context(), "big", size)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	d := diskcore.StorageOf(h).(*disk)
	mark := bytes.Repeat([]byte{7}, 4096)
	for _, off := range []int64{0, 1 << 30, size - 4096} {
		if err := h.WriteAt(mark, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := h.Snapshot(t.Context(), "before"); err != nil {
		t.Fatal(err)
	}
	if err := h.ZeroAt(100, size-200); err != nil {
		t.Fatal(err)
	}
	if b := d.buffered(); b > 4*pageSize {
		t.Fatalf("zeroing %d bytes buffered %d", int64(size), b)
	}
	if err := h.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8<<20)
	if _, err := h.ReadAt(got, 1<<30-4<<20); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatalf("zeroed range reads non-zero (%v)", err)
	}
	r, err := h.OpenSnapshot(t.Context(), "before")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.ReadAt(got, 1<<30-4<<20); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, len(got))
	copy(want[4<<20:], mark)
	if !bytes.Equal(got, want) {
		t.Fatal("snapshot before the zeroing changed")
	}
}

// testHeldAfterCrash: a snapshot deleted while a reader holds it, then left
// behind by a crash, stays out of the listing and is deleted at the next open.
func testHeldAfterCrash(t *testing.T, cs string) {
	cfg := Config{ConnectionString: cs, Container: containerFor(t.TempDir()), LeaseID: uuid.NewString()}
	a := mustOpen(t, cfg)
	h, err := a.OpenDisk(t.Context(), "d", 8192)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"s1", "s2"} {
		if err := h.WriteAt([]byte(name), 0); err != nil {
			t.Fatal(err)
		}
		if err := h.Snapshot(t.Context(), name); err != nil {
			t.Fatal(err)
		}
	}
	// The reader is never closed: the process is about to crash.
	if _, err := h.OpenSnapshot(t.Context(), "s1"); err != nil {
		t.Fatal(err)
	}
	if err := h.DeleteSnapshot(t.Context(), "s1"); err != nil {
		t.Fatal(err)
	}
	d := diskcore.StorageOf(h).(*disk)
	if l, err := d.listSnapshots(t.Context()); err != nil || len(l) != 2 {
		t.Fatalf("the service lists %d snapshots, %v; want both while a reader holds s1", len(l), err)
	}
	// A crash: the process goes without closing anything; the restarted
	// server takes its lease back with the same ID.
	a.cancel()
	a.wg.Wait()

	b := mustOpen(t, cfg)
	defer mustCloseTarget(t, b)
	h2, err := b.OpenDisk(t.Context(), "d", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h2.Close()
	if names, err := h2.Snapshots(t.Context()); err != nil || len(names) != 1 || names[0] != "s2" {
		t.Fatalf("Snapshots after the crash = %q, %v; want [s2]", names, err)
	}
	d2 := diskcore.StorageOf(h2).(*disk)
	if l, err := d2.listSnapshots(t.Context()); err != nil || len(l) != 1 || l[0].name != "s2" {
		t.Fatalf("the service still lists %d snapshots (%v) after the reopen", len(l), err)
	}
	props, err := d2.pb.GetProperties(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := getMeta(props.Metadata, metaHeld); ok && v != "" {
		t.Fatalf("the page blob still records deleted snapshots: %q", v)
	}
}
