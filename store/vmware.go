package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// VCenter is a registered vCenter (or ESXi host) and the last state of its
// discovery. Secret is the password sealed with the vault's data key; the
// store never sees it in clear.
type VCenter struct {
	Name       string
	URL        string
	User       string
	Secret     []byte
	Thumbprint string
	AddedAt    time.Time
	Connected  bool
	LastUpdate time.Time
	LastError  string
	About      string
}

// VMRow is one VM of the inventory: the fields it is looked up by, and the
// whole discovered record as JSON (vmware.VM).
type VMRow struct {
	VCenter   string
	Ref       string
	Name      string
	BIOSUUID  string
	Data      string
	Stale     bool
	UpdatedAt time.Time
}

// AddVCenter registers a vCenter; ErrConflict if the name is taken.
func (d *DB) AddVCenter(ctx context.Context, v VCenter) error {
	_, err := d.db.ExecContext(ctx, `INSERT INTO vcenters (name, url, username, secret, thumbprint, added_at) VALUES (?, ?, ?, ?, ?, ?)`,
		v.Name, v.URL, v.User, v.Secret, v.Thumbprint, d.now().Unix())
	if err != nil && strings.Contains(err.Error(), "UNIQUE") {
		return fmt.Errorf("vCenter %q: %w", v.Name, ErrConflict)
	}
	return err
}

const vcenterCols = `name, url, username, secret, thumbprint, added_at, connected, last_update, last_error, about`

func scanVCenter(s interface{ Scan(...any) error }) (VCenter, error) {
	var v VCenter
	var added, upd int64
	err := s.Scan(&v.Name, &v.URL, &v.User, &v.Secret, &v.Thumbprint, &added, &v.Connected, &upd, &v.LastError, &v.About)
	v.AddedAt = time.Unix(added, 0)
	if upd > 0 {
		v.LastUpdate = time.Unix(0, upd)
	}
	return v, err
}

// VCenter returns one registered vCenter.
func (d *DB) VCenter(ctx context.Context, name string) (VCenter, error) {
	v, err := scanVCenter(d.db.QueryRowContext(ctx, `SELECT `+vcenterCols+` FROM vcenters WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return v, fmt.Errorf("vCenter %q: %w", name, ErrNotFound)
	}
	return v, err
}

// VCenters lists the registered vCenters by name.
func (d *DB) VCenters(ctx context.Context) ([]VCenter, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT `+vcenterCols+` FROM vcenters ORDER BY name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var vs []VCenter
	for rows.Next() {
		v, err := scanVCenter(rows)
		if err != nil {
			return nil, err
		}
		vs = append(vs, v)
	}
	return vs, rows.Err()
}

// RemoveVCenter deletes a vCenter and its inventory.
func (d *DB) RemoveVCenter(ctx context.Context, name string) error {
	r, err := d.db.ExecContext(ctx, `DELETE FROM vcenters WHERE name = ?`, name)
	if err != nil {
		return err
	}
	if n, _ := r.RowsAffected(); n == 0 {
		return fmt.Errorf("vCenter %q: %w", name, ErrNotFound)
	}
	return nil
}

// SetVCenterStatus records discovery's state of a vCenter. When it is not
// connected, its VMs are marked stale (kept, as last known).
func (d *DB) SetVCenterStatus(ctx context.Context, name string, connected bool, lastUpdate time.Time, lastErr, about string) error {
	return d.tx(ctx, func(tx *sql.Tx) error {
		var upd int64
		if !lastUpdate.IsZero() {
			upd = lastUpdate.UnixNano()
		}
		if _, err := tx.ExecContext(ctx, `UPDATE vcenters SET connected = ?, last_update = MAX(last_update, ?), last_error = ?, about = CASE WHEN ? != '' THEN ? ELSE about END WHERE name = ?`,
			connected, upd, lastErr, about, about, name); err != nil {
			return err
		}
		if !connected {
			_, err := tx.ExecContext(ctx, `UPDATE vms SET stale = 1 WHERE vcenter = ?`, name)
			return err
		}
		return nil
	})
}

// ReplaceVMs makes vms the whole inventory of a vCenter: rows not in it are
// deleted (the VM was removed from vCenter), the others written and marked
// current. It does nothing for a vCenter no longer registered.
func (d *DB) ReplaceVMs(ctx context.Context, vcenter string, vms []VMRow) error {
	return d.tx(ctx, func(tx *sql.Tx) error {
		var one int
		if err := tx.QueryRowContext(ctx, `SELECT 1 FROM vcenters WHERE name = ?`, vcenter).Scan(&one); errors.Is(err, sql.ErrNoRows) {
			return nil
		} else if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM vms WHERE vcenter = ?`, vcenter); err != nil {
			return err
		}
		now := d.now().UnixNano()
		for _, v := range vms {
			if _, err := tx.ExecContext(ctx, `INSERT INTO vms (vcenter, ref, name, bios_uuid, data, stale, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?)`,
				vcenter, v.Ref, v.Name, strings.ToLower(v.BIOSUUID), v.Data, now); err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, `UPDATE vcenters SET last_update = ? WHERE name = ?`, now, vcenter)
		return err
	})
}

