package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Alert states, as stored (api.AlertActive, api.AlertResolved).
const (
	AlertActive   = "active"
	AlertResolved = "resolved"
)

// Alert is one raise of an alert condition on a subject, until it is
// resolved. Key is the engine's name of the subject (a machine id, a
// machine id and a disk, a vCenter's name): at most one active alert has a
// given (Kind, Key), which RaiseAlert enforces.
type Alert struct {
	ID        int64
	Kind      string
	Key       string
	Severity  string
	State     string
	MachineID string
	Machine   string
	Disk      string
	Subject   string
	Message   string
	Action    string
	Raised    time.Time
	Updated   time.Time
	Resolved  time.Time
	Acked     time.Time
}

// ErrAlertActive is returned by RaiseAlert when an active alert of the same
// kind and subject exists.
var ErrAlertActive = errors.New("an active alert of this kind and subject exists")

const alertCols = `id, kind, subject_key, severity, state, machine_id, machine, disk, subject, message, action, raised, updated, resolved, acked`

func scanAlert(s interface{ Scan(...any) error }) (Alert, error) {
	var a Alert
	var raised, updated, resolved, acked int64
	err := s.Scan(&a.ID, &a.Kind, &a.Key, &a.Severity, &a.State, &a.MachineID, &a.Machine, &a.Disk, &a.Subject,
		&a.Message, &a.Action, &raised, &updated, &resolved, &acked)
	a.Raised, a.Updated = time.Unix(0, raised), time.Unix(0, updated)
	if resolved != 0 {
		a.Resolved = time.Unix(0, resolved)
	}
	if acked != 0 {
		a.Acked = time.Unix(0, acked)
	}
	return a, err
}

// RaiseAlert records a new active alert and returns its id.
func (d *DB) RaiseAlert(ctx context.Context, a Alert) (int64, error) {
	if a.Raised.IsZero() {
		a.Raised = d.now()
	}
	r, err := d.db.ExecContext(ctx, `INSERT INTO alerts (kind, subject_key, severity, state, machine_id, machine, disk, subject, message, action, raised, updated)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`, a.Kind, a.Key, a.Severity, AlertActive, a.MachineID, a.Machine, a.Disk, a.Subject,
		a.Message, a.Action, a.Raised.UnixNano(), a.Raised.UnixNano())
	if err != nil {
		if strings.Contains(err.Error(), "UNIQUE") {
			return 0, fmt.Errorf("alert %s %s: %w", a.Kind, a.Key, ErrAlertActive)
		}
		return 0, err
	}
	return r.LastInsertId()
}

// UpdateAlert changes an active alert's severity, message and action;
// a changed severity takes back its acknowledgement (an escalation is news).
func (d *DB) UpdateAlert(ctx context.Context, id int64, severity, message, action string, at time.Time) error {
	_, err := d.db.ExecContext(ctx, `UPDATE alerts SET acked = CASE WHEN severity != ? THEN 0 ELSE acked END,
		severity = ?, message = ?, action = ?, updated = ? WHERE id = ? AND state = ?`,
		severity, severity, message, action, at.UnixNano(), id, AlertActive)
	return err
}

// ResolveAlert marks an active alert resolved.
func (d *DB) ResolveAlert(ctx context.Context, id int64, message string, at time.Time) error {
	_, err := d.db.ExecContext(ctx, `UPDATE alerts SET state = ?, resolved = ?, updated = ?, message = ? WHERE id = ? AND state = ?`,
		AlertResolved, at.UnixNano(), at.UnixNano(), message, id, AlertActive)
	return err
}

// AckAlert acknowledges an alert (ErrNotFound if there is none with this
// id). Acknowledging an acknowledged or resolved alert is not an error.
func (d *DB) AckAlert(ctx context.Context, id int64, at time.Time) error {
	r, err := d.db.ExecContext(ctx, `UPDATE alerts SET acked = CASE WHEN acked = 0 THEN ? ELSE acked END WHERE id = ?`, at.UnixNano(), id)
	if err != nil {
		return err
	}
	if n, _ := r.RowsAffected(); n == 0 {
		return fmt.Errorf("alert %d: %w", id, ErrNotFound)
	}
	return nil
}

// Alert returns one alert.
func (d *DB) Alert(ctx context.Context, id int64) (Alert, error) {
	a, err := scanAlert(d.db.QueryRowContext(ctx, `SELECT `+alertCols+` FROM alerts WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return a, fmt.Errorf("alert %d: %w", id, ErrNotFound)
	}
	return a, err
}

// Alerts lists the active alerts (most severe, then newest first) and,
// with all, then the newest resolved ones, at most limit in all.
func (d *DB) Alerts(ctx context.Context, all bool, limit int) ([]Alert, error) {
	q := `SELECT ` + alertCols + ` FROM alerts WHERE state = ?`
	args := []any{AlertActive}
	if all {
		q = `SELECT ` + alertCols + ` FROM alerts`
		args = nil
	}
	q += ` ORDER BY state = 'active' DESC, severity = 'critical' DESC, id DESC LIMIT ?`
	args = append(args, limit)
	rows, err := d.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Alert
	for rows.Next() {
		a, err := scanAlert(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, rows.Err()
}
