package server_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// TestReregisteredMachineResyncsWholeDisk: a machine whose disk grew has a
// resync of the new area scheduled (for the night) when it is
// re-registered. The fresh agent's log is a new one: the scheduled resync
// becomes one of the whole disk, for the new log, so a block the old log
// never carried (outside the new area) is found and sent.
func TestReregisteredMachineResyncsWholeDisk(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	var clock atomic.Int64
	clock.Store(time.Date(2026, 11, 26, 12, 0, 0, 0, time.Local).UnixNano()) // outside the default window
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) {
		c.Now = func() time.Time { return time.Unix(0, clock.Load()) }
	}}
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 8<<20, 11)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	ra.close()
	if err := os.Truncate(disk, 12<<20); err != nil {
		t.Fatal(err)
	}
	startAgent(t, cfg) // the old agent, running on
	rows := func() []api.ResyncJSON {
		var rows []api.ResyncJSON
		r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/resync", nil, &rows)
		return rows
	}
	waitRow := func(what string, ok func(api.ResyncJSON) bool) {
		t.Helper()
		deadline := time.Now().Add(hung)
		for {
			if rs := rows(); len(rs) == 1 && ok(rs[0]) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %+v", what, rows())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitRow("the new area's resync scheduled", func(x api.ResyncJSON) bool {
		return x.State == "scheduled" && strings.Contains(x.Reason, "grew")
	})
	// A block the old log never carried (its lost state had it).
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte(strings.Repeat("lost with the old state ", 200)), 1<<20)
	f.Close()

	fresh := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	fresh.StateDir, fresh.NBD = filepath.Join(dir, "vm1-fresh"), "unix:"+filepath.Join(dir, "vm1-fresh.sock")
	startAgent(t, fresh)
	waitRow("the resync for the new log", func(x api.ResyncJSON) bool {
		return x.State == "scheduled" && strings.Contains(x.Reason, "new log")
	})
	if m := r.machine("vm1"); m.State != replication.StateResync {
		t.Fatalf("machine %s after the re-registration, want resync", m.State)
	}
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/machines/vm1/resync", api.ResyncRequest{}, nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(hung)
	for len(rows()) != 0 || r.machine("vm1").State != replication.StateProtected {
		if time.Now().After(deadline) {
			t.Fatalf("resync not done: %+v, machine %+v", rows(), r.machine("vm1"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	var es []api.EventJSON
	r.client.Do(ctx, http.MethodGet, "/api/v1/events?machine=vm1", nil, &es)
	var compared, sent int64 = -1, -1
	for _, e := range es {
		if e.Kind == "resync-done" {
			fmt.Sscanf(e.Message[strings.Index(e.Message, "compared"):], "compared %d bytes, sent %d", &compared, &sent)
		}
	}
	if compared != 12<<20 || sent < 4800 || sent > 2*4096*2 {
		t.Fatalf("the resync compared %d bytes and sent %d: want the whole disk compared and the lost block sent", compared, sent)
	}
	p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("the recovered point differs from the disk")
	}
}
