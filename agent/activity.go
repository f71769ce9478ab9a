package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

// The activity log (DRBD's name) is the persistent dirty map of a forced
// shutdown: the 4 MiB extents of each disk with changes that may not yet be
// durable in both the spool and the disk. An extent is added, durably,
// before its first change goes to the spool and the disk; every few
// seconds (a checkpoint) the extents whose changes are all durable leave
// it (below). A process that is
// killed loses nothing (the page cache keeps the spool), but after the
// machine itself went down (another boot id) the extents in the log are at
// risk: the disk is marked for a resync of exactly those ranges.
//
// An extent's changes are durable once a sync that began after them ends:
// the guest's own flushes (Disk.Flush, which credits its disk's extents)
// or the checkpoint's. A checkpoint syncs by itself only while more than
// alHot extents are at risk (DRBD's al-extents): a guest that flushes
// keeps the log small on its own, and one that never flushes keeps its
// hot extents in the log rather than having its disk written back every
// few seconds by the agent. The price is the resync after the machine
// went down: at most alHot extents, the ranges the guest had not flushed.
//
// With the memory log (spool.Options.MemBytes) a killed process loses the
// records in memory, so an extent stays in the log until every change to
// it is acknowledged by the server, not only durable (ackedGen, below), and
// any unclean start resyncs the log's extents (open.go).
//
// The file is a journal (DRBD's activity-log transactions): a header, then
// one fixed-size record per extent added, appended and fsync'd before
// the change that added it goes on (concurrent additions share one
// fsync). A change to an extent already in the log writes nothing. A
// checkpoint compacts the journal: it writes the extents still at risk to
// a new file, which replaces the old one atomically. A record torn by a
// crash is the last one (records are appended in order, each change waits
// for its own record's fsync), and its change never started: reading
// stops at the first record that does not check.

// alExtent is the granularity of the activity log.
const alExtent = 4 << 20

// alCheckpoint is how often the activity log is emptied of synced extents.
const alCheckpoint = 5 * time.Second

// alHot is how many extents (4 GiB) the log keeps at risk before a
// checkpoint syncs the spool and the disks itself.
const alHot = 1024

// The journal's layout (little endian). Header (16 bytes): "ASRAL2", u16
// version (2), u32 zero, u32 CRC-32C of bytes 0..11. Record (24 bytes):
// u8 alRecordTag, 3 zero bytes, u32 disk, u64 extent, u32 zero, u32 CRC-32C
// of bytes 0..19.
const (
	alHeaderSize = 16
	alRecordSize = 24
	alVersion    = 2
	alRecordTag  = 0xA1
	// alMaxFile bounds the journal a start reads (2.8 million extents,
	// 10 TiB of disk at risk); a longer one is unreadable and every disk
	// is at risk as a whole.
	alMaxFile = 64 << 20
)

var alMagic = [6]byte{'A', 'S', 'R', 'A', 'L', '2'}

type alKey struct {
	disk   uint32
	extent uint64
}

// alEntry is an extent in the log: the generation of its last change, and
// the journal record that made it durable.
type alEntry struct {
	gen uint64
	rec uint64
}

// activityFile is the activity log's file in the state directory.
const activityFile = "activity.log"

// activityLog is the activity log and the goroutine that checkpoints it.
type activityLog struct {
	path string
	log  *slog.Logger

	mu       sync.Mutex
	set      map[alKey]alEntry
	gen      uint64         // generation of the last touch
	inflight map[uint64]int // generations of changes not yet done
	recs     uint64         // records added (journal order)
	durable  uint64         // records known durable
	pend     []byte         // records added and not yet written
	broken   bool           // the journal's tail is unknown: compact next

	// wmu serializes the journal's writes (append + fsync, or a
	// compaction). Taken before mu, never while holding it; mu is not
	// held while waiting for the disk.
	wmu sync.Mutex
	f   *os.File // the journal, opened for appending; nil until the first write

	// sync makes every completed change durable in the spool and the
	// disks (before a checkpoint with more than hot extents at risk).
	sync func() error
	hot  int // alHot (tests lower it)
	// synced is the last generation whose changes are all durable on
	// every disk (a checkpoint's sync), flushed the same per disk (the
	// guest's flushes of that disk).
	synced  uint64
	flushed map[uint32]uint64
	// seqs, with the memory log, returns the spool's last acknowledged
	// sequence number and the next it gives out: a checkpoint drops an
	// extent only once every change to it is acknowledged (nil: once
	// fsync'd).
	seqs func() (acked, next uint64)
	// marks are (generation, next seq) pairs taken at checkpoints, oldest
	// first, for seqs: changes up to gen were logged below next.
	marks []alMark
	rt    *routines // the checkpoints
}

