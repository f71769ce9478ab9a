package azure

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
	"golang.org/x/sync/errgroup"

	"github.com/asrdr/asr/replication"
)

const (
	// pageSize is the page blob's unit: writes and clears are aligned to it.
	pageSize = 512
	// maxDiskSize is the largest page blob the service makes.
	maxDiskSize = 8 << 40
	// maxPut is the most one Put Page call may carry (the service's limit),
	// and maxGet the most one ranged download asks for, so that a try fits
	// in retryOptions.TryTimeout on a slow link.
	maxPut = 4 << 20
	maxGet = 4 << 20
	// defaultBufferLimit bounds the bytes buffered before WriteAt or ZeroAt
	// flushes; a pending clear counts clearCost.
	defaultBufferLimit = 64 << 20
	clearCost          = 64
	// flushParallel is how many Put Page calls a flush keeps in flight.
	flushParallel = 4
	// smallRead is the largest read done with one download, without asking
	// for the written page ranges first: two requests would cost more than
	// the zeros they could save.
	smallRead = 256 << 10

	// Metadata names, lowercase as the service keeps them.
	metaVersion = "asrversion"
	metaSize    = "asrsize"
	metaSnap    = "asrsnap"
	metaHeld    = "asrdeleting"
	diskVersion = "1"
)

// zeros is a source of zero bytes for the unaligned ends of a zeroed range,
// which are less than a page each.
var zeros [2 * pageSize]byte

// page is one page of buffered data.
type page [pageSize]byte

// span is a range of pages [lo, hi) to clear.
type span struct{ lo, hi int64 }

// snapshot is a blob snapshot of a disk.
type snapshot struct {
	name string // asrsnap
	id   string // the service's snapshot timestamp
	size int64  // the disk's size when it was taken

	// Guarded by disk.smu.
	refs    int  // open readers
	deleted bool // deleted by the caller, kept for its readers
}

// disk is the shared state of an open replica disk; Disk handles point at it.
type disk struct {
	t       *Target
	key     string
	pb      *pageblob.Client
	handles int // guarded by t.mu

	size atomic.Int64 // changed by Resize under mu

	// mu serializes the writer (WriteAt, ZeroAt, Flush, Resize, Snapshot,
	// DeleteSnapshot, the deletion of held snapshots, close) and ReadAt,
	// which must see the buffer and the blob in step.
	mu       sync.Mutex
	pages    map[int64]*page // buffered data by page index
	clears   []span          // buffered clears: sorted, disjoint, not adjacent
	bufLimit int64

	// smu guards snaps, held and the snapshots' refs and deleted. It is
	// taken after mu, never before.
	smu    sync.Mutex
	snaps  []*snapshot // live, in name order
	held   []*snapshot // deleted, kept for their readers
	closed atomic.Bool // set under mu and smu
}

// Disk is a replica disk of a Target: a handle on the disk's shared state.
// It implements replication.ReplicaDisk.
type Disk struct {
	d      *disk
	closed atomic.Bool
}

var _ replication.ReplicaDisk = (*Disk)(nil)

// OpenDisk opens the replica disk at key, creating an all-zero page blob of
// the given size if it does not exist. Size 0 opens an existing disk whatever
// its size, or fails with replication.ErrNotFound. Opening a disk that is open
// already returns another handle on the same state.
func (t *Target) OpenDisk(ctx context.Context, key string, size int64) (replication.ReplicaDisk, error) {
	if err := checkKey(key); err != nil {
		return nil, fmt.Errorf("open disk: %w", err)
	}
	if size < 0 || size > maxDiskSize {
		return nil, fmt.Errorf("open disk %s: size %d is not between 0 and 8 TiB, the most a page blob holds: %w", key, size, replication.ErrDiskTooLarge)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open disk %s: %w", key, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, fmt.Errorf("open disk %s: %s: %w", key, t, ErrClosed)
	}
	d := t.disks[key]
	if d == nil {
		var err error
		if d, err = t.loadDisk(ctx, key, size); err != nil {
			return nil, fmt.Errorf("open disk %s: %w", key, err)
		}
		t.disks[key] = d
	} else if size != 0 && size != d.size.Load() {
		return nil, fmt.Errorf("open disk %s: asked for %d bytes, the disk has %d", key, size, d.size.Load())
	}
	d.handles++
	return &Disk{d: d}, nil
}

