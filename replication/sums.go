package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// Block checksums ("sums"). Beside every replica disk the applier keeps, on
// the target, a sum disk: a ReplicaDisk of 16 bytes per 4 KiB block of the
// replica holding the block's hash (SHA-256, 128 bits), or 16 zero bytes
// for a block that reads as zeros, so a fresh, sparse sum disk describes a
// fresh, sparse replica. The applier writes the sums as it applies records
// (whole blocks are hashed from the record data; blocks written in part are
// read back once per segment) and snapshots the sum disk with the replica
// at every recovery point, under the same name, so every point carries the
// checksums of its own blocks. Then:
//
//   - recovery, through the server or straight from the target, checks
//     every block it reads against them and fails loudly on damage (bit rot
//     in the replica or in a snapshot's saved blocks), naming the disk, the
//     offset and the points that share the damaged block;
//   - a resync compares the source's hashes with them instead of reading
//     the replica back;
//   - a scrub reads the replica (and each point's own blocks) and compares.
//
// The sums live on the target, not in the process server's memory, which
// keeps only a small cache of sum pages per disk: protecting more capacity
// costs the server no memory.

// SumEntrySize is the size of one block's entry on a sum disk.
const SumEntrySize = 16

// sumPageSize is what the sum cache reads and writes at a time: the entries
// of one chunk (256 blocks, 1 MiB of the replica).
const sumPageSize = HashFanout * SumEntrySize

// sumCachePages bounds the sum pages a disk keeps in memory (256 KiB).
const sumCachePages = 64

// ErrDiskTooLarge is returned (wrapped) for a disk larger than asr or the
// target supports.
var ErrDiskTooLarge = errors.New("disk too large")

// ErrDamaged is matched (errors.Is) by a DamageError.
var ErrDamaged = errors.New("replica damaged")

