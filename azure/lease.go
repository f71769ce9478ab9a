package azure

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"

	"github.com/asrdr/asr/replication"
)

// A blob lease, renewed until released: the container's write lease (the
// lock blob's) and each machine's lease (leases/<machine id>). Timings
// follow from its duration D (15 to 60 s, the service's bounds): renewed
// every D/3, each renewal bounded by D/4 retries included (the lease must
// not lapse while the pipeline backs off), retried D/12 after a transient
// failure, and trusted for 5D/6 after the start of its last successful
// renewal: the service counts D from when it got the request, later than
// the start, and the D/6 left over cover clock rates. For 60 s: 20 s, 15 s,
// 5 s and 50 s.
type blobLease struct {
	what string // "the write lease", "machine M's lease": for messages
	lc   *lease.BlobClient
	secs int32
	now  func() time.Time
	log  *slog.Logger
	// lost makes the final error of a lease found lost from the service's
	// answer; it wraps the sentinel writers branch on.
	lost func(answer error) error

	mu      sync.Mutex
	renewed time.Time // start of the last successful acquire or renewal
	err     error     // set for good once a renewal finds the lease lost

	cancel context.CancelFunc // stops the renewals (start)
	done   chan struct{}      // closed when they have stopped
}

func (l *blobLease) period() time.Duration { return time.Duration(l.secs) * time.Second }
func (l *blobLease) trust() time.Duration  { return l.period() * 5 / 6 }

// acquire takes the lease. The SDK's error is returned as it is, so that
// callers can tell its code.
func (l *blobLease) acquire(ctx context.Context) error {
	start := l.now()
	if _, err := l.lc.AcquireLease(ctx, l.secs, nil); err != nil {
		return err
	}
	l.mu.Lock()
	l.renewed = start
	l.mu.Unlock()
	return nil
}

// start renews the lease until stop (or parent's end), in a goroutine wg
// counts.
func (l *blobLease) start(parent context.Context, wg *sync.WaitGroup) {
	ctx, cancel := context.WithCancel(parent)
	l.cancel, l.done = cancel, make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(l.done)
		l.keep(ctx)
	}()
}

// stop stops the renewals and waits for them (a lease never started is
// fine).
func (l *blobLease) stop() {
	if l.cancel != nil {
		l.cancel()
		<-l.done
	}
}

// keep renews the lease until ctx ends or the lease is lost.
func (l *blobLease) keep(ctx context.Context) {
	timer := time.NewTimer(l.period() / 3)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		next := l.period() / 3
		if err := l.renew(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			l.mu.Lock()
			lost := l.err != nil
			l.mu.Unlock()
			if lost {
				l.log.Error(l.what+" lost; writes fail from now on", "err", err)
				return
			}
			l.log.Warn(l.what+" renewal failed; retrying", "err", err)
			next = l.period() / 12
		}
		timer.Reset(next)
	}
}

// renew renews the lease once. A refusal that says the lease is gone (taken,
// broken, released, or its blob deleted) is final: it is recorded, and
// every later write fails with it.
func (l *blobLease) renew(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, l.period()/4)
	defer cancel()
	start := l.now()
	_, err := l.lc.RenewLease(ctx, nil)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return l.err
	}
	if err == nil {
		l.renewed = start
		return nil
	}
	if bloberror.HasCode(err, bloberror.LeaseIDMismatchWithLeaseOperation, bloberror.LeaseIsBrokenAndCannotBeRenewed,
		bloberror.LeaseNotPresentWithLeaseOperation, bloberror.LeaseLost, bloberror.LeaseAlreadyPresent,
		bloberror.BlobNotFound, bloberror.ContainerNotFound) {
		l.err = l.lost(azError(err))
		return l.err
	}
	return fmt.Errorf("renew %s: %w", l.what, azError(err))
}

// check returns an error unless the lease is surely held.
func (l *blobLease) check() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return l.err
	}
	if age := l.now().Sub(l.renewed); age > l.trust() {
		return fmt.Errorf("%s has not been renewed for %s and may lapse; writes wait for a renewal", l.what, age.Round(time.Second))
	}
	return nil
}

// expiry is the earliest moment the service may let the lease lapse: the
// start of its last successful renewal plus its duration.
func (l *blobLease) expiry() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.renewed.Add(l.period())
}

