package agent

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

// The start of an agent: its identity (registering the first time), its
// disks and spool, the repair of the log after an unclean stop, and the
// check for a forced shutdown of the machine. All of it runs before any
// component does, on the state as loaded.

// maxScanSize bounds a scan-mode disk: its block hashes (17 bytes a MiB)
// live in memory, 70 MiB at this size.
const maxScanSize = 4 << 40

// identity loads the agent's state, registering first if it has none.
func (a *Agent) identity(ctx context.Context) (*state, error) {
	cfg := a.cfg
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, err
	}
	st, err := loadState(cfg.StateDir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if cfg.Server == "" || cfg.PassphraseFile == "" {
			return nil, errors.New("this agent is not registered yet: --server and --passphrase-file are required")
		}
		pass, err := os.ReadFile(cfg.PassphraseFile)
		if err != nil {
			return nil, fmt.Errorf("read passphrase: %w", err)
		}
		st, err = registerRetry(ctx, a.log, defaultRegisterBackoff, cfg.Server, pass, cfg.Name, cfg.StateDir)
		if err != nil {
			return nil, err
		}
		a.log.Info("registered", "machine", st.MachineID, "name", st.Name, "data", st.DataAddr)
	case err != nil:
		return nil, err
	default:
		if cfg.Name != st.Name && cfg.Name != "" {
			a.log.Warn("--name differs from the registered name; keeping the registered one", "registered", st.Name, "given", cfg.Name)
		}
	}
	if st.LogID == "" {
		// A new state, or one from before log ids (an agent continuing
		// its own log): open saves it.
		st.LogID = newLogID()
	}
	return st, nil
}

// open opens the spool and the disks of st, repairs the log after an
// unclean stop, and wires the components.
func (a *Agent) open(st *state) error {
	cfg := a.cfg
	// Disks: keep indexes stable; new names get new indexes.
	for _, spec := range cfg.Disks {
		ds := st.disk(spec.Name)
		if ds == nil {
			idx := uint32(0)
			for _, d := range st.Disks {
				if d.Index >= idx {
					idx = d.Index + 1
				}
			}
			st.Disks = append(st.Disks, diskState{Index: idx, Name: spec.Name, Path: spec.Path})
			ds = &st.Disks[len(st.Disks)-1]
		}
		ds.Path = spec.Path
	}
	for _, ds := range st.Disks {
		found := false
		for _, spec := range cfg.Disks {
			found = found || spec.Name == ds.Name
		}
		if !found {
			return fmt.Errorf("disk %q is protected but not given with --disk; give it, or disable its protection", ds.Name)
		}
	}
	a.unclean = !exists(filepath.Join(cfg.StateDir, cleanFile))
	// The last run's records in memory were lost if it stopped uncleanly.
	memLost := a.unclean && st.MemoryLog
	st.MemoryLog = cfg.MemoryLog > 0
	sp, rec, err := spool.Open(filepath.Join(cfg.StateDir, spoolDir), spool.Options{MaxBytes: cfg.SpoolMax, MemBytes: cfg.MemoryLog}, st.Acked)
	if err != nil {
		return fmt.Errorf("open spool: %w", err)
	}
	a.spool = sp
	a.runFirst = sp.Next()
	if rec.Truncated > 0 {
		a.log.Warn("spool had a torn record at its end (the agent stopped mid-write); cut it off", "bytes", rec.Truncated)
	}
	from := map[uint32]copyPos{}
	for i := range st.Disks {
		ds := &st.Disks[i]
		d, err := openDisk(a.ctx, ds.Index, ds.Name, ds.Path, sp, a.lat, a.log)
		if err != nil {
			return err
		}
		a.disks = append(a.disks, d)
		for _, spec := range cfg.Disks {
			if spec.Name == ds.Name && spec.Scan {
				interval := spec.ScanInterval
				if interval <= 0 {
					interval = 30 * time.Second
				}
				if d.Size() > maxScanSize {
					return fmt.Errorf("disk %s: %d bytes is more than scan mode handles (%d: it keeps a hash of every MiB in memory); serve it over NBD (without mode=scan)", d.Name, d.Size(), int64(maxScanSize))
				}
				d.scan = newScanState(d.Size(), interval)
				if !a.unclean {
					if err := loadScan(cfg.StateDir, d); err != nil {
						a.log.Warn("scan hashes", "disk", d.Name, "err", err)
					}
				}
			}
		}
		if ds.Size != 0 && d.Size() < ds.Size {
			return fmt.Errorf("disk %s shrank from %d to %d bytes: a protected disk cannot shrink (as in ASR); restore its size, or disable its protection", ds.Name, ds.Size, d.Size())
		}
		if ds.Size != 0 && d.Size() > ds.Size {
			// The server grows the replica and resyncs the new area when
			// it sees the new size in Hello.
			a.log.Info("disk grew; its new area will be resynced", "disk", ds.Name, "from", ds.Size, "to", d.Size())
		}
		ds.Size = d.Size()
		idx := ds.Index
		d.diverged = func(reason string) { a.markDiverged(idx, reason) }
		// The initial copy resumes from the furthest progress known: the
		// acknowledged one in the state file, or a later one still in the
		// spool (whose records will be sent). Only the acknowledged one is
		// saved: the spool's tail is not durable until flushed.
		pos := copyPos{cursor: ds.Cursor, done: ds.Done}
		if p, ok := rec.Progress[ds.Index]; ok && int64(p.Offset) > pos.cursor {
			pos = copyPos{cursor: int64(p.Offset), done: pos.done || p.Flags&replication.FlagDone != 0}
		}
		from[ds.Index] = pos
	}
	if err := st.save(cfg.StateDir); err != nil {
		return err
	}
	// After the memory log was lost the activity log's extents are
	// resynced, which covers the ranges a repair would re-log (they are
	// not acknowledged, so in the activity log).
	if err := repairLog(cfg.StateDir, a.unclean && !memLost, rec, st, a.disks, sp, a.log); err != nil {
		return err
	}
	if err := a.afterForcedShutdown(st, memLost); err != nil {
		return err
	}
	a.state = newStateStore(cfg.StateDir, st)
	os.Remove(filepath.Join(cfg.StateDir, cleanFile))
	return a.wire(from)
}

