package procserver

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/asrdr/asr/replication"
)

// The hand-off of decoded DATA frames from a connection's reader to the
// machine's applier, so that a frame is decompressed and its records
// checked once on the process server, not twice. The reader decodes and
// checks every DATA frame before it is written to the cache (nothing
// malformed is ever acknowledged: CheckRecords). As the cacheWriter
// writes the frame it leaves the records here, keyed by the frame as the
// cache writes it (replication.FrameKey: seq, count, lengths, flags and
// the payload's CRC-32C, computed as the header is encoded): just before
// the write, as the frame may be sealed and applied as soon as it is
// written, and dropped again if the write fails. The cache remembers the
// key of every frame it wrote to a segment (sealedSeg.keys). Before the
// machine's first point (the initial copy, whose segments are not kept
// on the target), a segment all of whose frames are here is applied from
// here alone, its file never read (replication.PrepareHanded, which
// checks that the frames number the segment's range without a gap): the
// file is what a restart recovers from, read and checked whole then.
// Otherwise the applier reads the sealed segment (durable: fsync'd
// before its seal) and scans it whole (every frame's header and payload
// checksum): a frame whose key is here takes these records
// (replication.PrepareSegmentFrom), any other is decoded from the file
// as before. So records are only ever applied to the frame they were
// decoded from, and a miss (the bound reached, the entry dropped, a
// restart) costs only the second decode, and the read.
//
// Record checksums are not checked again on a hit: the records were
// checked by CheckRecords from the very payload bytes the cache wrote (a
// frame the server compressed itself is not handed off: its cached bytes
// were never decoded), and have not left the process's memory since,
// where the applier's own decode would hold them too between its check
// and its write. Checking again would cost a CRC-32C pass over every
// record byte (about 0.24 CPU-s for the 2 GiB disk of asrbench
// initial-peers: BENCHMARKS.md) to guard only against memory corruption,
// which nothing else on the path guards against either.
//
// Memory: the entries (their decode buffers and record slices) of every
// machine count against one budget (Config.HandoffBytes), from the put
// until the applier has applied the segment that took them; a put past it
// is refused (the oldest entries, the applier's next, are kept: evicting
// them would turn a backlog into misses only). Entries the applier will
// not take (their segment quarantined, a frame written again after a
// failed write) are dropped once it has passed their sequence numbers,
// and every entry when the machine closes.

// handoffBudget bounds the bytes every machine's hand-off holds.
type handoffBudget struct {
	max  int64
	used atomic.Int64

	mu    sync.Mutex
	freed chan struct{} // closed (and forgotten) when bytes are released

	pool bufPool // the buffers of applied entries, for the readers' next frames
}

// bufPool keeps the decode buffers of hand-off entries once their records
// are applied, for the readers' next frames: a new buffer for every frame
// handed off made the Go heap grow and shrink by the budget's worth, and
// every page of it was faulted in again (on this project's 2-core VM a
// minor fault costs 5-20 µs: the 2 GiB initial copy of asrbench took about
// 64,000 of them in the decode alone, and zeroed the reused pages first).
// It holds at most the budget's worth (the buffers in flight and pooled
// then stay about one budget in all: with half, a fifth of the frames of
// asrbench initial still got a new buffer), and nothing once the readers
// have taken nothing from it for poolIdle.
type bufPool struct {
	mu    sync.Mutex
	bufs  [][]byte
	bytes int64
	last  time.Time // of the last get

	reused atomic.Int64 // the buffers get returned
}

// poolIdle is how long buffers stay pooled while no reader takes one.
const poolIdle = 10 * time.Second

// get returns a pooled buffer of at least n bytes' capacity, emptied,
// or nil.
func (p *bufPool) get(n int) []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.last = time.Now()
	for i, b := range p.bufs {
		if cap(b) >= n {
			p.bufs = slices.Delete(p.bufs, i, i+1)
			p.bytes -= int64(cap(b))
			p.reused.Add(1)
			return b[:0]
		}
	}
	return nil
}

// put keeps b, which nothing refers to any more, if there is room (max
// bytes in all).
func (p *bufPool) put(b []byte, max int64) {
	if cap(b) == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bytes+int64(cap(b)) > max {
		return
	}
	p.bufs = append(p.bufs, b[:0])
	p.bytes += int64(cap(b))
}

// trim drops every buffer if no reader took one for poolIdle.
func (p *bufPool) trim() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Since(p.last) >= poolIdle {
		p.bufs, p.bytes = nil, 0
	}
}

