package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/asrdr/asr/replication"
)

// Machine is a registered guest.
type Machine struct {
	ID            string
	Name          string
	CertSerial    string
	RegisteredAt  time.Time
	LastSeen      time.Time
	AgentVersion  string
	BytesReceived int64
	LastError     string
	Policy        string
	Group         string
	// LastScrub is when the replica was last checked against its block
	// checksums, and ScrubResult what that found.
	LastScrub   time.Time
	ScrubResult string
	// ScrubOutcome is what the last scrub found: ScrubOK, ScrubDamaged,
	// ScrubFailed, or "" (none yet).
	ScrubOutcome string
	// BIOSUUID is the guest's BIOS UUID as its agent reports it (lower
	// case; "" if the agent does not know it): what links the machine to a
	// VM of the inventory.
	BIOSUUID string
	// DiskModes is how the agent captures each disk (by name: nbd or scan),
	// as JSON, as it last reported them.
	DiskModes string
	// UnprotectedAt is when the machine's protection ended (asr
	// unprotect; zero: protected). DeleteReplica says its replica, its
	// points and its row are to be deleted too (a removal cut short is
	// finished at the next start).
	UnprotectedAt time.Time
	DeleteReplica bool
	Disks         []Disk
}

// Unprotected reports whether the machine's protection ended.
func (m Machine) Unprotected() bool { return !m.UnprotectedAt.IsZero() }

// ErrUnprotected is returned (wrapped) by CreateMachine for a name taken by
// a machine whose protection ended.
var ErrUnprotected = errors.New("the machine's protection ended")

// Disk states.
const (
	DiskInitial   = replication.StateInitial   // initial replication running
	DiskProtected = replication.StateProtected // replica complete, delta replication
	DiskResync    = replication.StateResync    // continuity lost; Reason says why
)

// Disk is a protected disk of a machine.
type Disk struct {
	Index  uint32
	Name   string
	Size   int64
	State  string
	Cursor int64
	Reason string
}

// Point is a recovery point as listed in the console.
type Point struct {
	MachineID string
	Seq       uint64
	Time      time.Time
	Kind      string
}

// CreateMachine registers a machine, or re-registers the one with the same
// name (new certificate serial), and returns it with created=true if new.
func (d *DB) CreateMachine(ctx context.Context, id, name, serial string) (Machine, bool, error) {
	var m Machine
	created := false
	err := d.tx(ctx, func(tx *sql.Tx) error {
		var existing string
		err := tx.QueryRowContext(ctx, `SELECT id FROM machines WHERE name = ?`, name).Scan(&existing)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			created = true
			_, err = tx.ExecContext(ctx, `INSERT INTO machines (id, name, cert_serial, registered_at) VALUES (?, ?, ?, ?)`,
				id, name, serial, d.now().Unix())
			return err
		case err != nil:
			return err
		}
		id = existing
		var unprotected int64
		if err := tx.QueryRowContext(ctx, `SELECT unprotected_at FROM machines WHERE id = ?`, id).Scan(&unprotected); err != nil {
			return err
		}
		if unprotected != 0 {
			// Checked in the same transaction as the update: an unprotect
			// cannot slip in between and have its mark ignored.
			return fmt.Errorf("name %q is taken by machine %s, unprotected at %s: %w", name, id,
				time.Unix(0, unprotected).UTC().Format(time.RFC3339), ErrUnprotected)
		}
		_, err = tx.ExecContext(ctx, `UPDATE machines SET cert_serial = ? WHERE id = ?`, serial, id)
		return err
	})
	if err != nil {
		return m, false, fmt.Errorf("register machine %q: %w", name, err)
	}
	m, err = d.Machine(ctx, id)
	return m, created, err
}

const machineCols = `id, name, cert_serial, registered_at, last_seen, agent_version, bytes_received, last_error, policy, group_name, last_scrub, scrub_result, bios_uuid, disk_modes, unprotected_at, delete_replica, scrub_outcome`

func scanMachine(s interface{ Scan(...any) error }) (Machine, error) {
	var m Machine
	var reg, seen, scrub, unprotected int64
	err := s.Scan(&m.ID, &m.Name, &m.CertSerial, &reg, &seen, &m.AgentVersion, &m.BytesReceived, &m.LastError, &m.Policy, &m.Group, &scrub, &m.ScrubResult, &m.BIOSUUID, &m.DiskModes,
		&unprotected, &m.DeleteReplica, &m.ScrubOutcome)
	if unprotected != 0 {
		m.UnprotectedAt = time.Unix(0, unprotected)
	}
	m.RegisteredAt = time.Unix(reg, 0)
	if scrub > 0 {
		m.LastScrub = time.Unix(0, scrub)
	}
	if seen > 0 {
		m.LastSeen = time.Unix(0, seen)
	}
	return m, err
}

