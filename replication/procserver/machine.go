package procserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

const openName = "open.seg"

// connectGrace is how long a point request waits for a disconnected agent.
const connectGrace = 20 * time.Second

// newLogWait bounds how long an agent's new log waits for the old one to be
// applied before the agent is told to try again (within the 30 s the
// server gives a Hello's answer). Server.newLogWait holds it (tests shorten
// it).
const newLogWait = 15 * time.Second

// tryAgainError is a refusal that goes away by itself: the agent is told
// to try again soon, not that an operator must act.
type tryAgainError struct{ err error }

func (e *tryAgainError) Error() string { return e.err.Error() }
func (e *tryAgainError) Unwrap() error { return e.err }

// machine is the process server's state for one machine: its cache files,
// its current agent connection and its applier.
type machine struct {
	s   *Server
	id  string
	dir string
	log *slog.Logger

	mu        sync.Mutex
	open      cacheFile // the unsealed cache file
	openFirst uint64    // first seq the open file holds (or will hold)
	openBytes int64     // bytes in the open file
	openRaw   int64     // raw record bytes in the open file
	openSince time.Time
	openTag   bool   // the open file holds a tag: seal soon
	appended  uint64 // last seq written to the cache
	durable   uint64 // last seq fsync'd (acknowledged)
	sealed    []sealedSeg
	conn      *agentConn
	ackSent   uint64
	ackAt     time.Time
	status    replication.Status
	statusAt  time.Time
	applyErr  string
	broken    error // set when the cache could not be made durable
	waiters   map[uint64]chan pointResult
	helds     map[uint64]chan struct{} // group cuts waiting for this agent to hold
	syncWake  chan struct{}
	applyWake chan struct{}
	closed    bool

	applyMu sync.Mutex // held while the applier works
	applier *replication.Applier

	// attachMu serializes connecting agents (and the end of a log): each
	// decides from the catalog's log which log the agent's records join.
	attachMu sync.Mutex

	compares chan compareReq // resync chunk hashes to compare
}

type compareReq struct {
	cc *agentConn
	h  replication.Hashes
}

type sealedSeg struct {
	first, last uint64
	path        string
	size        int64
	raw         int64 // record bytes, uncompressed (= size for a segment recovered at start)
	sealedAt    time.Time
}

type pointResult struct {
	p   replication.Point
	err error
}

// openMachine recovers a machine's cache directory.
func openMachine(ctx context.Context, s *Server, id, name string) (*machine, error) {
	m := &machine{
		s: s, id: id, dir: filepath.Join(s.cfg.CacheDir, id), log: s.log.With("machine", id),
		compares: make(chan compareReq, 4),
		waiters:  map[uint64]chan pointResult{}, helds: map[uint64]chan struct{}{}, syncWake: make(chan struct{}, 1), applyWake: make(chan struct{}, 1),
	}
	if err := os.MkdirAll(m.dir, 0o700); err != nil {
		return nil, err
	}
	a, err := replication.OpenApplier(ctx, s.cfg.Catalog, id, name, s.log)
	if err != nil {
		return nil, err
	}
	m.applier = a
	a.OnPoint = m.onPoint
	a.OnNoPoint = m.onNoPoint
	a.OnState = s.cfg.OnState
	applied := a.AppliedSeq()
	m.durable = applied

	ents, err := os.ReadDir(m.dir)
	if err != nil {
		a.Close()
		return nil, err
	}
	kept, err := s.cfg.Catalog.Segments(ctx, id)
	if err != nil {
		a.Close()
		return nil, err
	}
	onTarget := map[uint64]bool{}
	for _, si := range kept {
		onTarget[si.First] = true
	}
	for _, e := range ents {
		first, last, ok := replication.ParseSegmentName(e.Name())
		if !ok {
			continue
		}
		path := filepath.Join(m.dir, e.Name())
		if last <= applied {
			// Applied before the stop; it may not have reached the
			// target's any-point-in-time store yet.
			if !onTarget[first] {
				if err := m.keepOnTarget(ctx, path); err != nil {
					m.log.Warn("applied segment not kept for any-point-in-time recovery", "segment", e.Name(), "err", err)
				}
			}
			os.Remove(path)
			continue
		}
		st, err := e.Info()
		if err != nil {
			a.Close()
			return nil, err
		}
		m.sealed = append(m.sealed, sealedSeg{first: first, last: last, path: path, size: st.Size(), raw: st.Size(), sealedAt: st.ModTime()})
	}
	sort.Slice(m.sealed, func(i, j int) bool { return m.sealed[i].first < m.sealed[j].first })
	for _, sg := range m.sealed {
		if sg.last > m.durable {
			m.durable = sg.last
		}
		s.cacheBytes.Add(sg.size)
	}
	// The unsealed file: keep its complete frames (they were written, and
	// those acknowledged were fsync'd), cut the torn tail, seal it.
	openPath := filepath.Join(m.dir, openName)
	if data, err := os.ReadFile(openPath); err == nil {
		scan, err := replication.ScanSegment(data, true, nil)
		switch {
		case err != nil:
			// Not even a valid header: created but never written.
			m.log.Warn("discarding unreadable cache file", "err", err)
		case scan.Records > 0 && scan.First <= m.durable+1 && scan.Last > m.durable:
			if err := m.sealBytes(data[:scan.ValidLen], scan); err != nil {
				a.Close()
				return nil, err
			}
		}
		os.Remove(openPath)
	}
	m.appended = m.durable
	if err := m.newOpenFile(); err != nil {
		a.Close()
		return nil, err
	}
	if len(m.sealed) > 0 {
		m.log.Info("cache recovered", "segments", len(m.sealed), "durable_seq", m.durable, "applied_seq", applied)
	}
	m.wakeApply()
	return m, nil
}

