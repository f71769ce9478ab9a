package server_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/psnode"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

func (r *rig) psConfig(name, passFile string) psnode.Config {
	pass, err := api.ReadSecretFile(passFile)
	if err != nil {
		r.t.Fatal(err)
	}
	return psnode.Config{ConfigURL: r.srv.URL(), Passphrase: pass, DataDir: filepath.Join(r.dir, name), DataListen: "127.0.0.1:0", Name: name,
		OpenTarget: func(ctx context.Context, url string) (replication.Target, error) {
			return server.OpenTarget(ctx, url, "", server.SharedTarget)
		}, Logger: r.log}
}

// waitPS waits until the list shows the process server name in state.
func (r *rig) waitPS(ctx context.Context, name, state string) api.ProcessServerInfo {
	r.t.Helper()
	for {
		l, err := r.client.ProcessServers(ctx)
		if err != nil {
			r.t.Fatal(err)
		}
		for _, p := range l {
			if p.Name == name && p.State == state {
				return p
			}
		}
		select {
		case <-ctx.Done():
			r.t.Fatalf("process server %s never %s: %+v", name, state, l)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// A scale-out process server registers with the passphrase, opens the
// configuration server's target beside it, sends heartbeats with its
// figures; a wrong passphrase or a reserved name is refused and registers
// nothing; removal revokes it (its next heartbeat is refused and it stops);
// a silent one raises a critical alert.
func TestProcessServerRegistersAndBeats(t *testing.T) {
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger()}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.tune = func(c *server.Config) {
		c.PolicyEvery, c.PSHeartbeatLost, c.AlertClear, c.HeartbeatLost = 20*time.Millisecond, 2*time.Second, 50*time.Millisecond, time.Hour
	}
	r.start()
	ctx, cancel := context.WithTimeout(context.Background(), hung)
	defer cancel()
	passFile := filepath.Join(dir, "srv", server.PassphraseFile)

	bad := filepath.Join(dir, "bad-pass")
	os.WriteFile(bad, []byte("not-the-passphrase\n"), 0o600)
	_, err := psnode.Open(ctx, r.psConfig("ps1", bad))
	if !errors.Is(err, enroll.ErrWrongPassphrase) {
		t.Fatalf("wrong passphrase: %v, want ErrWrongPassphrase", err)
	}
	if _, err := psnode.Open(ctx, r.psConfig(api.BuiltinProcessServer, passFile)); err == nil || !strings.Contains(err.Error(), "builtin") {
		t.Fatalf("the built-in name: %v", err)
	}
	if l, err := r.client.ProcessServers(ctx); err != nil || len(l) != 1 || !l[0].Builtin {
		t.Fatalf("after refusals: %+v, %v (want the built-in one only)", l, err)
	}

	n, err := psnode.Open(ctx, r.psConfig("ps1", passFile))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	runErr := make(chan error, 1)
	go func() { runErr <- n.Run(ctx) }()
	p := r.waitPS(ctx, "ps1", api.PSHealthy)
	if p.DataAddr != n.DataAddr() || p.Figures.MemoryTotal == 0 || !strings.HasPrefix(p.Figures.Target, "localfs:") || p.Figures.CacheState == "" {
		t.Fatalf("ps1 as listed: %+v (data %s)", p, n.DataAddr())
	}

	// Removed: the next heartbeat is refused and the process server stops.
	if err := r.client.RemoveProcessServer(ctx, "ps1"); err != nil {
		t.Fatal(err)
	}
	if err := r.client.RemoveProcessServer(ctx, "ps1"); err == nil || !strings.Contains(err.Error(), "no process server") {
		t.Fatalf("removed twice: %v", err)
	}
	if err := r.client.RemoveProcessServer(ctx, api.BuiltinProcessServer); err == nil {
		t.Fatal("the built-in process server was removed")
	}
	select {
	case err := <-runErr:
		if err == nil || !strings.Contains(err.Error(), "not registered") {
			t.Fatalf("removed process server's Run: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the removed process server kept running")
	}
	n.Close()

	// Registered again, then silent: a critical alert, cleared by its
	// heartbeats once it runs again.
	n2, err := psnode.Open(ctx, r.psConfig("ps2", passFile))
	if err != nil {
		t.Fatal(err)
	}
	n2.Close()
	waitAlert := func(active bool) {
		for {
			var as []api.Alert
			if err := r.client.Do(ctx, "GET", "/api/v1/alerts", nil, &as); err != nil {
				t.Fatal(err)
			}
			found := false
			for _, a := range as {
				if a.Kind == api.AlertPSHeartbeat && a.Subject == "process server ps2" && a.Severity == api.SeverityCritical {
					found = true
				}
			}
			if found == active {
				return
			}
			select {
			case <-ctx.Done():
				t.Fatalf("ps-heartbeat alert active=%v never: %+v", active, as)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	waitAlert(true)
	n3, err := psnode.Open(ctx, r.psConfig("ps2", passFile))
	if err != nil {
		t.Fatal(err)
	}
	defer n3.Close()
	ctx3, stop3 := context.WithCancel(ctx)
	defer stop3()
	go n3.Run(ctx3)
	waitAlert(false)
}
