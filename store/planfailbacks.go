package store

import (
	"context"
	"database/sql"
	"fmt"
)

// PlanFailback is the progress of a plan's (or replication group's)
// failback past its switch (migration 0014): its job, and the server's
// JSON of what is left to do. It exists from the switch (written in the
// same transaction, SwitchFailovers) until the failback ends.
type PlanFailback struct {
	JobID   string
	Subject string
	Data    string
}

// SwitchFailovers updates failovers (their switch) and records pf, in one
// transaction: both or neither.
func (d *DB) SwitchFailovers(ctx context.Context, fs []Failover, pf PlanFailback) error {
	return d.tx(ctx, func(tx *sql.Tx) error {
		for _, f := range fs {
			if err := d.updateFailover(ctx, tx, f); err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO plan_failbacks (job_id, subject, data, updated_at) VALUES (?, ?, ?, ?)`,
			pf.JobID, pf.Subject, pf.Data, d.now().UnixNano())
		return err
	})
}

// UpdatePlanFailback writes a plan failback's progress; ErrNotFound if it
// is not recorded.
func (d *DB) UpdatePlanFailback(ctx context.Context, jobID, data string) error {
	res, err := d.db.ExecContext(ctx, `UPDATE plan_failbacks SET data = ?, updated_at = ? WHERE job_id = ?`, data, d.now().UnixNano(), jobID)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("plan failback of job %q: %w", jobID, ErrNotFound)
	}
	return nil
}

// DeletePlanFailback removes an ended plan failback's progress (idempotent).
func (d *DB) DeletePlanFailback(ctx context.Context, jobID string) error {
	_, err := d.db.ExecContext(ctx, `DELETE FROM plan_failbacks WHERE job_id = ?`, jobID)
	return err
}

// PlanFailbacks lists the plan failbacks not ended, oldest first.
func (d *DB) PlanFailbacks(ctx context.Context) ([]PlanFailback, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT job_id, subject, data FROM plan_failbacks ORDER BY updated_at`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []PlanFailback
	for rows.Next() {
		var pf PlanFailback
		if err := rows.Scan(&pf.JobID, &pf.Subject, &pf.Data); err != nil {
			return nil, err
		}
		out = append(out, pf)
	}
	return out, rows.Err()
}

// ResumeJob marks a job that a stopped server left (and FailRunningJobs
// failed) running again: a job resumed by the next start.
func (d *DB) ResumeJob(ctx context.Context, id string) error {
	res, err := d.db.ExecContext(ctx, `UPDATE jobs SET state = ?, error = '', ended_at = 0 WHERE id = ?`, JobRunning, id)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("job %q: %w", id, ErrNotFound)
	}
	return nil
}
