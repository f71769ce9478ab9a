package server

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/overlay"
	"github.com/asrdr/asr/store/atomicfile"
)

// A failed-over machine's export, and what failback tracks of it.
//
// exportBackend is what the NBD server serves for a failover's disk: the
// overlay, plus, once the machine is reprotected, a reverseMap of the
// blocks written that the original disk does not hold yet, and a stop
// (failback stops the failed-over machine: its writes are refused).

// errExportStopped is what a write to a stopped export gets (NBD EPERM).
var errExportStopped = fmt.Errorf("the failed-over machine is stopped for failback: %w", syscall.EROFS)

type exportBackend struct {
	ov      *overlay.Overlay
	rev     atomic.Pointer[reverseMap]
	stopped atomic.Bool
}

func (b *exportBackend) Size() int64                      { return b.ov.Size() }
func (b *exportBackend) ReadAt(p []byte, off int64) error { return b.ov.ReadAt(p, off) }

func (b *exportBackend) WriteAt(p []byte, off int64, fua bool) error {
	return b.change(off, int64(len(p)), fua, func() error { return b.ov.WriteAt(p, off, false) })
}

func (b *exportBackend) WriteZeroes(off, n int64, fua bool) error {
	return b.change(off, n, fua, func() error { return b.ov.WriteZeroes(off, n, false) })
}

func (b *exportBackend) Trim(off, n int64, fua bool) error {
	return b.change(off, n, fua, func() error { return b.ov.Trim(off, n, false) })
}

// change makes a write and then marks its blocks for shipping: the mark
// comes after the data, so a block the shipper reads before the write
// completes is marked again and sent again. With FUA the mark is saved
// before the data is made durable.
func (b *exportBackend) change(off, n int64, fua bool, write func() error) error {
	if b.stopped.Load() {
		return errExportStopped
	}
	if err := write(); err != nil {
		return err
	}
	if m := b.rev.Load(); m != nil {
		m.mark(off, n)
	}
	if fua {
		return b.Flush()
	}
	return nil
}

// Flush saves the reverse map first, then makes the overlay durable: a
// block durable in the overlay is always marked on disk until it is on
// the original (a crash between the two re-sends a block, never loses one).
func (b *exportBackend) Flush() error {
	if m := b.rev.Load(); m != nil {
		if err := m.save(); err != nil {
			return fmt.Errorf("save the failback map: %w", err)
		}
	}
	return b.ov.Flush()
}

// reverseMap is one disk's blocks (overlay.BlockSize) that the original
// disk may not hold yet: dirty (written, not sent) and in flight (sent,
// not acknowledged). Saved to a file (DATA/failovers/ID/DISK.rev) as their
// union, so a restart re-sends whatever was not acknowledged.
type reverseMap struct {
	path   string
	size   int64
	blocks int64
	wake   func() // tells the shipper there is work

	mu       sync.Mutex
	dirty    []uint64
	inflight []uint64
	cursor   int64 // where take looks first
	gen      uint64
	saveMu   sync.Mutex
	savedGen atomic.Uint64
	// age is how far behind the original disk is (failback_rpo.go).
	age revAge
}

// Reverse map file: magic, version, block size, disk size, (version 2)
// the time every write before which is on the original (Unix ns, 0: not
// known), bits, CRC-32C of everything before it. Version 1 (no time) is
// still read: its writes' age is not known.
var revMagic = [8]byte{'A', 'S', 'R', 'R', 'E', 'V', 'M', 'P'}

const revVersion = 2

func newReverseMap(path string, size int64, wake func()) *reverseMap {
	n := (size + overlay.BlockSize - 1) / overlay.BlockSize
	words := (n + 63) / 64
	return &reverseMap{path: path, size: size, blocks: n, wake: wake, dirty: make([]uint64, words), inflight: make([]uint64, words),
		age: revAge{now: time.Now}}
}

