package cli

import (
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// asr tag --wait asked while the initial replication runs waits for it
// (its progress on stderr), then takes the point; on a machine whose
// protection ended it fails at once.
func TestTagWaitsForTheInitialReplication(t *testing.T) {
	srv, conn := startServer(t)
	with := func(args ...string) []string { return append(args, conn...) }
	dir := t.TempDir()
	disk := filepath.Join(dir, "d0.img")
	b := make([]byte, 40<<20)
	// Incompressible, larger than the spool and throttled: the copy is
	// still reading the disk when the tag comes.
	rand.Read(b)
	if err := os.WriteFile(disk, b, 0o600); err != nil {
		t.Fatal(err)
	}
	agent.Version, server.Version = "test", "test"
	a, err := agent.New(context.Background(), agent.Config{Server: srv.URL(), PassphraseFile: filepath.Join(conn[3], server.PassphraseFile),
		StateDir: filepath.Join(dir, "agent"), Name: "vm1", Disks: []agent.DiskSpec{{Name: "d0", Path: disk}},
		NBD: "unix:" + filepath.Join(dir, "vm1.sock"), CrashInterval: time.Hour, SpoolMax: 16 << 20, MaxRate: 8 << 20,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; a.Close() })

	// The machine exists (registered) and is still copying.
	c, err := api.NewClient(srv.URL(), filepath.Join(conn[3], server.AdminTokenFile), filepath.Join(conn[3], "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	var m api.Machine
	if err := c.Do(ctx, http.MethodGet, "/api/v1/machines/vm1", nil, &m); err != nil {
		t.Fatal(err)
	}
	if m.State == api.StateProtected {
		t.Fatalf("machine protected before the test could ask: %+v", m)
	}
	r := runCLI(t, with("tag", "--machine", "vm1", "--wait")...)
	if r.code != 0 {
		t.Fatalf("tag --wait during the initial replication: exit %d, stderr:\n%s", r.code, r.stderr)
	}
	if !strings.Contains(r.stderr, "waiting for the initial replication") {
		t.Errorf("tag --wait: no word of the wait on stderr: %q", r.stderr)
	}
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if !strings.HasPrefix(lines[0], "recovery point ") || !strings.Contains(r.stdout, "\n"+lines[len(lines)-1]) {
		t.Errorf("tag --wait output %q", r.stdout)
	}
	if got := mustRun(t, with("points", "--machine", "vm1")...); !strings.Contains(got, lines[len(lines)-1]) {
		t.Errorf("points after tag --wait: %q, want %s", got, lines[len(lines)-1])
	}
	// One point read whole: not a group's (no cut).
	if got := mustRun(t, with("points", "--machine", "vm1", "--point", lines[len(lines)-1])...); !strings.Contains(got, "CUT") || !strings.Contains(got, lines[len(lines)-1]) || !strings.HasSuffix(strings.TrimSpace(got), "-") {
		t.Errorf("points --point %s: %q", lines[len(lines)-1], got)
	}
	mustFail(t, "no such recovery point", with("points", "--machine", "vm1", "--point", "12345678")...)

	// An unprotected machine: no wait, a clear error.
	mustRun(t, with("unprotect", "--machine", "vm1")...)
	mustFail(t, "is unprotected", with("tag", "--machine", "vm1", "--wait")...)
}
