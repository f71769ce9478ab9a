package vmware

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/replication/retry"
)

// Status is a Watcher's connection to its vCenter.
type Status struct {
	Connected bool `json:"connected"`
	// LastUpdate is when the VM list was last known current: the last
	// answer from the vCenter (an update, or a wait that found none).
	LastUpdate time.Time `json:"last_update"`
	// LastError is why the watcher is not connected ("" while connected).
	LastError string `json:"last_error,omitempty"`
	VMs       int    `json:"vms"`
	// About is the vCenter's product and version, e.g. "VMware vCenter
	// Server 8.0.2 build-22385739" (kept from the last connection).
	About string `json:"about,omitempty"`
	// Since is when the current state (connected, or this error) began.
	Since time.Time `json:"since"`
}

// WatchOptions configures a Watcher. The callbacks run on the watcher's
// goroutine, one at a time; they must return soon (the next update waits).
type WatchOptions struct {
	// OnChange receives the full VM list (sorted by name, then ref) after
	// each batch of updates that changed it, and after each (re)connection.
	// It is never called with an emptied list because of an outage: while
	// disconnected the last list stands (the caller marks it stale).
	OnChange func(vms []VM)
	// OnStatus receives the status at each change of Connected, LastError,
	// About or the VM count (not at each LastUpdate).
	OnStatus func(Status)
	// MinBackoff and MaxBackoff bound the wait between connection tries
	// (retry.Backoff; defaults 1s and 1m).
	MinBackoff, MaxBackoff time.Duration
	// MaxWait is the longest the vCenter may hold a WaitForUpdatesEx
	// without an update (default 20s, whole seconds): how soon a silent
	// outage is noticed.
	MaxWait time.Duration
	Logger  *slog.Logger
}

// Watcher keeps the VM inventory of one vCenter current: it connects
// (pinned, see Connect), follows the PropertyCollector's updates over a
// ContainerView of the inventory, and reconnects with backoff after any
// failure, a changed certificate or a refused login included (the operator
// may fix the vCenter meanwhile). Its methods are safe for concurrent use.
type Watcher struct {
	ep     Endpoint
	opts   WatchOptions
	log    *slog.Logger
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	status  Status
	vms     []VM
	updated chan struct{} // closed and replaced at each change of status or VMs
}

// Watch starts watching ep's inventory until Close (or until ctx ends).
func Watch(ctx context.Context, ep Endpoint, opts WatchOptions) *Watcher {
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = time.Second
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = time.Minute
	}
	if opts.MaxWait < time.Second {
		opts.MaxWait = 20 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(ctx)
	w := &Watcher{
		ep:      ep,
		opts:    opts,
		log:     opts.Logger.With("vcenter", ep.Name),
		cancel:  cancel,
		done:    make(chan struct{}),
		updated: make(chan struct{}),
		status:  Status{Since: time.Now()},
	}
	go w.run(ctx)
	return w
}

// Status returns the watcher's current status.
func (w *Watcher) Status() Status {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.status
}

// VMs returns the last VM list (kept through outages; nil before the
// first connection). The VMs share their slices with the watcher's copy:
// read them, do not modify them.
func (w *Watcher) VMs() []VM {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.vms)
}

// Updated returns a channel closed at the next change of the status or
// the VM list: read Status or VMs, and if it is not what you wait for,
// wait on the channel taken before reading. A change shows in Status and
// VMs, and closes the channel, only after OnStatus and OnChange have
// returned from it.
func (w *Watcher) Updated() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.updated
}

// Close stops the watcher, logs out of the vCenter and waits for its
// goroutine to end.
func (w *Watcher) Close() {
	w.cancel()
	<-w.done
}

// notifyLocked wakes the waiters of Updated; w.mu is held.
func (w *Watcher) notifyLocked() {
	close(w.updated)
	w.updated = make(chan struct{})
}

// setStatus changes the status with f and reports it if it changed
// (LastUpdate alone is no change to report). A change is reported to
// OnStatus before Status shows it and Updated wakes its waiters, so
// whoever sees it finds the callback has run (the server's database row,
// a test's record). Only the watcher's goroutine calls it.
func (w *Watcher) setStatus(f func(*Status)) {
	w.mu.Lock()
	old := w.status
	w.mu.Unlock()
	st := old
	f(&st)
	changed := old.Connected != st.Connected || old.LastError != st.LastError ||
		old.About != st.About || old.VMs != st.VMs
	if changed && w.opts.OnStatus != nil {
		w.opts.OnStatus(st)
	}
	w.mu.Lock()
	w.status = st
	if changed {
		w.notifyLocked()
	}
	w.mu.Unlock()
}

func (w *Watcher) run(ctx context.Context) {
	defer close(w.done)
	b := retry.New(w.opts.MinBackoff, w.opts.MaxBackoff)
	for ctx.Err() == nil {
		err := w.session(ctx, &b)
		if ctx.Err() != nil {
			return
		}
		wait := b.Next()
		w.log.Warn("vcenter watch failed; retrying", "err", err, "wait", wait)
		w.setStatus(func(s *Status) {
			if s.Connected || s.LastError != err.Error() {
				s.Since = time.Now()
			}
			s.Connected, s.LastError = false, err.Error()
		})
		if retry.Sleep(ctx, wait) != nil {
			return
		}
	}
}

