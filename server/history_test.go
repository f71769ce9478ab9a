package server_test

import (
	"context"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// TestHistoryLoop: the running server samples a replicating machine's RPO
// and bytes received, served by GET /api/v1/machines/{m}/history.
func TestHistoryLoop(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.HistoryEvery = 20 * time.Millisecond }}
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 1<<20, 1)
	startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk}))
	r.waitProtected("vm1")
	var h []api.HistorySample
	deadline := time.Now().Add(hung)
	for time.Now().Before(deadline) {
		if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/history", nil, &h); err != nil {
			t.Fatal(err)
		}
		if n := len(h); n >= 3 && h[n-1].RPOKnown && h[n-1].Bytes > 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(h) < 3 || !h[len(h)-1].RPOKnown || h[len(h)-1].Bytes == 0 {
		t.Fatalf("history: %+v", h)
	}
	for i := 1; i < len(h); i++ {
		if !h[i].Time.After(h[i-1].Time) || h[i].Bytes < h[i-1].Bytes || h[i].Churn != h[i].Bytes-h[i-1].Bytes {
			t.Fatalf("samples %d and %d out of order or churn wrong: %+v %+v", i-1, i, h[i-1], h[i])
		}
	}
	var none []api.HistorySample
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/history?since="+time.Now().Add(time.Hour).UTC().Format(time.RFC3339), nil, &none); err != nil || len(none) != 0 {
		t.Errorf("history since a future time: %d samples, %v", len(none), err)
	}
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/machines/vm1/history?since=yesterday", nil, &none); err == nil {
		t.Error("a malformed since was accepted")
	}
}