type alMark struct{ gen, next uint64 }

func openActivityLog(parent context.Context, dir string, log *slog.Logger, sync func() error) *activityLog {
	return &activityLog{path: filepath.Join(dir, activityFile), log: log, set: map[alKey]alEntry{},
		inflight: map[uint64]int{}, sync: sync, hot: alHot, flushed: map[uint32]uint64{}, rt: newRoutines(parent)}
}

// start checkpoints the log every alCheckpoint.
func (al *activityLog) start() {
	al.rt.Go(func() {
		t := time.NewTicker(alCheckpoint)
		defer t.Stop()
		for {
			select {
			case <-al.rt.ctx.Done():
				return
			case <-t.C:
				al.mu.Lock()
				var sync func() error
				if len(al.set) > al.hot {
					sync = al.sync
				}
				al.mu.Unlock()
				if err := al.checkpoint(sync); err != nil && al.rt.ctx.Err() == nil {
					al.log.Error("activity log checkpoint", "err", err)
				}
			}
		}
	})
}

// Close stops the checkpoints. The file stays: only a clean stop, with
// everything synced, removes it.
func (al *activityLog) Close() {
	al.rt.Close()
	al.wmu.Lock()
	if al.f != nil {
		al.f.Close()
		al.f = nil
	}
	al.wmu.Unlock()
}

// touch makes sure the extents of [off, off+n) of disk are durably in the
// log, and returns the change's generation, which the caller hands to done
// once its change is in the spool and on the disk (or failed): until then
// no checkpoint drops those extents. A change whose extents are all in the
// log already writes nothing and waits for nothing but mu.
func (al *activityLog) touch(disk uint32, off, n int64) (uint64, error) {
	if n <= 0 {
		return 0, nil
	}
	al.mu.Lock()
	al.gen++
	g := al.gen
	need := uint64(0)
	for e := uint64(off) / alExtent; e <= uint64(off+n-1)/alExtent; e++ {
		k := alKey{disk, e}
		ent, ok := al.set[k]
		if !ok {
			al.recs++
			ent.rec = al.recs
			al.pend = appendALRecord(al.pend, k)
		}
		ent.gen = g
		al.set[k] = ent
		need = max(need, ent.rec)
	}
	al.inflight[g]++
	durable := al.durable
	al.mu.Unlock()
	if need <= durable {
		return g, nil
	}
	if err := al.commit(need); err != nil {
		al.done(g)
		return 0, fmt.Errorf("activity log: %w", err)
	}
	return g, nil
}

// done ends the change of generation g (see touch).
func (al *activityLog) done(g uint64) {
	if g == 0 {
		return
	}
	al.mu.Lock()
	if al.inflight[g]--; al.inflight[g] <= 0 {
		delete(al.inflight, g)
	}
	al.mu.Unlock()
}

// commit makes the journal durable up to record need: one append and
// fsync for every record pending (group commit), or a compaction if the
// journal is not open yet or its tail is unknown. Every record in the
// journal is an extent in the set (extents leave the set only with a
// compaction), so the file holds one record per extent at risk.
func (al *activityLog) commit(need uint64) error {
	al.wmu.Lock()
	defer al.wmu.Unlock()
	al.mu.Lock()
	if al.durable >= need {
		al.mu.Unlock()
		return nil
	}
	if al.f == nil || al.broken {
		al.mu.Unlock()
		return al.compactLocked()
	}
	pend, upto := al.pend, al.recs
	al.pend = nil
	al.mu.Unlock()
	_, err := al.f.Write(pend)
	if err == nil {
		err = al.f.Sync()
	}
	al.mu.Lock()
	defer al.mu.Unlock()
	if err != nil {
		// What reached the file is unknown: the next commit rewrites it
		// whole (the records are still in the set).
		al.broken = true
		return err
	}
	al.durable = max(al.durable, upto)
	return nil
}

