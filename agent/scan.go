package agent

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

// Scan mode, for disks the agent cannot interpose on (the root disk of a
// running guest): the guest writes the disk directly, and the agent finds
// the changes by reading it every scan interval and comparing each 1 MiB
// block's hash (SHA-256, 128 bits kept) with the hash of what it last sent.
// Changed blocks travel as ordinary write records. A point taken outside a
// freeze is marked inconsistent (each block is as its last scan read it);
// an application-consistent point runs a full scan while the file systems
// are frozen, which makes it consistent.

// scanBlock is the unit of change detection in scan mode.
const scanBlock = initialChunk

type blockHash [16]byte

var zeroHash = hashBlock(make([]byte, scanBlock))

func hashBlock(b []byte) blockHash {
	s := sha256.Sum256(b)
	return blockHash(s[:16])
}

// scanState is a scan-mode disk's record of what the replica holds.
type scanState struct {
	interval time.Duration
	mu       sync.Mutex
	hashes   []blockHash // of each block as last sent; known[i] false: unknown
	known    []bool
	passes   int64
	changed  int64 // blocks sent by scans
}

func newScanState(size int64, interval time.Duration) *scanState {
	n := (size + scanBlock - 1) / scanBlock
	return &scanState{interval: interval, hashes: make([]blockHash, n), known: make([]bool, n)}
}

// note records what was sent (or found zero by the initial copy) for the
// block at off.
func (s *scanState) note(off int64, h blockHash) {
	s.mu.Lock()
	s.hashes[off/scanBlock], s.known[off/scanBlock] = h, true
	s.mu.Unlock()
}

// scanTick is how often the scanner looks whether a disk's scan is due.
const scanTick = 200 * time.Millisecond

// scanner scans the scan-mode disks: it owns the goroutine that scans each
// one at its interval once its initial copy is complete.
type scanner struct {
	log   *slog.Logger
	spool *spool.Spool
	disks diskSet
	// copied reports whether a disk's initial copy is complete: a disk is
	// scanned only from then on.
	copied func(index uint32) bool
	// pointLock is held during a pass: no scan while a point is made
	// (an application-consistent point scans while frozen instead).
	pointLock sync.Locker

	rt *routines // the scans
}

func newScanner(parent context.Context, log *slog.Logger, sp *spool.Spool, disks diskSet, copied func(uint32) bool, pointLock sync.Locker) *scanner {
	return &scanner{log: log, spool: sp, disks: disks, copied: copied, pointLock: pointLock, rt: newRoutines(parent)}
}

// start begins the scans (a machine without scan-mode disks has none).
func (s *scanner) start() {
	if s.disks.hasScan() {
		s.rt.Go(s.loop)
	}
}

// Close stops the scans.
func (s *scanner) Close() { s.rt.Close() }

// pass reads the whole disk once and logs the blocks whose contents
// differ from what was last sent. It returns the number of blocks sent.
func (s *scanner) pass(d *Disk) (int, error) {
	ctx := s.rt.ctx
	buf := make([]byte, scanBlock)
	sent := 0
	for off := int64(0); off < d.Size(); off += scanBlock {
		if err := ctx.Err(); err != nil {
			return sent, err
		}
		for s.spool.Fill() > initialSpoolShare {
			select {
			case <-ctx.Done():
				return sent, ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
		n := min(int64(scanBlock), d.Size()-off)
		b := buf[:n]
		changed, err := d.scanChunk(b, off)
		if err != nil {
			return sent, err
		}
		if changed {
			sent++
		}
	}
	dropCache(d.f, 0, d.Size())
	d.scan.mu.Lock()
	d.scan.passes++
	d.scan.changed += int64(sent)
	d.scan.mu.Unlock()
	return sent, nil
}

// passCopied scans every scan-mode disk whose initial copy is complete
// (inside an application-consistent freeze, which makes them consistent
// with the rest). The caller holds the point lock.
func (s *scanner) passCopied() error {
	for _, d := range s.disks {
		if d.scan == nil || !s.copied(d.Index) {
			continue
		}
		if _, err := s.pass(d); err != nil {
			return fmt.Errorf("scan of disk %s: %v", d.Name, err)
		}
	}
	return nil
}

// scanChunk reads one block and logs it if it changed since it was sent.
func (d *Disk) scanChunk(b []byte, off int64) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, err := d.f.ReadAt(b, off); err != nil && err != io.EOF {
		return false, fmt.Errorf("scan disk %s at %d: %w", d.Name, off, err)
	}
	h := hashBlock(b)
	i := off / scanBlock
	d.scan.mu.Lock()
	same := d.scan.known[i] && d.scan.hashes[i] == h
	d.scan.mu.Unlock()
	if same {
		return false, nil
	}
	rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindWrite, Offset: uint64(off), Length: uint32(len(b)), Data: b}
	if replication.IsZero(b) {
		rec.Kind, rec.Data = replication.KindZero, nil
	}
	seq, err := d.spool.Append(d.ctx, &rec)
	if err != nil {
		return false, err
	}
	d.spool.Complete(seq)
	d.scan.note(off, h)
	return true, nil
}