// DeleteDisk removes the disk at key with its snapshots. Deleting a missing
// disk is nil; deleting an open one fails with ErrDiskOpen.
func (t *Target) DeleteDisk(ctx context.Context, key string) error {
	if err := checkKey(key); err != nil {
		return fmt.Errorf("delete disk: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete disk %s: %w", key, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return fmt.Errorf("delete disk %s: %s: %w", key, t, ErrClosed)
	}
	if _, ok := t.disks[key]; ok {
		return fmt.Errorf("delete disk %s: %w", key, ErrDiskOpen)
	}
	if err := t.checkWrite(); err != nil {
		return fmt.Errorf("delete disk %s: %w", key, err)
	}
	_, err := t.cc.NewBlobClient(disksPrefix+key).Delete(ctx, &blob.DeleteOptions{DeleteSnapshots: to.Ptr(blob.DeleteSnapshotsOptionTypeInclude)})
	if err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		return fmt.Errorf("delete disk %s: %w", key, azError(err))
	}
	return nil
}

// loadDisk reads (or creates) a disk's page blob and lists its snapshots.
// Snapshots whose deletion a crash interrupted are deleted now.
func (t *Target) loadDisk(ctx context.Context, key string, size int64) (*disk, error) {
	d := &disk{t: t, key: key, pb: t.cc.NewPageBlobClient(disksPrefix + key), pages: map[int64]*page{}, bufLimit: defaultBufferLimit}
	var props blob.GetPropertiesResponse
	for created := false; ; created = true {
		var err error
		props, err = d.pb.GetProperties(ctx, nil)
		if err == nil {
			break
		}
		if !bloberror.HasCode(err, bloberror.BlobNotFound) {
			return nil, azError(err)
		}
		if size == 0 {
			return nil, replication.ErrNotFound
		}
		if err := t.checkWrite(); err != nil {
			return nil, err
		}
		d.size.Store(size)
		_, err = d.pb.Create(ctx, pagesUp(size)*pageSize, &pageblob.CreateOptions{
			Metadata:         d.metadata(),
			AccessConditions: &blob.AccessConditions{ModifiedAccessConditions: &blob.ModifiedAccessConditions{IfNoneMatch: to.Ptr(azcore.ETagAny)}},
		})
		if err == nil {
			return d, nil
		}
		// Made by a retried request whose answer was lost: read it back.
		if created || !bloberror.HasCode(err, bloberror.BlobAlreadyExists) {
			return nil, fmt.Errorf("create page blob: %w", azError(err))
		}
	}
	if v, _ := getMeta(props.Metadata, metaVersion); v != diskVersion {
		return nil, fmt.Errorf("page blob %s%s: disk format version %q not supported (this build reads %s): %w", disksPrefix, key, v, diskVersion, replication.ErrCorrupt)
	}
	logical, err := metaInt(props.Metadata, metaSize)
	if err != nil || props.ContentLength == nil || *props.ContentLength < pagesUp(logical)*pageSize {
		return nil, fmt.Errorf("page blob %s%s: no valid %s metadata for its size: %w", disksPrefix, key, metaSize, replication.ErrCorrupt)
	}
	if size != 0 && size != logical {
		return nil, fmt.Errorf("asked for %d bytes, the disk has %d", size, logical)
	}
	d.size.Store(logical)
	listed, err := d.listSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	heldIDs := map[string]bool{}
	if v, ok := getMeta(props.Metadata, metaHeld); ok && v != "" {
		for id := range strings.SplitSeq(v, ",") {
			heldIDs[id] = true
		}
	}
	for _, s := range listed {
		if heldIDs[s.id] {
			s.deleted = true
			d.held = append(d.held, s)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.adopt(ctx, listed); err != nil {
		return nil, err
	}
	// No reader holds the held ones in this process: finish their deletion.
	// Failing that, they stay hidden, and a later deletion or close retries.
	var gcErr error
	switch {
	case len(d.held) > 0:
		gcErr = d.gcLocked(ctx)
	case len(heldIDs) > 0:
		gcErr = d.writeMetadata(ctx) // deleted already, but still recorded
	}
	if gcErr != nil {
		t.log.Warn("deleting snapshots a crash left behind", "disk", key, "err", gcErr)
	}
	return d, nil
}

// metadata is the page blob's metadata for the disk's current state.
func (d *disk) metadata() map[string]*string {
	m := map[string]*string{
		metaVersion: to.Ptr(diskVersion),
		metaSize:    to.Ptr(strconv.FormatInt(d.size.Load(), 10)),
	}
	d.smu.Lock()
	defer d.smu.Unlock()
	if len(d.held) > 0 {
		ids := make([]string, len(d.held))
		for i, s := range d.held {
			ids[i] = s.id
		}
		m[metaHeld] = to.Ptr(strings.Join(ids, ","))
	}
	return m
}

// writeMetadata stores metadata(). The caller holds mu.
func (d *disk) writeMetadata(ctx context.Context) error {
	if _, err := d.pb.SetMetadata(ctx, d.metadata(), nil); err != nil {
		return fmt.Errorf("set page blob metadata: %w", azError(err))
	}
	return nil
}

// getMeta looks a metadata name up without regard to case: the SDK gives the
// names of a blob's own metadata as HTTP headers canonicalize them.
func getMeta(m map[string]*string, name string) (string, bool) {
	for k, v := range m {
		if strings.EqualFold(k, name) && v != nil {
			return *v, true
		}
	}
	return "", false
}

// metaInt reads a size from the metadata: between 0 and maxDiskSize, so
// that nothing computed from it (pages, buffers, a hash index) overflows.
func metaInt(m map[string]*string, name string) (int64, error) {
	v, ok := getMeta(m, name)
	if !ok {
		return 0, fmt.Errorf("no %s metadata", name)
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 || n > maxDiskSize {
		return 0, fmt.Errorf("%s metadata %q is not a size of at most %d bytes", name, v, int64(maxDiskSize))
	}
	return n, nil
}

// listSnapshots lists the service's snapshots of the disk that this package
// made, oldest first.
func (d *disk) listSnapshots(ctx context.Context) ([]*snapshot, error) {
	name := disksPrefix + d.key
	var out []*snapshot
	pager := d.t.cc.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{
		Prefix:  to.Ptr(name),
		Include: container.ListBlobsInclude{Snapshots: true, Metadata: true},
	})
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("list snapshots: %w", azError(err))
		}
		for _, it := range page.Segment.BlobItems {
			// The prefix matches other disks too ("a" of "a/b").
			if it.Name == nil || *it.Name != name || it.Snapshot == nil || *it.Snapshot == "" {
				continue
			}
			snap, ok := getMeta(it.Metadata, metaSnap)
			if !ok || checkSnapName(snap) != nil {
				continue
			}
			size, err := metaInt(it.Metadata, metaSize)
			if err != nil {
				return nil, fmt.Errorf("snapshot %s (%s): %v: %w", snap, *it.Snapshot, err, replication.ErrCorrupt)
			}
			out = append(out, &snapshot{name: snap, id: *it.Snapshot, size: size})
		}
	}
	// Snapshot IDs are fixed-width UTC timestamps: they sort by time.
	slices.SortFunc(out, func(a, b *snapshot) int { return strings.Compare(a.id, b.id) })
	return out, nil
}