// compactLocked writes the whole set as a new journal that replaces the old
// one atomically, and opens it for appending. The caller holds wmu.
func (al *activityLog) compactLocked() error {
	al.mu.Lock()
	keys := make([]alKey, 0, len(al.set))
	for k := range al.set {
		keys = append(keys, k)
	}
	upto := al.recs
	al.pend = nil
	al.mu.Unlock()
	// Records added from here are after upto and go to the new file.
	b := alHeader()
	for _, k := range keys {
		b = appendALRecord(b, k)
	}
	err := atomicfile.Write(al.path, b, 0o600)
	var f *os.File
	if err == nil {
		f, err = os.OpenFile(al.path, os.O_WRONLY|os.O_APPEND, 0)
	}
	al.mu.Lock()
	defer al.mu.Unlock()
	if al.f != nil {
		al.f.Close()
		al.f = nil
	}
	if err != nil {
		al.broken = true
		return err
	}
	al.f = f
	al.broken = false
	al.durable = max(al.durable, upto)
	return nil
}

// completedLocked returns the last generation whose changes are all done
// (a change still in flight may reach the spool or the disk after a sync
// that begins now). The caller holds mu.
func (al *activityLog) completedLocked() uint64 {
	g := al.gen
	for ig := range al.inflight {
		g = min(g, ig-1)
	}
	return g
}

// completed is completedLocked for a sync about to begin (Disk.Flush).
func (al *activityLog) completed() uint64 {
	al.mu.Lock()
	defer al.mu.Unlock()
	return al.completedLocked()
}

// flushedDisk records that a sync of disk and the spool, begun when
// completed returned g, ended: the disk's changes up to g are durable.
func (al *activityLog) flushedDisk(disk uint32, g uint64) {
	al.mu.Lock()
	al.flushed[disk] = max(al.flushed[disk], g)
	al.mu.Unlock()
}

// checkpoint drops from the log the extents whose changes are all durable
// (a sync of their disk began after the last of them: the guest's flushes,
// or sync when not nil, which this checkpoint calls first) and, with the
// memory log, acknowledged; and compacts the journal.
func (al *activityLog) checkpoint(sync func() error) error {
	al.mu.Lock()
	if len(al.set) == 0 {
		al.mu.Unlock()
		return nil
	}
	g := al.completedLocked()
	if al.seqs != nil {
		// Changes up to g were logged (given their sequence numbers)
		// before next: they are acknowledged once next-1 is.
		_, next := al.seqs()
		al.marks = append(al.marks, alMark{gen: g, next: next})
	}
	al.mu.Unlock()
	if sync != nil {
		if err := sync(); err != nil {
			return err
		}
		al.mu.Lock()
		al.synced = max(al.synced, g)
		al.mu.Unlock()
	}
	acked := uint64(math.MaxUint64)
	if al.seqs != nil {
		acked = al.ackedGen()
	}
	al.wmu.Lock()
	defer al.wmu.Unlock()
	al.mu.Lock()
	dropped := 0
	for k, e := range al.set {
		if e.gen <= max(al.synced, al.flushed[k.disk]) && e.gen <= acked {
			delete(al.set, k)
			dropped++
		}
	}
	al.mu.Unlock()
	if dropped == 0 && al.f != nil && !al.broken {
		return nil
	}
	return al.compactLocked()
}

// ackedGen returns the last generation whose changes are all acknowledged,
// from the marks (0 if none is known), and forgets the marks it passed.
func (al *activityLog) ackedGen() uint64 {
	acked, _ := al.seqs()
	al.mu.Lock()
	defer al.mu.Unlock()
	g := uint64(0)
	n := 0
	for n < len(al.marks) && al.marks[n].next-1 <= acked {
		g = al.marks[n].gen
		n++
	}
	if n > 0 {
		// Keep the last mark passed: a later one is newer, an older one
		// drops nothing more.
		al.marks = al.marks[n-1:]
	}
	return g
}