// loop scans every scan-mode disk at its interval, once its initial
// copy is complete.
func (s *scanner) loop() {
	ctx := s.rt.ctx
	last := map[uint32]time.Time{}
	t := time.NewTicker(scanTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			for _, d := range s.disks {
				if d.scan == nil || !s.copied(d.Index) || now.Sub(last[d.Index]) < d.scan.interval {
					continue
				}
				s.pointLock.Lock() // not while a point is being made
				n, err := s.pass(d)
				s.pointLock.Unlock()
				last[d.Index] = time.Now()
				if err != nil {
					if ctx.Err() == nil {
						s.log.Error("scan pass", "disk", d.Name, "err", err)
					}
					continue
				}
				if n > 0 {
					s.log.Debug("scan pass", "disk", d.Name, "changed_blocks", n)
				}
			}
		}
	}
}

// Hash file: "ASRSCN", version u16, block size u32, count u64, then count
// entries of [known u8][hash 16 bytes], then CRC-32C of all before.
var scanMagic = [6]byte{'A', 'S', 'R', 'S', 'C', 'N'}

func scanFile(dir, disk string) string { return filepath.Join(dir, "scan-"+disk+".hashes") }

// saveScan writes a scan disk's hashes (at a clean stop only: after a crash
// the spool may have lost records the hashes say were sent).
func saveScan(dir string, d *Disk) error {
	s := d.scan
	s.mu.Lock()
	b := make([]byte, 0, 20+len(s.hashes)*17+4)
	b = append(b, scanMagic[:]...)
	b = binary.LittleEndian.AppendUint16(b, 1)
	b = binary.LittleEndian.AppendUint32(b, scanBlock)
	b = binary.LittleEndian.AppendUint64(b, uint64(len(s.hashes)))
	for i, h := range s.hashes {
		k := byte(0)
		if s.known[i] {
			k = 1
		}
		b = append(b, k)
		b = append(b, h[:]...)
	}
	s.mu.Unlock()
	b = binary.LittleEndian.AppendUint32(b, replication.Checksum(b))
	return atomicfile.Write(scanFile(dir, d.Name), b, 0o600)
}

// loadScan reads saved hashes, and removes the file: it is valid for one
// start only (until the next clean stop writes it again).
func loadScan(dir string, d *Disk) error {
	path := scanFile(dir, d.Name)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	os.Remove(path)
	if len(b) < 24 || [6]byte(b[:6]) != scanMagic || replication.Checksum(b[:len(b)-4]) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return fmt.Errorf("%s: damaged; the disk is rescanned whole", path)
	}
	n := binary.LittleEndian.Uint64(b[12:])
	if binary.LittleEndian.Uint32(b[8:]) != scanBlock || n != uint64(len(d.scan.hashes)) || len(b) != 20+int(n)*17+4 {
		return fmt.Errorf("%s: for another disk size; the disk is rescanned whole", path)
	}
	p := b[20:]
	for i := range d.scan.hashes {
		d.scan.known[i] = p[0] == 1
		copy(d.scan.hashes[i][:], p[1:17])
		p = p[17:]
	}
	return nil
}
