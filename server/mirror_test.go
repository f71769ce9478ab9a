package server_test

import (
	"bytes"
	"context"
	"net/http"
	"path/filepath"
	"testing"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
)

// TestReplicationDoesNotWaitOnTheDatabase: with the vault database held
// (every statement waits, as behind a stuck disk), the guest's writes are
// still acknowledged and applied and points are still made: nothing on
// the replication path waits on the database (it used to: the applier
// wrote every disk row under its lock at each checkpoint). Once the
// database is back, its copies catch up with the catalog: the machine
// shows the points, and the last one holds the guest's writes.
func TestReplicationDoesNotWaitOnTheDatabase(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 8<<20, 21)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	id := ra.a.MachineID()
	ps := r.srv.ProcessServerForTest()
	before, _ := ps.Stats(id)
	c, err := nbd.Dial(ctx, cfg.NBD, "d")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	release, err := r.srv.DB().Hold(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer release() // before the rig stops the server
	var points []replication.Point
	for i := range 3 {
		if err := c.WriteAt(bytes.Repeat([]byte{byte('a' + i)}, 64<<10), int64(i)<<20); err != nil {
			t.Fatal(err)
		}
		// The bound is for a hung test: while the database is held,
		// anything that waits on it never returns.
		pctx, cancel := context.WithTimeout(ctx, hung)
		p, err := ps.RequestPoint(pctx, id, false)
		cancel()
		if err != nil {
			t.Fatalf("point %d with the database held: %v", i, err)
		}
		points = append(points, p)
	}
	if st, _ := ps.Stats(id); st.AppliedSeq < points[2].Seq || st.AppliedSeq <= before.AppliedSeq {
		t.Fatalf("applied %d with the database held, want %d", st.AppliedSeq, points[2].Seq)
	}
	release()

	last := points[2].ID
	waitFor(t, "the database to show the points", func() bool {
		var m api.Machine
		err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1", nil, &m)
		return err == nil && m.LastPoint != nil && m.LastPoint.ID == last && m.State == replication.StateProtected
	})
	out := filepath.Join(dir, "out")
	r.recover("vm1", last, out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("the point made while the database was held differs from the disk")
	}
}