// damagedEntry marks a block a scrub found damaged: it matches no data, so
// recovery fails on it and a resync compare asks the source for it again.
var damagedEntry = Hash{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// SumKey is the target key of a replica disk's sum disk.
func SumKey(machineID string, index uint32) string {
	return DiskKey(machineID, index) + ".sums"
}

// SumSize is the size of the sum disk of a replica disk of size bytes.
func SumSize(size int64) int64 {
	return (size + HashBlock - 1) / HashBlock * SumEntrySize
}

// BlockEntry returns the sum entry of a block's contents: zeros for a block
// of zeros, else its hash (never one of the two marker values).
func BlockEntry(b []byte) Hash {
	if isZero(b) {
		return Hash{}
	}
	h := HashData(b)
	if h == (Hash{}) || h == damagedEntry {
		h[0] ^= 1 // a 2^-128 chance; keeps the markers unambiguous
	}
	return h
}

// leafOf turns a sum entry into the block hash a resync compares with the
// source's (which hashes zeros like any data).
func leafOf(e Hash, blockLen int64) Hash {
	if e == (Hash{}) {
		return zeroHash(blockLen)
	}
	return e
}

// Sums is an open sum disk: the block checksums of one replica disk. It is
// used by the disk's applier; its methods are safe for concurrent use (a
// resync compare reads while the applier writes).
type Sums struct {
	rd ReplicaDisk

	mu      sync.Mutex
	size    int64 // bytes of the replica disk
	pages   map[int64]*sumPage
	tick    uint64
	partial map[int64]struct{} // blocks written in part since the last Settle
}

type sumPage struct {
	b     []byte
	dirty bool
	used  uint64
}

// OpenSums opens (creating it if missing) the sum disk at key for a replica
// disk of size bytes. created reports a new, all-zero sum disk.
func OpenSums(ctx context.Context, t Target, key string, size int64) (s *Sums, created bool, err error) {
	if size <= 0 {
		return nil, false, fmt.Errorf("sums %s: disk size %d", key, size)
	}
	rd, err := t.OpenDisk(ctx, key, 0)
	switch {
	case errors.Is(err, ErrNotFound):
		rd, err = t.OpenDisk(ctx, key, SumSize(size))
		created = true
	case err == nil && rd.Size() != SumSize(size):
		got := rd.Size()
		rd.Close()
		return nil, false, fmt.Errorf("sums %s: %d bytes, want %d for a disk of %d: %w", key, got, SumSize(size), size, ErrCorrupt)
	}
	if err != nil {
		return nil, false, fmt.Errorf("open sums %s: %w", key, err)
	}
	return NewSums(rd, size), created, nil
}

// NewSums uses an open sum disk as the checksums of a replica disk of size
// bytes (for reading an existing one without creating anything).
func NewSums(rd ReplicaDisk, size int64) *Sums {
	return &Sums{rd: rd, size: size, pages: map[int64]*sumPage{}, partial: map[int64]struct{}{}}
}

// Disk returns the sum disk (for snapshot readers).
func (s *Sums) Disk() ReplicaDisk { return s.rd }

func (s *Sums) blocks() int64 { return (s.size + HashBlock - 1) / HashBlock }

func (s *Sums) blockLen(b int64) int64 { return min(int64(HashBlock), s.size-b*HashBlock) }

// pageLocked returns page c, reading it if it is not cached and evicting
// the least recently used page (written out if dirty) above the bound.
func (s *Sums) pageLocked(c int64) (*sumPage, error) {
	s.tick++
	if p, ok := s.pages[c]; ok {
		p.used = s.tick
		return p, nil
	}
	off := c * sumPageSize
	n := min(int64(sumPageSize), SumSize(s.size)-off)
	if n <= 0 {
		return nil, fmt.Errorf("sum page %d past the end: %w", c, ErrCorrupt)
	}
	if len(s.pages) >= sumCachePages {
		if err := s.evictLocked(); err != nil {
			return nil, err
		}
	}
	p := &sumPage{b: make([]byte, n), used: s.tick}
	if err := ReadFull(s.rd)(p.b, off); err != nil {
		return nil, fmt.Errorf("read sums at %d: %w", off, err)
	}
	s.pages[c] = p
	return p, nil
}

func (s *Sums) evictLocked() error {
	var victim int64 = -1
	var oldest uint64
	for c, p := range s.pages {
		if victim < 0 || p.used < oldest {
			victim, oldest = c, p.used
		}
	}
	p := s.pages[victim]
	if p.dirty {
		if err := s.rd.WriteAt(p.b, victim*sumPageSize); err != nil {
			return fmt.Errorf("write sums: %w", err)
		}
	}
	delete(s.pages, victim)
	return nil
}

func (s *Sums) setLocked(b int64, e Hash) error {
	p, err := s.pageLocked(b / HashFanout)
	if err != nil {
		return err
	}
	i := (b % HashFanout) * SumEntrySize
	if Hash(p.b[i:i+SumEntrySize]) != e {
		copy(p.b[i:], e[:])
		p.dirty = true
	}
	return nil
}

// Note records that data was written at off: whole blocks get their entry
// from the data; blocks written in part are hashed at the next Settle.
func (s *Sums) Note(off int64, data []byte) error {
	return s.NoteEntries(off, data, BlockEntries{})
}

// BlockEntries are the checksum entries of a write's whole 4 KiB blocks,
// computed ahead of Note (the applier hashes a segment's writes in
// parallel, before it takes them in log order): e[i] is block first+i.
type BlockEntries struct {
	first int64
	e     []Hash
}

// EntriesOf hashes the whole 4 KiB blocks of data written at off (a
// disk's short last block, if any, is left to NoteEntries).
func EntriesOf(off int64, data []byte) BlockEntries {
	b := (off + HashBlock - 1) / HashBlock
	end := off + int64(len(data))
	be := BlockEntries{first: b, e: make([]Hash, 0, max(0, end/HashBlock-b))}
	for ; (b+1)*HashBlock <= end; b++ {
		be.e = append(be.e, BlockEntry(data[b*HashBlock-off:(b+1)*HashBlock-off]))
	}
	return be
}

// fits reports whether be can be EntriesOf(off, data) for n bytes of data
// (hashed), or the zero BlockEntries (not hashed): its first block and
// count. (Whether each checksum is of that data is not checked: that
// would hash it again.)
func (be BlockEntries) fits(off int64, n int, hashed bool) bool {
	if !hashed {
		return be.e == nil && be.first == 0
	}
	first := (off + HashBlock - 1) / HashBlock
	return be.first == first && int64(len(be.e)) == max(0, (off+int64(n))/HashBlock-first)
}

// NoteEntries is Note with the whole blocks' entries given (be is
// EntriesOf(off, data)); a block be does not hold is hashed here.
func (s *Sums) NoteEntries(off int64, data []byte, be BlockEntries) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.noteLocked(off, int64(len(data)), func(b0, b1 int64) Hash {
		if i := b0/HashBlock - be.first; b1-b0 == HashBlock && i >= 0 && i < int64(len(be.e)) {
			return be.e[i]
		}
		return BlockEntry(data[b0-off : b1-off])
	})
}

