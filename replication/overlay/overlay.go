// Package overlay is a copy-on-write layer over a read-only disk image: the
// instant test failover and the failover to the server's own NBD exports
// run a recovered machine from a recovery point without copying it. Reads
// of blocks never written come from the base (the point, read through its
// checksums); the first write to a block copies it into a sparse file and
// marks it in a bitmap; later reads and writes of that block go to the
// file. Opening an overlay costs the same whatever the disk's size: a
// sparse file and a bitmap of one bit per 64 KiB block (2 MiB for 1 TiB).
//
// Durability follows NBD: a write is durable once Flush (or a FUA write)
// returns. Flush syncs the data file first and only then writes the bitmap
// pages that changed and syncs them, so a bit on disk always names a block
// whose data is on disk. Bits only ever go from 0 to 1, so a torn bitmap
// page holds old and new bits, each of them safe. A crash loses the writes
// since the last Flush, as a crashed disk would.
//
// The bitmap file starts with a 4 KiB header (magic, version, block size,
// disk size, CRC-32C); the bits follow from offset 4096.
package overlay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"os"
	"sync"
)

// BlockSize is the copy-on-write unit.
const BlockSize = 64 << 10

const (
	headerSize = 4096
	pageSize   = 4096 // bitmap bytes written per dirty page
	version    = 1
	// maxSize bounds a disk's size (64 TiB, VMware's largest virtual disk
	// is 62 TiB): the bitmap is held in memory, 128 MiB at most.
	maxSize = 64 << 40
	stripes = 256
)

var magic = [8]byte{'A', 'S', 'R', 'O', 'V', 'L', '1', 0}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrFormat is returned when an overlay's bitmap file is not one this
// build reads, or does not match the disk.
var ErrFormat = errors.New("overlay: bad bitmap file")

// Overlay is one disk's copy-on-write layer. Its methods are safe for
// concurrent use; it implements the agent/nbd Backend interface.
type Overlay struct {
	base io.ReaderAt
	size int64
	data *os.File
	mapf *os.File

	locks [stripes]sync.Mutex // per-block copy-on-write, by block index

	mu    sync.Mutex // bits, dirty, written
	bits  []uint64
	dirty map[int64]struct{} // bitmap pages changed since the last Flush
	// written counts the blocks marked.
	written int64

	flushMu sync.Mutex // one Flush at a time
}

// Paths returns the data and bitmap file names of an overlay named name in
// dir.
func Paths(dir, name string) (data, bitmap string) {
	return dir + "/" + name + ".overlay", dir + "/" + name + ".map"
}

// Open opens (or creates, when the files do not exist) the overlay named
// name in dir over base, a disk of size bytes. An existing overlay must
// have been made for the same size.
func Open(dir, name string, base io.ReaderAt, size int64) (*Overlay, error) {
	if size <= 0 || size > maxSize {
		return nil, fmt.Errorf("overlay %s: disk size %d out of range (1 byte to 64 TiB)", name, size)
	}
	dp, mp := Paths(dir, name)
	o := &Overlay{base: base, size: size, dirty: map[int64]struct{}{}}
	nblocks := (size + BlockSize - 1) / BlockSize
	o.bits = make([]uint64, (nblocks+63)/64)
	mf, err := os.OpenFile(mp, os.O_RDWR, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if mf, err = create(mp, size); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	default:
		if err := o.load(mf, size); err != nil {
			mf.Close()
			return nil, fmt.Errorf("overlay %s: %w", name, err)
		}
	}
	o.mapf = mf
	df, err := os.OpenFile(dp, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		mf.Close()
		return nil, err
	}
	if err := df.Truncate(size); err != nil {
		mf.Close()
		df.Close()
		return nil, err
	}
	o.data = df
	return o, nil
}

func create(path string, size int64) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	if _, err := f.WriteAt(header(size), 0); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func header(size int64) []byte {
	h := make([]byte, headerSize)
	copy(h, magic[:])
	binary.LittleEndian.PutUint32(h[8:], version)
	binary.LittleEndian.PutUint32(h[12:], BlockSize)
	binary.LittleEndian.PutUint64(h[16:], uint64(size))
	binary.LittleEndian.PutUint32(h[24:], crc32.Checksum(h[:24], castagnoli))
	return h
}

