package agent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

// Stats are the agent's cumulative figures, also written to
// STATE/stats.json every second.
type Stats struct {
	BytesSent  int64  `json:"bytes_sent"` // frame bytes sent to the process server, all connections, all runs
	RawSent    int64  `json:"raw_sent"`   // record bytes before compression
	Frames     int64  `json:"frames"`
	FramesZstd int64  `json:"frames_zstd"` // of Frames, those sent zstd-compressed
	FramesS2   int64  `json:"frames_s2"`   // and those sent S2-compressed
	Records    int64  `json:"records"`
	Acked      uint64 `json:"acked"`
	NextSeq    uint64 `json:"next_seq"`
	SpoolBytes int64  `json:"spool_bytes"`
	// SpoolWritten is the bytes of records written to the spool's files
	// this run: every change with the spool log, what the memory log
	// spilled with it.
	SpoolWritten int64        `json:"spool_written"`
	Writes       int64        `json:"writes"` // guest changes this run
	Latency      LatencyStats `json:"ack_latency"`
	Holds        LatencyStats `json:"group_holds"` // how long group cuts held the guest's writes
	Connected    bool         `json:"connected"`
	Disks        []replication.DiskProgress
}

// statsFileName is where the figures are written, in the state directory.
const statsFileName = "stats.json"

// sendCounters are the shipper's cumulative figures; they carry on from
// the last run's stats file.
type sendCounters struct {
	bytesSent, rawSent, frames, records atomic.Int64
	framesZstd, framesS2                atomic.Int64
	connected                           atomic.Bool
}

// loadSendCounters starts the counters where the last run's stats file
// left them (at zero without one).
func loadSendCounters(dir string) *sendCounters {
	c := &sendCounters{}
	var prev Stats
	if b, err := os.ReadFile(filepath.Join(dir, statsFileName)); err == nil && json.Unmarshal(b, &prev) == nil {
		c.bytesSent.Store(prev.BytesSent)
		c.rawSent.Store(prev.RawSent)
		c.frames.Store(prev.Frames)
		c.framesZstd.Store(prev.FramesZstd)
		c.framesS2.Store(prev.FramesS2)
		c.records.Store(prev.Records)
	}
	return c
}

// statsFile writes the agent's figures (snapshot) to the stats file every
// second while it runs, and once more at the stop.
type statsFile struct {
	path     string
	snapshot func() Stats
	rt       *routines
}

func newStatsFile(parent context.Context, dir string, snapshot func() Stats) *statsFile {
	return &statsFile{path: filepath.Join(dir, statsFileName), snapshot: snapshot, rt: newRoutines(parent)}
}

// start begins the writes.
func (s *statsFile) start() {
	s.rt.Go(func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-s.rt.ctx.Done():
				return
			case <-t.C:
				s.save()
			}
		}
	})
}

// Close stops the writes.
func (s *statsFile) Close() { s.rt.Close() }

// save writes the figures now (best effort: they are informational).
func (s *statsFile) save() {
	b, err := json.MarshalIndent(s.snapshot(), "", "  ")
	if err == nil {
		atomicfile.Write(s.path, b, 0o644)
	}
}
