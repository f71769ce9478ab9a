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
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

// The durable cache of one machine (cache/<id>/): DATA frames are appended
// to an open file (open.seg) as they arrive; a sync loop fsyncs it,
// grouping frames, and only then reports the durable sequence number,
// which is what the agent is acknowledged; the file is sealed into an
// immutable segment (%016x-%016x.seg) after SealAfter, at SegmentBytes, or
// at once after a tag, and the sealed segments wait in order for the
// applier. Opening the cache recovers what a stop left.
//
// One writer at a time: a connection appends with the epoch takeOver gave
// it, and a later takeOver (the agent's next connection) or fence ends
// that epoch, so a replaced connection can append nothing more.
//
// A failed fsync is not retried: what the file holds after it is unknown (a
// retried fsync may report success for data that was dropped). The cache
// then stops for good (broken): nothing more is appended or acknowledged
// until a restart recovers the file. So does a torn write that cannot be
// cut back, and a new file that cannot be made.

const openName = "open.seg"

// cacheFile is the open cache file (an *os.File; tests inject failures).
type cacheFile interface {
	io.Writer
	Truncate(size int64) error
	Seek(offset int64, whence int) (int64, error)
	Sync() error
	Close() error
}

func createCacheFile(path string) (cacheFile, error) {
	return os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
}

// errReplaced refuses a frame of a connection that a newer one replaced
// (or that was disconnected).
var errReplaced = errors.New("connection replaced by a newer one")

// cacheConfig configures a machine's cache.
type cacheConfig struct {
	dir          string
	segmentBytes int64
	sealAfter    time.Duration
	total        *atomic.Int64 // the cache bytes of every machine (back-pressure)
	log          *slog.Logger
	// create makes a new open file (default: createCacheFile).
	create func(path string) (cacheFile, error)
	// The sync loop reports, outside the cache's lock: onDurable the
	// durable seq after each pass (acknowledgements); onFail a pass that
	// failed (the connection is ended: its agent sends again from the
	// last acknowledgement). onSealed is told of a new sealed segment,
	// under the lock: it must return at once (the applier's wake-up).
	onDurable func(seq uint64)
	onFail    func(err error)
	onSealed  func()
}

type sealedSeg struct {
	first, last uint64
	path        string
	size        int64
	raw         int64 // record bytes, uncompressed (= size for a segment recovered at start)
	sealedAt    time.Time
	// keys are the DATA frames the file holds, in order, as this process
	// wrote them (nil for a segment recovered at start): the applier
	// may take every one's records from the hand-off without reading
	// the file (apply.go, preparedFromHandoff).
	keys []replication.FrameKey
}

// cache is a machine's durable cache. mu guards its state; the sync loop
// is its own goroutine (openCache starts it, close stops it).
type cache struct {
	cfg  cacheConfig
	log  *slog.Logger
	wake chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	open      cacheFile // the unsealed cache file
	openFirst uint64    // first seq the open file holds (or will hold)
	openBytes int64     // bytes in the open file
	openRaw   int64     // raw record bytes in the open file
	openSince time.Time
	openTag   bool                   // the open file holds a tag: seal soon
	openKeys  []replication.FrameKey // the DATA frames written to the open file
	appended  uint64                 // last seq written to the cache
	durable   uint64                 // last seq fsync'd (acknowledged)
	sealed    []sealedSeg
	writer    uint64 // the epoch that may append (takeOver, fence)
	broken    error  // set when the cache could not be made durable
	closed    bool
}

