package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Failover states.
const (
	FailoverStarting  = "starting"
	FailoverActive    = "active"
	FailoverCommitted = "committed"
	FailoverFailed    = "failed"
	FailoverEnded     = "ended" // cleaned up (test) or failed back
)

// Failover is a machine recovered from a point: a test failover (thrown
// away at cleanup) or a failover (the machine now runs from the recovered
// disks). While its state is starting, active or committed it holds its
// point against retention.
type Failover struct {
	ID        string
	MachineID string
	Kind      string // test | failover
	Dest      string // nbd | qemu | vsphere | azure
	State     string
	PointSeq  uint64
	PointID   string
	AtTime    time.Time // --time (zero: the point itself)
	Plan      string
	JobID     string
	Detail    string // JSON, the server's
	CreatedAt time.Time
	EndedAt   time.Time
}

// Live reports whether the failover holds its point and its machine.
func (f Failover) Live() bool {
	return f.State == FailoverStarting || f.State == FailoverActive || f.State == FailoverCommitted
}

const failoverCols = `id, machine_id, kind, dest, state, point_seq, point_id, at_time, plan, job_id, detail, created_at, ended_at`

func scanFailover(s interface{ Scan(...any) error }) (Failover, error) {
	var f Failover
	var at, cr, en int64
	var seq int64
	err := s.Scan(&f.ID, &f.MachineID, &f.Kind, &f.Dest, &f.State, &seq, &f.PointID, &at, &f.Plan, &f.JobID, &f.Detail, &cr, &en)
	f.PointSeq = uint64(seq)
	if at != 0 {
		f.AtTime = time.Unix(0, at).UTC()
	}
	f.CreatedAt = time.Unix(0, cr).UTC()
	if en != 0 {
		f.EndedAt = time.Unix(0, en).UTC()
	}
	return f, err
}