// sealBytes writes recovered frames as a sealed segment. The file may be
// sealed already (the server stopped between writing the SEAL frame and the
// rename), in which case it is kept as it is.
func (m *machine) sealBytes(data []byte, scan replication.SegmentScan) error {
	if !scan.Sealed {
		seal := replication.SealFrame(scan.Last, scan.Records)
		data = replication.AppendFrame(append([]byte(nil), data...), &seal)
	}
	path := filepath.Join(m.dir, replication.SegmentName(scan.First, scan.Last))
	if err := atomicfile.Write(path, data, 0o600); err != nil {
		return err
	}
	m.sealed = append(m.sealed, sealedSeg{first: scan.First, last: scan.Last, path: path, size: int64(len(data)), raw: int64(len(data)), sealedAt: time.Now()})
	m.s.cacheBytes.Add(int64(len(data)))
	if scan.Last > m.durable {
		m.durable = scan.Last
	}
	return nil
}

// newOpenFile starts an empty cache file after m.appended. Caller holds mu
// (or has exclusive access).
func (m *machine) newOpenFile() error {
	path := filepath.Join(m.dir, openName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	h := replication.SegmentHeader(m.appended+1, time.Now())
	if _, err := f.Write(h); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := atomicfile.SyncDir(m.dir); err != nil {
		f.Close()
		return err
	}
	m.open, m.openFirst, m.openBytes, m.openRaw, m.openTag = f, m.appended+1, int64(len(h)), 0, false
	m.s.cacheBytes.Add(int64(len(h)))
	return nil
}

// attach makes cc the machine's connection (closing an older one) and checks
// that the agent's log continues the server's, or takes it as a new log
// (another log id), recorded in the catalog before the Welcome names it.
func (m *machine) attach(ctx context.Context, cc *agentConn, h *replication.Hello) (replication.Welcome, error) {
	if h.LogID != "" && !validID(h.LogID) {
		return replication.Welcome{}, fmt.Errorf("log id %.80q: want up to 64 hex digits", h.LogID)
	}
	m.attachMu.Lock()
	defer m.attachMu.Unlock()
	m.applyMu.Lock()
	err := m.applier.EnsureDisks(ctx, h.Disks)
	cat := m.applier.Machine()
	m.applyMu.Unlock()
	if err != nil {
		return replication.Welcome{}, err
	}
	cc.disks = map[uint32]int64{}
	for _, d := range cat.Disks {
		cc.disks[d.Index] = d.Size
	}
	w, err := m.join(cc, h, &cat)
	if err != nil {
		return w, err
	}
	// cc's reader has not started and the old connection can append nothing
	// more: the durable sequence number stays w.DurableSeq meanwhile.
	if w.NewLog {
		// The old log is applied to its end first (its tags make their
		// points), so that the disks are marked, and the resyncs due
		// follow the new log, before the agent can be asked for anything.
		if werr := m.waitApplied(w.DurableSeq, time.Duration(m.s.newLogWait.Load())); werr != nil {
			err = &tryAgainError{fmt.Errorf("this agent's log is a new one, which starts once the server has applied the old one: %v", werr)}
		}
	}
	m.applyMu.Lock()
	switch {
	case err != nil:
	case w.NewLog:
		why := cat.LogEnded
		if why == "" {
			why = "re-registered, or its state was lost"
		}
		start := w.DurableSeq + 1
		reason := fmt.Sprintf("the agent started a new log at seq %d (%s)", start, why)
		m.log.Warn("the agent's log is a new one: it starts after the server's durable seq, and the disks will be resynced",
			"log_id", h.LogID, "previous_log_id", cat.LogID, "seq", start, "agent_spool_first", h.SpoolFirst, "agent_next_seq", h.NextSeq)
		w.Copied, err = m.applier.StartLog(ctx, h.LogID, start, reason)
	case h.LogID != "" && (cat.LogID != h.LogID || cat.LogEnded != ""):
		err = m.applier.AdoptLog(ctx, h.LogID)
	}
	m.applyMu.Unlock()
	if err != nil {
		m.mu.Lock()
		if m.conn == cc {
			m.conn = nil
		}
		m.mu.Unlock()
		return replication.Welcome{}, err
	}
	if m.s.cfg.PolicyFor != nil {
		w.Policy = m.s.cfg.PolicyFor(m.id)
	}
	return w, nil
}

// join makes cc the machine's connection and decides how the agent's log
// joins what the server holds: it continues it (the same log id, or an
// agent that has none), or it is a new log. cat is the catalog entry.
func (m *machine) join(cc *agentConn, h *replication.Hello, cat *replication.MachineCatalog) (replication.Welcome, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return replication.Welcome{}, errors.New("process server closing")
	}
	if m.broken != nil {
		return replication.Welcome{}, m.broken
	}
	// From here the old connection (if any) can append nothing more, and
	// all it appended is made durable, so Welcome names everything held.
	if old := m.conn; old != nil {
		old.log.Info("replaced by a new connection")
		old.replace()
	}
	m.conn = cc
	if m.appended > m.durable {
		if err := m.open.Sync(); err != nil {
			m.breakLocked(err)
			return replication.Welcome{}, m.broken
		}
		m.durable = m.appended
	}
	var err error
	newLog := false
	if m.durable > 0 { // with nothing held, any log starts here
		switch {
		case h.LogID == "" && cat.LogEnded != "":
			err = fmt.Errorf("the machine's log ended (%s) and this agent (version %s) cannot start a new one: upgrade the agent", cat.LogEnded, h.AgentVersion)
		case h.LogID == "":
			// An agent from before log ids: the numbers are all there is.
		case cat.LogEnded != "", cat.LogID != "" && cat.LogID != h.LogID:
			newLog = true
		case cat.LogStart > 0 && h.SpoolFirst < cat.LogStart:
			// This log started at LogStart but the agent's spool is still
			// numbered as before: it never applied the Welcome that
			// started it (the connection broke first). Start it again.
			newLog = true
		}
	}
	if newLog {
		// Never joined by sequence number: the new log starts after what
		// the server holds, all of which stays and is applied (it was
		// acknowledged to the old agent).
		m.ackSent = m.durable
		return replication.Welcome{DurableSeq: m.durable, NewLog: true}, nil
	}
	// The agent holds [SpoolFirst, NextSeq); the server holds up to durable.
	if err == nil && h.SpoolFirst > m.durable+1 {
		// A sequence gap: changes the server acknowledged are gone from its
		// cache (lost or damaged). The log goes on from the agent's first
		// record; the applier meets the gap and marks the disks for resync.
		// What the open cache file holds is durable (synced above): it is
		// sealed first, so the log after the gap starts a file of its own.
		if m.openRaw > 0 {
			if serr := m.sealLocked(); serr != nil {
				m.conn = nil
				return replication.Welcome{}, fmt.Errorf("seal the cache before a sequence gap: %w", serr)
			}
		}
		m.log.Warn("sequence gap: changes lost between the server and the agent; the disks will be resynced",
			"lost_from", m.durable+1, "lost_to", h.SpoolFirst-1)
		m.open.Close()
		m.s.cacheBytes.Add(-m.openBytes)
		m.appended, m.durable = h.SpoolFirst-1, h.SpoolFirst-1
		if err := m.newOpenFile(); err != nil {
			m.conn = nil
			return replication.Welcome{}, err
		}
	}
	switch {
	case err != nil:
	case h.NextSeq <= m.durable && h.NextSeq > 0 && !h.Recovering:
		err = fmt.Errorf("the server holds changes up to seq %d but the agent's log ends at %d: the agent lost its state; re-register it (a resync follows)", m.durable, h.NextSeq-1)
	}
	if err != nil {
		m.conn = nil
		return replication.Welcome{}, err
	}
	m.ackSent = m.durable
	return replication.Welcome{DurableSeq: m.durable}, nil
}

