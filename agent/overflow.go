package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
)

// Spool overflow: when the spool is nearly full (the server is out of reach
// for long, or the link is too slow for the guest's writes), the agent does
// not stall the guest: it logs a resync-start record for every disk (the
// replica is inconsistent from there: no points) and from then on only
// marks the 4 KiB blocks each write changes in a changed-block map, writing
// the disk as usual. Once the spool has drained below half, guest writes are
// logged again and the agent walks the maps, logging the current contents of
// every marked block (under the disk's change lock, so in order with the
// guest's writes); when every map is empty it logs resync-done records and
// the disks are consistent again. Only the changed blocks travel. The maps
// live in memory: if the agent stops while overflowing (the state file says
// so), every disk is marked for a full checksum resync at the next start.

const mapBlock = 4096

// changeMap marks changed 4 KiB blocks of a disk. It is sparse: a page of
// bits (4 KiB, covering 128 MiB of the disk) exists only while a block in
// it is marked, so its memory follows what the guest changed during the
// overflow, not the size of the disk.
type changeMap struct {
	mu     sync.Mutex
	blocks int64
	pages  map[int64]*mapPage
	order  []int64 // page numbers, sorted
	count  int
}

const mapPageWords = 512 // 32768 blocks, 128 MiB

type mapPage struct {
	bits [mapPageWords]uint64
	n    int // blocks marked in the page
}

func newChangeMap(size int64) *changeMap {
	return &changeMap{blocks: (size + mapBlock - 1) / mapBlock, pages: map[int64]*mapPage{}}
}

const mapPageBlocks = mapPageWords * 64

func (m *changeMap) mark(off, n int64) {
	if n <= 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for b := off / mapBlock; b <= (off+n-1)/mapBlock && b < m.blocks; b++ {
		pn := b / mapPageBlocks
		pg := m.pages[pn]
		if pg == nil {
			pg = &mapPage{}
			m.pages[pn] = pg
			i, _ := slices.BinarySearch(m.order, pn)
			m.order = slices.Insert(m.order, i, pn)
		}
		i := b % mapPageBlocks
		w, bit := i/64, uint64(1)<<(i%64)
		if pg.bits[w]&bit == 0 {
			pg.bits[w] |= bit
			pg.n++
			m.count++
		}
	}
}

func (m *changeMap) isSet(b int64) bool {
	pg := m.pages[b/mapPageBlocks]
	if pg == nil {
		return false
	}
	i := b % mapPageBlocks
	return pg.bits[i/64]&(1<<(i%64)) != 0
}

// next returns the first run of marked blocks (at most max blocks) at or
// after block from, and false if none.
func (m *changeMap) next(from int64, max int) (first int64, n int, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k, _ := slices.BinarySearch(m.order, from/mapPageBlocks)
	for ; k < len(m.order); k++ {
		pn := m.order[k]
		pg := m.pages[pn]
		b0 := max64(from, pn*mapPageBlocks)
		for b := b0; b < (pn+1)*mapPageBlocks; b++ {
			i := b % mapPageBlocks
			if pg.bits[i/64] == 0 {
				b = pn*mapPageBlocks + (i/64+1)*64 - 1
				continue
			}
			if pg.bits[i/64]&(1<<(i%64)) == 0 {
				continue
			}
			first = b
			for b < m.blocks && n < max && m.isSet(b) {
				n++
				b++
			}
			return first, n, true
		}
	}
	return 0, 0, false
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

func (m *changeMap) clear(first int64, n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for b := first; b < first+int64(n); b++ {
		pn := b / mapPageBlocks
		pg := m.pages[pn]
		if pg == nil {
			continue
		}
		i := b % mapPageBlocks
		if pg.bits[i/64]&(1<<(i%64)) != 0 {
			pg.bits[i/64] &^= 1 << (i % 64)
			pg.n--
			m.count--
			if pg.n == 0 {
				delete(m.pages, pn)
				j, _ := slices.BinarySearch(m.order, pn)
				m.order = slices.Delete(m.order, j, j+1)
			}
		}
	}
}

func (m *changeMap) reset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.pages)
	m.order = m.order[:0]
	m.count = 0
}

func (m *changeMap) empty() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.count == 0
}

// overflowTick is how often the overflow looks whether the spool drained.
const overflowTick = 200 * time.Millisecond

// overflow is the agent's overflow state, shared by its disks, and the
// goroutine that leaves it.
type overflow struct {
	log    *slog.Logger
	spool  *spool.Spool
	disks  diskSet
	state  *stateStore // records the overflow (its maps are lost with the agent)
	events *eventQueue

	active atomic.Bool
	mu     sync.Mutex // serializes entering and leaving
	began  bool       // start records logged, done records not yet
	marked atomic.Int64

	rt *routines // the catch-up
}

func newOverflow(parent context.Context, log *slog.Logger, sp *spool.Spool, disks diskSet, st *stateStore, events *eventQueue) *overflow {
	return &overflow{log: log, spool: sp, disks: disks, state: st, events: events, rt: newRoutines(parent)}
}

// start begins watching for the end of an overflow.
func (o *overflow) start() { o.rt.Go(o.loop) }

// Close stops the catch-up (an overflow in progress stays recorded).
func (o *overflow) Close() { o.rt.Close() }