func (o *Overlay) load(f *os.File, size int64) error {
	h := make([]byte, 28)
	if _, err := f.ReadAt(h, 0); err != nil {
		return fmt.Errorf("%w: header: %v", ErrFormat, err)
	}
	switch {
	case [8]byte(h[:8]) != magic:
		return fmt.Errorf("%w: not an overlay bitmap", ErrFormat)
	case binary.LittleEndian.Uint32(h[24:]) != crc32.Checksum(h[:24], castagnoli):
		return fmt.Errorf("%w: header checksum mismatch", ErrFormat)
	case binary.LittleEndian.Uint32(h[8:]) != version:
		return fmt.Errorf("%w: version %d (this build reads %d)", ErrFormat, binary.LittleEndian.Uint32(h[8:]), version)
	case binary.LittleEndian.Uint32(h[12:]) != BlockSize:
		return fmt.Errorf("%w: block size %d", ErrFormat, binary.LittleEndian.Uint32(h[12:]))
	case int64(binary.LittleEndian.Uint64(h[16:])) != size:
		return fmt.Errorf("%w: made for a disk of %d bytes, not %d", ErrFormat, binary.LittleEndian.Uint64(h[16:]), size)
	}
	raw := make([]byte, len(o.bits)*8)
	n, err := f.ReadAt(raw, headerSize)
	if err != nil && err != io.EOF {
		return err
	}
	raw = raw[:n] // a bitmap never flushed past some page is short: zeros
	for i := 0; i+8 <= len(raw); i += 8 {
		o.bits[i/8] = binary.LittleEndian.Uint64(raw[i:])
	}
	for _, w := range o.bits {
		o.written += int64(bits.OnesCount64(w))
	}
	return nil
}

// Size returns the disk's size.
func (o *Overlay) Size() int64 { return o.size }

// Written returns the number of blocks written (copied up) so far.
func (o *Overlay) Written() int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.written
}

// WrittenBytes is Written in bytes (the last block counted whole).
func (o *Overlay) WrittenBytes() int64 { return o.Written() * BlockSize }

func (o *Overlay) marked(b int64) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.bits[b/64]&(1<<(b%64)) != 0
}

func (o *Overlay) mark(b int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.bits[b/64]&(1<<(b%64)) != 0 {
		return
	}
	o.bits[b/64] |= 1 << (b % 64)
	o.written++
	o.dirty[(b/8)/pageSize] = struct{}{}
}

// Blocks calls fn with the offset of every written block, in order (for
// shipping only the changes back, failback).
func (o *Overlay) Blocks(fn func(off int64) error) error {
	o.mu.Lock()
	words := append([]uint64(nil), o.bits...)
	o.mu.Unlock()
	for i, w := range words {
		for w != 0 {
			j := bits.TrailingZeros64(w)
			w &^= 1 << j
			if err := fn((int64(i)*64 + int64(j)) * BlockSize); err != nil {
				return err
			}
		}
	}
	return nil
}

func (o *Overlay) check(off, n int64) error {
	if off < 0 || n < 0 || off > o.size || n > o.size-off {
		return fmt.Errorf("overlay: range %d+%d outside the disk (%d bytes)", off, n, o.size)
	}
	return nil
}

func (o *Overlay) blockLen(b int64) int64 { return min(BlockSize, o.size-b*BlockSize) }