func (m *machine) detach(cc *agentConn) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.conn == cc {
		m.conn = nil
	}
	cc.replace()
	close(cc.stopped)
}

// disconnect ends the machine's agent connection, if any, and waits until
// its reader stopped: from then on nothing it sends is used.
func (m *machine) disconnect(ctx context.Context, reason string) error {
	m.attachMu.Lock() // a connection being attached is either not there yet or detached in the end
	m.mu.Lock()
	cc := m.conn
	m.conn = nil
	m.mu.Unlock()
	m.attachMu.Unlock()
	if cc == nil {
		return nil
	}
	cc.log.Warn("agent connection closed", "reason", reason)
	cc.replace()
	select {
	case <-cc.stopped:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the agent connection of machine %s to stop: %w", m.id, ctx.Err())
	}
}

// breakLocked stops the machine's cache after an fsync failed: what the
// file holds after a failed fsync is unknown (a retried fsync may report
// success for data that was dropped), so nothing more is acknowledged until
// the server is restarted and recovers the file. Caller holds mu.
func (m *machine) breakLocked(err error) {
	if m.broken == nil {
		m.broken = fmt.Errorf("the process server's cache for this machine could not be made durable (%v); fix the cache disk and restart the server", err)
		m.log.Error("cache fsync failed; no more acknowledgements for this machine until a restart", "err", err)
	}
	if m.conn != nil {
		m.conn.replace()
		m.conn = nil
	}
}