// enter switches to changed-block maps (called with d's change lock held).
// It returns false, and the caller waits for spool room instead, if the
// overflow cannot be recorded in the state file first: an agent stopped
// during an overflow must know it at the next start (its maps are gone),
// or the disks would diverge silently.
func (o *overflow) enter(d *Disk) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.active.Load() {
		return true
	}
	if err := o.state.setOverflow(true); err != nil {
		o.log.Error("the spool is full but the overflow cannot be recorded (state file); the guest's writes wait for room instead", "err", err)
		return false
	}
	o.active.Store(true)
	if !o.began {
		// Every disk's start record, in the spool's reserve. The guest's
		// writes from here are tracked in the maps.
		for _, dk := range o.disks {
			rec := replication.Record{Time: time.Now().UnixNano(), Disk: dk.Index, Kind: replication.KindResync,
				Data: []byte(replication.OverflowReason)}
			rec.Length = uint32(len(rec.Data))
			seq, err := o.spool.Append(o.rt.ctx, &rec)
			if err != nil {
				o.log.Error("log overflow start", "disk", dk.Name, "err", err)
				continue
			}
			o.spool.Complete(seq)
		}
		o.began = true
		o.events.add("spool-overflow", "the spool is full: the agent tracks changed blocks and resyncs them when it catches up (no recovery points meanwhile)")
		o.log.Warn("spool overflow: tracking changed blocks", "disk_that_filled_it", d.Name)
	}
	return true
}

// pending reports whether an overflow is under way or being caught up:
// the disks are inconsistent on the server until its done records.
func (o *overflow) pending() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.began
}

// reset forgets an overflow when the agent starts a new log (newlog.go):
// its start records are dropped with the spool, and the changes the maps
// hold were made before the new log, whose resync or new copy covers them.
// The caller holds every disk's change lock.
func (o *overflow) reset() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.active.Store(false)
	o.began = false
	for _, d := range o.disks {
		if d.changes != nil {
			d.changes.reset()
		}
	}
}

// loop leaves overflow once the spool has drained, resending the marked
// blocks.
func (o *overflow) loop() {
	t := time.NewTicker(overflowTick)
	defer t.Stop()
	var buf []byte // only while catching up
	for {
		select {
		case <-o.rt.ctx.Done():
			return
		case <-t.C:
		}
		o.mu.Lock()
		began := o.began
		o.mu.Unlock()
		if !began {
			continue
		}
		if o.active.Load() {
			if o.spool.Fill() >= 0.5 {
				continue
			}
			o.active.Store(false) // guest writes are logged again from here
			o.log.Info("spool drained: resending the changed blocks")
		}
		if buf == nil {
			buf = make([]byte, 1<<20)
		}
		if err := o.drain(buf); err != nil {
			if !errors.Is(err, spool.ErrFull) && o.rt.ctx.Err() == nil {
				o.log.Error("resend changed blocks", "err", err)
			}
			continue
		}
		o.finish()
		buf = nil
	}
}

// drain logs the current contents of every marked block.
func (o *overflow) drain(buf []byte) error {
	for _, d := range o.disks {
		for from := int64(0); ; {
			if o.active.Load() {
				return spool.ErrFull // overflowing again: wait for room
			}
			first, n, ok := d.changes.next(from, len(buf)/mapBlock)
			if !ok {
				break
			}
			if err := d.resendBlocks(first, n, buf); err != nil {
				return err
			}
			from = first + int64(n)
		}
	}
	return nil
}

// finish logs the done records once every map is empty and no write is
// being tracked.
func (o *overflow) finish() {
	o.disks.lockAll()
	defer o.disks.unlockAll()
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.active.Load() || !o.began {
		return
	}
	for _, d := range o.disks {
		if !d.changes.empty() {
			return
		}
	}
	for _, d := range o.disks {
		rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindResync, Flags: replication.FlagDone}
		seq, err := o.spool.Append(o.rt.ctx, &rec)
		if err != nil {
			o.log.Error("log overflow end", "disk", d.Name, "err", err)
			return
		}
		o.spool.Complete(seq)
	}
	o.began = false
	if err := o.state.setOverflow(false); err != nil {
		// The next start then believes it stopped mid-overflow and
		// compares the disks in full: costly, never wrong.
		o.log.Error("save agent state after the overflow", "err", err)
	}
	o.events.add("spool-overflow-resynced", fmt.Sprintf("the changed blocks of the overflow were resent (%d blocks marked)", o.marked.Load()))
	o.log.Info("overflow resolved: the disks are consistent again")
}

// resendBlocks logs the current contents of n marked blocks from first.
func (d *Disk) resendBlocks(first int64, n int, buf []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	off := first * mapBlock
	size := min(int64(n)*mapBlock, d.size-off)
	b := buf[:size]
	if _, err := d.f.ReadAt(b, off); err != nil && err != io.EOF {
		return err
	}
	rec := replication.Record{Time: time.Now().UnixNano(), Disk: d.Index, Kind: replication.KindWrite,
		Offset: uint64(off), Length: uint32(len(b)), Data: b}
	if replication.IsZero(b) {
		rec.Kind, rec.Data = replication.KindZero, nil
	}
	seq, err := d.spool.TryAppend(&rec)
	if errors.Is(err, spool.ErrFull) {
		d.over.enter(d)
		return err
	}
	if err != nil {
		return err
	}
	d.spool.Complete(seq)
	d.changes.clear(first, n)
	return nil
}
