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

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
	"golang.org/x/sync/errgroup"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/diskcore"
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
	// clearCost is what a buffered clear counts in Buffered.
	clearCost = 64
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

// bufferLimit bounds the bytes buffered before WriteAt or ZeroAt flushes;
// tests lower it.
var bufferLimit int64 = diskcore.DefaultBufferLimit

// zeros is a source of zero bytes for the unaligned ends of a zeroed range,
// which are less than a page each.
var zeros [2 * pageSize]byte

// page is one page of buffered data.
type page [pageSize]byte

// span is a range of pages [lo, hi) to clear.
type span struct{ lo, hi int64 }

// snapshot is a blob snapshot of a disk: its ref in diskcore.
type snapshot struct {
	name string // asrsnap
	id   string // the service's snapshot timestamp
	size int64  // the disk's size when it was taken
}

// disk is the storage of an open replica disk: diskcore.Disk. diskcore
// calls its methods one at a time, but OpenSnapshot, which touches none of
// its state.
type disk struct {
	t    *Target
	key  string
	pb   *pageblob.Client
	size int64

	pages  map[int64]*page // buffered data by page index
	clears []span          // buffered clears: sorted, disjoint, not adjacent

	// held are the snapshots deleted while readers held them, recorded in
	// the page blob's metadata; hidden has the IDs of every deleted snapshot
	// not gone yet, which the listing of a new snapshot passes over.
	held   []*snapshot
	hidden map[string]bool
}

var _ diskcore.Disk = (*disk)(nil)

// diskStorage is the container's page blobs as diskcore.Storage.
type diskStorage struct{ t *Target }

// DeleteDisk removes the page blob at key with its snapshots; a missing one
// is nil.
func (s diskStorage) DeleteDisk(ctx context.Context, key string) error {
	ctx, cancel := s.t.leaseBound(ctx, key)
	defer cancel()
	_, err := s.t.cc.NewBlobClient(disksPrefix+key).Delete(ctx, &blob.DeleteOptions{DeleteSnapshots: to.Ptr(blob.DeleteSnapshotsOptionTypeInclude)})
	if err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		return azError(err)
	}
	return nil
}

// LoadDisk reads (or creates) a disk's page blob and lists its snapshots.
// Those whose deletion a crash interrupted go to diskcore, which deletes
// them.
func (s diskStorage) LoadDisk(ctx context.Context, key string, size int64) (diskcore.Loaded, error) {
	t := s.t
	if size > maxDiskSize {
		return diskcore.Loaded{}, fmt.Errorf("size %d is more than 8 TiB, the most a page blob holds: %w", size, replication.ErrDiskTooLarge)
	}
	d := &disk{t: t, key: key, pb: t.cc.NewPageBlobClient(disksPrefix + key), pages: map[int64]*page{}, hidden: map[string]bool{}}
	var props blob.GetPropertiesResponse
	for created := false; ; created = true {
		var err error
		props, err = d.pb.GetProperties(ctx, nil)
		if err == nil {
			break
		}
		if !bloberror.HasCode(err, bloberror.BlobNotFound) {
			return diskcore.Loaded{}, azError(err)
		}
		if size == 0 {
			return diskcore.Loaded{}, replication.ErrNotFound
		}
		if err := t.checkWrite(key); err != nil {
			return diskcore.Loaded{}, err
		}
		d.size = size
		cctx, cancel := t.leaseBound(ctx, key)
		_, err = d.pb.Create(cctx, pagesUp(size)*pageSize, &pageblob.CreateOptions{
			Metadata:         d.metadata(),
			AccessConditions: &blob.AccessConditions{ModifiedAccessConditions: &blob.ModifiedAccessConditions{IfNoneMatch: to.Ptr(azcore.ETagAny)}},
		})
		cancel()
		if err == nil {
			return diskcore.Loaded{Disk: d, Size: size}, nil
		}
		// Made by a retried request whose answer was lost: read it back.
		if created || !bloberror.HasCode(err, bloberror.BlobAlreadyExists) {
			return diskcore.Loaded{}, fmt.Errorf("create page blob: %w", azError(err))
		}
	}
	if v, _ := getMeta(props.Metadata, metaVersion); v != diskVersion {
		return diskcore.Loaded{}, fmt.Errorf("page blob %s%s: disk format version %q not supported (this build reads %s): %w", disksPrefix, key, v, diskVersion, replication.ErrCorrupt)
	}
	logical, err := metaInt(props.Metadata, metaSize)
	if err != nil || props.ContentLength == nil || *props.ContentLength < pagesUp(logical)*pageSize {
		return diskcore.Loaded{}, fmt.Errorf("page blob %s%s: no valid %s metadata for its size: %w", disksPrefix, key, metaSize, replication.ErrCorrupt)
	}
	if err := diskcore.CheckSize(size, logical); err != nil {
		return diskcore.Loaded{}, err
	}
	d.size = logical
	listed, err := d.listSnapshots(ctx)
	if err != nil {
		return diskcore.Loaded{}, err
	}
	heldIDs := map[string]bool{}
	if v, ok := getMeta(props.Metadata, metaHeld); ok && v != "" {
		for id := range strings.SplitSeq(v, ",") {
			heldIDs[id] = true
		}
	}
	l := diskcore.Loaded{Disk: d, Size: logical}
	for _, s := range listed {
		if heldIDs[s.id] {
			d.held = append(d.held, s)
			d.hidden[s.id] = true
			l.Add(s.name, s, true)
		}
	}
	live, err := d.adopt(ctx, listed, "")
	if err != nil {
		return diskcore.Loaded{}, err
	}
	for _, s := range live {
		l.Add(s.name, s, false)
	}
	if len(d.held) == 0 && len(heldIDs) > 0 {
		// Deleted already, but still recorded.
		if err := d.writeMetadata(ctx); err != nil {
			t.log.Warn("forgetting deleted snapshots", "disk", key, "err", err)
		}
	}
	return l, nil
}