// append writes a DATA frame from connection cc to the open cache file. The
// frame is acknowledged by the sync loop once fsync'd.
func (m *machine) append(cc *agentConn, f *replication.Frame) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("process server closing")
	}
	if m.broken != nil {
		return m.broken
	}
	if m.conn != cc {
		return errors.New("connection replaced by a newer one")
	}
	if f.Seq != m.appended+1 || f.Count == 0 {
		return &replication.ProtocolError{Reason: fmt.Sprintf("data frame at seq %d (%d records), expected seq %d", f.Seq, f.Count, m.appended+1)}
	}
	b := replication.AppendFrame(make([]byte, 0, replication.FrameHeaderSize+len(f.Payload)), f)
	if _, err := m.open.Write(b); err != nil {
		// A partial write leaves garbage: cut it so the file stays valid.
		m.cutLocked()
		return fmt.Errorf("write cache: %w", err)
	}
	if m.openRaw == 0 {
		m.openSince = time.Now()
	}
	m.openBytes += int64(len(b))
	m.openRaw += int64(f.RawLen)
	m.appended = f.Seq + uint64(f.Count) - 1
	if f.Flags&replication.FlagTag != 0 {
		m.openTag = true
	}
	m.s.cacheBytes.Add(int64(len(b)))
	select {
	case m.syncWake <- struct{}{}:
	default:
	}
	return nil
}

// syncLoop fsyncs the open cache file (group commit), acknowledges, and seals.
func (m *machine) syncLoop() {
	tick := time.NewTicker(m.s.cfg.SealAfter / 4)
	defer tick.Stop()
	for {
		select {
		case <-m.s.ctx.Done():
			return
		case <-m.syncWake:
		case <-tick.C:
		}
		if err := m.syncOnce(); err != nil {
			m.log.Error("cache sync or seal failed", "err", err)
			m.mu.Lock()
			if m.conn != nil {
				m.conn.replace() // the agent will resend from the last ack
			}
			m.mu.Unlock()
			time.Sleep(time.Second)
		}
	}
}