// NoteZero records that n bytes at off now read as zero.
func (s *Sums) NoteZero(off, n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.noteLocked(off, n, func(int64, int64) Hash { return Hash{} })
}

func (s *Sums) noteLocked(off, n int64, whole func(b0, b1 int64) Hash) error {
	end := min(off+n, s.size)
	for b := off / HashBlock; b*HashBlock < end; b++ {
		b0, b1 := b*HashBlock, b*HashBlock+s.blockLen(b)
		if b0 >= off && b1 <= end {
			if err := s.setLocked(b, whole(b0, b1)); err != nil {
				return err
			}
		} else {
			s.partial[b] = struct{}{}
		}
	}
	return nil
}

// Settle hashes the blocks written in part since the last Settle, reading
// them from the replica's current contents (read). The applier calls it
// after flushing the replica, before the sums are flushed or snapshotted.
func (s *Sums) Settle(read func(p []byte, off int64) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.partial) == 0 {
		return nil
	}
	blocks := make([]int64, 0, len(s.partial))
	for b := range s.partial {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	buf := make([]byte, HashBlock)
	for _, b := range blocks {
		if b >= s.blocks() {
			continue
		}
		p := buf[:s.blockLen(b)]
		if err := read(p, b*HashBlock); err != nil {
			return fmt.Errorf("read block at %d for its checksum: %w", b*HashBlock, err)
		}
		if err := s.setLocked(b, BlockEntry(p)); err != nil {
			return err
		}
	}
	clear(s.partial)
	return nil
}

// Flush writes the changed sum pages and flushes the sum disk. Blocks
// written in part must have been settled.
func (s *Sums) Flush(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.partial) > 0 {
		return errors.New("sums: flush with unsettled blocks")
	}
	idx := make([]int64, 0, len(s.pages))
	for c, p := range s.pages {
		if p.dirty {
			idx = append(idx, c)
		}
	}
	slices.Sort(idx)
	for _, c := range idx {
		p := s.pages[c]
		if err := s.rd.WriteAt(p.b, c*sumPageSize); err != nil {
			return fmt.Errorf("write sums: %w", err)
		}
		p.dirty = false
	}
	return s.rd.Flush(ctx)
}

// Entries returns the raw entries of chunk c (256 blocks, fewer at the end).
func (s *Sums) Entries(c int64) ([]Hash, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.pageLocked(c)
	if err != nil {
		return nil, err
	}
	out := make([]Hash, len(p.b)/SumEntrySize)
	for i := range out {
		out[i] = Hash(p.b[i*SumEntrySize:])
	}
	return out, nil
}

// Chunk returns the hash of chunk c of the replica and its block hashes, as
// a resync compares them with the source's.
func (s *Sums) Chunk(c int64) (Hash, []Hash, error) {
	es, err := s.Entries(c)
	if err != nil {
		return Hash{}, nil, err
	}
	s.mu.Lock()
	for i := range es {
		es[i] = leafOf(es[i], s.blockLen(c*HashFanout+int64(i)))
	}
	s.mu.Unlock()
	return ChunkHash(es), es, nil
}

