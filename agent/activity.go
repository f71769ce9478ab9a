package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
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
// seconds, once the spool and the disks are fsynced, the extents written
// before the fsync leave it. A process that is killed loses nothing (the
// page cache keeps the spool), but after the machine itself went down
// (another boot id) the extents in the log are at risk: the disk is marked
// for a resync of exactly those ranges.

// alExtent is the granularity of the activity log.
const alExtent = 4 << 20

// alCheckpoint is how often the activity log is emptied of synced extents.
const alCheckpoint = 5 * time.Second

type alKey struct {
	disk   uint32
	extent uint64
}

// activityFile is the activity log's file in the state directory.
const activityFile = "activity.log"

// activityLog is the activity log and the goroutine that checkpoints it.
type activityLog struct {
	path string
	log  *slog.Logger
	mu   sync.Mutex
	set  map[alKey]uint64 // extent -> generation of its last change
	gen  uint64
	err  error // sticky: the log could not be written

	// sync makes every completed change durable in the spool and the
	// disks (before a checkpoint).
	sync func() error
	rt   *routines // the checkpoints
}

func openActivityLog(parent context.Context, dir string, log *slog.Logger, sync func() error) *activityLog {
	return &activityLog{path: filepath.Join(dir, activityFile), log: log, set: map[alKey]uint64{}, sync: sync, rt: newRoutines(parent)}
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
				if err := al.checkpoint(al.sync); err != nil && al.rt.ctx.Err() == nil {
					al.log.Error("activity log checkpoint", "err", err)
				}
			}
		}
	})
}

// Close stops the checkpoints. The file stays: only a clean stop, with
// everything synced, removes it.
func (al *activityLog) Close() { al.rt.Close() }

// touch makes sure the extents of [off, off+n) of disk are in the log,
// writing it durably if one was missing.
func (al *activityLog) touch(disk uint32, off, n int64) error {
	if n <= 0 {
		return nil
	}
	al.mu.Lock()
	defer al.mu.Unlock()
	al.gen++
	added := false
	for e := uint64(off) / alExtent; e <= uint64(off+n-1)/alExtent; e++ {
		k := alKey{disk, e}
		if _, ok := al.set[k]; !ok {
			added = true
		}
		al.set[k] = al.gen
	}
	if !added {
		return nil
	}
	if err := al.saveLocked(); err != nil {
		al.err = err
		return fmt.Errorf("activity log: %w", err)
	}
	return nil
}

// checkpoint fsyncs the spool and the disks (sync) and then drops from the
// log the extents not changed since the fsync began.
func (al *activityLog) checkpoint(sync func() error) error {
	al.mu.Lock()
	if len(al.set) == 0 {
		al.mu.Unlock()
		return nil
	}
	g := al.gen
	al.mu.Unlock()
	if err := sync(); err != nil {
		return err
	}
	al.mu.Lock()
	defer al.mu.Unlock()
	for k, kg := range al.set {
		if kg <= g {
			delete(al.set, k)
		}
	}
	return al.saveLocked()
}

// File: "ASRAL1", count u32, entries [disk u32][extent u64], CRC-32C.
func (al *activityLog) saveLocked() error {
	keys := make([]alKey, 0, len(al.set))
	for k := range al.set {
		keys = append(keys, k)
	}
	b := make([]byte, 0, 10+12*len(keys)+4)
	b = append(b, "ASRAL1"...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(keys)))
	for _, k := range keys {
		b = binary.LittleEndian.AppendUint32(b, k.disk)
		b = binary.LittleEndian.AppendUint64(b, k.extent)
	}
	b = binary.LittleEndian.AppendUint32(b, replication.Checksum(b))
	return atomicfile.Write(al.path, b, 0o600)
}

// atRisk reads the log left by the last run: the ranges of each disk that a
// forced shutdown may have left different from the replica. ok is false if
// the log is unreadable (then every disk is at risk as a whole).
func atRisk(dir string) (map[uint32][]replication.Range, bool) {
	b, err := os.ReadFile(filepath.Join(dir, activityFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, true
	}
	if err != nil || len(b) < 14 || string(b[:6]) != "ASRAL1" ||
		replication.Checksum(b[:len(b)-4]) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return nil, false
	}
	n := int(binary.LittleEndian.Uint32(b[6:]))
	if len(b) != 10+12*n+4 {
		return nil, false
	}
	out := map[uint32][]replication.Range{}
	p := b[10:]
	for i := 0; i < n; i++ {
		disk, e := binary.LittleEndian.Uint32(p), binary.LittleEndian.Uint64(p[4:])
		if e >= replication.MaxDiskSize/alExtent {
			return nil, false // no disk has that extent: not a log this agent wrote
		}
		out[disk] = append(out[disk], replication.Range{Off: int64(e) * alExtent, Len: alExtent})
		p = p[12:]
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