func (m *machine) syncOnce() error {
	m.mu.Lock()
	if m.closed || m.broken != nil {
		m.mu.Unlock()
		return nil
	}
	target, f := m.appended, m.open
	m.mu.Unlock()
	if target > m.durableSeq() {
		if err := f.Sync(); err != nil {
			m.mu.Lock()
			if m.open == f { // not sealed (and synced) meanwhile
				m.breakLocked(err)
			}
			m.mu.Unlock()
			return err
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.open == f && target > m.durable {
		m.durable = target
	}
	if m.openRaw > 0 && (m.openTag || m.openBytes >= m.s.cfg.SegmentBytes || m.openRaw >= m.s.cfg.SegmentBytes ||
		time.Since(m.openSince) >= m.s.cfg.SealAfter) {
		if err := m.sealLocked(); err != nil {
			return err
		}
	}
	// Acknowledge what became durable, and at least every few seconds
	// while idle so the agent knows the link is alive.
	if m.conn != nil && (m.durable != m.ackSent || time.Since(m.ackAt) > 5*time.Second) {
		m.conn.ack(m.durable)
		m.ackSent, m.ackAt = m.durable, time.Now()
	}
	return nil
}

func (m *machine) durableSeq() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.durable
}

// sealLocked closes the open file with a SEAL frame, renames it to its
// sequence range and starts a new one.
func (m *machine) sealLocked() error {
	first, last := m.openFirst, m.appended
	count := uint32(last - first + 1)
	seal := replication.SealFrame(last, count)
	b := replication.AppendFrame(nil, &seal)
	// Until the rename, a failure takes the SEAL frame back out, so later
	// frames are never written after a seal.
	unseal := m.cutLocked
	if _, err := m.open.Write(b); err != nil {
		unseal()
		return err
	}
	if err := m.open.Sync(); err != nil {
		unseal()
		m.breakLocked(err)
		return err
	}
	size, raw := m.openBytes+int64(len(b)), m.openRaw
	path := filepath.Join(m.dir, replication.SegmentName(first, last))
	if err := os.Rename(filepath.Join(m.dir, openName), path); err != nil {
		unseal()
		return err
	}
	m.open.Close()
	if err := atomicfile.SyncDir(m.dir); err != nil {
		// The rename may not be durable; the file is sealed and valid
		// under either name, and recovery handles both.
		m.log.Warn("directory fsync after sealing failed", "err", err)
	}
	m.s.cacheBytes.Add(int64(len(b)))
	m.sealed = append(m.sealed, sealedSeg{first: first, last: last, path: path, size: size, raw: raw, sealedAt: time.Now()})
	m.durable = last
	if err := m.newOpenFile(); err != nil {
		// Without an open file nothing more can be cached.
		m.breakLocked(fmt.Errorf("start a new cache file: %v", err))
		return err
	}
	m.wakeApply()
	return nil
}

// cacheFile is the open cache file (an *os.File; tests inject failures).
type cacheFile interface {
	io.Writer
	Truncate(size int64) error
	Seek(offset int64, whence int) (int64, error)
	Sync() error
	Close() error
}

// cutLocked takes whatever a failed write left after the last whole frame
// back out of the open file. If that fails too, what follows the last
// frame is unknown: the cache stops like after a failed fsync (sticky),
// rather than append a frame after garbage. Caller holds mu.
func (m *machine) cutLocked() {
	err := m.open.Truncate(m.openBytes)
	if err == nil {
		_, err = m.open.Seek(m.openBytes, io.SeekStart)
	}
	if err != nil {
		m.breakLocked(fmt.Errorf("cut the cache file back after a failed write: %v", err))
	}
}

func (m *machine) wakeApply() {
	select {
	case m.applyWake <- struct{}{}:
	default:
	}
}

// applyLoop applies sealed segments in order. A corrupt segment is never
// applied: it is moved aside, the machine is marked for resync, and later
// segments are applied after it (the replica is not trusted for points until
// the resync, so nothing is lost by keeping it current).
func (m *machine) applyLoop() {
	backoff := time.Second
	for {
		select {
		case <-m.s.ctx.Done():
			return
		case <-m.applyWake:
		case <-time.After(5 * time.Second):
		}
		for m.s.ctx.Err() == nil {
			m.mu.Lock()
			if len(m.sealed) == 0 {
				m.mu.Unlock()
				break
			}
			sg := m.sealed[0]
			m.mu.Unlock()
			err := m.applyOne(sg)
			if err == nil {
				backoff = time.Second
				continue
			}
			m.mu.Lock()
			m.applyErr = err.Error()
			m.mu.Unlock()
			m.log.Error("apply segment failed", "segment", filepath.Base(sg.path), "err", err, "retry_in", backoff)
			select {
			case <-m.s.ctx.Done():
				return
			case <-time.After(backoff):
			}
			if backoff < time.Minute {
				backoff *= 2
			}
		}
	}
}

func (m *machine) applyOne(sg sealedSeg) error {
	data, err := os.ReadFile(sg.path)
	if err != nil {
		return err
	}
	// Kept on the target first, so a point is never reported before the
	// changes after it can be replayed; a segment that fails verification
	// is not kept (Apply reports it below).
	if err := m.keepSegment(m.s.ctx, data); err == nil {
		m.s.uploadedBytes(int64(len(data)))
	} else if !errors.Is(err, replication.ErrCorrupt) {
		return err
	}
	m.applyMu.Lock()
	if first, err := replication.ParseSegmentHeader(data); err == nil && first > m.applier.AppliedSeq()+1 {
		// A sequence gap: the records before this segment are lost.
		reason := fmt.Sprintf("changes %d to %d were lost before they were applied (sequence gap)", m.applier.AppliedSeq()+1, first-1)
		m.log.Error("sequence gap", "from", m.applier.AppliedSeq()+1, "to", first-1)
		err := m.applier.MarkResync(m.s.ctx, -1, reason)
		if err == nil {
			err = m.applier.SkipTo(m.s.ctx, first-1)
		}
		if err != nil {
			m.applyMu.Unlock()
			return err
		}
	}
	err = m.applier.Apply(m.s.ctx, data)
	if errors.Is(err, replication.ErrCorrupt) {
		reason := fmt.Sprintf("segment %s failed verification (%v); it was not applied", filepath.Base(sg.path), err)
		m.log.Error("corrupt segment", "segment", filepath.Base(sg.path), "err", err)
		err = m.applier.MarkResync(m.s.ctx, -1, reason)
		if err == nil {
			err = m.applier.SkipTo(m.s.ctx, sg.last)
		}
		m.applyMu.Unlock()
		if err != nil {
			return err
		}
		// Kept for inspection, out of the way of the applier.
		bad := filepath.Join(m.dir, "bad")
		os.MkdirAll(bad, 0o700)
		if err := os.Rename(sg.path, filepath.Join(bad, filepath.Base(sg.path))); err != nil {
			m.log.Warn("could not move the corrupt segment aside", "err", err)
		}
		m.popSealed(sg)
		if m.s.cfg.OnQuarantine != nil {
			m.s.cfg.OnQuarantine(m.id, filepath.Join(bad, filepath.Base(sg.path)), reason)
		}
		return nil
	}
	m.applyMu.Unlock()
	if err != nil {
		return err
	}
	m.s.uploadedBytes(sg.raw)
	if err := os.Remove(sg.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	m.popSealed(sg)
	return nil
}

// keepSegment stores an applied segment on the target, where recovery to
// any point in time replays it (pruned once older than the policy's window).
func (m *machine) keepSegment(ctx context.Context, data []byte) error {
	si, err := replication.DescribeSegment(data)
	if err != nil {
		return err
	}
	if err := m.s.cfg.Catalog.PutSegment(ctx, m.id, si, data); err != nil {
		return fmt.Errorf("keep segment %d-%d on the target: %w", si.First, si.Last, err)
	}
	return nil
}

func (m *machine) keepOnTarget(ctx context.Context, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return m.keepSegment(ctx, data)
}

func (m *machine) popSealed(sg sealedSeg) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.sealed) > 0 && m.sealed[0].path == sg.path {
		m.sealed = m.sealed[1:]
	}
	m.s.cacheBytes.Add(-sg.size)
	m.applyErr = ""
}

