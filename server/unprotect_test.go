package server_test

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// writeRandom writes n random runs of blocks to an NBD disk.
func writeRandom(t *testing.T, c *nbd.Client, rnd *rand.Rand, n int) {
	t.Helper()
	for range n {
		b := make([]byte, 512*(1+rnd.IntN(64)))
		for j := range b {
			b[j] = byte(rnd.IntN(256))
		}
		off := rnd.Int64N((c.Size()-int64(len(b)))/512) * 512
		if err := c.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

// waitAcknowledged waits until the agent's every change is acknowledged
// (durable in the process server's cache). It asks the agent: the server's
// figures wait for its applier, which a test may hold.
func waitAcknowledged(t *testing.T, ra *runningAgent) {
	t.Helper()
	waitFor(t, "every change acknowledged", func() bool {
		st := ra.a.Stats()
		return st.NextSeq > 0 && st.Acked >= st.NextSeq-1
	})
}

// targetOf opens the rig's target and vault (the server stopped).
func targetOf(t *testing.T, dir string) (replication.Target, *replication.Catalog) {
	t.Helper()
	ctx := context.Background()
	tgt, err := server.OpenTarget(ctx, "file://"+filepath.Join(dir, "srv", "target"), "", server.ExistingTarget)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tgt.Close() })
	pass, err := api.ReadSecretFile(filepath.Join(dir, "srv", server.PassphraseFile))
	if err != nil {
		t.Fatal(err)
	}
	cat, _, err := replication.OpenVault(ctx, tgt, pass)
	if err != nil {
		t.Fatal(err)
	}
	return tgt, cat
}

// mustHoldNothingOf fails unless the target holds no object, no disk and
// no file of machine id, and the cache no directory of it.
func mustHoldNothingOf(t *testing.T, dir, id string, disks []uint32) {
	t.Helper()
	ctx := context.Background()
	tgt, _ := targetOf(t, dir)
	defer tgt.Close() // the server may start again on it
	objs, err := tgt.ListObjects(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if strings.Contains(o.Key, id) {
			t.Errorf("the target still holds object %s", o.Key)
		}
	}
	for _, idx := range disks {
		for _, key := range []string{replication.DiskKey(id, idx), replication.SumKey(id, idx)} {
			if d, err := tgt.OpenDisk(ctx, key, 0); !errors.Is(err, replication.ErrNotFound) {
				if err == nil {
					d.Close()
				}
				t.Errorf("the target still holds disk %s (%v)", key, err)
			}
		}
	}
	filepath.WalkDir(filepath.Join(dir, "srv", "target"), func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.Contains(path, id) {
			t.Errorf("the target directory still holds %s", path)
		}
		return nil
	})
	if _, err := os.Stat(filepath.Join(dir, "srv", server.CacheDir, id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the cache of machine %s is still there (%v)", id, err)
	}
}

