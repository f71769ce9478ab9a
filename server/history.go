package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// historyKeep is how long the console's history is kept: its charts show
// 24 h.
const historyKeep = 25 * time.Hour

// historyLoop samples every machine's RPO and bytes received every
// Config.HistoryEvery (a minute) for the console's charts, and prunes
// what is older than historyKeep. It reads and writes the database only,
// off the replication path.
func (s *Server) historyLoop() {
	t := time.NewTicker(s.cfg.HistoryEvery)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		if err := s.sampleHistory(s.ctx, s.now()); err != nil && s.ctx.Err() == nil {
			s.log.Error("history sample", "err", err)
		}
	}
}

// sampleHistory records one sample of every protected machine at now.
func (s *Server) sampleHistory(ctx context.Context, now time.Time) error {
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return err
	}
	ss := make([]store.Sample, 0, len(ms))
	for _, m := range ms {
		if m.Unprotected() {
			continue
		}
		v, err := s.machineView(ctx, m, &links{}) // no VM look-up
		if errors.Is(err, store.ErrNotFound) {
			continue // deleted since the listing
		}
		if err != nil {
			return fmt.Errorf("machine %s: %w", m.Name, err)
		}
		rpo := time.Duration(-1)
		if d, _, ok := v.RPOAtLeast(now); ok {
			rpo = d
		}
		ss = append(ss, store.Sample{MachineID: m.ID, Time: now, RPO: rpo, Bytes: v.BytesReceived})
	}
	if err := s.db.AddSamples(ctx, ss); err != nil {
		return err
	}
	if _, err := s.db.PruneHistory(ctx, now.Add(-historyKeep)); err != nil {
		return fmt.Errorf("prune history: %w", err)
	}
	// Sampled more often than the bound allows in 25 h (tests, a
	// --history-every of seconds), a machine's history is capped too.
	if s.cfg.HistoryEvery < historyKeep/store.MaxSamplesPerMachine {
		if _, err := s.db.CapHistory(ctx); err != nil {
			return fmt.Errorf("cap history: %w", err)
		}
	}
	return nil
}

// History returns a machine's (by name) samples since since, oldest
// first, with the churn of each interval: store.ErrNotFound if there is
// no such machine.
func (s *Server) History(ctx context.Context, name string, since time.Time) ([]api.HistorySample, error) {
	m, err := s.db.MachineByName(ctx, name)
	if err != nil {
		return nil, err
	}
	ss, err := s.db.History(ctx, m.ID, since)
	if err != nil {
		return nil, err
	}
	out := make([]api.HistorySample, len(ss))
	for i, x := range ss {
		out[i] = api.HistorySample{Time: x.Time.UTC(), RPO: max(x.RPO, 0), RPOKnown: x.RPO >= 0, Bytes: x.Bytes}
		if i > 0 {
			// Received bytes only grow; a smaller count (a server that
			// lost its unflushed count in a crash) is no churn.
			out[i].Churn = max(x.Bytes-ss[i-1].Bytes, 0)
		}
	}
	return out, nil
}

// handleHistory answers GET /api/v1/machines/{m}/history?since=T (RFC
// 3339; default the last 24 h).
func (s *Server) handleHistory(w http.ResponseWriter, r *http.Request) error {
	m, err := s.findMachine(r.Context(), r)
	if err != nil {
		return err
	}
	since := s.now().Add(-24 * time.Hour)
	if q := r.URL.Query().Get("since"); q != "" {
		if since, err = time.Parse(time.RFC3339Nano, q); err != nil {
			return errorf(http.StatusBadRequest, "since %q: want RFC 3339, e.g. 2026-11-26T09:30:00Z", q)
		}
	}
	out, err := s.History(r.Context(), m.Name, since)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}