// openCache recovers a machine's cache directory, whose log the replica
// holds up to applied, and starts its sync loop (stopped by parent or
// close). Sealed segments wholly applied already are returned, for the
// caller to keep on the target (if they are not yet) and remove. The
// unsealed file keeps its complete frames (they were written, and those
// acknowledged were fsync'd), loses its torn tail, and is sealed.
func openCache(parent context.Context, cfg cacheConfig, applied uint64) (*cache, []sealedSeg, error) {
	if cfg.create == nil {
		cfg.create = createCacheFile
	}
	if cfg.onSealed == nil {
		cfg.onSealed = func() {}
	}
	if cfg.onDurable == nil {
		cfg.onDurable = func(uint64) {}
	}
	if cfg.onFail == nil {
		cfg.onFail = func(error) {}
	}
	c := &cache{cfg: cfg, log: cfg.log, wake: make(chan struct{}, 1), durable: applied}
	if err := os.MkdirAll(cfg.dir, 0o700); err != nil {
		return nil, nil, err
	}
	ents, err := os.ReadDir(cfg.dir)
	if err != nil {
		return nil, nil, err
	}
	var done []sealedSeg
	for _, e := range ents {
		first, last, ok := replication.ParseSegmentName(e.Name())
		if !ok {
			continue
		}
		st, err := e.Info()
		if err != nil {
			return nil, nil, err
		}
		sg := sealedSeg{first: first, last: last, path: filepath.Join(cfg.dir, e.Name()), size: st.Size(), raw: st.Size(), sealedAt: st.ModTime()}
		if last <= applied {
			done = append(done, sg)
			continue
		}
		c.sealed = append(c.sealed, sg)
	}
	sort.Slice(c.sealed, func(i, j int) bool { return c.sealed[i].first < c.sealed[j].first })
	for _, sg := range c.sealed {
		c.durable = max(c.durable, sg.last)
		cfg.total.Add(sg.size)
	}
	openPath := filepath.Join(cfg.dir, openName)
	if data, err := os.ReadFile(openPath); err == nil {
		scan, err := replication.ScanSegment(data, true, nil)
		switch {
		case err != nil:
			// Not even a valid header: created but never written.
			c.log.Warn("discarding unreadable cache file", "err", err)
		case scan.Records > 0 && scan.Last > c.durable:
			// It may start after durable + 1: the log went on after a
			// sequence gap (skipTo), and these frames were acknowledged.
			if err := c.sealBytes(data[:scan.ValidLen], scan); err != nil {
				c.dropCounted()
				return nil, nil, err
			}
		}
		os.Remove(openPath)
	}
	c.appended = c.durable
	if err := c.newOpenFile(); err != nil {
		c.dropCounted()
		return nil, nil, err
	}
	if len(c.sealed) > 0 {
		c.log.Info("cache recovered", "segments", len(c.sealed), "durable_seq", c.durable, "applied_seq", applied)
	}
	c.ctx, c.cancel = context.WithCancel(parent)
	c.wg.Add(1)
	go func() { defer c.wg.Done(); c.syncLoop() }()
	return c, done, nil
}

// dropCounted takes a cache that failed to open out of the total.
func (c *cache) dropCounted() {
	for _, sg := range c.sealed {
		c.cfg.total.Add(-sg.size)
	}
}

// sealBytes writes recovered frames as a sealed segment. The file may be
// sealed already (the server stopped between writing the SEAL frame and the
// rename), in which case it is kept as it is.
func (c *cache) sealBytes(data []byte, scan replication.SegmentScan) error {
	if !scan.Sealed {
		seal := replication.SealFrame(scan.Last, scan.Records)
		data = replication.AppendFrame(append([]byte(nil), data...), &seal)
	}
	path := filepath.Join(c.cfg.dir, replication.SegmentName(scan.First, scan.Last))
	if err := atomicfile.Write(path, data, 0o600); err != nil {
		return err
	}
	c.sealed = append(c.sealed, sealedSeg{first: scan.First, last: scan.Last, path: path, size: int64(len(data)), raw: int64(len(data)), sealedAt: time.Now()})
	c.cfg.total.Add(int64(len(data)))
	c.durable = max(c.durable, scan.Last)
	return nil
}

