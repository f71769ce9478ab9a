package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// ProcessServer is a scale-out process server registered with the vault.
type ProcessServer struct {
	Name       string
	CertSerial string // the serial of the client certificate of its latest registration
	DataAddr   string // where its agents connect (host:port)
	Registered time.Time
}

// RegisterProcessServer records a process server's registration, replacing
// an earlier one of the same name (whose certificate is revoked by the new
// serial); created says whether the name was new.
func (d *DB) RegisterProcessServer(ctx context.Context, p ProcessServer) (created bool, err error) {
	err = d.tx(ctx, func(tx *sql.Tx) error {
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM process_servers WHERE name = ?`, p.Name).Scan(&n); err != nil {
			return err
		}
		created = n == 0
		_, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO process_servers (name, cert_serial, data_addr, registered) VALUES (?, ?, ?, ?)`,
			p.Name, p.CertSerial, p.DataAddr, p.Registered.UnixNano())
		return err
	})
	if err != nil {
		return false, fmt.Errorf("register process server %s: %w", p.Name, err)
	}
	return created, nil
}

// ProcessServers lists the registered process servers by name.
func (d *DB) ProcessServers(ctx context.Context) ([]ProcessServer, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT name, cert_serial, data_addr, registered FROM process_servers ORDER BY name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []ProcessServer
	for rows.Next() {
		var p ProcessServer
		var reg int64
		if err := rows.Scan(&p.Name, &p.CertSerial, &p.DataAddr, &reg); err != nil {
			return nil, err
		}
		p.Registered = time.Unix(0, reg)
		out = append(out, p)
	}
	return out, rows.Err()
}

// ProcessServerByName returns a registered process server, or ErrNotFound.
func (d *DB) ProcessServerByName(ctx context.Context, name string) (ProcessServer, error) {
	p := ProcessServer{Name: name}
	var reg int64
	err := d.db.QueryRowContext(ctx, `SELECT cert_serial, data_addr, registered FROM process_servers WHERE name = ?`, name).
		Scan(&p.CertSerial, &p.DataAddr, &reg)
	if errors.Is(err, sql.ErrNoRows) {
		return p, fmt.Errorf("process server %s: %w", name, ErrNotFound)
	} else if err != nil {
		return p, err
	}
	p.Registered = time.Unix(0, reg)
	return p, nil
}

// RemoveProcessServer deletes a registration (its certificate no longer
// authenticates), or returns ErrNotFound.
func (d *DB) RemoveProcessServer(ctx context.Context, name string) error {
	res, err := d.db.ExecContext(ctx, `DELETE FROM process_servers WHERE name = ?`, name)
	if err != nil {
		return fmt.Errorf("remove process server %s: %w", name, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("process server %s: %w", name, ErrNotFound)
	}
	return nil
}

// Assignments maps each machine assigned to a scale-out process server to
// its name (machines not in it are the built-in process server's).
func (d *DB) Assignments(ctx context.Context) (map[string]string, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT machine_id, process_server FROM ps_assignments`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var m, p string
		if err := rows.Scan(&m, &p); err != nil {
			return nil, err
		}
		out[m] = p
	}
	return out, rows.Err()
}

// Assign assigns a machine to a scale-out process server ("" : the
// built-in one).
func (d *DB) Assign(ctx context.Context, machineID, processServer string) error {
	var err error
	if processServer == "" {
		_, err = d.db.ExecContext(ctx, `DELETE FROM ps_assignments WHERE machine_id = ?`, machineID)
	} else {
		_, err = d.db.ExecContext(ctx, `INSERT OR REPLACE INTO ps_assignments (machine_id, process_server) VALUES (?, ?)`, machineID, processServer)
	}
	if err != nil {
		return fmt.Errorf("assign machine %s to process server %q: %w", machineID, processServer, err)
	}
	return nil
}
