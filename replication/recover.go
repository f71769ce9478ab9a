package replication

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// recoverChunk is the unit of copying (and of sparseness detection) when a
// disk image is written out.
const recoverChunk = 1 << 20

// WriteImage copies a snapshot to w (which starts empty), size bytes, leaving
// all-zero chunks as holes when w is a file. It returns the bytes of data
// (non-zero chunks) written.
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
		if isZero(b) {
			continue
		}
		if _, err := w.WriteAt(b, off); err != nil {
			return data, err
		}
		data += n
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
}

// RecoverPoint writes every disk of a machine at point p to dir/<disk>.img,
// straight from the target (no server involved). Existing files are replaced.
func RecoverPoint(ctx context.Context, cat *Catalog, m MachineCatalog, p Point, dir string) ([]RecoveredDisk, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var out []RecoveredDisk
	for _, idx := range p.Disks {
		d, ok := m.Disk(idx)
		if !ok {
			return out, fmt.Errorf("point %s names disk %d, unknown to machine %s: %w", p.ID, idx, m.Name, ErrCorrupt)
		}
		rd, err := cat.T.OpenDisk(ctx, DiskKey(m.ID, idx), 0)
		if err != nil {
			return out, fmt.Errorf("open replica of disk %s: %w", d.Name, err)
		}
		snap, err := rd.OpenSnapshot(ctx, SnapshotName(p.Seq))
		if err != nil {
			rd.Close()
			return out, fmt.Errorf("open point %s of disk %s: %w", p.ID, d.Name, err)
		}
		path := filepath.Join(dir, d.Name+".img")
		size := snap.Size()
		if s, ok := p.Sizes[idx]; ok && s <= size {
			size = s // the disk grew after the point
		}
		n, err := writeImageFile(ctx, io.NewSectionReader(snap, 0, size), size, path)
		snap.Close()
		rd.Close()
		if err != nil {
			return out, fmt.Errorf("recover disk %s: %w", d.Name, err)
		}
		out = append(out, RecoveredDisk{Name: d.Name, Path: path, Size: size, Data: n})
	}
	return out, nil
}

// writeImageFile writes size bytes of a snapshot to a new sparse file at
// path (via a temporary name, so a failed recovery leaves no half image).
func writeImageFile(ctx context.Context, snap io.ReaderAt, size int64, path string) (int64, error) {
	tmp := path + ".partial"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
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
// server's image API) to a sparse file at path.
func WriteImageFile(ctx context.Context, r io.Reader, size int64, path string) (int64, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return 0, err
	}
	tmp := path + ".partial"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
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
		if !isZero(buf[:n]) {
			if _, err = f.WriteAt(buf[:n], off); err != nil {
				break
			}
			data += n
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