func (m *machine) onPoint(p replication.Point, reqID uint64) {
	if m.s.cfg.OnPoint != nil {
		m.s.cfg.OnPoint(m.id, p)
	}
	m.resolve(reqID, pointResult{p: p})
}

func (m *machine) onNoPoint(reqID uint64, reason string) {
	m.resolve(reqID, pointResult{err: fmt.Errorf("no recovery point: %s", reason)})
}

func (m *machine) resolve(reqID uint64, r pointResult) {
	if reqID == 0 {
		return
	}
	m.mu.Lock()
	ch, ok := m.waiters[reqID]
	delete(m.waiters, reqID)
	m.mu.Unlock()
	if ok {
		ch <- r
	}
}

func (m *machine) requestPoint(ctx context.Context, id uint64, app bool) (replication.Point, error) {
	f, err := replication.JSONFrame(replication.FrameTagReq, replication.TagRequest{ID: id, App: app})
	if err != nil {
		return replication.Point{}, err
	}
	ch := make(chan pointResult, 1)
	// An agent that is reconnecting (after a restart of either side) gets
	// a moment to come back.
	deadline := time.Now().Add(connectGrace)
	m.mu.Lock()
	for m.conn == nil && time.Now().Before(deadline) && ctx.Err() == nil {
		m.mu.Unlock()
		time.Sleep(100 * time.Millisecond)
		m.mu.Lock()
	}
	cc := m.conn
	if cc == nil {
		m.mu.Unlock()
		return replication.Point{}, fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	}
	m.waiters[id] = ch
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.waiters, id)
		m.mu.Unlock()
	}()
	select {
	case cc.out <- f:
	case <-cc.done:
		return replication.Point{}, fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	case <-ctx.Done():
		return replication.Point{}, ctx.Err()
	}
	select {
	case r := <-ch:
		return r.p, r.err
	case <-ctx.Done():
		return replication.Point{}, fmt.Errorf("waiting for the point: %w", ctx.Err())
	}
}

func (m *machine) setStatus(st replication.Status) {
	m.mu.Lock()
	m.status, m.statusAt = st, time.Now()
	m.mu.Unlock()
}

// backlog is what the cache holds that is not applied yet (an open file
// with no frames is not backlog) and when the oldest of it arrived (zero:
// nothing).
func (m *machine) backlog() (n int64, oldest time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, sg := range m.sealed {
		n += sg.size
	}
	if m.openRaw > 0 {
		n += m.openBytes
		oldest = m.openSince
	}
	if len(m.sealed) > 0 {
		oldest = m.sealed[0].sealedAt
	}
	return n, oldest
}

