// Package store is the vault database of an asr server: SQLite (pure Go,
// modernc.org/sqlite) in WAL mode, with the numbered migrations of package
// migrations applied once each. It keeps what the configuration server
// manages: settings, registered machines and disks, the recovery points shown
// in the console, and console sessions. The authoritative record of disk
// states and recovery points is the catalog on the target (package
// replication); the disks and points tables copy it for queries, written
// by the server off the replication path.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/asrdr/asr/migrations"

	_ "modernc.org/sqlite" // database/sql driver "sqlite"
)

// ErrNotFound is returned when a row does not exist.
var ErrNotFound = errors.New("not found")

// ErrConflict is returned when a unique value (a machine name) is taken.
var ErrConflict = errors.New("already exists")

// DB is the vault database.
type DB struct {
	db  *sql.DB
	now func() time.Time
}

// Open opens (creating if needed) the database at path and applies pending
// migrations. The database and its -wal and -shm files are made 0600, or
// tightened to it: they hold the vault's settings, machines and sessions.
func Open(ctx context.Context, path string) (*DB, error) {
	if err := privateFiles(path); err != nil {
		return nil, fmt.Errorf("open vault database: %w", err)
	}
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)" +
		"&_pragma=foreign_keys(1)&_pragma=synchronous(FULL)&_txlock=immediate"
	sdb, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open vault database: %w", err)
	}
	// One connection: SQLite has one writer anyway, and a single connection
	// makes every statement see the last committed state.
	sdb.SetMaxOpenConns(1)
	d := &DB{db: sdb, now: time.Now}
	if err := d.migrate(ctx, migrations.FS); err != nil {
		sdb.Close()
		return nil, err
	}
	return d, nil
}

// privateFiles creates the database file 0600 if it is missing, and takes
// the group and other bits off it and off its -wal and -shm files if they
// exist. SQLite makes the -wal and -shm files with the database file's
// mode, so a private database file keeps the new ones private too.
func privateFiles(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		st, err := os.Stat(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if perm := st.Mode().Perm(); perm&0o077 != 0 {
			if err := os.Chmod(p, perm&^0o077); err != nil {
				return err
			}
		}
	}
	return nil
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

// Hold takes the database's one connection, in a write transaction, until
// release is called: meanwhile every other statement waits, as behind a
// long write or a slow disk. Tests use it to show what does not wait on
// the database.
func (d *DB) Hold(ctx context.Context) (release func(), err error) {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	return sync.OnceFunc(func() { tx.Rollback() }), nil
}

// SetClock replaces the clock (tests).
func (d *DB) SetClock(now func() time.Time) { d.now = now }

// migrate applies every migration in fsys not yet recorded in
// schema_migrations, in numeric order, each in its own transaction.
func (d *DB) migrate(ctx context.Context, fsys fs.FS) error {
	if _, err := d.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	names, err := fs.Glob(fsys, "*.sql")
	if err != nil {
		return err
	}
	type mig struct {
		version int
		name    string
	}
	var migs []mig
	for _, n := range names {
		num, _, ok := strings.Cut(n, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 {
			return fmt.Errorf("migration file %q: name must be NNNN_name.sql", n)
		}
		migs = append(migs, mig{v, n})
	}
	sort.Slice(migs, func(i, j int) bool { return migs[i].version < migs[j].version })
	for i := 1; i < len(migs); i++ {
		if migs[i].version == migs[i-1].version {
			return fmt.Errorf("migrations %q and %q share version %d", migs[i-1].name, migs[i].name, migs[i].version)
		}
	}
	for _, m := range migs {
		var n int
		if err := d.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_migrations WHERE version = ?`, m.version).Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			continue
		}
		body, err := fs.ReadFile(fsys, m.name)
		if err != nil {
			return err
		}
		if err := d.tx(ctx, func(tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, string(body)); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)`,
				m.version, m.name, d.now().Unix())
			return err
		}); err != nil {
			return fmt.Errorf("apply migration %s: %w", m.name, err)
		}
	}
	return nil
}

// AppliedMigrations lists the recorded migration names in order.
func (d *DB) AppliedMigrations(ctx context.Context) ([]string, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT name FROM schema_migrations ORDER BY version`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, rows.Err()
}

func (d *DB) tx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// Setting returns a setting, or ErrNotFound.
func (d *DB) Setting(ctx context.Context, key string) (string, error) {
	var v string
	err := d.db.QueryRowContext(ctx, `SELECT value FROM settings WHERE key = ?`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", ErrNotFound
	}
	return v, err
}

// SetSetting stores a setting.
func (d *DB) SetSetting(ctx context.Context, key, value string) error {
	_, err := d.db.ExecContext(ctx, `INSERT INTO settings (key, value) VALUES (?, ?)
		ON CONFLICT(key) DO UPDATE SET value = excluded.value`, key, value)
	return err
}