func alHeader() []byte {
	b := make([]byte, alHeaderSize)
	copy(b, alMagic[:])
	binary.LittleEndian.PutUint16(b[6:], alVersion)
	binary.LittleEndian.PutUint32(b[12:], replication.Checksum(b[:12]))
	return b
}

func appendALRecord(b []byte, k alKey) []byte {
	at := len(b)
	b = append(b, alRecordTag, 0, 0, 0)
	b = binary.LittleEndian.AppendUint32(b, k.disk)
	b = binary.LittleEndian.AppendUint64(b, k.extent)
	b = binary.LittleEndian.AppendUint32(b, 0)
	return binary.LittleEndian.AppendUint32(b, replication.Checksum(b[at:at+20]))
}

// atRisk reads the log left by the last run: the ranges of each disk that a
// forced shutdown may have left different from the replica. ok is false if
// the log is unreadable (then every disk is at risk as a whole).
func atRisk(dir string) (map[uint32][]replication.Range, bool) {
	f, err := os.Open(filepath.Join(dir, activityFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, true
	}
	if err != nil {
		return nil, false
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, alMaxFile+1))
	if err != nil || len(b) > alMaxFile || len(b) < alHeaderSize || [6]byte(b[:6]) != alMagic ||
		binary.LittleEndian.Uint16(b[6:]) != alVersion ||
		replication.Checksum(b[:12]) != binary.LittleEndian.Uint32(b[12:]) {
		return nil, false
	}
	out := map[uint32][]replication.Range{}
	seen := map[alKey]bool{}
	for p := b[alHeaderSize:]; len(p) >= alRecordSize; p = p[alRecordSize:] {
		if p[0] != alRecordTag || replication.Checksum(p[:20]) != binary.LittleEndian.Uint32(p[20:]) {
			break // the torn tail of an append whose change never started
		}
		disk, e := binary.LittleEndian.Uint32(p[4:]), binary.LittleEndian.Uint64(p[8:])
		if e >= replication.MaxDiskSize/alExtent {
			return nil, false // no disk has that extent: not a log this agent wrote
		}
		if k := (alKey{disk, e}); !seen[k] {
			seen[k] = true
			out[disk] = append(out[disk], replication.Range{Off: int64(e) * alExtent, Len: alExtent})
		}
	}
	for d, rs := range out {
		sort.Slice(rs, func(i, j int) bool { return rs[i].Off < rs[j].Off })
		out[d] = coalesce(rs, replication.MaxDivergedRanges)
	}
	return out, true
}

// coalesce returns sorted ranges as at most limit ranges covering them, by
// closing the smallest gaps first: a Hello carries at most
// replication.MaxDivergedRanges per disk, and resyncing a little more than
// changed is safe where a refused Hello is not.
func coalesce(rs []replication.Range, limit int) []replication.Range {
	if len(rs) <= limit {
		return rs
	}
	// gaps[i] is the gap after rs[i]; close the len(rs)-limit smallest.
	gaps := make([]int, len(rs)-1)
	for i := range gaps {
		gaps[i] = i
	}
	gap := func(i int) int64 { return rs[i+1].Off - (rs[i].Off + rs[i].Len) }
	sort.SliceStable(gaps, func(a, b int) bool { return gap(gaps[a]) < gap(gaps[b]) })
	closed := make([]bool, len(rs))
	for _, i := range gaps[:len(rs)-limit] {
		closed[i] = true
	}
	out := make([]replication.Range, 0, limit)
	for i, r := range rs {
		if i > 0 && closed[i-1] {
			last := &out[len(out)-1]
			last.Len = max(last.Len, r.Off+r.Len-last.Off)
			continue
		}
		out = append(out, r)
	}
	return out
}

// bootID identifies this boot of the machine ("" if unknown).
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