// release gives the lease up, so another holder can take it at once. A
// lease no longer held (it expired, another Target with the same lease ID
// released it, or another holder took it after that; or its blob is gone)
// is fine: Azure answers the first case with LeaseNotPresent, Azurite with
// LeaseIdMismatch.
func (l *blobLease) release() error {
	l.mu.Lock()
	lost := l.err != nil
	l.mu.Unlock()
	if lost {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	_, err := l.lc.ReleaseLease(ctx, nil)
	if err != nil && !bloberror.HasCode(err, bloberror.LeaseNotPresentWithLeaseOperation, bloberror.LeaseIDMismatchWithLeaseOperation, bloberror.BlobNotFound) {
		return fmt.Errorf("release %s: %w", l.what, azError(err))
	}
	return nil
}

// newLease makes the lease of blob name under this Target's lease ID.
func (t *Target) newLease(name, what string, secs int32, lost func(error) error) (*blobLease, error) {
	lc, err := lease.NewBlobClient(t.cc.NewBlockBlobClient(name), &lease.BlobClientOptions{LeaseID: &t.leaseID})
	if err != nil {
		return nil, err
	}
	return &blobLease{what: what, lc: lc, secs: secs, now: t.now, log: t.log, lost: lost}, nil
}

// leaseHeld reports whether an acquisition was refused because another
// holder has the lease.
func leaseHeld(err error) bool {
	return bloberror.HasCode(err, bloberror.LeaseAlreadyPresent, bloberror.LeaseIsBreakingAndCannotBeAcquired)
}

// take acquires l on blob name, creating the blob (empty) when missing.
// The SDK's error is returned as it is (leaseHeld tells a refusal).
func (t *Target) take(ctx context.Context, l *blobLease, name string) error {
	for created := false; ; created = true {
		err := l.acquire(ctx)
		if err == nil || created || !bloberror.HasCode(err, bloberror.BlobNotFound) {
			return err
		}
		// If-None-Match keeps a blob that another holder made meanwhile,
		// and its lease.
		_, err = t.cc.NewBlockBlobClient(name).Upload(ctx, streaming.NopCloser(bytes.NewReader(nil)), &blockblob.UploadOptions{
			AccessConditions: &blob.AccessConditions{ModifiedAccessConditions: &blob.ModifiedAccessConditions{IfNoneMatch: to.Ptr(azcore.ETagAny)}},
		})
		if err != nil && !bloberror.HasCode(err, bloberror.BlobAlreadyExists, bloberror.LeaseIDMissing, bloberror.ConditionNotMet) {
			return fmt.Errorf("create the %s blob: %w", name, azError(err))
		}
	}
}

// Machine leases (replication.MachineLeaser): the blob leases/<machine id>,
// empty, whose lease is the machine's, held under the Target's lease ID (a
// process server proposes the one it keeps in its data directory, so after
// a restart it takes its machines back at once) and labelled with the
// holder's name in the blob's metadata (asrholder), for the error another
// taker gets.
const (
	leasesPrefix = "leases/"
	metaHolder   = "asrholder"
	// DefaultMachineLease is a machine lease's duration: a crashed process
	// server's machines can be taken this long after its last renewal.
	DefaultMachineLease = 60 * time.Second
	maxHolderLen        = 256
)

var _ replication.MachineLeaser = (*Target)(nil)

// machineLease is a machine's lease held by this Target. While it is
// being acquired, bl is nil: the entry keeps a second taker in this
// process out.
type machineLease struct {
	t      *Target
	id     string
	holder string
	bl     *blobLease

	once sync.Once
	err  error
}

// LeaseMachine takes the machine's lease (replication.MachineLeaser): one
// Acquire Lease on leases/<id> (made if missing), which fails at once while
// another holder, in another process or in this Target, has it; then it is
// renewed until Release, Close, or the lease is found lost. A holder that
// stops (kill -9 included) stops renewing, and its lease lapses within the
// lease's duration (Config.MachineLease, 60 s by default), except to a
// holder proposing the same lease ID (its own restart), who takes it back
// at once.
func (t *Target) LeaseMachine(ctx context.Context, id, holder string) (replication.Lease, error) {
	if !replication.ValidKeyElem(id) {
		return nil, fmt.Errorf("lease machine %q: %w", id, replication.ErrInvalidKey)
	}
	if err := t.disks.Check(ctx, "lease machine", id, false); err != nil {
		return nil, err
	}
	t.mmu.Lock()
	if t.leasesClosed {
		t.mmu.Unlock()
		return nil, fmt.Errorf("lease machine %s: %s: %w", id, t, replication.ErrClosed)
	}
	if o, ok := t.machines[id]; ok {
		t.mmu.Unlock()
		return nil, fmt.Errorf("machine %s is held by %s: %w", id, o.holder, replication.ErrMachineLeased)
	}
	ml := &machineLease{t: t, id: id, holder: holderLabel(holder)}
	t.machines[id] = ml
	t.mmu.Unlock()

	bl, err := t.takeMachine(ctx, id, ml.holder)
	t.mmu.Lock()
	defer t.mmu.Unlock()
	if err == nil && t.leasesClosed {
		err = fmt.Errorf("lease machine %s: %s: %w", id, t, replication.ErrClosed)
		bl.release()
	}
	if err != nil {
		delete(t.machines, id)
		return nil, err
	}
	// Under mmu, not closed: Close waits for these renewals only after
	// it has set leasesClosed, so none starts once it waits.
	bl.start(t.ctx, &t.wg)
	ml.bl = bl
	return ml, nil
}

// takeMachine acquires leases/<id> and labels it; LeaseMachine starts its
// renewals.
func (t *Target) takeMachine(ctx context.Context, id, holder string) (*blobLease, error) {
	name := leasesPrefix + id
	bl, err := t.newLease(name, "machine "+id+"'s lease", t.machineSecs, func(answer error) error {
		return fmt.Errorf("%s: machine %s's lease is lost (%v); another process server may be writing it, so this one stops writing it: %w", t, id, answer, replication.ErrMachineLeased)
	})
	if err != nil {
		return nil, fmt.Errorf("lease machine %s: %w", id, err)
	}
	bc := t.cc.NewBlockBlobClient(name)
	err = t.take(ctx, bl, name)
	if leaseHeld(err) {
		return nil, fmt.Errorf("machine %s is held by %s (its lease on the %s blob; the lease of a holder that stopped lapses within %d s): %w",
			id, t.holderOf(ctx, bc.BlobClient()), name, t.machineSecs, replication.ErrMachineLeased)
	}
	if err != nil {
		return nil, fmt.Errorf("lease machine %s: %w", id, azError(err))
	}
	// The label, under the lease: a failure to write it gives the lease
	// up, so that no taker is ever told a former holder's name.
	_, err = bc.SetMetadata(ctx, map[string]*string{metaHolder: to.Ptr(holder)}, &blob.SetMetadataOptions{
		AccessConditions: &blob.AccessConditions{LeaseAccessConditions: &blob.LeaseAccessConditions{LeaseID: to.Ptr(t.leaseID)}},
	})
	if err != nil {
		bl.release()
		return nil, fmt.Errorf("lease machine %s: label the lease with its holder: %w", id, azError(err))
	}
	return bl, nil
}

// holderOf reads the holder's label of a lease blob.
func (t *Target) holderOf(ctx context.Context, bc *blob.Client) string {
	if p, err := bc.GetProperties(ctx, nil); err == nil {
		if h, ok := getMeta(p.Metadata, metaHolder); ok && h != "" {
			return h
		}
	}
	return "another process server"
}

// holderLabel keeps a holder's label to what a metadata value carries:
// printable ASCII, at most maxHolderLen bytes.
func holderLabel(h string) string {
	if h == "" || len(h) > maxHolderLen {
		return "a process server"
	}
	for i := 0; i < len(h); i++ {
		if h[i] < 0x20 || h[i] > 0x7e {
			return "a process server"
		}
	}
	return h
}

// Release stops renewing the lease and gives it up (idempotent); the
// machine's blobs can no longer be written through this Target by a
// process server sharing the container.
func (l *machineLease) Release() error {
	l.once.Do(func() {
		l.bl.stop()
		l.err = l.bl.release()
		t := l.t
		t.mmu.Lock()
		if t.machines[l.id] == l {
			delete(t.machines, l.id)
		}
		t.mmu.Unlock()
	})
	return l.err
}

// DropMachineLease deletes leases/<id> under its lease, which it takes
// first (failing with ErrMachineLeased while a holder has it). Missing is
// nil. Only the configuration server deletes machines: a Target sharing
// the container refuses.
func (t *Target) DropMachineLease(ctx context.Context, id string) error {
	if !replication.ValidKeyElem(id) {
		return fmt.Errorf("drop the lease of machine %q: %w", id, replication.ErrInvalidKey)
	}
	if err := t.disks.Check(ctx, "drop machine lease", id, false); err != nil {
		return err
	}
	if t.lock == nil {
		return fmt.Errorf("drop the lease of machine %s: %s is shared with the configuration server, which alone deletes machines: %w", id, t, replication.ErrLocked)
	}
	if err := t.lock.check(); err != nil {
		return fmt.Errorf("drop the lease of machine %s: %s: %w", id, t, err)
	}
	bc := t.cc.NewBlobClient(leasesPrefix + id)
	if _, err := bc.GetProperties(ctx, nil); bloberror.HasCode(err, bloberror.BlobNotFound) {
		return nil
	}
	l, err := t.LeaseMachine(ctx, id, "deleting the machine")
	if err != nil {
		return err
	}
	_, err = bc.Delete(ctx, &blob.DeleteOptions{AccessConditions: &blob.AccessConditions{
		LeaseAccessConditions: &blob.LeaseAccessConditions{LeaseID: to.Ptr(t.leaseID)}}})
	// Released after: a lease on a deleted blob is fine to release.
	rerr := l.Release()
	if err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		return fmt.Errorf("drop the lease of machine %s: %w", id, azError(err))
	}
	return rerr
}

