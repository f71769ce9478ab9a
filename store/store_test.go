package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"testing/fstest"
	"time"
)

func mustOpen(t testing.TB, path string) *DB {
	t.Helper()
	d, err := Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestMigrationsAppliedOnce(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "vault.db")
	d := mustOpen(t, path)
	first, err := d.AppliedMigrations(ctx)
	if err != nil || len(first) == 0 {
		t.Fatalf("applied %v, %v", first, err)
	}
	if _, _, err := d.CreateMachine(ctx, "aa", "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	d.Close()
	// Reopening applies nothing again (a second CREATE TABLE would fail)
	// and keeps the data.
	d = mustOpen(t, path)
	again, err := d.AppliedMigrations(ctx)
	if err != nil || len(again) != len(first) {
		t.Fatalf("after reopen: %v, %v", again, err)
	}
	if m, err := d.MachineByName(ctx, "vm1"); err != nil || m.ID != "aa" {
		t.Fatalf("machine after reopen: %+v, %v", m, err)
	}
}

func TestMigrateNewAndBroken(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	extra := fstest.MapFS{
		"0001_init.sql":  {Data: []byte("CREATE TABLE already_there (x INT);")},
		"9000_more.sql":  {Data: []byte("CREATE TABLE more (x INT); INSERT INTO more VALUES (1);")},
		"9001_broke.sql": {Data: []byte("CREATE TABLE half (x INT); THIS IS NOT SQL;")},
	}
	// 0001 is recorded already and must be skipped; 9000 applies; 9001
	// fails and leaves nothing behind (its own transaction).
	err := d.migrate(ctx, extra)
	if err == nil {
		t.Fatal("broken migration did not fail")
	}
	var n int
	if err := d.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM more`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("9000 not applied: %d, %v", n, err)
	}
	if _, err := d.db.ExecContext(ctx, `SELECT * FROM half`); err == nil {
		t.Fatal("the failed migration's first statement was kept")
	}
	if _, err := d.db.ExecContext(ctx, `SELECT * FROM already_there`); err == nil {
		t.Fatal("an applied migration was applied again")
	}
	names, _ := d.AppliedMigrations(ctx)
	if names[len(names)-1] != "9000_more.sql" {
		t.Fatalf("recorded %v", names)
	}
}

// A resync's progress goes only to the row of its job: never to a row that
// is gone (the job ended) or that another job has taken.
func TestUpdateResyncProgress(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	if _, _, err := d.CreateMachine(ctx, "aa", "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	row := Resync{MachineID: "aa", Disk: 0, Reason: "test", State: ResyncRunning, JobID: 7, RequestedAt: time.Unix(1, 0)}
	if err := d.PutResync(ctx, row); err != nil {
		t.Fatal(err)
	}
	if ok, err := d.UpdateResyncProgress(ctx, "aa", 0, 7, 100, 40, 8, "slow"); !ok || err != nil {
		t.Fatalf("update of the job's row: %v, %v", ok, err)
	}
	got, err := d.Resync(ctx, "aa", 0)
	if err != nil || got.Total != 100 || got.Compared != 40 || got.Sent != 8 || got.LastError != "slow" || got.State != ResyncRunning || got.Reason != "test" {
		t.Fatalf("after the update: %+v, %v", got, err)
	}
	if ok, err := d.UpdateResyncProgress(ctx, "aa", 0, 6, 1, 1, 1, ""); ok || err != nil {
		t.Fatalf("another job's progress updated the row: %v, %v", ok, err)
	}
	if err := d.DeleteResync(ctx, "aa", 0); err != nil {
		t.Fatal(err)
	}
	if ok, err := d.UpdateResyncProgress(ctx, "aa", 0, 7, 100, 100, 8, ""); ok || err != nil {
		t.Fatalf("progress after the row was deleted: %v, %v", ok, err)
	}
	if _, err := d.Resync(ctx, "aa", 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the deleted row came back: %v", err)
	}
}

func TestSessions(t *testing.T) {
	ctx := context.Background()
	d := mustOpen(t, filepath.Join(t.TempDir(), "vault.db"))
	now := time.Unix(1_800_000_000, 0)
	d.SetClock(func() time.Time { return now })
	id, csrf, err := d.CreateSession(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := d.Session(ctx, id); err != nil || got != csrf {
		t.Fatalf("session: %q %v", got, err)
	}
	now = now.Add(2 * time.Hour)
	if _, err := d.Session(ctx, id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired session: %v", err)
	}
}

// The vault database and its -wal and -shm files are private to the
// server's user: made 0600, and an older database left 0644 (with its
// -wal and -shm from a crash) is tightened when opened.
func TestDatabaseFilesPrivate(t *testing.T) {
	check := func(path string) {
		t.Helper()
		for _, p := range []string{path, path + "-wal", path + "-shm"} {
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if got := st.Mode().Perm(); got != 0o600 {
				t.Errorf("%s: mode %04o, want 0600", filepath.Base(p), got)
			}
		}
	}
	path := filepath.Join(t.TempDir(), "vault.db")
	d := mustOpen(t, path)
	if err := d.SetSetting(context.Background(), "k", "v"); err != nil {
		t.Fatal(err)
	}
	check(path) // the -wal and -shm exist while the database is open
	d.Close()

	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			// A clean close removes the -wal and -shm; a crash leaves them.
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Chmod(p, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d = mustOpen(t, path)
	if v, err := d.Setting(context.Background(), "k"); err != nil || v != "v" {
		t.Fatalf("setting after reopen: %q, %v", v, err)
	}
	check(path)
}
