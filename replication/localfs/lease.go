package localfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/asrdr/asr/replication"
)

// leasesDir holds one file per machine whose flock is the machine's lease
// (replication.MachineLeaser): <dir>/leases/<machine id>, holding the
// holder's label for the error another taker sees.
const leasesDir = "leases"

var _ replication.MachineLeaser = (*Target)(nil)

// LeaseMachine takes the machine's lease: a non-blocking exclusive flock on
// leases/<id>. flock locks belong to the open file, so a second taker is
// refused whether it is in another process or this one, and the kernel
// drops the lock when the holder's process ends (kill -9 included). On a
// system without flock (not Linux) leases are not enforced.
func (t *Target) LeaseMachine(ctx context.Context, id, holder string) (replication.Lease, error) {
	if !replication.ValidKeyElem(id) {
		return nil, fmt.Errorf("lease machine %q: %w", id, replication.ErrInvalidKey)
	}
	if err := t.disks.Check(ctx, "lease machine", id, false); err != nil {
		return nil, err
	}
	dir := filepath.Join(t.dir, leasesDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("lease machine %s: %w", id, err)
	}
	path := filepath.Join(dir, id)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lease machine %s: %w", id, err)
	}
	if err := lockFileExclusive(f); err != nil {
		f.Close()
		if errors.Is(err, replication.ErrLocked) {
			who := "another process server"
			// The holder wrote its label after taking the lock; a label
			// being rewritten reads short, which only blurs the message.
			if b, rerr := os.ReadFile(path); rerr == nil && len(b) > 0 && len(b) <= 256 {
				who = strings.TrimSpace(string(b))
			}
			return nil, fmt.Errorf("machine %s is held by %s: %w", id, who, replication.ErrMachineLeased)
		}
		return nil, fmt.Errorf("lease machine %s: %w", id, err)
	}
	// The label is for the message above only: a failure to write it
	// leaves the lease held.
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(holder+"\n"), 0)
	}
	return &fileLease{f: f}, nil
}

// fileLease is a lease held as a flock on an open file.
type fileLease struct {
	once sync.Once
	f    *os.File
	err  error
}

func (l *fileLease) Release() error {
	l.once.Do(func() { l.err = l.f.Close() })
	return l.err
}

// DropMachineLease removes leases/<id>, taking the lease first so that a
// holder is never left with an unlinked file (replication.MachineLeaser).
// Missing is nil.
func (t *Target) DropMachineLease(ctx context.Context, id string) error {
	path := filepath.Join(t.dir, leasesDir, id)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	l, err := t.LeaseMachine(ctx, id, "deleting the machine")
	if err != nil {
		return err
	}
	defer l.Release()
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("drop the lease of machine %s: %w", id, err)
	}
	return nil
}