// checkWrite returns an error unless this Target may write the blob of key
// (an object's or a disk's) now. The container's write lease, when this
// Target holds it (the configuration server), must be held; a machine's
// blob (replication.MachineOfKey) whose lease this Target holds needs that
// lease held too. A Target sharing the container (a scale-out process
// server) writes nothing else: no blob of a machine it has not leased, and
// no blob outside machines (the vault descriptor, group points), which
// the configuration server alone writes.
func (t *Target) checkWrite(key string) error {
	if t.lock != nil {
		if err := t.lock.check(); err != nil {
			return fmt.Errorf("%s: %w", t, err)
		}
	}
	id, ok := replication.MachineOfKey(key)
	if ok {
		t.mmu.Lock()
		ml := t.machines[id]
		t.mmu.Unlock()
		if ml != nil && ml.bl != nil {
			if err := ml.bl.check(); err != nil {
				return fmt.Errorf("%s: %w", t, err)
			}
			return nil
		}
	}
	switch {
	case t.lock != nil:
		// The configuration server's own work on a machine it has not
		// leased: deleting it, pruning its kept segments.
		return nil
	case !ok:
		return fmt.Errorf("%s is shared with the configuration server, which alone writes %s: %w", t, key, replication.ErrLocked)
	}
	return fmt.Errorf("%s: this process server does not hold machine %s's lease: %w", t, id, replication.ErrMachineLeased)
}