// adopt makes the live snapshots those the service listed, but for the held
// ones: one per name, the one known already or else the oldest. Another
// snapshot of the same name (a create retried after its answer was lost) is
// the same contents; it is deleted. The caller holds mu.
func (d *disk) adopt(ctx context.Context, listed []*snapshot) error {
	d.smu.Lock()
	skip := map[string]bool{}
	for _, s := range d.held {
		skip[s.id] = true
	}
	known := map[string]*snapshot{}
	for _, s := range d.snaps {
		known[s.name] = s
	}
	listedIDs := map[string]bool{}
	for _, s := range listed {
		listedIDs[s.id] = true
	}
	keep := map[string]*snapshot{}
	for _, s := range listed {
		if skip[s.id] {
			continue
		}
		if k := known[s.name]; k != nil && listedIDs[k.id] {
			keep[s.name] = k
		} else if keep[s.name] == nil {
			keep[s.name] = s
		}
	}
	var extra []*snapshot
	for _, s := range listed {
		if !skip[s.id] && keep[s.name].id != s.id {
			extra = append(extra, s)
		}
	}
	d.snaps = d.snaps[:0]
	for _, s := range keep {
		d.snaps = append(d.snaps, s)
	}
	slices.SortFunc(d.snaps, func(a, b *snapshot) int { return strings.Compare(a.name, b.name) })
	d.smu.Unlock()
	for _, s := range extra {
		if err := d.deleteSnapshot(ctx, s); err != nil {
			return err
		}
	}
	return nil
}

// deleteSnapshot deletes a blob snapshot; a missing one is fine.
func (d *disk) deleteSnapshot(ctx context.Context, s *snapshot) error {
	bc, err := d.pb.BlobClient().WithSnapshot(s.id)
	if err != nil {
		return fmt.Errorf("snapshot %s (%s): %w", s.name, s.id, err)
	}
	if _, err := bc.Delete(ctx, nil); err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		return fmt.Errorf("delete snapshot %s (%s): %w", s.name, s.id, azError(err))
	}
	return nil
}

