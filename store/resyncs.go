package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/asrdr/asr/replication"
)

// Resync states (replication's names).
const (
	ResyncScheduled = replication.ResyncScheduled
	ResyncRunning   = replication.ResyncRunning
	ResyncFailed    = replication.ResyncFailed
)

// Resync is a disk's pending or running resync: its schedule. Whether a
// disk needs a resync, why and over which ranges is the catalog's to say
// (the server creates and removes the rows by it): Reason is what the row
// was scheduled for, shown to operators (an operator's or a verify's own
// reason when the catalog names none). The ranges column is no longer
// written (the job takes its ranges from the catalog when it starts); old
// rows keep theirs, unread.
type Resync struct {
	MachineID   string
	Disk        uint32
	Reason      string
	Manual      bool
	State       string
	JobID       uint64
	RequestedAt time.Time
	NextTry     time.Time // zero: as soon as allowed
	Attempts    int
	LastError   string
	StartedAt   time.Time
	Total       int64
	Compared    int64
	Sent        int64
	// Verify makes the job a verify: the source is compared with the
	// replica's contents read back (replication.ResyncJob.Verify).
	Verify bool
}

const resyncCols = `machine_id, disk_idx, reason, ranges, manual, state, job_id, requested_at, next_try, attempts, last_error, started_at, total, compared, sent, verify`

func nsTime(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

func tNs(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func scanResync(s interface{ Scan(...any) error }) (Resync, error) {
	var r Resync
	var ranges string // unread (see Resync)
	var manual, verify int
	var job, req, next, started int64
	err := s.Scan(&r.MachineID, &r.Disk, &r.Reason, &ranges, &manual, &r.State, &job, &req, &next, &r.Attempts, &r.LastError, &started, &r.Total, &r.Compared, &r.Sent, &verify)
	if err != nil {
		return r, err
	}
	r.Manual, r.Verify, r.JobID = manual != 0, verify != 0, uint64(job)
	r.RequestedAt, r.NextTry, r.StartedAt = nsTime(req), nsTime(next), nsTime(started)
	return r, nil
}

// PutResync inserts or replaces a disk's resync row.
func (d *DB) PutResync(ctx context.Context, r Resync) error {
	manual, verify := 0, 0
	if r.Manual {
		manual = 1
	}
	if r.Verify {
		verify = 1
	}
	_, err := d.db.ExecContext(ctx, `INSERT OR REPLACE INTO resyncs (`+resyncCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		r.MachineID, r.Disk, r.Reason, "", manual, r.State, int64(r.JobID), tNs(r.RequestedAt), tNs(r.NextTry),
		r.Attempts, r.LastError, tNs(r.StartedAt), r.Total, r.Compared, r.Sent, verify)
	return err
}

// UpdateResyncProgress records the progress of job on a disk's resync row,
// if the row is that job's: a row deleted meanwhile (the job is done) or
// taken by another job stays as it is. It reports whether it updated.
func (d *DB) UpdateResyncProgress(ctx context.Context, machineID string, disk uint32, job uint64, total, compared, sent int64, lastError string) (bool, error) {
	res, err := d.db.ExecContext(ctx, `UPDATE resyncs SET total = ?, compared = ?, sent = ?, last_error = ?
		WHERE machine_id = ? AND disk_idx = ? AND job_id = ?`, total, compared, sent, lastError, machineID, disk, int64(job))
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n > 0, err
}

// Resync returns a disk's resync row, or ErrNotFound.
func (d *DB) Resync(ctx context.Context, machineID string, disk uint32) (Resync, error) {
	r, err := scanResync(d.db.QueryRowContext(ctx, `SELECT `+resyncCols+` FROM resyncs WHERE machine_id = ? AND disk_idx = ?`, machineID, disk))
	if errors.Is(err, sql.ErrNoRows) {
		return r, ErrNotFound
	}
	return r, err
}

// Resyncs lists the resync rows (of one machine unless machineID is "").
func (d *DB) Resyncs(ctx context.Context, machineID string) ([]Resync, error) {
	q := `SELECT ` + resyncCols + ` FROM resyncs`
	var args []any
	if machineID != "" {
		q += ` WHERE machine_id = ?`
		args = append(args, machineID)
	}
	rows, err := d.db.QueryContext(ctx, q+` ORDER BY machine_id, disk_idx`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Resync
	for rows.Next() {
		r, err := scanResync(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// DeleteResync removes a disk's resync row.
func (d *DB) DeleteResync(ctx context.Context, machineID string, disk uint32) error {
	_, err := d.db.ExecContext(ctx, `DELETE FROM resyncs WHERE machine_id = ? AND disk_idx = ?`, machineID, disk)
	return err
}

// DeleteResyncs removes every resync row (resyncs and verify jobs) of a
// machine.
func (d *DB) DeleteResyncs(ctx context.Context, machineID string) error {
	_, err := d.db.ExecContext(ctx, `DELETE FROM resyncs WHERE machine_id = ?`, machineID)
	return err
}

// ResyncWindow returns a policy's resync window ("" = the vault's).
func (d *DB) ResyncWindow(ctx context.Context, policy string) (string, error) {
	var w string
	err := d.db.QueryRowContext(ctx, `SELECT resync_window FROM policies WHERE name = ?`, policy).Scan(&w)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("policy %q: %w", policy, ErrNotFound)
	}
	return w, err
}

// SetResyncWindow sets a policy's resync window ("" = the vault's).
func (d *DB) SetResyncWindow(ctx context.Context, policy, window string) error {
	_, err := d.db.ExecContext(ctx, `UPDATE policies SET resync_window = ? WHERE name = ?`, window, policy)
	return err
}
