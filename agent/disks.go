package agent

import "github.com/asrdr/asr/agent/spool"

// diskSet is the agent's protected disks, in the order of its state file.
// The set is fixed once the agent is open; each disk's change lock is its
// own (Disk.mu).
type diskSet []*Disk

// lockAll takes every disk's change lock, in order: no change can be logged
// or reach a disk until unlockAll.
func (ds diskSet) lockAll() {
	for _, d := range ds {
		d.mu.Lock()
	}
}

// unlockAll releases what lockAll took, in reverse order.
func (ds diskSet) unlockAll() {
	for i := len(ds) - 1; i >= 0; i-- {
		ds[i].mu.Unlock()
	}
}

// byIndex returns the disk with the given index, or nil.
func (ds diskSet) byIndex(index uint32) *Disk {
	for _, d := range ds {
		if d.Index == index {
			return d
		}
	}
	return nil
}

// hasScan reports whether any disk is in scan mode.
func (ds diskSet) hasScan() bool {
	for _, d := range ds {
		if d.scan != nil {
			return true
		}
	}
	return false
}

// writes is the number of guest changes captured this run, all disks.
func (ds diskSet) writes() int64 {
	var n int64
	for _, d := range ds {
		n += d.writes.Load()
	}
	return n
}

// syncAll makes every completed change durable in the spool and the disks.
func (ds diskSet) syncAll(sp *spool.Spool) error {
	if err := sp.Sync(); err != nil {
		return err
	}
	for _, d := range ds {
		if err := d.fb.Flush(); err != nil {
			return err
		}
	}
	return nil
}