// gcLocked deletes the held snapshots no reader holds any more (all of them
// once the disk is closed) and records that in the metadata. The caller
// holds mu.
func (d *disk) gcLocked(ctx context.Context) error {
	d.smu.Lock()
	var free []*snapshot
	for _, s := range d.held {
		if s.refs == 0 || d.closed.Load() {
			free = append(free, s)
		}
	}
	d.smu.Unlock()
	if len(free) == 0 {
		return nil
	}
	if err := d.t.checkWrite(); err != nil {
		return err
	}
	var errs []error
	for _, s := range free {
		if err := d.deleteSnapshot(ctx, s); err != nil {
			errs = append(errs, err)
			continue
		}
		d.smu.Lock()
		d.held = slices.DeleteFunc(d.held, func(h *snapshot) bool { return h == s })
		d.smu.Unlock()
	}
	// A metadata write that fails leaves IDs of deleted snapshots listed,
	// which the next open ignores.
	errs = append(errs, d.writeMetadata(ctx))
	return errors.Join(errs...)
}

// pagesUp is the number of pages n bytes take.
func pagesUp(n int64) int64 { return (n + pageSize - 1) / pageSize }

// Size returns the disk's size in bytes.
func (h *Disk) Size() int64 { return h.d.size.Load() }

// lock takes mu of a usable disk.
func (h *Disk) lock() (*disk, error) {
	d := h.d
	if h.closed.Load() {
		return nil, fmt.Errorf("disk %s: %w", d.key, ErrClosed)
	}
	d.mu.Lock()
	if d.closed.Load() {
		d.mu.Unlock()
		return nil, fmt.Errorf("disk %s: %w", d.key, ErrClosed)
	}
	return d, nil
}

// lockWriter takes mu of a usable disk whose target holds the write lease.
func (h *Disk) lockWriter() (*disk, error) {
	d, err := h.lock()
	if err != nil {
		return nil, err
	}
	if err := d.t.checkWrite(); err != nil {
		d.mu.Unlock()
		return nil, fmt.Errorf("disk %s: %w", d.key, err)
	}
	return d, nil
}

func (d *disk) checkRange(off, n int64) error {
	size := d.size.Load()
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("range %d+%d outside the disk's %d bytes", off, n, size)
	}
	return nil
}

// WriteAt buffers p for off; Flush uploads it. A page p covers only in part
// is read first, unless buffered or cleared already.
func (h *Disk) WriteAt(p []byte, off int64) error {
	if err := h.d.checkRange(off, int64(len(p))); err != nil {
		return fmt.Errorf("write disk %s: %w", h.d.key, err)
	}
	if len(p) == 0 {
		return nil
	}
	d, err := h.lockWriter()
	if err != nil {
		return fmt.Errorf("write: %w", err)
	}
	defer d.mu.Unlock()
	if err := d.write(p, off); err != nil {
		return fmt.Errorf("write disk %s at %d+%d: %w", d.key, off, len(p), err)
	}
	return d.flushIfFull()
}

// ZeroAt makes n bytes at off read as zero. The whole pages in the range are
// cleared at Flush, without buffering any data; the partial pages at its ends
// are written.
func (h *Disk) ZeroAt(off, n int64) error {
	if err := h.d.checkRange(off, n); err != nil {
		return fmt.Errorf("zero disk %s: %w", h.d.key, err)
	}
	if n == 0 {
		return nil
	}
	d, err := h.lockWriter()
	if err != nil {
		return fmt.Errorf("zero: %w", err)
	}
	defer d.mu.Unlock()
	if err := d.zero(off, n); err != nil {
		return fmt.Errorf("zero disk %s at %d+%d: %w", d.key, off, n, err)
	}
	return d.flushIfFull()
}

// write copies p into the buffer. The caller holds mu.
func (d *disk) write(p []byte, off int64) error {
	end, size := off+int64(len(p)), d.size.Load()
	first, last := off/pageSize, (end-1)/pageSize
	// Only the first and last pages can be covered in part; they are read
	// into the buffer before anything changes, so that a failed read leaves
	// the buffer as it was (a page buffered as it is changes nothing). A
	// page covered to the disk's end, past which it is zero, is whole.
	for _, pg := range []int64{first, last} {
		ps := pg * pageSize
		if d.pages[pg] != nil || (max(ps, off) == ps && min(ps+pageSize, end) >= min(ps+pageSize, size)) {
			continue
		}
		buf := new(page)
		if err := d.current(buf, pg); err != nil {
			return err
		}
		d.pages[pg] = buf
	}
	for pg := first; pg <= last; pg++ {
		ps := pg * pageSize
		buf := d.pages[pg]
		if buf == nil {
			buf = new(page)
			d.pages[pg] = buf
		}
		lo, hi := max(ps, off), min(ps+pageSize, end)
		copy(buf[lo-ps:hi-ps], p[lo-off:hi-off])
	}
	return nil
}

// current reads page pg as it is now into buf, which is zero. The caller
// holds mu and has found pg not buffered.
func (d *disk) current(buf *page, pg int64) error {
	if d.cleared(pg) {
		return nil
	}
	return download(d.t.ctx, d.pb, buf[:], pg*pageSize)
}

