package replication

import (
	"context"
	"errors"
)

// ErrMachineLeased is returned (wrapped) by MachineLeaser.LeaseMachine while
// another holder (another process server) has the machine's lease.
var ErrMachineLeased = errors.New("the machine's replica is being written by another process server")

// MachineLeaser is implemented by a target that several process servers may
// write at once (scale-out): each machine's replica, catalog entry, points
// and kept segments are written only by the holder of that machine's lease.
//
// Contract:
//   - LeaseMachine does not wait: while another holder has the lease it
//     fails at once with an error wrapping ErrMachineLeased that names the
//     holder when the target knows it.
//   - A lease is held until Release, or until the holder's process ends
//     (a crashed process server never keeps a machine).
//   - A lease cannot be taken while it is held, so a new holder exists
//     only once the old one has stopped writing: that is the fencing (a
//     process server gives a machine up by closing it, which releases the
//     lease after its last write).
//   - id is a machine id (a key element, ValidKeyElem); holder is a label
//     for operators (the process server's name), not a secret.
//   - A machine's blobs are the keys under machines/<id>/ (MachineOfKey).
//     A target whose leases can be lost while their holder runs (Azure's
//     lapse when not renewed) refuses a holder's writes of those keys once
//     it cannot be sure its lease is held, as it refuses writes once its
//     lease on the whole target is lost.
type MachineLeaser interface {
	LeaseMachine(ctx context.Context, id, holder string) (Lease, error)
	// DropMachineLease removes what the target keeps of a machine's lease
	// once the machine is deleted (Catalog.DeleteMachine); it fails with
	// ErrMachineLeased while a holder has it. Only for a machine nothing
	// will open again.
	DropMachineLease(ctx context.Context, id string) error
}

// Lease is a machine's lease, held until Release (idempotent).
type Lease interface {
	Release() error
}
