package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// Sample is one minute of a machine's history for the console's charts.
type Sample struct {
	MachineID string
	Time      time.Time
	// RPO is the machine's RPO at Time; negative: not known.
	RPO time.Duration
	// Bytes is what the server had received from the machine by Time
	// (cumulative: the churn between two samples is their difference).
	Bytes int64
}

// MaxSamplesPerMachine bounds a machine's history whatever the sampling
// interval: 25 h of one a minute, with room to spare.
const MaxSamplesPerMachine = 1600

// AddSamples records samples in one transaction. A sample at the time of an
// existing one of the same machine replaces it; a sample of a machine
// not in the vault (deleted meanwhile) is skipped.
func (d *DB) AddSamples(ctx context.Context, ss []Sample) error {
	return d.tx(ctx, func(tx *sql.Tx) error {
		for _, s := range ss {
			// A machine deleted since the caller listed it is skipped,
			// not a foreign key failure of the whole batch.
			if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO history (machine_id, time, rpo_ns, bytes)
				SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM machines WHERE id = ?)`,
				s.MachineID, s.Time.UnixNano(), int64(s.RPO), s.Bytes, s.MachineID); err != nil {
				return fmt.Errorf("add history sample: %w", err)
			}
		}
		return nil
	})
}

// History returns a machine's samples since since, oldest first, at most
// MaxSamplesPerMachine.
func (d *DB) History(ctx context.Context, machineID string, since time.Time) ([]Sample, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT time, rpo_ns, bytes FROM history WHERE machine_id = ? AND time >= ?
		ORDER BY time DESC LIMIT ?`, machineID, since.UnixNano(), MaxSamplesPerMachine)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Sample
	for rows.Next() {
		s := Sample{MachineID: machineID}
		var t, rpo int64
		if err := rows.Scan(&t, &rpo, &s.Bytes); err != nil {
			return nil, err
		}
		s.Time, s.RPO = time.Unix(0, t), time.Duration(rpo)
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, nil
}

// PruneHistory deletes the samples older than before and returns how many
// went.
func (d *DB) PruneHistory(ctx context.Context, before time.Time) (int64, error) {
	res, err := d.db.ExecContext(ctx, `DELETE FROM history WHERE time < ?`, before.UnixNano())
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// CapHistory deletes the oldest samples of each machine beyond its newest
// MaxSamplesPerMachine (a machine sampled more often than the bound
// allows) and returns how many went. It reads the whole table: callers
// sampling less often than the bound needs skip it.
func (d *DB) CapHistory(ctx context.Context) (int64, error) {
	res, err := d.db.ExecContext(ctx, `DELETE FROM history
		WHERE machine_id IN (SELECT machine_id FROM history GROUP BY machine_id HAVING COUNT(*) > ?1)
		AND time < (SELECT h.time FROM history h WHERE h.machine_id = history.machine_id ORDER BY h.time DESC LIMIT 1 OFFSET ?1 - 1)`,
		MaxSamplesPerMachine)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}
