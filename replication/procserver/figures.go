package procserver

import (
	"sync"
	"sync/atomic"
	"time"
)

// The process server's health, as ASR's process-server blade shows it:
// backlog (bytes and age), upload rate, compression ratio, and the cache
// disk's free space. Below CacheWarnFree of free space the cache is in
// warning, below CacheCriticalFree critical; while critical, the server
// stops reading from agents once its own cache holds more than
// criticalCacheBytes, so back-pressure reaches the agents (they spool, then
// fall back to their changed-block maps) before the cache disk fills.

// Cache free-space thresholds, as in ASR. A state is left only
// cacheHysteresis past its threshold, so free space hovering around one
// neither floods the events nor toggles the back-pressure.
const (
	CacheWarnFree     = 0.30
	CacheCriticalFree = 0.25
	cacheHysteresis   = 0.02
)

// Cache states.
const (
	CacheOK       = "ok"
	CacheWarning  = "warning"
	CacheCritical = "critical"
	CacheUnknown  = "unknown" // the free space cannot be measured: no back-pressure from it
)

// criticalCacheBytes is what the cache may still take while its disk is
// critical: enough to keep the appliers busy, not enough to fill the disk.
const criticalCacheBytes = 64 << 20

// rateWindow is the span the upload rate is averaged over.
const rateWindow = 10 * time.Second

// Figures are the process server's own figures.
type Figures struct {
	BacklogBytes int64         `json:"backlog_bytes"`  // received, not yet applied to the target
	BacklogAge   time.Duration `json:"backlog_age_ns"` // age of the oldest data not yet applied
	UploadRate   float64       `json:"upload_rate"`    // bytes per second written to the target, over the last 10 s
	Uploaded     int64         `json:"uploaded"`       // bytes written to the target since start
	RawBytes     int64         `json:"raw_bytes"`      // record bytes received since start
	WireBytes    int64         `json:"wire_bytes"`     // the same, as they came over the wire (compressed if the agent compresses)
	CachedBytes  int64         `json:"cached_bytes"`   // the same, as written to the cache (compressed by the agent or here)
	Compression  float64       `json:"compression"`    // RawBytes / CachedBytes (0: nothing received)
	CacheFree    float64       `json:"cache_free"`     // fraction of the cache disk free, 0..1
	CacheFreeB   uint64        `json:"cache_free_bytes"`
	CacheTotalB  uint64        `json:"cache_total_bytes"`
	CacheState   string        `json:"cache_state"` // ok, warning, critical
	CacheError   string        `json:"cache_error,omitempty"`
	// CacheMaxBytes is its cache's bound (Config.CacheMaxBytes).
	CacheMaxBytes int64 `json:"cache_max_bytes"`
}

// meter counts bytes into one-second buckets for a moving rate.
type meter struct {
	mu      sync.Mutex
	buckets [int(rateWindow / time.Second)]int64
	at      int64 // the Unix second of buckets[at%len]
}

func (r *meter) add(n int64, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.advance(now.Unix())
	r.buckets[r.at%int64(len(r.buckets))] += n
}

func (r *meter) advance(sec int64) {
	for r.at < sec {
		r.at++
		r.buckets[r.at%int64(len(r.buckets))] = 0
		if sec-r.at > int64(len(r.buckets)) {
			r.at = sec - int64(len(r.buckets))
		}
	}
}

// rate is the bytes per second over the last full window.
func (r *meter) rate(now time.Time) float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.advance(now.Unix())
	var sum int64
	for i := range r.buckets {
		if int64(i) != r.at%int64(len(r.buckets)) { // the current second is not over
			sum += r.buckets[i]
		}
	}
	return float64(sum) / float64(len(r.buckets)-1)
}

// cacheSpace is the last sample of the cache disk's free space.
type cacheSpace struct {
	free, total atomic.Uint64
	state       atomic.Value // string
	err         atomic.Value // string
}

// sampleCache reads the cache disk's free space and reports a change of
// state. It runs every second.
func (s *Server) sampleCache() {
	free, total, err := s.cfg.DiskFree(s.cfg.CacheDir)
	old, _ := s.space.state.Load().(string)
	if err != nil {
		s.space.err.Store(err.Error())
		if old != CacheUnknown {
			s.space.state.Store(CacheUnknown)
			s.log.Warn("cannot measure the process server's cache disk", "err", err)
		}
		return
	}
	s.space.err.Store("")
	s.space.free.Store(free)
	s.space.total.Store(total)
	state := CacheOK
	if total > 0 {
		f := float64(free) / float64(total)
		warn, crit := CacheWarnFree, CacheCriticalFree
		switch old {
		case CacheWarning:
			warn += cacheHysteresis
		case CacheCritical:
			warn, crit = warn+cacheHysteresis, crit+cacheHysteresis
		}
		switch {
		case f < crit:
			state = CacheCritical
		case f < warn:
			state = CacheWarning
		}
	}
	if s.space.state.Swap(state); old != state && (old != "" || state != CacheOK) {
		s.log.Warn("process server cache disk", "state", state, "free_bytes", free, "total_bytes", total)
		if s.cfg.OnCacheState != nil {
			s.cfg.OnCacheState(state, free, total)
		}
	}
}

// cacheFull reports whether reading from agents must wait: the cache
// holds more than its limit, or its disk is critical and the cache holds
// more than the little it may still take.
func (s *Server) cacheFull() bool {
	n := s.cacheBytes.Load()
	if n > s.cfg.CacheMaxBytes {
		return true
	}
	st, _ := s.space.state.Load().(string)
	return st == CacheCritical && n > criticalCacheBytes
}

// Figures returns the process server's figures now.
func (s *Server) Figures() Figures {
	now := time.Now()
	f := Figures{
		UploadRate:    s.uploads.rate(now),
		Uploaded:      s.uploaded.Load(),
		RawBytes:      s.rawBytes.Load(),
		WireBytes:     s.wireBytes.Load(),
		CachedBytes:   s.cachedBytes.Load(),
		CacheFreeB:    s.space.free.Load(),
		CacheTotalB:   s.space.total.Load(),
		CacheMaxBytes: s.cfg.CacheMaxBytes,
	}
	f.CacheState, _ = s.space.state.Load().(string)
	f.CacheError, _ = s.space.err.Load().(string)
	if f.CacheTotalB > 0 {
		f.CacheFree = float64(f.CacheFreeB) / float64(f.CacheTotalB)
	}
	if f.CachedBytes > 0 {
		f.Compression = float64(f.RawBytes) / float64(f.CachedBytes)
	}
	s.mu.Lock()
	ms := make([]*machine, 0, len(s.machines))
	for _, m := range s.machines {
		ms = append(ms, m)
	}
	s.mu.Unlock()
	for _, m := range ms {
		n, t := m.backlog()
		f.BacklogBytes += n
		if !t.IsZero() && now.Sub(t) > f.BacklogAge {
			f.BacklogAge = now.Sub(t)
		}
	}
	return f
}

// uploadedBytes counts bytes written to the target.
func (s *Server) uploadedBytes(n int64) {
	s.uploaded.Add(n)
	s.uploads.add(n, time.Now())
}