// TestUnprotect: a protected machine is unprotected with its replica kept
// (its agent refused, its points listed and recovered, the replica holding
// every acknowledged change, its name not registered again), unprotected
// again (nothing to do), then with its replica deleted (nothing of it left
// on the target or in the database), and its name registered afresh.
func TestUnprotect(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 8<<20, 5)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	c, err := nbd.Dial(ctx, cfg.NBD, "d")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rnd := rand.New(rand.NewPCG(7, 7))
	writeRandom(t, c, rnd, 100)
	r.waitProtected("vm1")
	id := r.machine("vm1").ID
	writeRandom(t, c, rnd, 100)
	p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	atPoint := fileSum(t, disk)
	// Acknowledged after the point, and not applied yet when the unprotect
	// comes (the applier is held): the kept replica must hold these too.
	hold, held := make(chan struct{}), make(chan struct{})
	go r.srv.ProcessServerForTest().WithApplier(ctx, id, func(*replication.Applier) error {
		close(held)
		<-hold
		return nil
	})
	<-held
	writeRandom(t, c, rnd, 200)
	waitAcknowledged(t, ra)
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	final := fileSum(t, disk)
	done := make(chan error, 1)
	go func() { done <- r.client.Unprotect(ctx, "vm1", false) }()
	time.Sleep(200 * time.Millisecond) // the unprotect has begun (and waits for the applier)
	close(hold)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	m := r.machine("vm1")
	if !m.Unprotected || m.State != api.StateUnprotected || m.UnprotectedAt.IsZero() {
		t.Fatalf("machine after unprotect: %+v", m)
	}
	// The agent runs on: its reconnections are refused with the reason,
	// which the machine shows.
	waitFor(t, "the agent's refusal shown on the machine", func() bool {
		m := r.machine("vm1")
		return !m.Connected && strings.Contains(m.Error, "unprotected")
	})
	if _, ok := r.srv.ProcessServerForTest().Stats(id); ok {
		t.Error("the process server still has the machine")
	}
	if _, err := os.Stat(filepath.Join(dir, "srv", server.CacheDir, id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the machine's cache is still there (%v)", err)
	}
	// Its points are listed and recovered as before; nothing new is made.
	var ps []api.PointJSON
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/points", nil, &ps); err != nil {
		t.Fatal(err)
	}
	if len(ps) == 0 || ps[len(ps)-1].ID < p.ID {
		t.Fatalf("points after unprotect: %+v (want up to %s)", ps, p.ID)
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d.img")) != atPoint {
		t.Fatal("the recovered point differs from the source at that point")
	}
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err == nil || !strings.Contains(err.Error(), "unprotected") {
		t.Errorf("a point of an unprotected machine: %v", err)
	}
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/vm1/resync", api.ResyncRequest{}, nil); err == nil || !strings.Contains(err.Error(), "HTTP 409") {
		t.Errorf("a resync of an unprotected machine: %v", err)
	}
	// Its name is taken: a new agent named so is refused, with what to do.
	fresh := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	fresh.StateDir, fresh.NBD = filepath.Join(dir, "vm1-fresh"), "unix:"+filepath.Join(dir, "vm1-fresh.sock")
	if a, err := agent.New(ctx, fresh); err == nil {
		a.Close()
		t.Fatal("an agent registered under the name of an unprotected machine")
	} else if !strings.Contains(err.Error(), "--delete-replica") {
		t.Errorf("registration refused with %q: want what to do", err)
	}
	// Unprotecting again changes nothing.
	if err := r.client.Unprotect(ctx, "vm1", false); err != nil {
		t.Fatalf("unprotect again: %v", err)
	}
	if m2 := r.machine("vm1"); !m2.UnprotectedAt.Equal(m.UnprotectedAt) || m2.ID != id {
		t.Fatalf("unprotect again changed the machine: %+v", m2)
	}

	// The replica kept holds every acknowledged change, not only those up
	// to the last point; and it is still there after a restart.
	r.stop()
	_, cat := targetOf(t, dir)
	mc, err := cat.Machine(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	rd, err := cat.T.OpenDisk(ctx, replication.DiskKey(id, 0), 0)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, rd.Size())
	if _, err := rd.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	rd.Close()
	cat.T.Close()
	src, _ := os.ReadFile(disk)
	if !bytes.Equal(got, src) || fileSum(t, disk) != final {
		t.Fatalf("the replica kept does not hold every acknowledged change (applied seq %d)", mc.AppliedSeq)
	}
	r.start()
	if m := r.machine("vm1"); !m.Unprotected {
		t.Fatalf("after a restart: %+v", m)
	}
	if _, ok := r.srv.ProcessServerForTest().Stats(id); ok {
		t.Error("the process server opened the unprotected machine at its start")
	}
	r.recover("vm1", "latest", filepath.Join(dir, "out2"))

	// Now with the replica.
	if err := r.client.Unprotect(ctx, "vm1", true); err != nil {
		t.Fatal(err)
	}
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1", nil, nil); err == nil || !strings.Contains(err.Error(), "HTTP 404") {
		t.Fatalf("the machine after unprotect --delete-replica: %v", err)
	}
	if _, err := r.srv.DB().Machine(ctx, id); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("the machine's row: %v", err)
	}
	if es, err := r.srv.DB().Events(ctx, id, 0); err != nil || len(es) != 0 {
		t.Fatalf("the machine's events: %d, %v", len(es), err)
	}
	ra.close()
	r.stop()
	mustHoldNothingOf(t, dir, id, []uint32{0})
	r.start()

	// The name is free: a new registration is a new machine.
	fresh.Server = r.srv.URL()
	startAgent(t, fresh)
	r.waitProtected("vm1")
	if m := r.machine("vm1"); m.ID == id || m.Unprotected {
		t.Fatalf("the machine registered again: %+v (old id %s)", m, id)
	}
}

// TestUnprotectFinishedAtStart: a stop between the unprotect mark and the
// removal leaves a state the next start finishes: the process server does
// not open the machine, its cache is applied and removed (replica kept), or
// everything of it deleted (with the replica).
func TestUnprotectFinishedAtStart(t *testing.T) {
	t.Parallel()
	for _, del := range []bool{false, true} {
		name := "keep"
		if del {
			name = "delete"
		}
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			r := startServer(t, dir)
			disk := filepath.Join(dir, "d.img")
			mustDisk(t, disk, 4<<20, 9)
			ra := startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk}))
			r.waitProtected("vm1")
			if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil {
				t.Fatal(err)
			}
			id := r.machine("vm1").ID
			ra.close()
			r.stop()
			// The crash came right after the mark: nothing else was done.
			db, err := store.Open(ctx, filepath.Join(dir, "srv", server.DatabaseFile))
			if err != nil {
				t.Fatal(err)
			}
			if err := db.SetUnprotected(ctx, id, time.Now(), del); err != nil {
				t.Fatal(err)
			}
			db.Close()
			if _, err := os.Stat(filepath.Join(dir, "srv", server.CacheDir, id)); err != nil {
				t.Fatalf("the cache of the machine before the restart: %v", err)
			}
			r.start()
			if _, ok := r.srv.ProcessServerForTest().Stats(id); ok {
				t.Error("the process server opened the unprotected machine at its start")
			}
			if !del {
				waitFor(t, "the cache removed", func() bool {
					_, err := os.Stat(filepath.Join(dir, "srv", server.CacheDir, id))
					return errors.Is(err, os.ErrNotExist)
				})
				if m := r.machine("vm1"); !m.Unprotected || m.PointCount == 0 {
					t.Fatalf("machine %+v", m)
				}
				r.recover("vm1", "latest", filepath.Join(dir, "out"))
				// Asked again, it is done already.
				if err := r.client.Unprotect(ctx, "vm1", false); err != nil {
					t.Fatal(err)
				}
				return
			}
			waitFor(t, "the machine deleted", func() bool {
				_, err := r.srv.DB().Machine(ctx, id)
				return errors.Is(err, store.ErrNotFound)
			})
			// A deletion asked for is not turned into a keep.
			if err := r.client.Unprotect(ctx, "vm1", false); err == nil || !strings.Contains(err.Error(), "HTTP 404") {
				t.Fatalf("unprotect after the deletion: %v", err)
			}
			r.stop()
			mustHoldNothingOf(t, dir, id, []uint32{0})
		})
	}
}