func (m *machine) stats() MachineStats {
	m.mu.Lock()
	st := MachineStats{
		Connected:  m.conn != nil,
		LastStatus: m.status,
		StatusAt:   m.statusAt,
		DurableSeq: m.durable,
		Segments:   len(m.sealed),
		ApplyError: m.applyErr,
		CacheBytes: m.openBytes,
	}
	for _, sg := range m.sealed {
		st.CacheBytes += sg.size
	}
	if len(m.sealed) > 0 {
		st.OldestSealed = m.sealed[0].sealedAt
	}
	m.mu.Unlock()
	m.applyMu.Lock()
	st.AppliedSeq = m.applier.AppliedSeq()
	m.applyMu.Unlock()
	return st
}

// close stops using the machine's files. The sync and apply loops have
// exited (the server context is cancelled and its WaitGroup waited).
func (m *machine) close() error {
	m.mu.Lock()
	m.closed = true
	var err error
	if m.open != nil {
		// Make what was written durable; an unsealed file is recovered at
		// the next start.
		err = m.open.Sync()
		m.open.Close()
		m.open = nil
	}
	m.mu.Unlock()
	m.applyMu.Lock()
	if cerr := m.applier.Close(); err == nil {
		err = cerr
	}
	m.applyMu.Unlock()
	return err
}

// compareLoop answers resync chunk hashes from the replica's hash index.
func (m *machine) compareLoop() {
	for {
		select {
		case <-m.s.ctx.Done():
			return
		case req := <-m.compares:
			w := m.compare(req.h)
			f, err := replication.JSONFrame(replication.FrameWant, w)
			if err != nil {
				continue
			}
			select {
			case req.cc.out <- f:
			case <-req.cc.replaced:
			case <-m.s.ctx.Done():
				return
			}
		}
	}
}

// compareWait bounds how long a compare waits for the replica to catch up
// with the resync's start record.
const compareWait = 2 * time.Minute