// AddFailover records a new failover. A machine has at most one live
// failover: adding a second fails with ErrConflict.
func (d *DB) AddFailover(ctx context.Context, f Failover) error {
	if f.CreatedAt.IsZero() {
		f.CreatedAt = d.now()
	}
	var at int64
	if !f.AtTime.IsZero() {
		at = f.AtTime.UnixNano()
	}
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM failovers WHERE machine_id = ? AND state IN (?, ?, ?)`,
		f.MachineID, FailoverStarting, FailoverActive, FailoverCommitted).Scan(&n); err != nil {
		return err
	}
	if n > 0 {
		return fmt.Errorf("machine %s has a failover already: %w", f.MachineID, ErrConflict)
	}
	if f.Detail == "" {
		f.Detail = "{}"
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO failovers (`+failoverCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)`,
		f.ID, f.MachineID, f.Kind, f.Dest, f.State, int64(f.PointSeq), f.PointID, at, f.Plan, f.JobID, f.Detail, f.CreatedAt.UnixNano()); err != nil {
		return err
	}
	return tx.Commit()
}

// UpdateFailover writes a failover's state, point and detail (ending it
// when the state is failed or ended).
func (d *DB) UpdateFailover(ctx context.Context, f Failover) error {
	return d.updateFailover(ctx, d.db, f)
}

// UpdateFailovers updates several failovers in one transaction: all of
// them or none (a plan's failback records its machines' switch at once).
func (d *DB) UpdateFailovers(ctx context.Context, fs []Failover) error {
	return d.tx(ctx, func(tx *sql.Tx) error {
		for _, f := range fs {
			if err := d.updateFailover(ctx, tx, f); err != nil {
				return err
			}
		}
		return nil
	})
}

func (d *DB) updateFailover(ctx context.Context, db interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
}, f Failover) error {
	var en, at int64
	if f.State == FailoverFailed || f.State == FailoverEnded {
		en = d.now().UnixNano()
	}
	if !f.AtTime.IsZero() {
		at = f.AtTime.UnixNano()
	}
	res, err := db.ExecContext(ctx, `UPDATE failovers SET state = ?, point_seq = ?, point_id = ?, at_time = ?, detail = ?, ended_at = ?, job_id = ? WHERE id = ?`,
		f.State, int64(f.PointSeq), f.PointID, at, f.Detail, en, f.JobID, f.ID)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("failover %q: %w", f.ID, ErrNotFound)
	}
	return nil
}

// LiveFailover returns a machine's live failover, or ErrNotFound.
func (d *DB) LiveFailover(ctx context.Context, machineID string) (Failover, error) {
	f, err := scanFailover(d.db.QueryRowContext(ctx, `SELECT `+failoverCols+` FROM failovers WHERE machine_id = ? AND state IN (?, ?, ?)`,
		machineID, FailoverStarting, FailoverActive, FailoverCommitted))
	if errors.Is(err, sql.ErrNoRows) {
		return f, fmt.Errorf("machine %s has no failover: %w", machineID, ErrNotFound)
	}
	return f, err
}

// LatestFailover returns a machine's newest failover (live or ended), or
// ErrNotFound.
func (d *DB) LatestFailover(ctx context.Context, machineID string) (Failover, error) {
	f, err := scanFailover(d.db.QueryRowContext(ctx, `SELECT `+failoverCols+` FROM failovers WHERE machine_id = ? ORDER BY created_at DESC LIMIT 1`, machineID))
	if errors.Is(err, sql.ErrNoRows) {
		return f, fmt.Errorf("machine %s has no failover: %w", machineID, ErrNotFound)
	}
	return f, err
}

// Failovers lists the live failovers, and the ended ones when all is set,
// newest first.
func (d *DB) Failovers(ctx context.Context, all bool) ([]Failover, error) {
	q := `SELECT ` + failoverCols + ` FROM failovers WHERE state IN (?, ?, ?) ORDER BY created_at DESC`
	args := []any{FailoverStarting, FailoverActive, FailoverCommitted}
	if all {
		q, args = `SELECT `+failoverCols+` FROM failovers ORDER BY created_at DESC LIMIT 500`, nil
	}
	rows, err := d.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Failover
	for rows.Next() {
		f, err := scanFailover(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, rows.Err()
}

// HeldPoints returns, per machine, the sequence numbers of the points live
// failovers hold (retention must not delete them).
func (d *DB) HeldPoints(ctx context.Context) (map[string]map[uint64]bool, error) {
	fs, err := d.Failovers(ctx, false)
	if err != nil {
		return nil, err
	}
	out := map[string]map[uint64]bool{}
	for _, f := range fs {
		if out[f.MachineID] == nil {
			out[f.MachineID] = map[uint64]bool{}
		}
		out[f.MachineID][f.PointSeq] = true
	}
	return out, nil
}

// Plan is a recovery plan as stored: its definition is the server's JSON.
type Plan struct {
	Name      string
	Data      string
	CreatedAt time.Time
	LastDrill time.Time
}

// PutPlan creates a plan (ErrConflict if the name exists) or, with
// replace, replaces its definition.
func (d *DB) PutPlan(ctx context.Context, p Plan, replace bool) error {
	if p.CreatedAt.IsZero() {
		p.CreatedAt = d.now()
	}
	if replace {
		res, err := d.db.ExecContext(ctx, `UPDATE plans SET data = ? WHERE name = ?`, p.Data, p.Name)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("plan %q: %w", p.Name, ErrNotFound)
		}
		return nil
	}
	_, err := d.db.ExecContext(ctx, `INSERT INTO plans (name, data, created_at) VALUES (?, ?, ?)`, p.Name, p.Data, p.CreatedAt.UnixNano())
	if err != nil && strings.Contains(err.Error(), "UNIQUE") {
		return fmt.Errorf("plan %q exists: %w", p.Name, ErrConflict)
	}
	return err
}

// SetPlanDrill records when a plan's scheduled drill last ran.
func (d *DB) SetPlanDrill(ctx context.Context, name string, at time.Time) error {
	_, err := d.db.ExecContext(ctx, `UPDATE plans SET last_drill = ? WHERE name = ?`, at.UnixNano(), name)
	return err
}

func scanPlan(s interface{ Scan(...any) error }) (Plan, error) {
	var p Plan
	var cr, ld int64
	err := s.Scan(&p.Name, &p.Data, &cr, &ld)
	p.CreatedAt = time.Unix(0, cr).UTC()
	if ld != 0 {
		p.LastDrill = time.Unix(0, ld).UTC()
	}
	return p, err
}

// GetPlan returns a plan.
func (d *DB) GetPlan(ctx context.Context, name string) (Plan, error) {
	p, err := scanPlan(d.db.QueryRowContext(ctx, `SELECT name, data, created_at, last_drill FROM plans WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return p, fmt.Errorf("plan %q: %w", name, ErrNotFound)
	}
	return p, err
}

// Plans lists the plans by name.
func (d *DB) Plans(ctx context.Context) ([]Plan, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT name, data, created_at, last_drill FROM plans ORDER BY name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Plan
	for rows.Next() {
		p, err := scanPlan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, rows.Err()
}

// DeletePlan deletes a plan.
func (d *DB) DeletePlan(ctx context.Context, name string) error {
	res, err := d.db.ExecContext(ctx, `DELETE FROM plans WHERE name = ?`, name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("plan %q: %w", name, ErrNotFound)
	}
	return nil
}