// newOpenFile starts an empty cache file after c.appended. Caller holds mu
// (or has exclusive access).
func (c *cache) newOpenFile() error {
	path := filepath.Join(c.cfg.dir, openName)
	f, err := c.cfg.create(path)
	if err != nil {
		return err
	}
	h := replication.SegmentHeader(c.appended+1, time.Now())
	if _, err := f.Write(h); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := atomicfile.SyncDir(c.cfg.dir); err != nil {
		f.Close()
		return err
	}
	c.open, c.openFirst, c.openBytes, c.openRaw, c.openTag, c.openKeys = f, c.appended+1, int64(len(h)), 0, false, nil
	c.cfg.total.Add(int64(len(h)))
	return nil
}

// takeOver makes the caller the cache's only writer (a new connection of
// the agent): the previous writer can append nothing more, and all it
// appended is made durable first, so durable names everything the cache
// holds. It returns the new writer's epoch.
func (c *cache) takeOver() (epoch, durable uint64, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, 0, errors.New("process server closing")
	}
	if c.broken != nil {
		return 0, 0, c.broken
	}
	c.writer++
	if c.appended > c.durable {
		if err := c.open.Sync(); err != nil {
			c.breakLocked(err)
			return 0, 0, c.broken
		}
		c.durable = c.appended
	}
	return c.writer, c.durable, nil
}

// fence ends a writer's epoch (its connection ended): it can append
// nothing more.
func (c *cache) fence(epoch uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.writer == epoch {
		c.writer++
	}
}

// skipTo makes the log go on after last, past a sequence gap (changes the
// server acknowledged are gone): what the open file holds is durable
// (takeOver synced it) and sealed first, so the log after the gap starts
// a file of its own, and the applier meets the gap between the two.
func (c *cache) skipTo(epoch, last uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.writableLocked(epoch); err != nil {
		return err
	}
	if last <= c.appended {
		return fmt.Errorf("skip to seq %d: the cache holds up to %d", last, c.appended)
	}
	if c.openRaw > 0 {
		if err := c.sealLocked(); err != nil {
			return fmt.Errorf("seal the cache before a sequence gap: %w", err)
		}
	}
	c.open.Close()
	c.cfg.total.Add(-c.openBytes)
	c.appended, c.durable = last, last
	if err := c.newOpenFile(); err != nil {
		c.open = nil
		c.breakLocked(fmt.Errorf("start a new cache file after a sequence gap: %v", err))
		return c.broken
	}
	return nil
}

// writableLocked returns why the writer with this epoch may not change
// the cache: it is closing, broken, or the writer was replaced. Caller
// holds mu.
func (c *cache) writableLocked(epoch uint64) error {
	switch {
	case c.closed:
		return errors.New("process server closing")
	case c.broken != nil:
		return c.broken
	case epoch != c.writer:
		return errReplaced
	}
	return nil
}

// breakLocked stops the cache for good (see the top of this file). Caller
// holds mu.
func (c *cache) breakLocked(err error) {
	if c.broken == nil {
		c.broken = fmt.Errorf("the process server's cache for this machine could not be made durable (%v); fix the cache disk and restart the server", err)
		c.log.Error("cache fsync failed; no more acknowledgements for this machine until a restart", "err", err)
	}
}

// append writes a DATA frame of the writer with this epoch to the open
// file, and returns the key of the frame as written. It is acknowledged
// once the sync loop has fsync'd it.
func (c *cache) append(epoch uint64, f *replication.Frame) (replication.FrameKey, error) {
	var h [replication.FrameHeaderSize]byte
	key := replication.EncodeFrameHeader(&h, f)
	return key, c.appendEncoded(epoch, f, &h, key)
}