// cleared reports whether a buffered clear covers page pg.
func (d *disk) cleared(pg int64) bool {
	i := sort.Search(len(d.clears), func(i int) bool { return d.clears[i].hi > pg })
	return i < len(d.clears) && d.clears[i].lo <= pg
}

// zero buffers a zeroed range. The caller holds mu.
func (d *disk) zero(off, n int64) error {
	end, size := off+n, d.size.Load()
	lo, hi := pagesUp(off), end/pageSize
	if end == size {
		hi = pagesUp(end) // the last page is zero past the disk's end
	}
	if lo >= hi {
		return d.write(zeros[:n], off) // no whole page: less than two
	}
	if head := lo*pageSize - off; head > 0 {
		if err := d.write(zeros[:head], off); err != nil {
			return err
		}
	}
	if tail := end - hi*pageSize; tail > 0 {
		if err := d.write(zeros[:tail], hi*pageSize); err != nil {
			return err
		}
	}
	d.clear(lo, hi)
	return nil
}

// clear buffers a clear of pages [lo, hi), which voids the data buffered
// for them. Flush clears before it uploads data, so data buffered later for
// those pages lands on top.
func (d *disk) clear(lo, hi int64) {
	if hi-lo < int64(len(d.pages)) {
		for pg := lo; pg < hi; pg++ {
			delete(d.pages, pg)
		}
	} else {
		for pg := range d.pages {
			if lo <= pg && pg < hi {
				delete(d.pages, pg)
			}
		}
	}
	i := sort.Search(len(d.clears), func(i int) bool { return d.clears[i].hi >= lo })
	j := i
	for ; j < len(d.clears) && d.clears[j].lo <= hi; j++ {
		lo, hi = min(lo, d.clears[j].lo), max(hi, d.clears[j].hi)
	}
	d.clears = slices.Replace(d.clears, i, j, span{lo, hi})
}

func (d *disk) buffered() int64 {
	return int64(len(d.pages))*pageSize + int64(len(d.clears))*clearCost
}

// flushIfFull flushes when the buffer has reached its bound. The caller
// holds mu.
func (d *disk) flushIfFull() error {
	if d.buffered() < d.bufLimit {
		return nil
	}
	if err := d.flushLocked(d.t.ctx); err != nil {
		return fmt.Errorf("flush disk %s: %w", d.key, err)
	}
	return nil
}

// Flush uploads what is buffered: the clears first, then the data, in Put
// Page calls of at most 4 MiB, several at a time. The buffer is kept until
// all succeed, so a failed Flush can be retried.
func (h *Disk) Flush(ctx context.Context) error {
	d, err := h.lockWriter()
	if err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	defer d.mu.Unlock()
	if err := d.flushLocked(ctx); err != nil {
		return fmt.Errorf("flush disk %s: %w", d.key, err)
	}
	return nil
}