// metadata is the page blob's metadata for the disk's current state.
func (d *disk) metadata() map[string]*string {
	m := map[string]*string{
		metaVersion: to.Ptr(diskVersion),
		metaSize:    to.Ptr(strconv.FormatInt(d.size, 10)),
	}
	if len(d.held) > 0 {
		ids := make([]string, len(d.held))
		for i, s := range d.held {
			ids[i] = s.id
		}
		m[metaHeld] = to.Ptr(strings.Join(ids, ","))
	}
	return m
}

// writeMetadata stores metadata().
func (d *disk) writeMetadata(ctx context.Context) error {
	ctx, cancel := d.t.leaseBound(ctx, d.key)
	defer cancel()
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
			if !ok || replication.CheckSnapshotName(snap) != nil {
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

// adopt returns the live snapshots among those the service listed (or only
// those called name, if name is set), in name order: one per name, the
// oldest, passing the deleted ones over. Another snapshot of the same name
// (a create retried after its answer was lost) is the same contents; it is
// deleted.
func (d *disk) adopt(ctx context.Context, listed []*snapshot, name string) ([]*snapshot, error) {
	keep := map[string]*snapshot{}
	var live, extra []*snapshot
	for _, s := range listed { // oldest first
		switch {
		case d.hidden[s.id] || name != "" && s.name != name:
		case keep[s.name] == nil:
			keep[s.name] = s
			live = append(live, s)
		default:
			extra = append(extra, s)
		}
	}
	for _, s := range extra {
		if err := d.deleteSnapshot(ctx, s); err != nil {
			return nil, err
		}
	}
	slices.SortFunc(live, func(a, b *snapshot) int { return strings.Compare(a.name, b.name) })
	return live, nil
}

// deleteSnapshot deletes a blob snapshot; a missing one is fine.
func (d *disk) deleteSnapshot(ctx context.Context, s *snapshot) error {
	bc, err := d.pb.BlobClient().WithSnapshot(s.id)
	if err != nil {
		return fmt.Errorf("snapshot %s (%s): %w", s.name, s.id, err)
	}
	ctx, cancel := d.t.leaseBound(ctx, d.key)
	defer cancel()
	if _, err := bc.Delete(ctx, nil); err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		return fmt.Errorf("delete snapshot %s (%s): %w", s.name, s.id, azError(err))
	}
	return nil
}

// pagesUp is the number of pages n bytes take.
func pagesUp(n int64) int64 { return (n + pageSize - 1) / pageSize }

// Write buffers p for off; Flush uploads it. A page p covers only in part
// is read first, unless buffered or cleared already.
func (d *disk) Write(p []byte, off int64) error { return d.write(p, off) }

// Zero buffers a zeroed range: the whole pages in it are cleared at Flush,
// without buffering any data; the partial pages at its ends are written.
func (d *disk) Zero(off, n int64) error { return d.zero(off, n) }

// Buffered is the bytes of pages buffered, a clear counting clearCost.
func (d *disk) Buffered() int64 { return d.buffered() }

// write copies p into the buffer.
func (d *disk) write(p []byte, off int64) error {
	end, size := off+int64(len(p)), d.size
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
// has found pg not buffered.
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

// zero buffers a zeroed range.
func (d *disk) zero(off, n int64) error {
	end, size := off+n, d.size
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

// Flush uploads what is buffered: the clears first, then the data, in Put
// Page calls of at most 4 MiB, several at a time. The buffer is kept until
// all succeed, so a failed Flush can be retried.
func (d *disk) Flush(ctx context.Context) error { return d.flushLocked(ctx) }

// flushLocked does Flush.
func (d *disk) flushLocked(ctx context.Context) error {
	if len(d.pages) == 0 && len(d.clears) == 0 {
		return nil
	}
	if err := d.t.checkWrite(d.key); err != nil {
		return err
	}
	ctx, cancel := d.t.leaseBound(ctx, d.key)
	defer cancel()
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

// ReadAt reads the disk's current contents: the page blob, the buffer on
// top.
func (d *disk) ReadAt(p []byte, off int64) error {
	if err := readPages(d.t.ctx, d.pb, p, off); err != nil {
		return err
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
	return nil
}

// Resize grows the page blob if it must, and records the new size in its
// metadata. The snapshots keep their contents and size.
func (d *disk) Resize(ctx context.Context, size int64) error {
	if size > maxDiskSize {
		return fmt.Errorf("to %d bytes: a page blob holds at most 8 TiB: %w", size, replication.ErrDiskTooLarge)
	}
	old := d.size
	// The blob grows first: a crash before the metadata leaves a blob
	// larger than its disk, which is harmless and grows again next time.
	if pagesUp(size) > pagesUp(old) {
		rctx, cancel := d.t.leaseBound(ctx, d.key)
		_, err := d.pb.Resize(rctx, pagesUp(size)*pageSize, nil)
		cancel()
		if err != nil {
			return azError(err)
		}
	}
	d.size = size
	if err := d.writeMetadata(ctx); err != nil {
		d.size = old
		return err
	}
	return nil
}

// Snapshot takes a blob snapshot of the page blob, named name in its
// metadata. diskcore has flushed the disk.
func (d *disk) Snapshot(ctx context.Context, name string) (any, error) {
	meta := map[string]*string{
		metaVersion: to.Ptr(diskVersion),
		metaSize:    to.Ptr(strconv.FormatInt(d.size, 10)),
		metaSnap:    to.Ptr(name),
	}
	cctx, cancel := d.t.leaseBound(ctx, d.key)
	_, cerr := d.pb.CreateSnapshot(cctx, &blob.CreateSnapshotOptions{Metadata: meta})
	cancel()
	// Whatever the answer, the service may hold the snapshot, or two of it
	// (a create retried after its answer was lost): the listing tells.
	listed, err := d.listSnapshots(ctx)
	var live []*snapshot
	if err == nil {
		live, err = d.adopt(ctx, listed, name)
	}
	switch {
	case err != nil:
		return nil, errors.Join(azError(cerr), err)
	case len(live) > 0:
		return live[0], nil
	case cerr != nil:
		return nil, azError(cerr)
	}
	return nil, errors.New("created, but not listed")
}

// HideSnapshot passes the snapshot over in the listings from now on; if
// readers hold it, its ID is recorded in the page blob's metadata, so that
// a crash before its deletion leaves it deleted.
func (d *disk) HideSnapshot(ctx context.Context, ref any, held bool) error {
	s := ref.(*snapshot)
	d.hidden[s.id] = true
	if !held {
		return nil
	}
	d.held = append(d.held, s)
	if err := d.writeMetadata(ctx); err != nil {
		d.held = slices.DeleteFunc(d.held, func(x *snapshot) bool { return x == s })
		delete(d.hidden, s.id)
		return err
	}
	return nil
}

// DropSnapshot deletes the blob snapshot, and its ID from the metadata if
// it was recorded there.
func (d *disk) DropSnapshot(ctx context.Context, ref any) error {
	s := ref.(*snapshot)
	d.hidden[s.id] = true
	if err := d.deleteSnapshot(ctx, s); err != nil {
		return err
	}
	delete(d.hidden, s.id)
	if !slices.Contains(d.held, s) {
		return nil
	}
	d.held = slices.DeleteFunc(d.held, func(x *snapshot) bool { return x == s })
	// A metadata write that fails leaves the ID of a deleted snapshot
	// listed, which the next open ignores.
	return d.writeMetadata(ctx)
}

// OpenSnapshot returns a reader of the blob snapshot.
func (d *disk) OpenSnapshot(ref any) (diskcore.Reader, error) {
	s := ref.(*snapshot)
	pb, err := d.pb.WithSnapshot(s.id)
	if err != nil {
		return nil, err
	}
	return &snapshotReader{d: d, s: s, pb: pb}, nil
}

// Close deletes the snapshots deleted but held (their readers are done) and
// records that in the metadata.
func (d *disk) Close(ctx context.Context, held []any) error {
	if len(held) == 0 {
		return nil
	}
	if err := d.t.checkWrite(d.key); err != nil {
		return err
	}
	var errs []error
	recorded := false
	for _, ref := range held {
		s := ref.(*snapshot)
		if err := d.deleteSnapshot(ctx, s); err != nil {
			errs = append(errs, err)
			continue
		}
		recorded = recorded || slices.Contains(d.held, s)
		d.held = slices.DeleteFunc(d.held, func(x *snapshot) bool { return x == s })
	}
	if recorded {
		// If this fails, the next open ignores the IDs of deleted snapshots.
		errs = append(errs, d.writeMetadata(ctx))
	}
	return errors.Join(errs...)
}

// snapshotReader reads one blob snapshot of a disk (diskcore.Reader).
type snapshotReader struct {
	d  *disk
	s  *snapshot
	pb *pageblob.Client // the snapshot's
}

// Size returns the disk's size when the snapshot was taken.
func (r *snapshotReader) Size() int64 { return r.s.size }

// ReadAt fills p from off, inside the snapshot.
func (r *snapshotReader) ReadAt(p []byte, off int64) (int, error) {
	if err := readPages(r.d.t.ctx, r.pb, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
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
