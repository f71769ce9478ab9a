package web

import (
	"context"
	"fmt"

	"github.com/asrdr/asr/server/api"
)

// The fake's Alerts, AckAlert and Events, the methods the alerts branch
// adds to Backend too: at the merge, keep one fake of them (this file, or
// theirs) and point the dashboard's tests at its fields.

func (b *fakeBackend) Alerts(_ context.Context, all bool) ([]api.Alert, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []api.Alert
	for _, a := range b.consoleAlerts {
		if all || a.State == api.AlertActive {
			out = append(out, a)
		}
	}
	return out, nil
}

func (b *fakeBackend) AckAlert(_ context.Context, id int64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.consoleAlerts {
		if b.consoleAlerts[i].ID == id {
			b.consoleAlerts[i].Acked = testNow
			b.consoleAcked = append(b.consoleAcked, id)
			return nil
		}
	}
	return fmt.Errorf("alert %d: %w", id, ErrNotFound)
}

func (b *fakeBackend) Events(_ context.Context, limit int) ([]api.EventJSON, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.consoleEvents[:min(limit, len(b.consoleEvents))], nil
}
