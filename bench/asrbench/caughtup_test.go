package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
)

// caughtUp returns only once the agent's log says its overflow is
// resolved and a stats file written after that says the server
// acknowledged every change; the stats it returns are that file's.
func TestCaughtUpWaitsForTheResolvedOverflowAndTheAcks(t *testing.T) {
	dir := t.TempDir()
	c := &cluster{dir: dir}
	logPath := filepath.Join(dir, "agent-bench.log")
	statsPath := filepath.Join(dir, "agent-bench", "stats.json")
	if err := os.MkdirAll(filepath.Dir(statsPath), 0o700); err != nil {
		t.Fatal(err)
	}
	writeStats := func(st agent.Stats) {
		b, _ := json.Marshal(st)
		if err := os.WriteFile(statsPath+".tmp", b, 0o600); err != nil {
			t.Error(err)
		}
		if err := os.Rename(statsPath+".tmp", statsPath); err != nil { // whole, as the agent's
			t.Error(err)
		}
	}
	if err := os.WriteFile(logPath, []byte("spool overflow: tracking changed blocks\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	writeStats(agent.Stats{NextSeq: 10, Acked: 9, RawSent: 1}) // drained, but not yet resolved
	since := time.Now()
	type result struct {
		st  agent.Stats
		err error
	}
	done := make(chan result, 1)
	go func() {
		st, _, err := c.caughtUp(since)
		done <- result{st, err}
	}()
	// The agent rewrites its stats file every second; here every few
	// milliseconds. Before the resolution they say every change is
	// acknowledged (RawSent 1): a caughtUp that did not wait for the log
	// would return them.
	stop := make(chan struct{})
	var r result
	go func() {
		defer close(stop)
		for range 20 {
			writeStats(agent.Stats{NextSeq: 10, Acked: 9, RawSent: 1})
			time.Sleep(5 * time.Millisecond)
		}
		f, err := os.OpenFile(logPath, os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			t.Error(err)
			return
		}
		f.WriteString("overflow resolved: the disks are consistent again\n")
		f.Close()
		// After it: first not every change acknowledged, then all.
		writeStats(agent.Stats{NextSeq: 20, Acked: 12, RawSent: 2})
		for {
			select {
			case r = <-done:
				return
			default:
			}
			writeStats(agent.Stats{NextSeq: 20, Acked: 19, RawSent: 3 << 30})
			time.Sleep(5 * time.Millisecond)
		}
	}()
	<-stop
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.st.RawSent != 3<<30 || r.st.Acked+1 < r.st.NextSeq {
		t.Fatalf("stats %+v: want the last file's, every change acknowledged", r.st)
	}
}
