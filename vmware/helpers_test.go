package vmware

import (
	"bytes"
	"context"
	"crypto/tls"
	"log/slog"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/vmware/govmomi/simulator"
)

// testPassword is distinctive so a search for it in errors and logs finds
// only a leak (the simulator's default, "pass", is inside "password").
const testPassword = "S3cret-Passw0rd-42"

// sim is a vCenter simulator (simulator.VPX) served over TLS in-process.
type sim struct {
	model  *simulator.Model
	server *simulator.Server
	ep     Endpoint
}

// mustSim starts a VPX simulator over TLS with testPassword as the
// password; the cleanup stops it.
func mustSim(t *testing.T) *sim {
	t.Helper()
	m := simulator.VPX()
	if err := m.Create(); err != nil {
		t.Fatal(err)
	}
	m.Service.TLS = new(tls.Config) // the simulator's localhost certificate
	m.Service.Listen = &url.URL{User: url.UserPassword("admin", testPassword)}
	s := m.Service.NewServer()
	sm := &sim{model: m, server: s}
	t.Cleanup(func() {
		sm.server.Close()
		m.Remove()
	})
	u := *s.URL
	u.User = nil
	sm.ep = Endpoint{
		Name:       "vc1",
		URL:        u.String(),
		User:       "admin",
		Password:   testPassword,
		Thumbprint: certThumbprint(s.Certificate()),
	}
	return sm
}

// syncBuffer is a log sink safe for the watcher's goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func testLogger(buf *syncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// waitFor waits until cond holds for the watcher, waking on its Updated
// channel (never on a timer), and fails the test after a minute.
func waitFor(t *testing.T, w *Watcher, what string, cond func(Status, []VM) bool) []VM {
	t.Helper()
	deadline := time.NewTimer(60 * time.Second)
	defer deadline.Stop()
	for {
		ch := w.Updated()
		st, vms := w.Status(), w.VMs()
		if cond(st, vms) {
			return vms
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s; status %+v, %d VMs", what, st, len(vms))
		}
	}
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