// flushLocked does Flush. The caller holds mu.
func (d *disk) flushLocked(ctx context.Context) error {
	if len(d.pages) == 0 && len(d.clears) == 0 {
		return nil
	}
	if err := d.t.checkWrite(); err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(flushParallel)
	for _, s := range d.clears {
		g.Go(func() error {
			r := blob.HTTPRange{Offset: s.lo * pageSize, Count: (s.hi - s.lo) * pageSize}
			if _, err := d.pb.ClearPages(gctx, r, nil); err != nil {
				return fmt.Errorf("clear pages %d+%d: %w", r.Offset, r.Count, azError(err))
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	idx := make([]int64, 0, len(d.pages))
	for pg := range d.pages {
		idx = append(idx, pg)
	}
	slices.Sort(idx)
	g, gctx = errgroup.WithContext(ctx)
	g.SetLimit(flushParallel)
	for len(idx) > 0 {
		// A run of consecutive pages, at most maxPut bytes.
		n := 1
		for n < len(idx) && n < maxPut/pageSize && idx[n] == idx[0]+int64(n) {
			n++
		}
		run := idx[:n]
		idx = idx[n:]
		g.Go(func() error {
			buf := make([]byte, len(run)*pageSize)
			for i, pg := range run {
				copy(buf[i*pageSize:], d.pages[pg][:])
			}
			r := blob.HTTPRange{Offset: run[0] * pageSize, Count: int64(len(buf))}
			if _, err := d.pb.UploadPages(gctx, streaming.NopCloser(bytes.NewReader(buf)), r, nil); err != nil {
				return fmt.Errorf("put pages %d+%d: %w", r.Offset, r.Count, azError(err))
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	clear(d.pages)
	d.clears = nil
	return nil
}

// ReadAt reads the disk's current contents: everything written, flushed or
// not.
func (h *Disk) ReadAt(p []byte, off int64) (int, error) {
	if err := h.d.checkRange(off, int64(len(p))); err != nil {
		return 0, fmt.Errorf("read disk %s: %w", h.d.key, err)
	}
	d, err := h.lock()
	if err != nil {
		return 0, fmt.Errorf("read: %w", err)
	}
	defer d.mu.Unlock()
	if len(p) == 0 {
		return 0, nil
	}
	if err := readPages(d.t.ctx, d.pb, p, off); err != nil {
		return 0, fmt.Errorf("read disk %s at %d+%d: %w", d.key, off, len(p), err)
	}
	// The buffer on top, clears first, as Flush applies it.
	end := off + int64(len(p))
	for _, s := range d.clears {
		lo, hi := max(s.lo*pageSize, off), min(s.hi*pageSize, end)
		if lo < hi {
			clear(p[lo-off : hi-off])
		}
	}
	overlay := func(pg int64, buf *page) {
		ps := pg * pageSize
		if lo, hi := max(ps, off), min(ps+pageSize, end); lo < hi {
			copy(p[lo-off:hi-off], buf[lo-ps:hi-ps])
		}
	}
	if first, last := off/pageSize, (end-1)/pageSize; last-first+1 < int64(len(d.pages)) {
		for pg := first; pg <= last; pg++ {
			if buf := d.pages[pg]; buf != nil {
				overlay(pg, buf)
			}
		}
	} else {
		for pg, buf := range d.pages {
			overlay(pg, buf)
		}
	}
	return len(p), nil
}

// Resize grows the disk to size bytes; the new area reads as zero. The
// snapshots keep their contents and size. Shrinking is refused.
func (h *Disk) Resize(ctx context.Context, size int64) error {
	d, err := h.lockWriter()
	if err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	defer d.mu.Unlock()
	old := d.size.Load()
	if size < old {
		return fmt.Errorf("resize disk %s from %d to %d bytes: %w", d.key, old, size, replication.ErrShrink)
	}
	if size == old {
		return nil
	}
	if size > maxDiskSize {
		return fmt.Errorf("resize disk %s to %d bytes: a page blob holds at most 8 TiB: %w", d.key, size, replication.ErrDiskTooLarge)
	}
	// The blob grows first: a crash before the metadata leaves a blob
	// larger than its disk, which is harmless and grows again next time.
	if pagesUp(size) > pagesUp(old) {
		if _, err := d.pb.Resize(ctx, pagesUp(size)*pageSize, nil); err != nil {
			return fmt.Errorf("resize disk %s: %w", d.key, azError(err))
		}
	}
	d.size.Store(size)
	if err := d.writeMetadata(ctx); err != nil {
		d.size.Store(old)
		return fmt.Errorf("resize disk %s: %w", d.key, err)
	}
	return nil
}

func checkSnapName(name string) error {
	if !validElem(name) || len(name) > maxNameLen {
		return fmt.Errorf("snapshot name %q: %w", name, ErrInvalidKey)
	}
	return nil
}

// visible returns the live snapshot called name. The caller holds smu.
func (d *disk) visible(name string) *snapshot {
	for _, s := range d.snaps {
		if s.name == name {
			return s
		}
	}
	return nil
}

// Snapshot flushes the disk and takes a blob snapshot of it, named name in
// its metadata. A name that exists already is a no-op; a new name must sort
// after every existing one (ErrSnapshotOrder).
func (h *Disk) Snapshot(ctx context.Context, name string) error {
	if err := checkSnapName(name); err != nil {
		return fmt.Errorf("snapshot disk %s: %w", h.d.key, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("snapshot disk %s: %w", h.d.key, err)
	}
	d, err := h.lockWriter()
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	defer d.mu.Unlock()
	d.smu.Lock()
	exists := d.visible(name) != nil
	var after string
	if len(d.snaps) > 0 {
		after = d.snaps[len(d.snaps)-1].name
	}
	d.smu.Unlock()
	if exists {
		return nil
	}
	if after >= name {
		return fmt.Errorf("snapshot %s of disk %s: snapshot %s exists: %w", name, d.key, after, ErrSnapshotOrder)
	}
	if err := d.flushLocked(ctx); err != nil {
		return fmt.Errorf("snapshot %s of disk %s: %w", name, d.key, err)
	}
	meta := map[string]*string{
		metaVersion: to.Ptr(diskVersion),
		metaSize:    to.Ptr(strconv.FormatInt(d.size.Load(), 10)),
		metaSnap:    to.Ptr(name),
	}
	_, cerr := d.pb.CreateSnapshot(ctx, &blob.CreateSnapshotOptions{Metadata: meta})
	// Whatever the answer, the service may hold the snapshot, or two of it
	// (a create retried after its answer was lost): the listing tells.
	listed, err := d.listSnapshots(ctx)
	if err == nil {
		err = d.adopt(ctx, listed)
	}
	if err != nil {
		return fmt.Errorf("snapshot %s of disk %s: %w", name, d.key, errors.Join(azError(cerr), err))
	}
	d.smu.Lock()
	exists = d.visible(name) != nil
	d.smu.Unlock()
	switch {
	case exists:
		return nil
	case cerr != nil:
		return fmt.Errorf("snapshot %s of disk %s: %w", name, d.key, azError(cerr))
	default:
		return fmt.Errorf("snapshot %s of disk %s: created, but not listed", name, d.key)
	}
}

// Snapshots lists the disk's snapshots in name order.
func (h *Disk) Snapshots(ctx context.Context) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list snapshots of disk %s: %w", h.d.key, err)
	}
	if h.closed.Load() {
		return nil, fmt.Errorf("list snapshots of disk %s: %w", h.d.key, ErrClosed)
	}
	d := h.d
	d.smu.Lock()
	defer d.smu.Unlock()
	if d.closed.Load() {
		return nil, fmt.Errorf("list snapshots of disk %s: %w", d.key, ErrClosed)
	}
	names := make([]string, len(d.snaps))
	for i, s := range d.snaps {
		names[i] = s.name
	}
	return names, nil
}

// DeleteSnapshot deletes snapshot name; a missing one is nil. While readers
// of it are open, it only leaves the listing, and its ID is recorded in the
// page blob's metadata; the blob snapshot is deleted when the last reader
// closes, or, after a crash, when the disk is next opened.
func (h *Disk) DeleteSnapshot(ctx context.Context, name string) error {
	if err := checkSnapName(name); err != nil {
		return fmt.Errorf("delete snapshot of disk %s: %w", h.d.key, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete snapshot %s of disk %s: %w", name, h.d.key, err)
	}
	d, err := h.lockWriter()
	if err != nil {
		return fmt.Errorf("delete snapshot: %w", err)
	}
	defer d.mu.Unlock()
	d.smu.Lock()
	s := d.visible(name)
	if s == nil {
		d.smu.Unlock()
		return nil
	}
	// Out of the listing at once, so no reader can open it from now on.
	d.snaps = slices.DeleteFunc(d.snaps, func(x *snapshot) bool { return x == s })
	readers := s.refs > 0
	if readers {
		s.deleted = true
		d.held = append(d.held, s)
	}
	d.smu.Unlock()
	if readers {
		err = d.writeMetadata(ctx)
	} else {
		err = d.deleteSnapshot(ctx, s)
	}
	if err != nil {
		d.smu.Lock()
		d.held = slices.DeleteFunc(d.held, func(x *snapshot) bool { return x == s })
		s.deleted = false
		d.snaps = append(d.snaps, s)
		slices.SortFunc(d.snaps, func(a, b *snapshot) int { return strings.Compare(a.name, b.name) })
		d.smu.Unlock()
		return fmt.Errorf("delete snapshot %s of disk %s: %w", name, d.key, err)
	}
	return nil
}

// OpenSnapshot returns a reader of snapshot name, or an error wrapping
// replication.ErrNotFound. The reader stays valid until closed, whatever is
// written, snapshotted or deleted meanwhile, until the disk closes.
func (h *Disk) OpenSnapshot(ctx context.Context, name string) (replication.SnapshotReader, error) {
	if err := checkSnapName(name); err != nil {
		return nil, fmt.Errorf("open snapshot of disk %s: %w", h.d.key, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, h.d.key, err)
	}
	if h.closed.Load() {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, h.d.key, ErrClosed)
	}
	d := h.d
	d.smu.Lock()
	defer d.smu.Unlock()
	if d.closed.Load() {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, d.key, ErrClosed)
	}
	s := d.visible(name)
	if s == nil {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, d.key, replication.ErrNotFound)
	}
	pb, err := d.pb.WithSnapshot(s.id)
	if err != nil {
		return nil, fmt.Errorf("open snapshot %s of disk %s: %w", name, d.key, err)
	}
	s.refs++
	return &snapshotReader{d: d, s: s, pb: pb}, nil
}

// Close flushes the disk and releases the handle; the last handle closes the
// disk, after which its snapshot readers fail.
func (h *Disk) Close() error {
	if !h.closed.CompareAndSwap(false, true) {
		return nil
	}
	d, t := h.d, h.d.t
	t.mu.Lock()
	defer t.mu.Unlock()
	d.handles--
	if d.handles > 0 {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.closed.Load() {
			return nil
		}
		if err := d.flushLocked(t.ctx); err != nil {
			return fmt.Errorf("close disk %s: %w", d.key, err)
		}
		return nil
	}
	if t.disks[d.key] == d {
		delete(t.disks, d.key)
	}
	if err := d.close(t.ctx); err != nil {
		return fmt.Errorf("close disk %s: %w", d.key, err)
	}
	return nil
}

// close flushes the disk, marks it closed, which ends its readers, and
// deletes the snapshots they held.
func (d *disk) close(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed.Load() {
		return nil
	}
	err := d.flushLocked(ctx)
	d.smu.Lock()
	d.closed.Store(true)
	d.smu.Unlock()
	return errors.Join(err, d.gcLocked(ctx))
}

// snapshotReader reads one blob snapshot of a disk. It holds a reference on
// the snapshot, which keeps the blob snapshot even if it is deleted.
type snapshotReader struct {
	d      *disk
	s      *snapshot
	pb     *pageblob.Client // the snapshot's
	closed atomic.Bool
}

var _ replication.SnapshotReader = (*snapshotReader)(nil)

// Size returns the disk's size when the snapshot was taken.
func (r *snapshotReader) Size() int64 { return r.s.size }

// ReadAt reads len(p) bytes of the snapshot at off. Like any io.ReaderAt, it
// returns io.EOF with fewer bytes only at the end of the disk.
func (r *snapshotReader) ReadAt(p []byte, off int64) (int, error) {
	if r.closed.Load() || r.d.closed.Load() {
		return 0, fmt.Errorf("read snapshot %s of disk %s: %w", r.s.name, r.d.key, ErrClosed)
	}
	if off < 0 {
		return 0, fmt.Errorf("read snapshot %s of disk %s: negative offset %d", r.s.name, r.d.key, off)
	}
	size := r.s.size
	if off >= size {
		return 0, io.EOF
	}
	n, eof := len(p), false
	if int64(n) > size-off {
		n, eof = int(size-off), true
	}
	if n == 0 {
		return 0, nil
	}
	if err := readPages(r.d.t.ctx, r.pb, p[:n], off); err != nil {
		return 0, fmt.Errorf("read snapshot %s of disk %s at %d+%d: %w", r.s.name, r.d.key, off, n, err)
	}
	if eof {
		return n, io.EOF
	}
	return n, nil
}

// Close releases the reader. If its snapshot was deleted and this was the
// last reader, the blob snapshot is deleted now.
func (r *snapshotReader) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	d := r.d
	d.smu.Lock()
	r.s.refs--
	gc := r.s.refs == 0 && r.s.deleted && !d.closed.Load()
	d.smu.Unlock()
	if !gc {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed.Load() {
		return nil
	}
	if err := d.gcLocked(d.t.ctx); err != nil {
		return fmt.Errorf("close snapshot reader of disk %s: %w", d.key, err)
	}
	return nil
}

// readPages fills p from off of a page blob (or snapshot). A large read asks
// for the written page ranges first and downloads only those: the rest of a
// page blob is zeros.
func readPages(ctx context.Context, pb *pageblob.Client, p []byte, off int64) error {
	if len(p) <= smallRead {
		return download(ctx, pb, p, off)
	}
	end := off + int64(len(p))
	first := off / pageSize * pageSize
	pager := pb.NewGetPageRangesPager(&pageblob.GetPageRangesOptions{
		Range: blob.HTTPRange{Offset: first, Count: pagesUp(end)*pageSize - first},
	})
	clear(p)
	for pager.More() {
		resp, err := pager.NextPage(ctx)
		if err != nil {
			return fmt.Errorf("get page ranges: %w", azError(err))
		}
		for _, r := range resp.PageRange {
			if r.Start == nil || r.End == nil {
				continue
			}
			lo, hi := max(*r.Start, off), min(*r.End+1, end)
			if lo >= hi {
				continue
			}
			if err := download(ctx, pb, p[lo-off:hi-off], lo); err != nil {
				return err
			}
		}
	}
	return nil
}

// download fills p from off with ranged downloads of at most maxGet bytes.
func download(ctx context.Context, pb *pageblob.Client, p []byte, off int64) error {
	for len(p) > 0 {
		n := min(len(p), maxGet)
		resp, err := pb.DownloadStream(ctx, &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: off, Count: int64(n)}})
		if err != nil {
			return fmt.Errorf("download %d+%d: %w", off, n, azError(err))
		}
		body := resp.NewRetryReader(ctx, &blob.RetryReaderOptions{MaxRetries: 5})
		_, err = io.ReadFull(body, p[:n])
		body.Close()
		if err != nil {
			return fmt.Errorf("download %d+%d: %w", off, n, azError(err))
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}