// UpdateVMs writes the VMs of a vCenter that changed (put, by ref) and
// deletes those gone (by ref), marking its inventory current: what
// ReplaceVMs does when the caller knows what it wrote before, at a cost in
// proportion to the change rather than to the inventory.
func (d *DB) UpdateVMs(ctx context.Context, vcenter string, put []VMRow, gone []string) error {
	return d.tx(ctx, func(tx *sql.Tx) error {
		var one int
		if err := tx.QueryRowContext(ctx, `SELECT 1 FROM vcenters WHERE name = ?`, vcenter).Scan(&one); errors.Is(err, sql.ErrNoRows) {
			return nil
		} else if err != nil {
			return err
		}
		now := d.now().UnixNano()
		for _, ref := range gone {
			if _, err := tx.ExecContext(ctx, `DELETE FROM vms WHERE vcenter = ? AND ref = ?`, vcenter, ref); err != nil {
				return err
			}
		}
		for _, v := range put {
			if _, err := tx.ExecContext(ctx, `INSERT INTO vms (vcenter, ref, name, bios_uuid, data, stale, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?)
				ON CONFLICT (vcenter, ref) DO UPDATE SET name = excluded.name, bios_uuid = excluded.bios_uuid, data = excluded.data, stale = 0, updated_at = excluded.updated_at`,
				vcenter, v.Ref, v.Name, strings.ToLower(v.BIOSUUID), v.Data, now); err != nil {
				return err
			}
		}
		if _, err := tx.ExecContext(ctx, `UPDATE vms SET stale = 0 WHERE vcenter = ? AND stale = 1`, vcenter); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, `UPDATE vcenters SET last_update = ? WHERE name = ?`, now, vcenter)
		return err
	})
}

// VMsWithUUIDs lists the VMs whose BIOS UUID (lower case) is one of
// uuids, in no particular order.
func (d *DB) VMsWithUUIDs(ctx context.Context, uuids []string) ([]VMRow, error) {
	var out []VMRow
	for len(uuids) > 0 {
		n := min(len(uuids), 500) // SQLite's bound on variables is 32,766; batches stay well under
		q := `SELECT vcenter, ref, name, bios_uuid, data, stale, updated_at FROM vms WHERE bios_uuid IN (?` + strings.Repeat(", ?", n-1) + `)`
		args := make([]any, n)
		for i, u := range uuids[:n] {
			args[i] = u
		}
		uuids = uuids[n:]
		rows, err := d.db.QueryContext(ctx, q, args...)
		if err != nil {
			return nil, err
		}
		vs, err := scanVMRows(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, vs...)
	}
	return out, nil
}

// VMs lists the inventory (of one vCenter unless vcenter is ""), by name.
func (d *DB) VMs(ctx context.Context, vcenter string) ([]VMRow, error) {
	q := `SELECT vcenter, ref, name, bios_uuid, data, stale, updated_at FROM vms`
	var args []any
	if vcenter != "" {
		q += ` WHERE vcenter = ?`
		args = append(args, vcenter)
	}
	rows, err := d.db.QueryContext(ctx, q+` ORDER BY name, vcenter, ref`, args...)
	if err != nil {
		return nil, err
	}
	return scanVMRows(rows)
}

// scanVMRows reads VM rows and closes them.
func scanVMRows(rows *sql.Rows) ([]VMRow, error) {
	defer rows.Close()
	var vs []VMRow
	for rows.Next() {
		var v VMRow
		var upd int64
		if err := rows.Scan(&v.VCenter, &v.Ref, &v.Name, &v.BIOSUUID, &v.Data, &v.Stale, &upd); err != nil {
			return nil, err
		}
		v.UpdatedAt = time.Unix(0, upd)
		vs = append(vs, v)
	}
	return vs, rows.Err()
}
