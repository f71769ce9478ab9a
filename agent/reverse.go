package agent

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"

	"github.com/asrdr/asr/replication"
)

// Failback's master target (docs/PROTOCOL.md, "Failback"): after a planned
// failover the agent is frozen (guest writes refused) and the original
// disks are the place the failed-over machine's changes go back to. The
// server sends them as REVERSE frames; the agent writes each into its
// backing disk under the disk's change lock, outside the change log (the
// server marked the disks for a resync before the first one: the replica
// no longer describes them), makes it durable, and answers REVERSE_ACK.
// Only a machine frozen under the failover a frame names accepts it: a
// thawed one, or one frozen under another failover, refuses it and
// changes nothing. Writes are idempotent, so the server may send again
// whatever it did not see acknowledged.

// reverseWrite carries out one REVERSE frame and returns its answer.
func (a *Agent) reverseWrite(seq uint64, d replication.ReverseData) replication.ReverseAck {
	ack := replication.ReverseAck{ID: d.ID, Seq: seq}
	disk, err := a.reverseDisk(d.ID, d.Disk)
	if err == nil {
		if d.Off > disk.Size()-int64(len(d.Data)) {
			err = fmt.Errorf("range %d+%d outside disk %s (%d bytes)", d.Off, len(d.Data), disk.Name, disk.Size())
		} else {
			err = disk.reverseWrite(d.Data, d.Off)
		}
	}
	if err != nil {
		a.log.Error("failback: reverse write refused", "failover", d.ID, "disk", d.Disk, "offset", d.Off, "err", err)
		ack.Error = err.Error()
	}
	return ack
}

// reverseSum answers a REVERSE_SUM: the SHA-256 of the whole disk, or
// the block sums of a range (the checksum compare of an unplanned
// failover's failback).
func (a *Agent) reverseSum(r replication.ReverseSum) replication.ReverseAck {
	ack := replication.ReverseAck{ID: r.ID, Seq: r.Seq}
	disk, err := a.reverseDisk(r.ID, r.Disk)
	switch {
	case err != nil:
	case r.Block > 0:
		ack.Hashes, err = blockSums(readerAt{disk}, disk.Size(), r)
		ack.Size = disk.Size()
	default:
		h := sha256.New()
		if _, err = io.Copy(h, io.NewSectionReader(readerAt{disk}, 0, disk.Size())); err == nil {
			ack.Sum, ack.Size = hex.EncodeToString(h.Sum(nil)), disk.Size()
		}
	}
	if err != nil {
		ack.Error = err.Error()
	}
	return ack
}

// blockSums reads the blocks a (valid) block-sum request names from a
// disk of size bytes and returns their sums, 16 bytes each.
func blockSums(d io.ReaderAt, size int64, r replication.ReverseSum) ([]byte, error) {
	n := r.ReverseBlocks(size)
	if n == 0 {
		return nil, fmt.Errorf("offset %d at or past the disk's end (%d bytes)", r.Off, size)
	}
	out := make([]byte, 0, n*len(replication.Hash{}))
	buf := make([]byte, r.Block)
	for i := range n {
		off := r.Off + int64(i)*r.Block
		p := buf[:min(r.Block, size-off)]
		if _, err := d.ReadAt(p, off); err != nil {
			return nil, fmt.Errorf("read at %d: %w", off, err)
		}
		s := replication.BlockSum(p)
		if r.Leaves {
			s = replication.HashData(p)
		}
		out = append(out, s[:]...)
	}
	return out, nil
}

// reverseDisk returns the disk a reverse frame names, if the machine is
// frozen under its failover.
func (a *Agent) reverseDisk(id string, index uint32) (*Disk, error) {
	if cur := a.fo.current(); cur != id {
		if cur == "" {
			return nil, fmt.Errorf("not frozen: failback of planned failover %s refused", id)
		}
		return nil, fmt.Errorf("frozen under planned failover %s, not %s", cur, id)
	}
	d := a.disks.byIndex(index)
	if d == nil {
		return nil, fmt.Errorf("no disk %d", index)
	}
	if d.scan != nil {
		return nil, fmt.Errorf("disk %s is a scan-mode disk: failback writes only disks served by the write-splitter", d.Name)
	}
	return d, nil
}

// reverseWrite writes p at off into the backing disk and syncs it, under
// the change lock but outside the log, even while frozen.
func (d *Disk) reverseWrite(p []byte, off int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.fb.WriteAt(p, off, false); err != nil {
		return err
	}
	return d.fb.Flush()
}

type readerAt struct{ d *Disk }

func (r readerAt) ReadAt(p []byte, off int64) (int, error) {
	if err := r.d.ReadAt(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}