// repairFile lists the ranges being re-logged after an unclean stop, so a
// second stop in the middle of the repair repeats all of it.
const repairFile = "repair.json"

// repairLog re-logs, after an unclean stop, the ranges of the changes
// among the spool's last spool.MaxInFlight records: any of them may have
// been logged and not reached the disk (or the reverse), since changes
// that do not overlap run concurrently. Overlapping ranges are merged, so
// each byte is read once. The ranges are saved first, so an interrupted
// repair is redone whole at the next start.
//
// Nothing ships before the repair, so it never waits for room in the
// spool: when the ranges do not fit in what is left of it, they are
// marked for a resync instead (the server compares them with the
// replica), and after a stop during an overflow (the whole disk is
// resynced) nothing is re-logged.
func repairLog(dir string, unclean bool, rec spool.Recovered, st *state, disks diskSet, sp *spool.Spool, log *slog.Logger) error {
	path := filepath.Join(dir, repairFile)
	var ranges []spool.Tail
	if b, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(b, &ranges); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
	}
	if unclean {
		ranges = append(ranges, mergeTails(rec.Recent)...)
	}
	if len(ranges) == 0 {
		return nil
	}
	b, err := json.Marshal(ranges)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(path, b, 0o600); err != nil {
		return err
	}
	var need int64
	for _, t := range ranges {
		need += int64(t.Length) + repairRecordOverhead
	}
	if st.Overflow || need > sp.Room() {
		if !st.Overflow {
			log.Warn("unclean stop with the spool nearly full: the last changes' ranges are marked for a resync instead of re-logged", "bytes", need, "room", sp.Room())
			divergeRanges(st, ranges)
			if err := st.save(dir); err != nil {
				return err
			}
		}
		if err := os.Remove(path); err != nil {
			return err
		}
		return atomicfile.SyncDir(dir)
	}
	for _, t := range ranges {
		for _, d := range disks {
			if d.Index == t.Disk {
				if err := d.Relog(int64(t.Offset), int64(t.Length)); err != nil {
					return fmt.Errorf("repair log of disk %s: %w", d.Name, err)
				}
				log.Info("unclean stop: re-logged the disk's last change", "disk", d.Name, "offset", t.Offset, "length", t.Length)
			}
		}
	}
	if err := sp.Sync(); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil {
		return err
	}
	return atomicfile.SyncDir(dir)
}

