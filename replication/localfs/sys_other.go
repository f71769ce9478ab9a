//go:build !linux

package localfs

import (
	"errors"
	"os"
)

// lockFileExclusive is a no-op where flock is not wired up: only one Target
// may open a directory, and nothing checks it.
func lockFileExclusive(*os.File) error { return nil }

var errNoPunch = errors.New("punching holes is not supported here")

// punchHole is not supported; callers write zeros instead.
func punchHole(*os.File, int64, int64) error { return errNoPunch }

// nextData cannot tell where data is.
func nextData(*os.File, int64) (int64, bool) { return 0, false }

// nextHole cannot tell where holes are.
func nextHole(*os.File, int64) (int64, bool) { return 0, false }

// startWriteback does nothing here: the flush's fsync writes everything.
func startWriteback(*os.File, int64, int64) {}

// openDirect is not wired up here: the replica is written through the
// page cache.
func openDirect(string) (*os.File, error) { return nil, errors.ErrUnsupported }