// ReadAt fills p from off: each block from the file when written, else from
// the base.
func (o *Overlay) ReadAt(p []byte, off int64) error {
	if err := o.check(off, int64(len(p))); err != nil {
		return err
	}
	for len(p) > 0 {
		b := off / BlockSize
		in := off - b*BlockSize
		n := min(int64(len(p)), BlockSize-in)
		// Runs of blocks from the same source are read in one call.
		src := o.marked(b)
		for n < int64(len(p)) && o.marked(b+(in+n)/BlockSize) == src {
			n = min(int64(len(p)), n+BlockSize)
		}
		var err error
		if src {
			_, err = o.data.ReadAt(p[:n], off)
		} else {
			_, err = o.base.ReadAt(p[:n], off)
		}
		if err != nil && !(err == io.EOF && off+n == o.size) {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// WriteAt writes p at off; with fua it is durable when WriteAt returns.
func (o *Overlay) WriteAt(p []byte, off int64, fua bool) error {
	if err := o.write(p, off, int64(len(p))); err != nil {
		return err
	}
	if fua {
		return o.Flush()
	}
	return nil
}

// WriteZeroes makes n bytes at off read as zero.
func (o *Overlay) WriteZeroes(off, n int64, fua bool) error {
	if err := o.write(nil, off, n); err != nil {
		return err
	}
	if fua {
		return o.Flush()
	}
	return nil
}

// Trim zeroes the range: the contents of trimmed blocks are undefined to the
// client, and reading zeros is the cheapest defined answer.
func (o *Overlay) Trim(off, n int64, fua bool) error { return o.WriteZeroes(off, n, fua) }

var zeroBlock [BlockSize]byte

// write writes p (or n zero bytes when p is nil) at off, block by block.
func (o *Overlay) write(p []byte, off, n int64) error {
	if err := o.check(off, n); err != nil {
		return err
	}
	var tmp []byte
	for n > 0 {
		b := off / BlockSize
		in := off - b*BlockSize
		k := min(n, BlockSize-in)
		var chunk []byte
		if p != nil {
			chunk, p = p[:k], p[k:]
		} else {
			chunk = zeroBlock[:k]
		}
		l := &o.locks[b%stripes]
		l.Lock()
		var err error
		if o.marked(b) || k == o.blockLen(b) {
			_, err = o.data.WriteAt(chunk, off)
		} else {
			// First write of part of a block: copy the block up whole,
			// with the new bytes in it.
			if tmp == nil {
				tmp = make([]byte, BlockSize)
			}
			bl := tmp[:o.blockLen(b)]
			if err = o.readBase(bl, b*BlockSize); err == nil {
				copy(bl[in:], chunk)
				_, err = o.data.WriteAt(bl, b*BlockSize)
			}
		}
		if err == nil {
			o.mark(b)
		}
		l.Unlock()
		if err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

func (o *Overlay) readBase(p []byte, off int64) error {
	_, err := o.base.ReadAt(p, off)
	if err == io.EOF && off+int64(len(p)) == o.size {
		err = nil
	}
	return err
}

// Flush makes every completed write durable: the data file, then the
// bitmap pages that changed.
func (o *Overlay) Flush() error {
	o.flushMu.Lock()
	defer o.flushMu.Unlock()
	if err := o.data.Sync(); err != nil {
		return err
	}
	o.mu.Lock()
	pages := make([]int64, 0, len(o.dirty))
	for pg := range o.dirty {
		pages = append(pages, pg)
	}
	clear(o.dirty)
	bufs := make([][]byte, len(pages))
	for i, pg := range pages {
		bufs[i] = o.pageBytes(pg)
	}
	o.mu.Unlock()
	if len(pages) == 0 {
		return nil
	}
	for i, pg := range pages {
		if _, err := o.mapf.WriteAt(bufs[i], headerSize+pg*pageSize); err != nil {
			o.redirty(pages)
			return err
		}
	}
	if err := o.mapf.Sync(); err != nil {
		o.redirty(pages)
		return err
	}
	return nil
}

func (o *Overlay) redirty(pages []int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, pg := range pages {
		o.dirty[pg] = struct{}{}
	}
}

// pageBytes encodes bitmap page pg (o.mu held); the last page is short.
func (o *Overlay) pageBytes(pg int64) []byte {
	lo := pg * pageSize / 8
	hi := min(int64(len(o.bits)), lo+pageSize/8)
	b := make([]byte, (hi-lo)*8)
	for i := lo; i < hi; i++ {
		binary.LittleEndian.PutUint64(b[(i-lo)*8:], o.bits[i])
	}
	return b
}

// Close flushes and closes the overlay's files (not the base).
func (o *Overlay) Close() error {
	err := o.Flush()
	if cerr := o.data.Close(); err == nil {
		err = cerr
	}
	if cerr := o.mapf.Close(); err == nil {
		err = cerr
	}
	return err
}

// Remove deletes an overlay's files (after Close).
func Remove(dir, name string) error {
	dp, mp := Paths(dir, name)
	err := os.Remove(dp)
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	if e := os.Remove(mp); e != nil && !errors.Is(e, os.ErrNotExist) && err == nil {
		err = e
	}
	return err
}
