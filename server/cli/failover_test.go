package cli

import (
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// asr failover, plan and job against a real server and agent: the export
// lines come last, the failover lists, cleans up; plans are created,
// shown, listed and deleted; bad usage is refused.
func TestFailoverPlanJobCommands(t *testing.T) {
	srv, conn := startServer(t)
	with := func(args ...string) []string { return append(args, conn...) }
	dir := t.TempDir()
	disk := filepath.Join(dir, "d0.img")
	b := make([]byte, 1<<20)
	rand.Read(b)
	if err := os.WriteFile(disk, b, 0o600); err != nil {
		t.Fatal(err)
	}
	// The version the commands below set, set before the agent reads it.
	agent.Version, server.Version = "test", "test"
	a, err := agent.New(context.Background(), agent.Config{Server: srv.URL(), PassphraseFile: filepath.Join(conn[3], server.PassphraseFile),
		StateDir: filepath.Join(dir, "agent"), Name: "vm1", Disks: []agent.DiskSpec{{Name: "d0", Path: disk}},
		NBD: "unix:" + filepath.Join(dir, "vm1.sock"), CrashInterval: time.Hour, SpoolMax: 16 << 20, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; a.Close() })
	deadline := time.Now().Add(3 * time.Minute)
	for {
		r := runCLI(t, with("tag", "--machine", "vm1", "--wait")...)
		if r.code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no point: %s", r.stderr)
		}
		time.Sleep(100 * time.Millisecond)
	}

	mustFail(t, "say where", with("failover", "--machine", "vm1", "--test")...)
	mustFail(t, "one of --cleanup", with("failover", "--machine", "vm1", "--cleanup", "--commit")...)
	out := mustRun(t, with("failover", "--machine", "vm1", "--test", "--to", "nbd")...)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last, "d0 nbd://127.0.0.1:") || !strings.HasSuffix(last, "/vm1/d0") {
		t.Fatalf("failover output %q: want the DISK URI line last", out)
	}
	var fos []api.Failover
	mustJSON(t, mustRun(t, with("failover", "--list", "--json")...), &fos)
	if len(fos) != 1 || fos[0].Machine != "vm1" || fos[0].Kind != "test" || fos[0].Exports[0].URI != strings.Fields(last)[1] {
		t.Fatalf("failover --list --json: %+v", fos)
	}
	if got := mustRun(t, with("failover", "--list")...); !strings.Contains(got, "vm1") || !strings.Contains(got, "d0=nbd://") {
		t.Fatalf("failover --list: %q", got)
	}
	mustFail(t, "has a test failover", with("failover", "--machine", "vm1", "--test", "--to", "nbd")...)
	mustFail(t, "tests are not committed", with("failover", "--machine", "vm1", "--commit")...)
	if got := mustRun(t, with("failover", "--machine", "vm1", "--cleanup")...); !strings.Contains(got, "succeeded") {
		t.Fatalf("cleanup: %q", got)
	}
	mustJSON(t, mustRun(t, with("failover", "--list", "--json")...), &fos)
	if len(fos) != 0 {
		t.Fatalf("after cleanup: %+v", fos)
	}

	// Plans.
	mustFail(t, "no machine named", with("plan", "create", "p1", "--group", "1=nope")...)
	mustFail(t, "group 1 is missing", with("plan", "create", "p1", "--group", "2=vm1")...)
	mustFail(t, "script:PATH", with("plan", "create", "p1", "--group", "1=vm1", "--post", "1=phone:boss")...)
	mustFail(t, "script:PATH", with("plan", "create", "p1", "--group", "1=vm1", "--post", "1=failback:phone:boss")...)
	mustRun(t, with("plan", "create", "p1", "--group", "1=vm1", "--post", "1=manual:check the app", "--post", "1=failback:manual:check the replication")...)
	var p api.Plan
	mustJSON(t, mustRun(t, with("plan", "show", "p1", "--json")...), &p)
	if len(p.Groups) != 1 || p.Groups[0].Machines[0] != "vm1" || len(p.Groups[0].Post) != 2 || p.Groups[0].Post[0].Text != "check the app" ||
		p.Groups[0].Post[1] != (api.PlanAction{Kind: "manual", Text: "check the replication", On: api.ActionOnFailback}) {
		t.Fatalf("plan show: %+v", p)
	}
	if got := mustRun(t, with("plan", "show", "p1")...); !strings.Contains(got, "failback:manual:check the replication") {
		t.Fatalf("plan show: %q", got)
	}
	if got := mustRun(t, with("plan", "list")...); !strings.Contains(got, "p1") {
		t.Fatalf("plan list: %q", got)
	}
	id := strings.TrimSpace(mustRun(t, with("failover", "--plan", "p1", "--test", "--to", "nbd", "--no-wait")...))
	deadline = time.Now().Add(3 * time.Minute)
	for {
		j, err := srv.Job(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if j.Waiting != "" {
			break
		}
		if j.State != api.JobRunning || time.Now().After(deadline) {
			t.Fatalf("the plan's job did not wait: %+v", j)
		}
		time.Sleep(50 * time.Millisecond)
	}
	mustFail(t, "not found", with("job", "confirm", "0000000000000000")...)
	if got := mustRun(t, with("job", "confirm", id)...); !strings.Contains(got, "confirmed") {
		t.Fatalf("job confirm: %q", got)
	}
	for {
		j, err := srv.Job(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if j.State == api.JobSucceeded {
			break
		}
		if j.State != api.JobRunning || time.Now().After(deadline) {
			t.Fatalf("the plan's job: %+v", j)
		}
		time.Sleep(50 * time.Millisecond)
	}
	mustRun(t, with("failover", "--plan", "p1", "--cleanup")...)
	mustFail(t, "is not running", with("job", "cancel", id)...)
	mustRun(t, with("plan", "delete", "p1")...)
	mustFail(t, "no plan named", with("plan", "show", "p1")...)
}

// The failovers list shows a failback's state and its bytes.
func TestFailbackText(t *testing.T) {
	for _, c := range []struct {
		fb   *api.FailbackStatus
		want string
	}{
		{nil, "-"},
		{&api.FailbackStatus{State: "reprotected", Sent: 4096, Pending: 65536}, "reprotected sent=4096 pending=65536 compared=0"},
		{&api.FailbackStatus{State: "failed-back", Sent: 10, Compared: 20, Forward: "done", Resynced: 30, Resent: 5},
			"failed-back sent=10 pending=0 compared=20 forward=done resynced=30 resent=5"},
	} {
		if got := failbackText(c.fb); got != c.want {
			t.Errorf("failbackText(%+v) = %q, want %q", c.fb, got, c.want)
		}
	}
}
