package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"time"
)

// Console sessions. The cookie holds a random id; the database holds only
// its SHA-256, so a leaked database does not hand out live sessions.

func hashID(id string) string {
	h := sha256.Sum256([]byte(id))
	return hex.EncodeToString(h[:])
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// CreateSession starts a console session valid for ttl and returns its id
// (for the cookie) and CSRF token.
func (d *DB) CreateSession(ctx context.Context, ttl time.Duration) (id, csrf string, err error) {
	id, csrf = randomHex(32), randomHex(32)
	now := d.now()
	_, err = d.db.ExecContext(ctx, `INSERT INTO sessions (id, csrf, created_at, expires_at) VALUES (?, ?, ?, ?)`,
		hashID(id), csrf, now.Unix(), now.Add(ttl).Unix())
	if err != nil {
		return "", "", err
	}
	// Opportunistic clean-up of expired sessions.
	d.db.ExecContext(ctx, `DELETE FROM sessions WHERE expires_at < ?`, now.Unix())
	return id, csrf, nil
}

// Session returns the CSRF token of a live session, or ErrNotFound.
func (d *DB) Session(ctx context.Context, id string) (string, error) {
	var csrf string
	err := d.db.QueryRowContext(ctx, `SELECT csrf FROM sessions WHERE id = ? AND expires_at >= ?`, hashID(id), d.now().Unix()).Scan(&csrf)
	if errors.Is(err, sql.ErrNoRows) {
		return "", ErrNotFound
	}
	return csrf, err
}

// DeleteSession ends a session.
func (d *DB) DeleteSession(ctx context.Context, id string) error {
	_, err := d.db.ExecContext(ctx, `DELETE FROM sessions WHERE id = ?`, hashID(id))
	return err
}