// appendEncoded is append with f's header encoded by the caller
// (replication.EncodeFrameHeader, which gave key), outside the cache's
// lock.
func (c *cache) appendEncoded(epoch uint64, f *replication.Frame, h *[replication.FrameHeaderSize]byte, key replication.FrameKey) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.writableLocked(epoch); err != nil {
		return err
	}
	if f.Seq != c.appended+1 || f.Count == 0 {
		return &replication.ProtocolError{Reason: fmt.Sprintf("data frame at seq %d (%d records), expected seq %d", f.Seq, f.Count, c.appended+1)}
	}
	// Header and payload written apart: the payload (up to 16 MiB) is
	// not copied into a new buffer first.
	_, err := c.open.Write(h[:])
	if err == nil && len(f.Payload) > 0 {
		_, err = c.open.Write(f.Payload)
	}
	if err != nil {
		// A partial write leaves garbage: cut it so the file stays valid.
		c.cutLocked()
		return fmt.Errorf("write cache: %w", err)
	}
	n := int64(len(h) + len(f.Payload))
	if c.openRaw == 0 {
		c.openSince = time.Now()
	}
	c.openBytes += n
	c.openRaw += int64(f.RawLen)
	c.openKeys = append(c.openKeys, key)
	c.appended = f.Seq + uint64(f.Count) - 1
	if f.Flags&replication.FlagTag != 0 {
		c.openTag = true
	}
	c.cfg.total.Add(n)
	c.kick()
	return nil
}

// kick wakes the sync loop.
func (c *cache) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// sealSoon seals the open file at the sync loop's next pass, as for a tag,
// if it holds seq (a caller waits for seq to be applied).
func (c *cache) sealSoon(seq uint64) {
	c.mu.Lock()
	seal := c.openRaw > 0 && c.openFirst <= seq && seq <= c.appended
	if seal {
		c.openTag = true
	}
	c.mu.Unlock()
	if seal {
		c.kick()
	}
}

// syncLoop fsyncs the open file (group commit), reports the durable seq,
// and seals.
func (c *cache) syncLoop() {
	tick := time.NewTicker(c.cfg.sealAfter / 4)
	defer tick.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-c.wake:
		case <-tick.C:
		}
		durable, ok, err := c.syncOnce()
		switch {
		case err != nil:
			c.log.Error("cache sync or seal failed", "err", err)
			c.cfg.onFail(err)
			select {
			case <-c.ctx.Done():
				return
			case <-time.After(time.Second):
			}
		case ok:
			c.cfg.onDurable(durable)
		}
	}
}