// Machine returns a machine and its disks by id.
func (d *DB) Machine(ctx context.Context, id string) (Machine, error) {
	m, err := scanMachine(d.db.QueryRowContext(ctx, `SELECT `+machineCols+` FROM machines WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return m, fmt.Errorf("machine %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return m, err
	}
	m.Disks, err = d.Disks(ctx, id)
	return m, err
}

// MachineByName looks a machine up by its name or, failing that, by its id.
func (d *DB) MachineByName(ctx context.Context, name string) (Machine, error) {
	var id string
	err := d.db.QueryRowContext(ctx, `SELECT id FROM machines WHERE name = ? OR id = ? ORDER BY name = ? DESC LIMIT 1`,
		name, name, name).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return Machine{}, fmt.Errorf("machine %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return Machine{}, err
	}
	return d.Machine(ctx, id)
}

// Machines lists all machines with their disks, by name.
func (d *DB) Machines(ctx context.Context) ([]Machine, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT `+machineCols+` FROM machines ORDER BY name`)
	if err != nil {
		return nil, err
	}
	var ms []Machine
	for rows.Next() {
		m, err := scanMachine(rows)
		if err != nil {
			rows.Close()
			return nil, err
		}
		ms = append(ms, m)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for i := range ms {
		if ms[i].Disks, err = d.Disks(ctx, ms[i].ID); err != nil {
			return nil, err
		}
	}
	return ms, nil
}

// Disks lists a machine's disks by index.
func (d *DB) Disks(ctx context.Context, machineID string) ([]Disk, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT idx, name, size, state, cursor, reason FROM disks WHERE machine_id = ? ORDER BY idx`, machineID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ds []Disk
	for rows.Next() {
		var k Disk
		if err := rows.Scan(&k.Index, &k.Name, &k.Size, &k.State, &k.Cursor, &k.Reason); err != nil {
			return nil, err
		}
		ds = append(ds, k)
	}
	return ds, rows.Err()
}

// PutDisk inserts or updates a disk.
func (d *DB) PutDisk(ctx context.Context, machineID string, k Disk) error {
	_, err := d.db.ExecContext(ctx, `INSERT INTO disks (machine_id, idx, name, size, state, cursor, reason) VALUES (?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT(machine_id, idx) DO UPDATE SET name = excluded.name, size = excluded.size,
		state = excluded.state, cursor = excluded.cursor, reason = excluded.reason`,
		machineID, k.Index, k.Name, k.Size, k.State, k.Cursor, k.Reason)
	if err != nil {
		return fmt.Errorf("save disk %s/%d: %w", machineID, k.Index, err)
	}
	return nil
}

// TouchMachine records contact with a machine's agent.
func (d *DB) TouchMachine(ctx context.Context, id, agentVersion string, addBytes int64) error {
	_, err := d.db.ExecContext(ctx, `UPDATE machines SET last_seen = ?, agent_version = CASE WHEN ? = '' THEN agent_version ELSE ? END,
		bytes_received = bytes_received + ? WHERE id = ?`, d.now().UnixNano(), agentVersion, agentVersion, addBytes, id)
	return err
}

// SetBIOSUUID records the BIOS UUID a machine's agent reports.
func (d *DB) SetBIOSUUID(ctx context.Context, id, uuid string) error {
	_, err := d.db.ExecContext(ctx, `UPDATE machines SET bios_uuid = ? WHERE id = ? AND bios_uuid != ?`, uuid, id, uuid)
	return err
}

// SetDiskModes records how the agent captures each disk (JSON).
func (d *DB) SetDiskModes(ctx context.Context, id, modes string) error {
	_, err := d.db.ExecContext(ctx, `UPDATE machines SET disk_modes = ? WHERE id = ?`, modes, id)
	return err
}

// Scrub outcomes (Machine.ScrubOutcome).
const (
	ScrubOK      = "ok"
	ScrubDamaged = "damaged" // it found damaged blocks
	ScrubFailed  = "failed"  // it could not run to its end
)

// SetScrub records a machine's last scrub: its outcome (ScrubOK,
// ScrubDamaged, ScrubFailed) and what it found, for display.
func (d *DB) SetScrub(ctx context.Context, id string, at time.Time, outcome, result string) error {
	_, err := d.db.ExecContext(ctx, `UPDATE machines SET last_scrub = ?, scrub_outcome = ?, scrub_result = ? WHERE id = ?`,
		at.UnixNano(), outcome, result, id)
	return err
}

// SetUnprotected marks a machine's protection as ended at at (kept if it
// ended earlier) and revokes its client certificate (its serial is
// cleared, so no certificate matches it); deleteReplica asks for its
// replica, points and row to be deleted too (once asked, it stays asked).
// It takes the machine out of its replication group.
func (d *DB) SetUnprotected(ctx context.Context, id string, at time.Time, deleteReplica bool) error {
	res, err := d.db.ExecContext(ctx, `UPDATE machines SET
		unprotected_at = CASE WHEN unprotected_at = 0 THEN ? ELSE unprotected_at END,
		delete_replica = MAX(delete_replica, ?), cert_serial = '', group_name = '' WHERE id = ?`,
		at.UnixNano(), deleteReplica, id)
	if err != nil {
		return fmt.Errorf("mark machine %s unprotected: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("machine %s: %w", id, ErrNotFound)
	}
	return nil
}

// DeleteMachine deletes a machine's row with its disks, points and resync
// rows (by cascade), its events and its alerts. Deleting a missing
// machine is nil.
func (d *DB) DeleteMachine(ctx context.Context, id string) error {
	return d.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `DELETE FROM events WHERE machine_id = ?`, id); err != nil {
			return fmt.Errorf("delete the events of machine %s: %w", id, err)
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM alerts WHERE machine_id = ?`, id); err != nil {
			return fmt.Errorf("delete the alerts of machine %s: %w", id, err)
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM machines WHERE id = ?`, id); err != nil {
			return fmt.Errorf("delete machine %s: %w", id, err)
		}
		return nil
	})
}

// SetMachineError records (or, with "", clears) the error shown on a machine.
func (d *DB) SetMachineError(ctx context.Context, id, msg string) error {
	_, err := d.db.ExecContext(ctx, `UPDATE machines SET last_error = ? WHERE id = ?`, msg, id)
	return err
}

// AddPoint records a recovery point (idempotent).
func (d *DB) AddPoint(ctx context.Context, p Point) error {
	_, err := d.db.ExecContext(ctx, `INSERT OR IGNORE INTO points (machine_id, seq, time, kind) VALUES (?, ?, ?, ?)`,
		p.MachineID, int64(p.Seq), p.Time.UnixNano(), p.Kind)
	return err
}

// DeletePoints removes points of a machine (after pruning on the target).
func (d *DB) DeletePoints(ctx context.Context, machineID string, seqs []uint64) error {
	if len(seqs) == 0 {
		return nil
	}
	args := []any{machineID}
	for _, s := range seqs {
		args = append(args, int64(s))
	}
	_, err := d.db.ExecContext(ctx, `DELETE FROM points WHERE machine_id = ? AND seq IN (?`+strings.Repeat(",?", len(seqs)-1)+`)`, args...)
	return err
}

// Points lists a machine's points, oldest first; limit <= 0 means all.
func (d *DB) Points(ctx context.Context, machineID string, limit int) ([]Point, error) {
	q := `SELECT seq, time, kind FROM points WHERE machine_id = ? ORDER BY seq`
	args := []any{machineID}
	if limit > 0 {
		q = `SELECT * FROM (SELECT seq, time, kind FROM points WHERE machine_id = ? ORDER BY seq DESC LIMIT ?) ORDER BY seq`
		args = append(args, limit)
	}
	rows, err := d.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ps []Point
	for rows.Next() {
		var p Point
		var seq, t int64
		if err := rows.Scan(&seq, &t, &p.Kind); err != nil {
			return nil, err
		}
		p.MachineID, p.Seq, p.Time = machineID, uint64(seq), time.Unix(0, t)
		ps = append(ps, p)
	}
	return ps, rows.Err()
}

// PointCount counts a machine's points.
func (d *DB) PointCount(ctx context.Context, machineID string) (int, error) {
	var n int
	err := d.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM points WHERE machine_id = ?`, machineID).Scan(&n)
	return n, err
}
