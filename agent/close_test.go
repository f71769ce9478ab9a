package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// A point the server asked for runs on its own goroutine; Close waits for
// it before closing the disks and the spool under it. The point is held in
// its freeze until the test releases it, after Close was called.
func TestCloseWaitsForRequestedPoint(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fz := &fakeFreezer{frozen: map[string]bool{}, block: "/mnt/db", unblck: make(chan struct{})}
		release := sync.OnceFunc(func() { close(fz.unblck) })
		defer release()
		a := mustAgent(t, agentSetup{cfg: func(c *Config) { c.FreezeMounts = []string{"/mnt/db"} }})
		a.points.freezer = fz
		nc, peer := net.Pipe()
		defer peer.Close()
		s := &shipSession{sh: a.ship, nc: nc}
		s.cond = sync.NewCond(&s.mu)
		f, err := replication.JSONFrame(replication.FrameTagReq, replication.TagRequest{ID: 42, App: true})
		if err != nil {
			t.Fatal(err)
		}
		var in bytes.Buffer
		if err := replication.WriteFrame(&in, &f); err != nil {
			t.Fatal(err)
		}
		// The receiver starts the point, then ends with its input.
		if err := s.receive(a.ctx, bufio.NewReader(&in)); !errors.Is(err, io.EOF) {
			t.Fatalf("receive: %v", err)
		}
		closed := make(chan error, 1)
		go func() { closed <- a.Close() }()
		synctest.Wait() // the point is in its freeze, Close as far as it goes
		select {
		case err := <-closed:
			t.Fatalf("Close returned (%v) while a requested point was in flight", err)
		default:
		}
		release()
		if err := <-closed; err != nil {
			t.Fatalf("Close: %v", err)
		}
		// The point ran whole before the spool closed: its tag is logged.
		found := false
		for _, r := range spoolFileRecords(t, filepath.Join(a.cfg.StateDir, spoolDir)) {
			found = found || (r.Kind == replication.KindTag && r.Offset == 42 && r.Flags&replication.FlagApp != 0)
		}
		if !found {
			t.Fatal("the requested point's tag is not in the spool")
		}
	})
}

// spoolRecords reopens a closed spool and returns its records. It decodes
// them itself: the shared zstd codec readFrames uses must not be tied to a
// synctest bubble.
func spoolFileRecords(t *testing.T, dir string) []replication.Record {
	t.Helper()
	sp, _, err := spool.Open(dir, spool.Options{MaxBytes: 1 << 30}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	rd, err := sp.NewReader(sp.First())
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	buf, _, _, err := rd.Next(context.Background(), nil, 64<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	var recs []replication.Record
	for len(buf) > 0 {
		r, n, err := replication.DecodeRecord(buf)
		if err != nil {
			t.Fatal(err)
		}
		recs = append(recs, r)
		buf = buf[n:]
	}
	return recs
}

// Close writes the clean marker only after the state is saved: after a
// failed save the next start must repair the log, and Close says why.
func TestCloseStateSave(t *testing.T) {
	t.Run("saved", func(t *testing.T) {
		a := mustAgent(t, agentSetup{})
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if !exists(filepath.Join(a.cfg.StateDir, cleanFile)) {
			t.Fatal("no clean marker after a clean stop")
		}
		if st, err := loadState(a.cfg.StateDir); err != nil || st.MachineID != "m1" {
			t.Fatalf("state after Close: %+v, %v", st, err)
		}
	})
	t.Run("save fails", func(t *testing.T) {
		a := mustAgent(t, agentSetup{})
		// A directory where the state file goes: the save's rename fails
		// (a read-only directory would not stop root).
		os.Remove(filepath.Join(a.cfg.StateDir, stateFile))
		if err := os.Mkdir(filepath.Join(a.cfg.StateDir, stateFile), 0o700); err != nil {
			t.Fatal(err)
		}
		err := a.Close()
		if err == nil || !strings.Contains(err.Error(), "save agent state") {
			t.Fatalf("Close with a failing state save = %v", err)
		}
		if exists(filepath.Join(a.cfg.StateDir, cleanFile)) {
			t.Fatal("clean marker written after a failed state save")
		}
	})
}

// A resync job for a disk the agent does not have is dropped; if the state
// saying so cannot be saved, the error says that too.
func TestDroppedResyncReportsFailedSave(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, stateFile), 0o700); err != nil {
		t.Fatal(err)
	}
	job := resyncState{Job: replication.ResyncJob{ID: 7, Disk: 9}}
	st := newStateStore(dir, &state{Resync: &job})
	r := newResyncer(context.Background(), slog.Default(), nil, nil, st, &tagMarks{}, func() frameWriter { return nil }, 0)
	err := r.run(nil, job)
	if err == nil || !strings.Contains(err.Error(), "unknown disk 9 dropped") || !strings.Contains(err.Error(), "could not be saved") {
		t.Fatalf("run of a job for an unknown disk, with a failing save = %v", err)
	}
	if st.resyncJob() != nil {
		t.Fatal("the job is still current")
	}
}
