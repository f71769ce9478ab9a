package server

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/asrdr/asr/replication"
)

// TestOverflowResyncNotScheduled: a disk in resync because its agent's
// spool overflowed gets no resync row (the agent resends its marked blocks
// and ends that resync itself; a checksum resync started in the window
// hashed the whole disk on the guest meanwhile), while a disk marked for
// any other reason, the agent's stop in the middle of an overflow among
// them, is scheduled as before. It fails if the overflow's reason is
// scheduled, or if the exception swallows other reasons.
func TestOverflowResyncNotScheduled(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, err := Open(ctx, Config{DataDir: filepath.Join(t.TempDir(), "srv"), Listen: "127.0.0.1:0", DataListen: "127.0.0.1:0",
		NBDListen: "off", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.db.SetSetting(ctx, "resync_window", "always"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.db.CreateMachine(ctx, "vm1", "vm1", ""); err != nil {
		t.Fatal(err)
	}
	m := replication.MachineCatalog{ID: "vm1", Name: "vm1", Disks: []replication.CatalogDisk{
		{Index: 0, Name: "a", State: replication.StateResync, Reason: replication.OverflowReason},
		{Index: 1, Name: "b", State: replication.StateResync, Reason: "the agent stopped during a spool overflow: its changed-block map was lost"},
		{Index: 2, Name: "c", State: replication.StateProtected},
	}}
	if err := s.reconcileResyncs(ctx, m); err != nil {
		t.Fatal(err)
	}
	rows, err := s.db.Resyncs(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].Disk != 1 {
		t.Fatalf("resync rows %+v, want one, for disk b (the stop during the overflow), none for the overflow itself", rows)
	}
	// The overflow's own resync ends (its done record): nothing is left,
	// and nothing was ever scheduled for it.
	m.Disks[0].State, m.Disks[0].Reason = replication.StateProtected, ""
	if err := s.reconcileResyncs(ctx, m); err != nil {
		t.Fatal(err)
	}
	if rows, _ = s.db.Resyncs(ctx, "vm1"); len(rows) != 1 || rows[0].Disk != 1 {
		t.Fatalf("after the overflow ended: resync rows %+v, want only disk b's", rows)
	}
}