// MarkDamaged records that block b of the replica does not match its
// checksum: recovery fails on it and a resync compare asks the source for
// it again (which rewrites the block and its entry).
func (s *Sums) MarkDamaged(b int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.setLocked(b, damagedEntry)
}

// Resize grows the sums with their disk: the new area is zero, and a last
// block that was short is hashed again at the next Settle.
func (s *Sums) Resize(ctx context.Context, size int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if size <= s.size {
		return nil
	}
	for c, p := range s.pages {
		if p.dirty {
			if err := s.rd.WriteAt(p.b, c*sumPageSize); err != nil {
				return fmt.Errorf("write sums: %w", err)
			}
		}
	}
	clear(s.pages) // the last page's length changes
	if err := s.rd.Resize(ctx, SumSize(size)); err != nil {
		return fmt.Errorf("grow sums: %w", err)
	}
	if s.size%HashBlock != 0 {
		s.partial[s.size/HashBlock] = struct{}{}
	}
	s.size = size
	return nil
}

// Clear makes every entry zero (the replica was zeroed whole), with one
// ZeroAt of the sum disk, which targets do without touching what is zero
// already.
func (s *Sums) Clear(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.pages)
	clear(s.partial)
	if err := s.rd.ZeroAt(0, s.rd.Size()); err != nil {
		return fmt.Errorf("clear sums: %w", err)
	}
	return s.rd.Flush(ctx)
}

// Close closes the sum disk (unflushed pages are dropped: the applier
// flushes at every checkpoint, and re-applies after it).
func (s *Sums) Close() error { return s.rd.Close() }

// DamageError reports a block of a replica disk whose contents do not
// match its checksum.
type DamageError struct {
	Disk   string
	Point  string // point id; "" for the replica's current contents
	Offset int64  // first byte of the damaged 4 KiB block
	// Also lists the other points (and "current" for the replica's current
	// contents) whose copy of the block is damaged too, when known.
	Also []string
}

func (e *DamageError) Error() string {
	where := "the replica's current contents"
	if e.Point != "" {
		where = "point " + e.Point
	}
	msg := fmt.Sprintf("disk %s: the 4 KiB block at offset %d does not match its checksum in %s: the replica is damaged", e.Disk, e.Offset, where)
	if len(e.Also) > 0 {
		msg += " (the same block is damaged in " + strings.Join(e.Also, ", ") + ")"
	}
	return msg + "; recover another point, run `asr verify` to repair from the source, or accept the damage with --accept-damage"
}

// Is makes a DamageError match ErrDamaged.
func (e *DamageError) Is(target error) bool { return target == ErrDamaged }

// CheckedReader reads a disk at a recovery point and checks every block it
// reads against the point's block checksums. Without sums (a point made
// before asr kept them) it reads unchecked.
type CheckedReader struct {
	data, sums SnapshotReader
	size       int64
	disk       string
	point      string
	accept     bool

	mu      sync.Mutex
	damaged map[int64]bool
	also    []io.Closer // closed after the readers (CloseAlso)
}

// NewCheckedReader checks data (size bytes) against sums (nil: unchecked).
// With accept, damaged blocks are returned as they are and listed by
// Damaged instead of failing the read.
func NewCheckedReader(data, sums SnapshotReader, size int64, disk, point string, accept bool) *CheckedReader {
	return &CheckedReader{data: data, sums: sums, size: size, disk: disk, point: point, accept: accept, damaged: map[int64]bool{}}
}

// Size returns the disk's size at the point.
func (r *CheckedReader) Size() int64 { return r.size }

// Checked reports whether reads are checked (the point has sums).
func (r *CheckedReader) Checked() bool { return r.sums != nil }

// Damaged returns the offsets of the damaged blocks read so far (with
// accept), in order.
func (r *CheckedReader) Damaged() []int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Sorted(maps.Keys(r.damaged))
}

