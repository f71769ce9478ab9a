package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/asrdr/asr/replication"
)

const policyCols = `name, rpo_threshold, retention, app_frequency, crash_interval, pit_window, failback_of`

func scanPolicy(s interface{ Scan(...any) error }) (replication.Policy, error) {
	var p replication.Policy
	var rpo, ret, app, crash, pit int64
	err := s.Scan(&p.Name, &rpo, &ret, &app, &crash, &pit, &p.FailbackOf)
	p.RPOThreshold, p.Retention, p.AppFrequency = time.Duration(rpo), time.Duration(ret), time.Duration(app)
	p.CrashInterval, p.PITWindow = time.Duration(crash), time.Duration(pit)
	return p, err
}

// Policy returns a policy by name.
func (d *DB) Policy(ctx context.Context, name string) (replication.Policy, error) {
	p, err := scanPolicy(d.db.QueryRowContext(ctx, `SELECT `+policyCols+` FROM policies WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return p, fmt.Errorf("policy %q: %w", name, ErrNotFound)
	}
	return p, err
}

// Policies lists every policy by name.
func (d *DB) Policies(ctx context.Context) ([]replication.Policy, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT `+policyCols+` FROM policies ORDER BY name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ps []replication.Policy
	for rows.Next() {
		p, err := scanPolicy(rows)
		if err != nil {
			return nil, err
		}
		ps = append(ps, p)
	}
	return ps, rows.Err()
}

// CreatePolicy stores a new policy and, for a replication policy, its
// failback twin (replication.DefaultFailbackPolicy: ASR's failback
// defaults, not the policy's settings), in one transaction. The caller
// validates both.
func (d *DB) CreatePolicy(ctx context.Context, p replication.Policy) error {
	return d.tx(ctx, func(tx *sql.Tx) error {
		ps := []replication.Policy{p}
		if p.FailbackOf == "" {
			ps = append(ps, replication.DefaultFailbackPolicy(p.Name))
		}
		for _, q := range ps {
			var n int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM policies WHERE name = ?`, q.Name).Scan(&n); err != nil {
				return err
			}
			if n > 0 {
				return fmt.Errorf("policy %q: %w", q.Name, ErrConflict)
			}
			now := d.now().Unix()
			if _, err := tx.ExecContext(ctx, `INSERT INTO policies (`+policyCols+`, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
				q.Name, int64(q.RPOThreshold), int64(q.Retention), int64(q.AppFrequency), int64(q.CrashInterval), int64(q.PITWindow), q.FailbackOf, now, now); err != nil {
				return err
			}
		}
		return nil
	})
}

// UpdatePolicy replaces a policy's settings (not its name or kind).
func (d *DB) UpdatePolicy(ctx context.Context, p replication.Policy) error {
	res, err := d.db.ExecContext(ctx, `UPDATE policies SET rpo_threshold = ?, retention = ?, app_frequency = ?, crash_interval = ?, pit_window = ?, updated_at = ? WHERE name = ?`,
		int64(p.RPOThreshold), int64(p.Retention), int64(p.AppFrequency), int64(p.CrashInterval), int64(p.PITWindow), d.now().Unix(), p.Name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("policy %q: %w", p.Name, ErrNotFound)
	}
	return nil
}

// AssignPolicy sets the policy of a machine.
func (d *DB) AssignPolicy(ctx context.Context, machineID, policy string) error {
	if _, err := d.Policy(ctx, policy); err != nil {
		return err
	}
	_, err := d.db.ExecContext(ctx, `UPDATE machines SET policy = ? WHERE id = ?`, policy, machineID)
	return err
}

// MachinesWithPolicy lists the ids of the machines a policy is assigned to.
func (d *DB) MachinesWithPolicy(ctx context.Context, policy string) ([]string, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT id FROM machines WHERE policy = ? ORDER BY id`, policy)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// SetGroup puts a machine in a replication group ("" takes it out).
func (d *DB) SetGroup(ctx context.Context, machineID, group string) error {
	_, err := d.db.ExecContext(ctx, `UPDATE machines SET group_name = ? WHERE id = ?`, group, machineID)
	return err
}

// Event is something the console and API report: an RPO threshold crossed,
// a freeze that failed, ...
type Event struct {
	ID        int64
	Time      time.Time
	MachineID string
	Severity  string
	Kind      string
	Message   string
}

// AddEvent records an event.
func (d *DB) AddEvent(ctx context.Context, e Event) error {
	if e.Time.IsZero() {
		e.Time = d.now()
	}
	_, err := d.db.ExecContext(ctx, `INSERT INTO events (time, machine_id, severity, kind, message) VALUES (?, ?, ?, ?, ?)`,
		e.Time.UnixNano(), e.MachineID, e.Severity, e.Kind, e.Message)
	return err
}

// DeleteEvents deletes a machine's events of kind older than before and
// returns how many went.
func (d *DB) DeleteEvents(ctx context.Context, machineID, kind string, before time.Time) (int64, error) {
	res, err := d.db.ExecContext(ctx, `DELETE FROM events WHERE machine_id = ? AND kind = ? AND time < ?`, machineID, kind, before.UnixNano())
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// Events lists the newest events (of one machine, unless machineID is ""),
// newest first.
func (d *DB) Events(ctx context.Context, machineID string, limit int) ([]Event, error) {
	q := `SELECT id, time, machine_id, severity, kind, message FROM events`
	var args []any
	if machineID != "" {
		q += ` WHERE machine_id = ?`
		args = append(args, machineID)
	}
	q += ` ORDER BY id DESC LIMIT ?`
	args = append(args, limit)
	rows, err := d.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var es []Event
	for rows.Next() {
		var e Event
		var t int64
		if err := rows.Scan(&e.ID, &t, &e.MachineID, &e.Severity, &e.Kind, &e.Message); err != nil {
			return nil, err
		}
		e.Time = time.Unix(0, t)
		es = append(es, e)
	}
	return es, rows.Err()
}
