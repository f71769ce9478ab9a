package agent

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication"
)

// The exporter serves the splitter disks by name (a guest write goes
// through the splitter into the log), not the scan-mode ones, and nothing
// once closed.
func TestExporter(t *testing.T) {
	d, sp, dir := mustTestDisk(t, 1<<20)
	scanned, _, _ := mustTestDisk(t, 1<<20)
	scanned.Name, scanned.scan = "root", newScanState(1<<20, time.Hour)
	addr := "unix:" + filepath.Join(dir, "nbd.sock")
	e, err := listenNBD(context.Background(), addr, diskSet{d, scanned}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	e.start()
	ctx := context.Background()
	c, err := nbd.Dial(ctx, addr, "d")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAtFUA(make([]byte, 4096), 8192); err != nil {
		t.Fatal(err)
	}
	recs := spoolRecords(t, sp, sp.First())
	if len(recs) != 1 || recs[0].Kind != replication.KindWrite || recs[0].Offset != 8192 {
		t.Fatalf("records %+v: want the guest's write", recs)
	}
	if c, err := nbd.Dial(ctx, addr, "root"); err == nil {
		c.Close()
		t.Fatal("a scan-mode disk is served")
	}
	e.Close() // shuts the client's connection down too
	if err := c.WriteAt(make([]byte, 4096), 0); err == nil {
		t.Fatal("a connection outlived Close")
	}
	c.Close()
	if c, err := nbd.Dial(ctx, addr, "d"); err == nil {
		c.Close()
		t.Fatal("served after Close")
	}
}
