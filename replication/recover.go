package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// recoverChunk is the unit of copying when a disk image is written out;
// holeBlock the unit of sparseness within it: an all-zero 4 KiB block is
// never written, so a file system with 4 KiB blocks allocates only the
// blocks that hold data (a chunk with one written block costs one block,
// not a MiB).
const (
	recoverChunk = 1 << 20
	holeBlock    = 4 << 10
)

// writeSparse writes b at off to w, skipping its all-zero holeBlock blocks
// (adjacent non-zero blocks go in one write). It returns the bytes written.
func writeSparse(w io.WriterAt, b []byte, off int64) (int64, error) {
	var data int64
	for i := 0; i < len(b); {
		j := min(i+holeBlock, len(b))
		if isZero(b[i:j]) {
			i = j
			continue
		}
		for j < len(b) && !isZero(b[j:min(j+holeBlock, len(b))]) {
			j = min(j+holeBlock, len(b))
		}
		if _, err := w.WriteAt(b[i:j], off+int64(i)); err != nil {
			return data, err
		}
		data += int64(j - i)
		i = j
	}
	return data, nil
}

// WriteImage copies a snapshot to w (which starts empty), size bytes, leaving
// all-zero 4 KiB blocks as holes when w is a file (the caller truncates it
// to size at the end). It returns the bytes of data (non-zero blocks)
// written.
func WriteImage(ctx context.Context, src io.ReaderAt, size int64, w io.WriterAt) (int64, error) {
	buf := make([]byte, recoverChunk)
	var data int64
	for off := int64(0); off < size; off += recoverChunk {
		if err := ctx.Err(); err != nil {
			return data, err
		}
		n := int64(recoverChunk)
		if size-off < n {
			n = size - off
		}
		b := buf[:n]
		if _, err := src.ReadAt(b, off); err != nil && err != io.EOF {
			return data, fmt.Errorf("read at %d: %w", off, err)
		}
		n, err := writeSparse(w, b, off)
		data += n
		if err != nil {
			return data, err
		}
	}
	return data, nil
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// IsZero reports whether b is all zero bytes.
func IsZero(b []byte) bool { return isZero(b) }

// RecoveredDisk describes one image written by RecoverPoint.
type RecoveredDisk struct {
	Name string
	Path string
	Size int64
	Data int64
	// Checked is set when every block written was checked against the
	// point's block checksums (points made before asr kept them are not).
	Checked bool
	// Damaged lists the blocks that did not match their checksums and were
	// written as they are (only with RecoverOptions.AcceptDamage).
	Damaged []int64
	// DamagedNotListed counts the damaged blocks written as they are
	// that Damaged does not list (a recovery through the server lists at
	// most 10,000).
	DamagedNotListed int64
}

// RecoverOptions are the choices of a recovery.
type RecoverOptions struct {
	// AcceptDamage writes blocks that fail their checksums as they are
	// (listed in RecoveredDisk.Damaged) instead of failing the recovery.
	AcceptDamage bool
	// Progress, if set, is told how far each disk's image is written: done
	// of size bytes, from the goroutine writing it.
	Progress func(disk string, done, size int64)
}

// progressReaderAt reports how far a front-to-back copy has read.
type progressReaderAt struct {
	r    io.ReaderAt
	disk string
	size int64
	fn   func(disk string, done, size int64)
}

func (p progressReaderAt) ReadAt(b []byte, off int64) (int, error) {
	n, err := p.r.ReadAt(b, off)
	p.fn(p.disk, off+int64(n), p.size)
	return n, err
}

// ProgressReader reports how far a stream of a disk of size bytes has been
// read to fn (nil: r itself).
func ProgressReader(r io.Reader, disk string, size int64, fn func(disk string, done, size int64)) io.Reader {
	if fn == nil {
		return r
	}
	return &progressReader{r: r, disk: disk, size: size, fn: fn}
}

type progressReader struct {
	r          io.Reader
	disk       string
	done, size int64
	fn         func(disk string, done, size int64)
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.done += int64(n)
	p.fn(p.disk, p.done, p.size)
	return n, err
}

// RecoverPoint writes every disk of a machine at point p to dir/<disk>.img,
// straight from the target (no server involved), checking every block
// against the point's checksums. Existing files are replaced. A damaged
// block fails the recovery with a *DamageError naming the disk, the offset
// and every point that shares the damage, unless opts.AcceptDamage.
func RecoverPoint(ctx context.Context, cat *Catalog, m MachineCatalog, p Point, dir string, opts RecoverOptions) ([]RecoveredDisk, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var out []RecoveredDisk
	for _, idx := range p.Disks {
		d, ok := m.Disk(idx)
		if !ok {
			return out, fmt.Errorf("point %s names disk %d, unknown to machine %s: %w", p.ID, idx, m.Name, ErrCorrupt)
		}
		rec, err := recoverDisk(ctx, cat, m, p, *d, dir, opts)
		if err != nil {
			return out, err
		}
		out = append(out, rec)
	}
	return out, nil
}

func recoverDisk(ctx context.Context, cat *Catalog, m MachineCatalog, p Point, d CatalogDisk, dir string, opts RecoverOptions) (RecoveredDisk, error) {
	rd, err := cat.T.OpenDisk(ctx, DiskKey(m.ID, d.Index), 0)
	if err != nil {
		return RecoveredDisk{}, fmt.Errorf("open replica of disk %s: %w", d.Name, err)
	}
	defer rd.Close()
	var sums ReplicaDisk
	if p.Sums {
		if sums, err = cat.T.OpenDisk(ctx, SumKey(m.ID, d.Index), 0); err != nil {
			return RecoveredDisk{}, fmt.Errorf("open the block checksums of disk %s: %w", d.Name, err)
		}
		defer sums.Close()
	}
	r, err := OpenPointDisk(ctx, m, p, d.Index, rd, sums, opts.AcceptDamage)
	if err != nil {
		return RecoveredDisk{}, err
	}
	path := filepath.Join(dir, d.Name+".img")
	var src io.ReaderAt = r
	if opts.Progress != nil {
		src = progressReaderAt{r: r, disk: d.Name, size: r.Size(), fn: opts.Progress}
	}
	n, err := writeImageFile(ctx, src, r.Size(), path)
	r.Close()
	var de *DamageError
	if errors.As(err, &de) {
		// Wrapping errors rendered their text already: report the damage
		// itself, now naming every point it reaches.
		de.Also = cat.damagedCopies(ctx, m, p, d.Index, rd, sums, de.Offset)
		err = de
	}
	if err != nil {
		return RecoveredDisk{}, fmt.Errorf("recover disk %s: %w", d.Name, err)
	}
	return RecoveredDisk{Name: d.Name, Path: path, Size: r.Size(), Data: n, Checked: r.Checked(), Damaged: r.Damaged()}, nil
}

// damagedCopies lists the other points (and "current") whose copy of the
// block at off of disk idx is damaged too (see DamagedCopies).
func (c *Catalog) damagedCopies(ctx context.Context, m MachineCatalog, except Point, idx uint32, rd, sums ReplicaDisk, off int64) []string {
	listed, err := c.Points(ctx, m.ID)
	if err != nil {
		return nil
	}
	var full []Point
	for _, lp := range listed {
		if lp.Seq == except.Seq {
			continue
		}
		if p, err := c.FindPoint(ctx, m.ID, lp.ID); err == nil {
			full = append(full, p)
		}
	}
	return DamagedCopies(ctx, m, full, idx, rd, sums, off)
}

// writeImageFile writes size bytes of a snapshot to a new sparse file at
// path (via a temporary name, so a failed recovery leaves no half image).
func writeImageFile(ctx context.Context, snap io.ReaderAt, size int64, path string) (int64, error) {
	tmp := path + ".partial"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	n, err := WriteImage(ctx, snap, size, f)
	if err == nil {
		err = f.Truncate(size)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return n, err
	}
	return n, os.Rename(tmp, path)
}

// WriteImageFile writes a stream of a whole disk image (as served by the
// server's image API) to a sparse file at path: all-zero 4 KiB blocks are
// holes, the file truncated to size at the end.
func WriteImageFile(ctx context.Context, r io.Reader, size int64, path string) (int64, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return 0, err
	}
	tmp := path + ".partial"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	buf := make([]byte, recoverChunk)
	var off, data int64
	for off < size {
		if err = ctx.Err(); err != nil {
			break
		}
		n := int64(len(buf))
		if size-off < n {
			n = size - off
		}
		if _, err = io.ReadFull(r, buf[:n]); err != nil {
			err = fmt.Errorf("image stream ended at byte %d of %d: %w", off, size, err)
			break
		}
		var w int64
		w, err = writeSparse(f, buf[:n], off)
		data += w
		if err != nil {
			break
		}
		off += n
	}
	if err == nil {
		err = f.Truncate(size)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return data, err
	}
	return data, os.Rename(tmp, path)
}