// syncOnce makes what is appended durable and seals the open file if it
// is due. ok is false while the cache is closed or broken.
func (c *cache) syncOnce() (durable uint64, ok bool, err error) {
	c.mu.Lock()
	if c.closed || c.broken != nil {
		c.mu.Unlock()
		return 0, false, nil
	}
	target, f, was := c.appended, c.open, c.durable
	c.mu.Unlock()
	if target > was {
		// Outside the lock: appends go on meanwhile (group commit).
		if err := f.Sync(); err != nil {
			c.mu.Lock()
			if c.open == f { // not sealed (and synced) meanwhile
				c.breakLocked(err)
			}
			c.mu.Unlock()
			return 0, false, err
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.open == f && target > c.durable {
		c.durable = target
	}
	if c.openRaw > 0 && (c.openTag || c.openBytes >= c.cfg.segmentBytes || c.openRaw >= c.cfg.segmentBytes ||
		time.Since(c.openSince) >= c.cfg.sealAfter) {
		if err := c.sealLocked(); err != nil {
			return 0, false, err
		}
	}
	return c.durable, true, nil
}

// sealLocked closes the open file with a SEAL frame, renames it to its
// sequence range and starts a new one. Caller holds mu.
func (c *cache) sealLocked() error {
	first, last := c.openFirst, c.appended
	count := uint32(last - first + 1)
	seal := replication.SealFrame(last, count)
	b := replication.AppendFrame(nil, &seal)
	// Until the rename, a failure takes the SEAL frame back out, so later
	// frames are never written after a seal.
	unseal := c.cutLocked
	if _, err := c.open.Write(b); err != nil {
		unseal()
		return err
	}
	if err := c.open.Sync(); err != nil {
		unseal()
		c.breakLocked(err)
		return err
	}
	size, raw := c.openBytes+int64(len(b)), c.openRaw
	path := filepath.Join(c.cfg.dir, replication.SegmentName(first, last))
	if err := os.Rename(filepath.Join(c.cfg.dir, openName), path); err != nil {
		unseal()
		return err
	}
	c.open.Close()
	if err := atomicfile.SyncDir(c.cfg.dir); err != nil {
		// The rename may not be durable; the file is sealed and valid
		// under either name, and recovery handles both.
		c.log.Warn("directory fsync after sealing failed", "err", err)
	}
	c.cfg.total.Add(int64(len(b)))
	c.sealed = append(c.sealed, sealedSeg{first: first, last: last, path: path, size: size, raw: raw, sealedAt: time.Now(), keys: c.openKeys})
	c.openKeys = nil
	c.durable = last
	c.cfg.onSealed()
	if err := c.newOpenFile(); err != nil {
		// Without an open file nothing more can be cached.
		c.open = nil
		c.breakLocked(fmt.Errorf("start a new cache file: %v", err))
		return err
	}
	return nil
}

// cutLocked takes whatever a failed write left after the last whole frame
// back out of the open file. If that fails too, what follows the last
// frame is unknown: the cache stops like after a failed fsync (sticky),
// rather than append a frame after garbage. Caller holds mu.
func (c *cache) cutLocked() {
	err := c.open.Truncate(c.openBytes)
	if err == nil {
		_, err = c.open.Seek(c.openBytes, io.SeekStart)
	}
	if err != nil {
		c.breakLocked(fmt.Errorf("cut the cache file back after a failed write: %v", err))
	}
}

// sealAll makes what is appended durable and seals the open file, if it
// holds frames, so the applier can take everything the cache holds (the
// machine's removal with drain: nothing is appended any more).
func (c *cache) sealAll() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("process server closing")
	}
	if c.broken != nil {
		return c.broken
	}
	if c.openRaw == 0 {
		return nil
	}
	if err := c.open.Sync(); err != nil {
		c.breakLocked(err)
		return c.broken
	}
	c.durable = c.appended
	return c.sealLocked()
}

// uncount takes a closed cache's bytes out of the total of every machine
// (its files are about to be removed).
func (c *cache) uncount() {
	st := c.stats()
	c.cfg.total.Add(-st.bytes)
}

// next returns the oldest sealed segment, which the applier applies next.
func (c *cache) next() (sealedSeg, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.sealed) == 0 {
		return sealedSeg{}, false
	}
	return c.sealed[0], true
}

// done takes an applied (or quarantined) segment out of the queue; its
// file is gone or moved.
func (c *cache) done(sg sealedSeg) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.sealed) > 0 && c.sealed[0].path == sg.path {
		c.sealed = c.sealed[1:]
	}
	c.cfg.total.Add(-sg.size)
}

// durableSeq is the last seq acknowledged (or to be).
func (c *cache) durableSeq() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.durable
}

// brokenErr is why the cache stopped for good, or nil.
func (c *cache) brokenErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.broken
}

// cacheStats are a cache's figures.
type cacheStats struct {
	durable      uint64
	segments     int
	bytes        int64 // sealed + open
	backlog      int64 // sealed + an open file holding frames
	oldest       time.Time
	oldestSealed time.Time
}

func (c *cache) stats() cacheStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := cacheStats{durable: c.durable, segments: len(c.sealed), bytes: c.openBytes}
	for _, sg := range c.sealed {
		st.bytes += sg.size
		st.backlog += sg.size
	}
	if c.openRaw > 0 {
		st.backlog += c.openBytes
		st.oldest = c.openSince
	}
	if len(c.sealed) > 0 {
		st.oldest = c.sealed[0].sealedAt
		st.oldestSealed = c.sealed[0].sealedAt
	}
	return st
}

// close stops the sync loop and makes what was written durable; an
// unsealed file is recovered at the next start.
func (c *cache) close() error {
	c.cancel()
	c.wg.Wait()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	var err error
	if c.open != nil {
		err = c.open.Sync()
		c.open.Close()
		c.open = nil
	}
	return err
}
