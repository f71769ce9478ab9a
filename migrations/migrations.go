// Package migrations holds the numbered SQL migrations of the asr vault
// database. Each file NNNN_name.sql is applied once, in its own transaction,
// and recorded in the schema_migrations table (see store.Open).
package migrations

import "embed"

// FS holds the migration files.
//
//go:embed *.sql
var FS embed.FS