var checkBufs = sync.Pool{New: func() any { b := make([]byte, 0, HashChunk+HashBlock); return &b }}

// ReadAt reads p at off (whole blocks are read and checked around it).
func (r *CheckedReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at %d: negative offset", off)
	}
	if off >= r.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), r.size-off))
	done := 0
	for done < n {
		at := off + int64(done)
		// At most a chunk per round, block-aligned.
		a0 := at &^ (HashBlock - 1)
		a1 := min(a0+HashChunk, r.size, (off+int64(n)+HashBlock-1)&^(HashBlock-1))
		bp := checkBufs.Get().(*[]byte)
		buf := (*bp)[:a1-a0]
		if err := r.readChecked(buf, a0); err != nil {
			checkBufs.Put(bp)
			return done, err
		}
		k := copy(p[done:n], buf[at-a0:])
		checkBufs.Put(bp)
		done += k
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readChecked reads the block-aligned range [a0, a0+len(buf)) and checks it.
func (r *CheckedReader) readChecked(buf []byte, a0 int64) error {
	nb := (int64(len(buf)) + HashBlock - 1) / HashBlock
	block := func(i int64) []byte { return buf[i*HashBlock : min((i+1)*HashBlock, int64(len(buf)))] }
	var unreadable map[int64]bool
	if err := ReadFull(r.data)(buf, a0); err != nil {
		if !errors.Is(err, ErrCorrupt) {
			return fmt.Errorf("read disk %s at %d: %w", r.disk, a0, err)
		}
		// The target found stored data damaged (its own checksums): find
		// which blocks, reading them one by one.
		unreadable = map[int64]bool{}
		for i := int64(0); i < nb; i++ {
			err := ReadFull(r.data)(block(i), a0+i*HashBlock)
			switch {
			case errors.Is(err, ErrCorrupt):
				if err := r.damage(a0 + i*HashBlock); err != nil {
					return err
				}
				clear(block(i))
				unreadable[i] = true
			case err != nil:
				return fmt.Errorf("read disk %s at %d: %w", r.disk, a0+i*HashBlock, err)
			}
		}
	}
	if r.sums == nil {
		return nil
	}
	ent := make([]byte, nb*SumEntrySize)
	if err := ReadFull(r.sums)(ent, a0/HashBlock*SumEntrySize); err != nil {
		return fmt.Errorf("read the checksums of disk %s at %d: %w", r.disk, a0, err)
	}
	for i := int64(0); i < nb; i++ {
		if unreadable[i] || BlockEntry(block(i)) == Hash(ent[i*SumEntrySize:]) {
			continue
		}
		if err := r.damage(a0 + i*HashBlock); err != nil {
			return err
		}
	}
	return nil
}

// damage handles a damaged block: an error, or (accepting damage) a note.
func (r *CheckedReader) damage(off int64) error {
	if !r.accept {
		return &DamageError{Disk: r.disk, Point: r.point, Offset: off}
	}
	r.mu.Lock()
	r.damaged[off] = true
	r.mu.Unlock()
	return nil
}

// Close closes both readers.
func (r *CheckedReader) Close() error {
	err := r.data.Close()
	if r.sums != nil {
		if serr := r.sums.Close(); err == nil {
			err = serr
		}
	}
	for _, c := range r.also {
		if cerr := c.Close(); err == nil {
			err = cerr
		}
	}
	r.also = nil
	return err
}

// CloseAlso has Close close cs too, after the readers (the disk handles a
// reader opened for itself, which must outlive its snapshot readers).
func (r *CheckedReader) CloseAlso(cs ...io.Closer) { r.also = append(r.also, cs...) }

// OpenPointDisk opens disk idx of machine m at point p for reading, with its
// checksums when the point has them (rd and sums are the open replica and
// sum disks; sums may be nil for a disk without). The size is the disk's
// at the point.
func OpenPointDisk(ctx context.Context, m MachineCatalog, p Point, idx uint32, rd, sums ReplicaDisk, accept bool) (*CheckedReader, error) {
	d, ok := m.Disk(idx)
	if !ok {
		return nil, fmt.Errorf("point %s names disk %d, unknown to machine %s: %w", p.ID, idx, m.Name, ErrCorrupt)
	}
	snap, err := rd.OpenSnapshot(ctx, SnapshotName(p.Seq))
	if err != nil {
		return nil, fmt.Errorf("open point %s of disk %s: %w", p.ID, d.Name, err)
	}
	size := snap.Size()
	if s, ok := p.Sizes[idx]; ok && s <= size {
		size = s // the disk grew after the point
	}
	var ss SnapshotReader
	if p.Sums {
		if sums == nil {
			snap.Close()
			return nil, fmt.Errorf("point %s of disk %s has checksums but the disk has none: %w", p.ID, d.Name, ErrCorrupt)
		}
		if ss, err = sums.OpenSnapshot(ctx, SnapshotName(p.Seq)); err != nil {
			snap.Close()
			return nil, fmt.Errorf("open the checksums of point %s of disk %s: %w", p.ID, d.Name, err)
		}
	}
	return NewCheckedReader(snap, ss, size, d.Name, p.ID, accept), nil
}

// DamagedCopies checks the 4 KiB block at off of disk idx in every point
// (and the current contents) and returns the points whose copy is damaged
// ("current" for the current contents), oldest first. points must be read
// whole (Catalog.FindPoint): a listed point does not say whether it has
// checksums. It is how a failed recovery names every point the damage
// reaches.
func DamagedCopies(ctx context.Context, m MachineCatalog, points []Point, idx uint32, rd, sums ReplicaDisk, off int64) []string {
	var out []string
	blk := make([]byte, HashBlock)
	for _, p := range points {
		if len(p.Disks) > 0 && !slices.Contains(p.Disks, idx) {
			continue
		}
		r, err := OpenPointDisk(ctx, m, p, idx, rd, sums, false)
		if err != nil || !r.Checked() || off >= r.Size() {
			if r != nil {
				r.Close()
			}
			continue
		}
		_, err = r.ReadAt(blk[:min(int64(HashBlock), r.Size()-off)], off)
		r.Close()
		if errors.Is(err, ErrDamaged) {
			out = append(out, p.ID)
		}
	}
	if sums != nil && off < rd.Size() {
		n := min(int64(HashBlock), rd.Size()-off)
		ent := make([]byte, SumEntrySize)
		if ReadFull(rd)(blk[:n], off) == nil && ReadFull(sums)(ent, off/HashBlock*SumEntrySize) == nil &&
			BlockEntry(blk[:n]) != Hash(ent) {
			out = append(out, "current")
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		a, errA := strconv.ParseUint(out[i], 10, 64)
		b, errB := strconv.ParseUint(out[j], 10, 64)
		if errA != nil || errB != nil {
			return errA == nil
		}
		return a < b
	})
	return out
}

// Snapshot snapshots the sum disk (after Flush), under the replica's name.
func (s *Sums) Snapshot(ctx context.Context, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rd.Snapshot(ctx, name)
}

// DeleteSnapshot deletes a snapshot of the sum disk.
func (s *Sums) DeleteSnapshot(ctx context.Context, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rd.DeleteSnapshot(ctx, name)
}

// BuildSums computes the sums of a replica from its current contents (a
// disk replicated before asr kept checksums). s must be new (all zero):
// chunks of zeros are skipped.
func BuildSums(ctx context.Context, rd ReplicaDisk, s *Sums) error {
	size := rd.Size()
	buf := make([]byte, HashChunk)
	for off := int64(0); off < size; off += HashChunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		b := buf[:min(int64(HashChunk), size-off)]
		if err := ReadFull(rd)(b, off); err != nil {
			return fmt.Errorf("read replica at %d: %w", off, err)
		}
		if isZero(b) {
			continue
		}
		if err := s.Note(off, b); err != nil {
			return err
		}
	}
	return s.Flush(ctx)
}
