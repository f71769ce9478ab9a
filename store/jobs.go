package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Job states.
const (
	JobRunning   = "running"
	JobSucceeded = "succeeded"
	JobFailed    = "failed"
)

// Job is a long operation an operator started (a push install, an
// unprotect), with its steps as JSON (written by the server).
type Job struct {
	ID        string
	Kind      string
	Subject   string
	State     string
	Steps     string
	Error     string
	StartedAt time.Time
	EndedAt   time.Time
	// Output is the job's result lines as JSON (a failover's DISK URI
	// lines); RTO the measured time until the recovered machine was
	// usable; Waiting the manual action it waits on ("" if none).
	Output  string
	RTO     time.Duration
	Waiting string
}

// AddJob records a new running job.
func (d *DB) AddJob(ctx context.Context, j Job) error {
	if j.StartedAt.IsZero() {
		j.StartedAt = d.now()
	}
	if j.Steps == "" {
		j.Steps = "[]"
	}
	_, err := d.db.ExecContext(ctx, `INSERT INTO jobs (id, kind, subject, state, steps, started_at) VALUES (?, ?, ?, ?, ?, ?)`,
		j.ID, j.Kind, j.Subject, JobRunning, j.Steps, j.StartedAt.UnixNano())
	return err
}

// UpdateJob writes a job's steps, and its end when state is not running.
func (d *DB) UpdateJob(ctx context.Context, id, state, steps, errMsg string) error {
	var ended int64
	if state != JobRunning {
		ended = d.now().UnixNano()
	}
	_, err := d.db.ExecContext(ctx, `UPDATE jobs SET state = ?, steps = ?, error = ?, ended_at = ? WHERE id = ?`,
		state, steps, errMsg, ended, id)
	return err
}

// SetJobResult writes a job's output lines (JSON), measured RTO and the
// manual action it waits on.
func (d *DB) SetJobResult(ctx context.Context, id, output string, rto time.Duration, waiting string) error {
	if output == "" {
		output = "[]"
	}
	_, err := d.db.ExecContext(ctx, `UPDATE jobs SET output = ?, rto_ns = ?, waiting = ? WHERE id = ?`, output, int64(rto), waiting, id)
	return err
}

// FailRunningJobs ends the jobs a stopped server left running: their
// goroutine is gone, so they can neither finish nor report.
func (d *DB) FailRunningJobs(ctx context.Context, why string) error {
	_, err := d.db.ExecContext(ctx, `UPDATE jobs SET state = ?, error = ?, ended_at = ? WHERE state = ?`,
		JobFailed, why, d.now().UnixNano(), JobRunning)
	return err
}

const jobCols = `id, kind, subject, state, steps, error, started_at, ended_at, output, rto_ns, waiting`

func scanJob(s interface{ Scan(...any) error }) (Job, error) {
	var j Job
	var st, en, rto int64
	err := s.Scan(&j.ID, &j.Kind, &j.Subject, &j.State, &j.Steps, &j.Error, &st, &en, &j.Output, &rto, &j.Waiting)
	j.RTO = time.Duration(rto)
	j.StartedAt = time.Unix(0, st)
	if en > 0 {
		j.EndedAt = time.Unix(0, en)
	}
	return j, err
}

// Job returns one job.
func (d *DB) Job(ctx context.Context, id string) (Job, error) {
	j, err := scanJob(d.db.QueryRowContext(ctx, `SELECT `+jobCols+` FROM jobs WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return j, fmt.Errorf("job %q: %w", id, ErrNotFound)
	}
	return j, err
}

// Jobs lists the newest jobs first.
func (d *DB) Jobs(ctx context.Context, limit int) ([]Job, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT `+jobCols+` FROM jobs ORDER BY started_at DESC LIMIT ?`, limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var js []Job
	for rows.Next() {
		j, err := scanJob(rows)
		if err != nil {
			return nil, err
		}
		js = append(js, j)
	}
	return js, rows.Err()
}

// FailedJobs lists the failed jobs that ended at or after since, newest
// first, however many.
func (d *DB) FailedJobs(ctx context.Context, since time.Time) ([]Job, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT `+jobCols+` FROM jobs WHERE state = ? AND ended_at >= ? ORDER BY ended_at DESC`,
		JobFailed, since.UnixNano())
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var js []Job
	for rows.Next() {
		j, err := scanJob(rows)
		if err != nil {
			return nil, err
		}
		js = append(js, j)
	}
	return js, rows.Err()
}