// repairRecordOverhead bounds a re-logged range's record header (its
// data is at most the range's length).
const repairRecordOverhead = 64

// divergeRanges marks ranges of the disks for a resync (a disk marked
// whole stays so).
func divergeRanges(st *state, ranges []spool.Tail) {
	for i := range st.Disks {
		ds := &st.Disks[i]
		if ds.Diverged != "" && len(ds.DivergedRanges) == 0 {
			continue
		}
		for _, t := range ranges {
			if t.Disk == ds.Index {
				ds.DivergedRanges = append(ds.DivergedRanges, replication.Range{Off: int64(t.Offset), Len: int64(t.Length)})
				ds.Diverged = "unclean stop with the spool full: the ranges of its last changes are resynced"
			}
		}
	}
}

// mergeTails returns the ranges of ts, per disk, with overlapping or
// touching ranges merged (as writes: a relog reads what the disk holds).
func mergeTails(ts []spool.Tail) []spool.Tail {
	ts = slices.Clone(ts)
	slices.SortFunc(ts, func(a, b spool.Tail) int {
		return cmp.Or(cmp.Compare(a.Disk, b.Disk), cmp.Compare(a.Offset, b.Offset))
	})
	var out []spool.Tail
	for _, t := range ts {
		t.Kind = replication.KindWrite
		if n := len(out); n > 0 && out[n-1].Disk == t.Disk && t.Offset <= out[n-1].Offset+uint64(out[n-1].Length) {
			last := &out[n-1]
			end := max(last.Offset+uint64(last.Length), t.Offset+uint64(t.Length))
			if end-last.Offset <= replication.MaxRecordData {
				last.Length = uint32(end - last.Offset)
				continue
			}
		}
		out = append(out, t)
	}
	return out
}

// afterForcedShutdown checks whether the machine went down since the last
// run (an unclean stop and another boot id), or the last run stopped
// uncleanly with a memory log (memLost): then the changes in the activity
// log's extents may be lost from the spool while on the disk (or the
// reverse), and each disk is marked for a resync of those ranges. The
// server may then hold records the agent lost (recovering: it continues
// after them); with the memory log the spool is held until the agent knows
// where the server's records end (welcome), so no record of this run is
// numbered as one the server holds and dropped by the Rebase.
func (a *Agent) afterForcedShutdown(st *state, memLost bool) error {
	boot := bootID()
	prev := st.BootID
	st.BootID = boot
	if st.Overflow {
		// Stopped while overflowing: the changed-block maps are gone.
		for i := range st.Disks {
			st.Disks[i].Diverged, st.Disks[i].DivergedRanges = "the agent stopped during a spool overflow: its changed-block map was lost", nil
		}
		st.Overflow = false
	}
	forced := a.unclean && prev != "" && boot != "" && prev != boot
	if forced || memLost {
		a.recovering = true
		a.divergeFirst = forced
		what := "forced shutdown of the machine"
		if !forced {
			what = "unclean stop of the agent with its memory log"
			a.spool.Hold()
		}
		risk, ok := atRisk(a.cfg.StateDir)
		for i := range st.Disks {
			ds := &st.Disks[i]
			if ds.Diverged != "" && len(ds.DivergedRanges) == 0 {
				continue // already marked (whole disk)
			}
			if !ok {
				ds.Diverged, ds.DivergedRanges = what+" (activity log unreadable: the whole disk is at risk)", nil
				continue
			}
			if rs := risk[ds.Index]; len(rs) > 0 {
				ds.Diverged = fmt.Sprintf("%s: %d extents of 4 MiB had changes in flight", what, len(rs))
				ds.DivergedRanges = append(ds.DivergedRanges, rs...)
			}
		}
		a.log.Warn(what + ": the extents in the activity log will be resynced")
	}
	if err := st.save(a.cfg.StateDir); err != nil {
		return err
	}
	if a.unclean {
		// The activity log of the run that stopped covers its writes
		// until they are durable: the spool was synced at its open, the
		// disks are here, before the log goes.
		for _, d := range a.disks {
			if err := d.fb.Flush(); err != nil {
				return fmt.Errorf("sync disk %s after an unclean stop: %w", d.Name, err)
			}
		}
	}
	err := os.Remove(filepath.Join(a.cfg.StateDir, activityFile))
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}
