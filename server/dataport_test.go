package server_test

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
)

// A server restarted on another data port (a restarted demo, whose port
// was random) is found again by a running agent: the saved address
// refuses, the agent asks the control URL for the data port and
// reconnects there, and writes made meanwhile reach a point.
func TestAgentFindsAMovedDataListener(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 8<<20, 5)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	startAgent(t, cfg)
	r.waitProtected("vm1")

	old := r.dataListen
	r.stop()
	r.dataListen = "127.0.0.1:0" // another port, as a fresh demo would get
	r.start()
	if r.dataListen == old {
		t.Fatalf("the restarted server listens on the same data port %s", old)
	}
	c, err := nbd.Dial(ctx, cfg.NBD, "d")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteAt(bytes.Repeat([]byte{0xab}, 1<<20), 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	p, err := r.client.Tag(ctx, "vm1", false, hung)
	if err != nil {
		t.Fatalf("no point after the data listener moved: %v", err)
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("recovered image differs from the disk")
	}
}