// leaseBound bounds one write request of key's blob (checked by checkWrite
// first) by the earliest moment a lease it depends on may lapse (expiry):
// a request the SDK is still retrying then is abandoned, never sent when
// another holder may have taken the lease. Only write calls take it: reads
// go on whatever the leases.
func (t *Target) leaseBound(ctx context.Context, key string) (context.Context, context.CancelFunc) {
	var end time.Time
	if t.lock != nil {
		end = t.lock.expiry()
	}
	if id, ok := replication.MachineOfKey(key); ok {
		t.mmu.Lock()
		ml := t.machines[id]
		t.mmu.Unlock()
		if ml != nil && ml.bl != nil {
			if e := ml.bl.expiry(); end.IsZero() || e.Before(end) {
				end = e
			}
		}
	}
	if end.IsZero() {
		return context.WithCancel(ctx)
	}
	// As a duration from the Target's clock, which tests move.
	return context.WithTimeout(ctx, end.Sub(t.now()))
}

// releaseMachines releases every machine lease still held, and takes no
// more (Close).
func (t *Target) releaseMachines() error {
	t.mmu.Lock()
	t.leasesClosed = true
	held := make([]*machineLease, 0, len(t.machines))
	for _, ml := range t.machines {
		if ml.bl != nil {
			held = append(held, ml)
		}
	}
	t.mmu.Unlock()
	sort.Slice(held, func(i, j int) bool { return held[i].id < held[j].id })
	var errs []error
	for _, ml := range held {
		errs = append(errs, ml.Release())
	}
	return errors.Join(errs...)
}