// session is one connection: connect, watch until an error, log out. It
// resets the backoff once the inventory has been read whole.
func (w *Watcher) session(ctx context.Context, b *retry.Backoff) error {
	c, err := Connect(ctx, w.ep)
	if err != nil {
		return err
	}
	defer func() {
		// The session's view and collector go with it.
		lctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := c.Logout(lctx); err != nil {
			w.log.Debug("vcenter logout", "err", err)
		}
	}()
	// No session keep-alive is needed: the session is never idle, the
	// wait below is a call every MaxWait at the longest.
	about := c.ServiceContent.About.FullName
	w.log.Info("vcenter connected", "about", about)

	cv, err := view.NewManager(c.Client).CreateContainerView(ctx, c.ServiceContent.RootFolder, viewTypes, true)
	if err != nil {
		return fmt.Errorf("create the inventory view: %w", err)
	}
	// A collector of our own: the session's default one may be shared.
	pc, err := property.DefaultCollector(c.Client).Create(ctx)
	if err != nil {
		return fmt.Errorf("create a property collector: %w", err)
	}
	spec := types.PropertyFilterSpec{
		ObjectSet: []types.ObjectSpec{{
			Obj:  cv.Reference(),
			Skip: types.NewBool(true),
			SelectSet: []types.BaseSelectionSpec{&types.TraversalSpec{
				Type: "ContainerView",
				Path: "view",
			}},
		}},
	}
	for _, t := range viewTypes {
		spec.PropSet = append(spec.PropSet, types.PropertySpec{Type: t, PathSet: propsOf(t)})
	}
	if _, err := pc.CreateFilter(ctx, types.CreateFilter{Spec: spec}); err != nil {
		return fmt.Errorf("create the property filter: %w", err)
	}

	inv := newInventory()
	maxWait := int32(w.opts.MaxWait / time.Second)
	req := types.WaitForUpdatesEx{
		This:    pc.Reference(),
		Options: &types.WaitOptions{MaxWaitSeconds: &maxWait},
	}
	complete := false // the first whole inventory has been read
	for {
		// The vCenter answers within MaxWaitSeconds; a connection that
		// hangs past that (and a margin) is an outage.
		wctx, cancel := context.WithTimeout(ctx, w.opts.MaxWait+30*time.Second)
		res, err := methods.WaitForUpdatesEx(wctx, c, &req)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				// Stopped mid-wait: the vCenter would hold the wait (and
				// the connection) until MaxWait; cancel it there too.
				cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
				methods.CancelWaitForUpdates(cctx, c, &types.CancelWaitForUpdates{This: pc.Reference()})
				ccancel()
				return ctx.Err()
			}
			return fmt.Errorf("wait for updates: %w", err)
		}
		set := res.Returnval
		if set == nil { // MaxWaitSeconds passed without a change
			if complete {
				w.setStatus(func(s *Status) { s.LastUpdate = time.Now() })
			}
			continue
		}
		req.Version = set.Version
		var refetch []types.ManagedObjectReference
		for _, fs := range set.FilterSet {
			for _, u := range fs.ObjectSet {
				again, err := inv.apply(u)
				if err != nil {
					return err
				}
				if again {
					refetch = append(refetch, u.Obj)
				}
			}
		}
		if err := w.refetch(ctx, c, inv, refetch); err != nil {
			return err
		}
		if set.Truncated != nil && *set.Truncated {
			continue // more of this version to come before the model is whole
		}
		first := !complete
		complete = true
		if first {
			b.Reset()
		}
		w.publish(inv.vms(w.ep.Name), about, first)
	}
}

// refetch reads objects whole, for changes the model cannot apply
// property by property.
func (w *Watcher) refetch(ctx context.Context, c *govmomi.Client, inv *inventory, refs []types.ManagedObjectReference) error {
	if len(refs) == 0 {
		return nil
	}
	w.log.Debug("vcenter: reading changed objects whole", "objects", len(refs))
	var spec types.PropertyFilterSpec
	for _, r := range refs {
		spec.ObjectSet = append(spec.ObjectSet, types.ObjectSpec{Obj: r})
		spec.PropSet = append(spec.PropSet, types.PropertySpec{Type: r.Type, PathSet: propsOf(r.Type)})
	}
	res, err := c.PropertyCollector().RetrieveProperties(ctx, types.RetrieveProperties{SpecSet: []types.PropertyFilterSpec{spec}})
	if err != nil {
		if fault.Is(err, &types.ManagedObjectNotFound{}) {
			return nil // gone meanwhile: its leave update follows
		}
		return fmt.Errorf("read changed objects: %w", err)
	}
	for _, oc := range res.Returnval {
		inv.replace(oc)
	}
	return nil
}

// publish installs a new VM list, marks the watcher connected and calls
// OnChange if the list changed (always after a (re)connection). OnChange
// runs before VMs shows the list and Updated wakes its waiters (as for the
// status, see setStatus). Only the watcher's goroutine writes the list.
func (w *Watcher) publish(vms []VM, about string, first bool) {
	now := time.Now()
	w.mu.Lock()
	same := !first && reflect.DeepEqual(w.vms, vms)
	w.mu.Unlock()
	if !same && w.opts.OnChange != nil {
		w.opts.OnChange(slices.Clone(vms))
	}
	if !same {
		w.mu.Lock()
		w.vms = vms
		w.notifyLocked()
		w.mu.Unlock()
	}
	w.setStatus(func(s *Status) {
		if !s.Connected {
			s.Since = now
		}
		s.Connected, s.LastError, s.About, s.VMs, s.LastUpdate = true, "", about, len(vms), now
	})
}