// held is the bytes pooled.
func (p *bufPool) held() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bytes
}

// buffer returns a buffer of at least n bytes' capacity for a reader's
// next frame: a pooled one, or a new one.
func (b *handoffBudget) buffer(n int) []byte {
	if buf := b.pool.get(n); buf != nil {
		return buf
	}
	return make([]byte, 0, n)
}

// recycle pools bufs, the buffers of entries whose records are applied
// and referred to by nothing any more.
func (b *handoffBudget) recycle(bufs [][]byte) {
	for _, buf := range bufs {
		b.pool.put(buf, b.max)
	}
}

// reserve takes n bytes of the budget, if they fit.
func (b *handoffBudget) reserve(n int64) bool {
	for {
		u := b.used.Load()
		if u+n > b.max {
			return false
		}
		if b.used.CompareAndSwap(u, u+n) {
			return true
		}
	}
}

func (b *handoffBudget) release(n int64) {
	b.used.Add(-n)
	b.mu.Lock()
	if b.freed != nil {
		close(b.freed)
		b.freed = nil
	}
	b.mu.Unlock()
}

// reserveWait is reserve, waiting for bytes released while they do not
// fit, until d has passed or stop is closed.
func (b *handoffBudget) reserveWait(n int64, d time.Duration, stop <-chan struct{}) bool {
	if n > b.max {
		return false
	}
	var timeout <-chan time.Time
	for {
		// A release after the failed reserve below closes the channel
		// taken under the same lock: no release is missed.
		b.mu.Lock()
		if b.reserve(n) {
			b.mu.Unlock()
			return true
		}
		if b.freed == nil {
			b.freed = make(chan struct{})
		}
		freed := b.freed
		b.mu.Unlock()
		if timeout == nil {
			t := time.NewTimer(d)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-freed:
		case <-timeout:
			return false
		case <-stop:
			return false
		}
	}
}

// handoff is one machine's: the cacheWriter of its connection puts, its
// applier takes.
type handoff struct {
	budget *handoffBudget

	mu      sync.Mutex
	entries map[replication.FrameKey]handoffEntry
	closed  bool

	// hits and misses count the DATA frames the applier took from here and
	// decoded from the segment file; refused the puts past the budget;
	// whole the segments every frame of which was taken here at once
	// (takeAll), their files not read; waited the puts that waited for
	// the budget.
	hits, misses, refused, whole, waited atomic.Int64

	// While the applier's last try failed (stalled: the target out of
	// reach) nothing is put: what it holds is dropped (stall), so that
	// the budget all machines share goes to appliers that apply, and
	// the cache takes the agent's frames at full speed. A put waits for
	// the budget (putWait) only while the applier applies: not after a
	// wait that ran out, until the applier gives bytes back (noWait).
	stalled, noWait atomic.Bool
}

type handoffEntry struct {
	recs []replication.Record
	buf  []byte                     // what recs alias (bufPool once they are applied)
	be   []replication.BlockEntries // their blocks' checksums, if computed (nil)
	size int64                      // what it counts against the budget
}

func newHandoff(budget *handoffBudget) *handoff {
	return &handoff{budget: budget, entries: map[replication.FrameKey]handoffEntry{}}
}

// recordSize is what a decoded record costs beyond its data.
const recordSize = int64(unsafe.Sizeof(replication.Record{}))

// entriesSize is what a BlockEntries costs beyond its checksums.
const entriesSize = int64(unsafe.Sizeof(replication.BlockEntries{}))

// handoffSize is what records decoded into buf, with their blocks'
// checksums be (if computed), cost the budget.
func handoffSize(buf []byte, recs []replication.Record, be []replication.BlockEntries) int64 {
	n := int64(cap(buf)) + int64(cap(recs))*recordSize + int64(cap(be))*entriesSize
	for i := range be {
		n += be[i].Size()
	}
	return n
}

// put leaves the records of the frame the cache wrote as k, decoded
// into buf (which they alias; it is the hand-off's from now on if put
// returns true), for the applier. It reports false, and keeps nothing,
// past the budget.
func (h *handoff) put(k replication.FrameKey, recs []replication.Record, buf []byte) bool {
	return h.putWait(k, recs, nil, buf, 0, nil)
}

// handoffWait is the longest a frame's put waits for the budget by
// default (Config.HandoffWait): about ten times what applying a 32 MiB
// segment takes here.
const handoffWait = 2 * time.Second

