package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// agentSetup describes an agent made by mustAgent.
type agentSetup struct {
	spoolMax int64                   // default 1 GiB
	sizes    []int64                 // one disk each (default: one of 1 MiB)
	fill     func(i int, f *os.File) // writes a disk's contents, if set
	cfg      func(*Config)           // adjusts the configuration, if set
}

// mustAgent opens a registered agent through New, as a restart would: its
// state file is written first (no server, no registration), then New opens
// its disks (d0, d1, ...), spool and NBD listener and wires its components.
// Nothing runs until the test starts it; it is closed at the end of the
// test unless the test closed it.
func mustAgent(t *testing.T, s agentSetup) *Agent {
	t.Helper()
	dir := t.TempDir()
	if s.spoolMax == 0 {
		s.spoolMax = 1 << 30
	}
	if len(s.sizes) == 0 {
		s.sizes = []int64{1 << 20}
	}
	st := &state{MachineID: "m1", Name: "vm1", DataAddr: "127.0.0.1:1", LogID: newLogID()}
	if err := st.save(dir); err != nil {
		t.Fatal(err)
	}
	cfg := Config{StateDir: dir, Name: "vm1", NBD: "unix:" + filepath.Join(dir, "nbd.sock"), CrashInterval: time.Hour,
		SpoolMax: s.spoolMax, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for i, size := range s.sizes {
		name := fmt.Sprintf("d%d", i)
		path := filepath.Join(dir, name+".img")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		f.Truncate(size)
		if s.fill != nil {
			s.fill(i, f)
		}
		f.Close()
		cfg.Disks = append(cfg.Disks, DiskSpec{Name: name, Path: path})
	}
	if s.cfg != nil {
		s.cfg(&cfg)
	}
	a, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.Close()
		testHookNewLog = nil
	})
	return a
}

// TestAgentStartStop: Run starts every component and returns, with all
// of them stopped, once its context ends; Close after it stops cleanly.
func TestAgentStartStop(t *testing.T) {
	a := mustAgent(t, agentSetup{sizes: []int64{4 << 20}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	// The initial copy runs: wait until it is complete (no server needed).
	deadline := time.Now().Add(time.Minute)
	for !a.copies.allDone() {
		if time.Now().After(deadline) {
			t.Fatal("the initial copy did not complete")
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if !exists(filepath.Join(a.cfg.StateDir, cleanFile)) {
		t.Fatal("no clean marker after Run and Close")
	}
}