// waitApplied waits until the log is applied up to seq, sealing the open
// cache file at once if it holds records up to seq.
func (m *machine) waitApplied(seq uint64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for waiting := false; ; waiting = true {
		m.applyMu.Lock()
		applied := m.applier.AppliedSeq()
		m.applyMu.Unlock()
		if applied >= seq {
			return nil
		}
		if !waiting {
			m.log.Info("resync compare waits until the replica has applied the log up to the resync's start", "applied_seq", applied, "seq", seq)
		}
		// Seal the open file soon, as for a tag, if it holds seq; files
		// opened after it are sealed as usual (sealing every frame as it
		// arrives would only slow the applier down).
		m.mu.Lock()
		seal := m.openRaw > 0 && m.openFirst <= seq && seq <= m.appended
		if seal {
			m.openTag = true
		}
		m.mu.Unlock()
		if seal {
			select {
			case m.syncWake <- struct{}{}:
			default:
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the replica is not caught up with the resync's start (applied %d of %d) after %v", applied, seq, timeout)
		}
		select {
		case <-m.s.ctx.Done():
			return m.s.ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// compare finds the chunks of a batch whose replica hash differs: from the
// replica's block checksums, or, for a verify job (DRBD's online verify),
// from the replica's contents read back, checked against the checksums on
// the way.
func (m *machine) compare(h replication.Hashes) replication.Want {
	w := replication.Want{Job: h.Job, Batch: h.Batch}
	if len(h.Hashes) != 16*len(h.Offs) {
		w.Error = "malformed chunk hashes"
		return w
	}
	if err := m.waitApplied(h.After, compareWait); err != nil {
		w.Error = err.Error()
		return w
	}
	m.applyMu.Lock()
	sums := m.applier.Sums(h.Disk)
	rd, ok := m.applier.Disk(h.Disk)
	m.applyMu.Unlock()
	if sums == nil || !ok {
		w.Error = fmt.Sprintf("no replica disk %d", h.Disk)
		return w
	}
	var damaged []int64
	buf := make([]byte, replication.HashChunk)
	for i, off := range h.Offs {
		if off < 0 || off%replication.HashChunk != 0 || off >= rd.Size() {
			w.Error = fmt.Sprintf("chunk offset %d not aligned or past the disk's end", off)
			return w
		}
		c := off / replication.HashChunk
		var ch replication.Hash
		var leaves []replication.Hash
		var err error
		if h.Verify {
			var bad []int64
			ch, leaves, bad, err = m.readChunk(h.Disk, c, buf)
			damaged = append(damaged, bad...)
		} else {
			ch, leaves, err = sums.Chunk(c)
		}
		if err != nil {
			w.Error = err.Error()
			return w
		}
		if string(ch[:]) == string(h.Hashes[16*i:16*i+16]) {
			continue
		}
		wc := replication.WantChunk{Off: off, Leaves: make([]byte, 0, 16*len(leaves))}
		for _, l := range leaves {
			wc.Leaves = append(wc.Leaves, l[:]...)
		}
		w.Chunks = append(w.Chunks, wc)
	}
	if h.Verify && (len(damaged) > 0 || len(w.Chunks) > 0) {
		if err := m.verifyFound(h.Disk, damaged, len(w.Chunks)); err != nil {
			w.Error = err.Error()
			return w
		}
	}
	return w
}

// readChunk reads chunk c of a replica disk back, hashes its blocks, and
// checks them against the disk's checksums (a damaged block is marked, so
// the answer asks the source for it).
func (m *machine) readChunk(disk uint32, c int64, buf []byte) (replication.Hash, []replication.Hash, []int64, error) {
	m.applyMu.Lock()
	defer m.applyMu.Unlock()
	rd, _ := m.applier.Disk(disk)
	bad, err := replication.CheckChunk(rd, m.applier.Sums(disk), c, buf)
	if err != nil {
		return replication.Hash{}, nil, nil, err
	}
	n := min(int64(replication.HashChunk), rd.Size()-c*replication.HashChunk)
	leaves := replication.ChunkLeaves(buf[:n])
	return replication.ChunkHash(leaves), leaves, bad, nil
}

// verifyFound records what a verify found on a disk: damaged blocks are
// marked in the checksums and reported, and the disk makes no points until
// the verify's differences are resent (the job's done record ends that).
func (m *machine) verifyFound(disk uint32, damaged []int64, differing int) error {
	m.applyMu.Lock()
	defer m.applyMu.Unlock()
	mc := m.applier.Machine()
	d, ok := mc.Disk(disk)
	if !ok {
		return fmt.Errorf("no disk %d", disk)
	}
	reason := fmt.Sprintf("a verify found %d chunks that differ from the source", differing)
	if len(damaged) > 0 {
		reason = fmt.Sprintf("a verify found %d damaged blocks in the replica (first at offset %d) and %d chunks that differ from the source", len(damaged), damaged[0], differing)
	}
	if err := m.applier.MarkDamage(m.s.ctx, disk, damaged, reason); err != nil {
		return err
	}
	if len(damaged) > 0 && m.s.cfg.OnDamage != nil {
		m.s.cfg.OnDamage(m.id, Damage{Disk: d.Name, Blocks: damaged, Found: "verify"})
	}
	return nil
}

// Damage is what a check found wrong with a replica disk: blocks whose
// contents do not match their checksums, in the current contents (Point
// "") or in a recovery point's own blocks.
type Damage struct {
	Disk   string
	Point  string
	Blocks []int64 // offsets of damaged 4 KiB blocks
	Found  string  // "scrub", "verify", "resync sample", ...
}

// startResync checks a sample of the disk's checksums against the replica
// (marking what is damaged, so the resync sends it again) and asks the
// agent to resync.
func (m *machine) startResync(ctx context.Context, job replication.ResyncJob) error {
	m.applyMu.Lock()
	sums := m.applier.Sums(job.Disk)
	rd, ok := m.applier.Disk(job.Disk)
	m.applyMu.Unlock()
	if sums == nil || !ok {
		return fmt.Errorf("no replica disk %d", job.Disk)
	}
	if !job.Verify {
		var bad []int64
		buf := make([]byte, replication.HashChunk)
		for _, c := range replication.SampleChunks(rd.Size(), 16) {
			m.applyMu.Lock()
			b, err := replication.CheckChunk(rd, sums, c, buf)
			m.applyMu.Unlock()
			if err != nil {
				return fmt.Errorf("check the replica before the resync: %w", err)
			}
			bad = append(bad, b...)
		}
		if len(bad) > 0 {
			m.log.Warn("replica blocks do not match their checksums; the resync sends them again", "disk", job.Disk, "blocks", len(bad))
			m.applyMu.Lock()
			mc := m.applier.Machine()
			d, _ := mc.Disk(job.Disk)
			err := m.applier.MarkDamage(ctx, job.Disk, bad, "")
			m.applyMu.Unlock()
			if err != nil {
				return err
			}
			if len(job.Ranges) > 0 {
				// The job compares only its ranges: add the damaged blocks.
				job.Ranges = append(job.Ranges, replication.BlockRanges(bad)...)
			}
			if m.s.cfg.OnDamage != nil && d != nil {
				m.s.cfg.OnDamage(m.id, Damage{Disk: d.Name, Blocks: bad, Found: "resync sample"})
			}
		}
	}
	f, err := replication.JSONFrame(replication.FrameResync, job)
	if err != nil {
		return err
	}
	m.mu.Lock()
	cc := m.conn
	m.mu.Unlock()
	if cc == nil {
		return fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	}
	select {
	case cc.out <- f:
		return nil
	case <-cc.replaced:
		return fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	case <-ctx.Done():
		return ctx.Err()
	}
}