// putWait is put with the records' blocks' checksums be (if computed:
// replication.RecordEntries), waiting up to d (or until stop is closed)
// for the budget while the applier is applying (stalled, noWait). The reader
// runs ahead of an applier slower than it (the initial copy, whose
// applier writes, hashes and flushes the replica) only by what the
// budget holds: past it, a frame refused would be read back from its
// segment and decoded again by that same applier, which would then fall
// further behind; waiting delays the frame's write to the cache and its
// acknowledgement instead, by about the time the applier takes to catch
// up, when the replica could not be any further along anyway.
func (h *handoff) putWait(k replication.FrameKey, recs []replication.Record, be []replication.BlockEntries, buf []byte, d time.Duration, stop <-chan struct{}) bool {
	if h.stalled.Load() {
		h.refused.Add(1)
		return false
	}
	size := handoffSize(buf, recs, be)
	ok := h.budget.reserve(size)
	if !ok && d > 0 && !h.noWait.Load() {
		h.waited.Add(1)
		if ok = h.budget.reserveWait(size, d, stop); !ok {
			h.noWait.Store(true)
		}
	}
	if !ok {
		h.refused.Add(1)
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		h.budget.release(size)
		return false
	}
	if old, ok := h.entries[k]; ok {
		h.budget.release(old.size)
	}
	h.entries[k] = handoffEntry{recs: recs, be: be, buf: buf, size: size}
	return true
}

// take removes and returns the records of the frame with key k, the
// buffer they alias, and what they count against the budget until the
// applier gives it back (lent).
func (h *handoff) take(k replication.FrameKey) ([]replication.Record, []byte, int64, bool) {
	h.mu.Lock()
	e, ok := h.entries[k]
	if ok {
		delete(h.entries, k)
	}
	h.mu.Unlock()
	if !ok {
		h.misses.Add(1)
		return nil, nil, 0, false
	}
	h.hits.Add(1)
	return e.recs, e.buf, e.size, true
}

// takeAll removes and returns the records of every frame in keys, in
// order, with their blocks' checksums where computed (nil otherwise), the
// buffers they alias, and what they count against the budget until given
// back, if every one is here and accept (unless nil) accepts each one's
// records; otherwise it takes none and reports false.
func (h *handoff) takeAll(keys []replication.FrameKey, accept func(replication.FrameKey, []replication.Record) bool) ([][]replication.Record, [][]replication.BlockEntries, [][]byte, int64, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, k := range keys {
		e, ok := h.entries[k]
		if !ok || accept != nil && !accept(k, e.recs) {
			return nil, nil, nil, 0, false
		}
	}
	recs := make([][]replication.Record, len(keys))
	be := make([][]replication.BlockEntries, len(keys))
	bufs := make([][]byte, len(keys))
	var lent int64
	for i, k := range keys {
		e := h.entries[k]
		delete(h.entries, k)
		recs[i], be[i], bufs[i], lent = e.recs, e.be, e.buf, lent+e.size
	}
	h.hits.Add(int64(len(keys)))
	h.whole.Add(1)
	return recs, be, bufs, lent, true
}

// drop removes the entry of the frame with key k, if there is one (its
// write failed).
func (h *handoff) drop(k replication.FrameKey) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e, ok := h.entries[k]; ok {
		delete(h.entries, k)
		h.budget.release(e.size)
	}
}

// giveBack returns what taken entries counted, once their records are
// applied (nothing refers to them any more).
func (h *handoff) giveBack(n int64) {
	if n > 0 {
		h.noWait.Store(false)
		h.budget.release(n)
	}
}

// dropThrough drops the entries of frames ending at or before seq: the
// applier is past them.
func (h *handoff) dropThrough(seq uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for k, e := range h.entries {
		if k.Seq+uint64(k.Count)-1 <= seq {
			delete(h.entries, k)
			h.budget.release(e.size)
		}
	}
}

// stall records the applier's try failing (stalled) or succeeding again;
// failing, every entry is dropped (stalled).
func (h *handoff) stall(failed bool) {
	if h.stalled.Swap(failed) == failed || !failed {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for k, e := range h.entries {
		delete(h.entries, k)
		h.budget.release(e.size)
	}
}

// close drops every entry; later puts keep nothing.
func (h *handoff) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for k, e := range h.entries {
		delete(h.entries, k)
		h.budget.release(e.size)
	}
}

// held is how many entries wait for the applier.
func (h *handoff) held() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.entries)
}