// loadReverseMap reads a saved map: its blocks are dirty again (what was
// in flight is sent again). A missing file is os.ErrNotExist; one that is
// not a map of this disk is replication.ErrCorrupt.
func loadReverseMap(path string, size int64, wake func()) (*reverseMap, error) {
	m := newReverseMap(path, size, wake)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) < 12 || [8]byte(b[:8]) != revMagic {
		return nil, fmt.Errorf("failback map %s: not a map of a %d-byte disk: %w", path, size, replication.ErrCorrupt)
	}
	hdr := 24
	switch v := binary.LittleEndian.Uint32(b[8:]); v {
	case 1:
	case revVersion:
		hdr = 32
	default:
		return nil, fmt.Errorf("failback map %s: version %d, this build reads 1 and %d: %w", path, v, revVersion, replication.ErrCorrupt)
	}
	if len(b) != hdr+len(m.dirty)*8+4 {
		return nil, fmt.Errorf("failback map %s: not a map of a %d-byte disk: %w", path, size, replication.ErrCorrupt)
	}
	if binary.LittleEndian.Uint32(b[12:]) != overlay.BlockSize || int64(binary.LittleEndian.Uint64(b[16:])) != size {
		return nil, fmt.Errorf("failback map %s: made for another disk: %w", path, replication.ErrCorrupt)
	}
	if replication.Checksum(b[:len(b)-4]) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return nil, fmt.Errorf("failback map %s: checksum mismatch: %w", path, replication.ErrCorrupt)
	}
	var safe int64
	if hdr == 32 {
		safe = int64(binary.LittleEndian.Uint64(b[24:]))
	}
	for i := range m.dirty {
		m.dirty[i] = binary.LittleEndian.Uint64(b[hdr+8*i:])
	}
	m.loaded(safe)
	return m, nil
}

// save writes the map (dirty and in flight) if it changed since the last save.
func (m *reverseMap) save() error {
	m.saveMu.Lock()
	defer m.saveMu.Unlock()
	m.mu.Lock()
	gen := m.gen
	if gen == m.savedGen.Load() && gen != 0 {
		m.mu.Unlock()
		return nil
	}
	b := make([]byte, 32+len(m.dirty)*8+4)
	copy(b, revMagic[:])
	binary.LittleEndian.PutUint32(b[8:], revVersion)
	binary.LittleEndian.PutUint32(b[12:], overlay.BlockSize)
	binary.LittleEndian.PutUint64(b[16:], uint64(m.size))
	binary.LittleEndian.PutUint64(b[24:], uint64(m.age.safeNanos()))
	for i := range m.dirty {
		binary.LittleEndian.PutUint64(b[32+8*i:], m.dirty[i]|m.inflight[i])
	}
	m.mu.Unlock()
	binary.LittleEndian.PutUint32(b[len(b)-4:], replication.Checksum(b[:len(b)-4]))
	if err := atomicfile.Write(m.path, b, 0o600); err != nil {
		return err
	}
	m.savedGen.Store(gen)
	return nil
}

// mark makes the blocks of [off, off+n) dirty.
func (m *reverseMap) mark(off, n int64) {
	if n <= 0 {
		return
	}
	m.mu.Lock()
	now := m.age.now()
	for b := off / overlay.BlockSize; b <= (off+n-1)/overlay.BlockSize && b < m.blocks; b++ {
		m.marked(b, now)
		m.dirty[b/64] |= 1 << (b % 64)
	}
	m.gen++
	m.mu.Unlock()
	m.wake()
}

// take moves up to max dirty blocks, in order from the cursor, to in
// flight and returns them.
func (m *reverseMap) take(max int) []int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []int64
	words := int64(len(m.dirty))
	if words == 0 {
		return nil
	}
	m.startGeneration()
	start := (m.cursor / 64) % words
	for i := int64(0); i < words && len(out) < max; i++ {
		w := (start + i) % words
		for m.dirty[w] != 0 && len(out) < max {
			bit := int64(bits.TrailingZeros64(m.dirty[w]))
			m.dirty[w] &^= 1 << bit
			m.inflight[w] |= 1 << bit
			m.taken(w*64 + bit)
			out = append(out, w*64+bit)
		}
	}
	if len(out) > 0 {
		m.cursor = out[len(out)-1] + 1
		m.gen++
	}
	return out
}

// done: the blocks are durable on the original (unless written since:
// then they are dirty again and go once more).
func (m *reverseMap) done(blocks []int64) {
	m.mu.Lock()
	for _, b := range blocks {
		m.inflight[b/64] &^= 1 << (b % 64)
		m.acked(b)
	}
	m.ackedAll()
	m.gen++
	m.mu.Unlock()
}

// fail: the blocks were not acknowledged; they are dirty again.
func (m *reverseMap) fail(blocks []int64) {
	m.mu.Lock()
	for _, b := range blocks {
		m.inflight[b/64] &^= 1 << (b % 64)
		m.dirty[b/64] |= 1 << (b % 64)
		m.failed(b)
	}
	m.gen++
	m.mu.Unlock()
}

// pending is the bytes not known to be on the original (dirty or in flight).
func (m *reverseMap) pending() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var n int64
	for i := range m.dirty {
		n += int64(bits.OnesCount64(m.dirty[i] | m.inflight[i]))
	}
	return n * overlay.BlockSize
}
