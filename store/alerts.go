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
	// The outbox: when the raise was told (zero: not yet), the severity
	// last told, when the resolve was told.
	Notified         time.Time
	NotifiedSeverity string
	ResolveNotified  time.Time
}

// ErrAlertActive is returned by RaiseAlert when an active alert of the same
// kind and subject exists.
var ErrAlertActive = errors.New("an active alert of this kind and subject exists")

const alertCols = `id, kind, subject_key, severity, state, machine_id, machine, disk, subject, message, action, raised, updated, resolved, acked,
	notified_at, notified_severity, resolve_notified_at`

func scanAlert(s interface{ Scan(...any) error }) (Alert, error) {
	var a Alert
	var raised, updated, resolved, acked, notified, resolveNotified int64
	err := s.Scan(&a.ID, &a.Kind, &a.Key, &a.Severity, &a.State, &a.MachineID, &a.Machine, &a.Disk, &a.Subject,
		&a.Message, &a.Action, &raised, &updated, &resolved, &acked, &notified, &a.NotifiedSeverity, &resolveNotified)
	a.Raised, a.Updated = time.Unix(0, raised), time.Unix(0, updated)
	if notified != 0 {
		a.Notified = time.Unix(0, notified)
	}
	if resolveNotified != 0 {
		a.ResolveNotified = time.Unix(0, resolveNotified)
	}
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

// Alerts lists the active alerts (the critical first, then newest first)
// and, with all, then the resolved ones, the latest resolved first: at
// most limit in all (limit <= 0: no limit).
func (d *DB) Alerts(ctx context.Context, all bool, limit int) ([]Alert, error) {
	q := `SELECT ` + alertCols + ` FROM alerts WHERE state = ?`
	args := []any{AlertActive}
	if all {
		q = `SELECT ` + alertCols + ` FROM alerts`
		args = nil
	}
	// The same expressions as the index alerts_listing.
	q += ` ORDER BY state = 'active' DESC, (state = 'active' AND severity = 'critical') DESC, resolved DESC, id DESC`
	if limit > 0 {
		q += ` LIMIT ?`
		args = append(args, limit)
	}
	return d.queryAlerts(ctx, q, args...)
}

// ActiveAlerts lists every active alert, in no particular order.
func (d *DB) ActiveAlerts(ctx context.Context) ([]Alert, error) {
	return d.queryAlerts(ctx, `SELECT `+alertCols+` FROM alerts WHERE state = ?`, AlertActive)
}

// ActiveAlert returns the active alert of a kind and subject (ErrNotFound
// if there is none).
func (d *DB) ActiveAlert(ctx context.Context, kind, key string) (Alert, error) {
	a, err := scanAlert(d.db.QueryRowContext(ctx, `SELECT `+alertCols+` FROM alerts WHERE state = ? AND kind = ? AND subject_key = ?`,
		AlertActive, kind, key))
	if errors.Is(err, sql.ErrNoRows) {
		return a, fmt.Errorf("active alert %s %s: %w", kind, key, ErrNotFound)
	}
	return a, err
}

// UnsentAlerts lists the alerts with a notice still to send, oldest first:
// active ones whose raise or current severity was not told, resolved
// ones whose resolve was not told.
func (d *DB) UnsentAlerts(ctx context.Context) ([]Alert, error) {
	// The same condition as the index alerts_unsent.
	return d.queryAlerts(ctx, `SELECT `+alertCols+` FROM alerts
		WHERE (state = 'active' AND (notified_at = 0 OR notified_severity != severity))
		   OR (state = 'resolved' AND resolve_notified_at = 0) ORDER BY id`)
}

// Notice changes that MarkAlertNotified records (api.AlertChange*).
const (
	NoticeRaised   = "raised"
	NoticeEscalate = "escalated"
	NoticeResolved = "resolved"
)

// MarkAlertNotified records that a notice of an alert was sent: a raise
// or an escalation at severity, or its resolve. Marking twice is not an
// error; a missing alert (pruned, its machine deleted) is not one either.
func (d *DB) MarkAlertNotified(ctx context.Context, id int64, change, severity string, at time.Time) error {
	var err error
	switch change {
	case NoticeRaised, NoticeEscalate:
		_, err = d.db.ExecContext(ctx, `UPDATE alerts SET notified_at = CASE WHEN notified_at = 0 THEN ? ELSE notified_at END,
			notified_severity = ? WHERE id = ?`, at.UnixNano(), severity, id)
	case NoticeResolved:
		_, err = d.db.ExecContext(ctx, `UPDATE alerts SET resolve_notified_at = ? WHERE id = ? AND resolve_notified_at = 0`, at.UnixNano(), id)
	default:
		return fmt.Errorf("alert %d: unknown notice change %q", id, change)
	}
	return err
}

// PruneAlerts deletes the alerts resolved before a time, and returns how
// many it deleted. An alert whose resolve is not told yet is kept.
func (d *DB) PruneAlerts(ctx context.Context, before time.Time) (int64, error) {
	r, err := d.db.ExecContext(ctx, `DELETE FROM alerts WHERE state = ? AND resolved < ? AND resolve_notified_at != 0`,
		AlertResolved, before.UnixNano())
	if err != nil {
		return 0, fmt.Errorf("prune alerts: %w", err)
	}
	return r.RowsAffected()
}

func (d *DB) queryAlerts(ctx context.Context, q string, args ...any) ([]Alert, error) {
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
