package server

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store/atomicfile"
)

// MetricsTokenFile, in the data directory, holds the read-only token of
// GET /metrics (made at the first start; `asr metrics token --rotate`
// replaces it). It grants nothing else: the API wants the admin token.
const MetricsTokenFile = "metrics-token"

// metricsScrapeTimeout bounds the database reads of one scrape.
const metricsScrapeTimeout = 10 * time.Second

// metrics is the server's Prometheus endpoint: its own registry (never the
// global one, so tests can run several servers in one process), the
// collector that reads the server's current views at each scrape, the
// job histograms observed as jobs end, and the metrics token.
//
// A scrape reads the database and the process server's figures only (the
// figures take each part's lock for a copy): it never waits on the
// replication path.
type metrics struct {
	s       *Server
	reg     *prometheus.Registry
	handler http.Handler
	path    string // the metrics token's file

	tokenMu sync.Mutex
	token   string

	jobDuration *prometheus.HistogramVec
	jobRTO      *prometheus.HistogramVec

	// received keeps each machine's highest received count: the
	// database's count and the bytes not yet flushed to it are read
	// apart, so a flush between the two reads could show a dip, and a
	// counter never goes back. Pruned to the machines that exist.
	receivedMu sync.Mutex
	received   map[string]float64
}

// jobBuckets span a test failover to NBD's fraction of a second to a large
// plan's hours.
var jobBuckets = []float64{0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400}

// newMetrics loads or makes the metrics token in dataDir and builds the
// registry.
func newMetrics(s *Server, dataDir string) (*metrics, error) {
	m := &metrics{s: s, reg: prometheus.NewRegistry(), path: filepath.Join(dataDir, MetricsTokenFile), received: map[string]float64{}}
	tok, err := loadOrCreateSecret(m.path, newMetricsToken)
	if err != nil {
		return nil, fmt.Errorf("metrics token: %w", err)
	}
	m.token = string(tok)
	m.jobDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "asr_job_duration_seconds",
		Help:    "Duration of the jobs that ended since the server started (failovers, drills, plans, cleanups, push installs), by kind and result.",
		Buckets: jobBuckets,
	}, []string{"kind", "result"})
	m.jobRTO = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "asr_job_rto_seconds",
		Help:    "Measured recovery time (start until the recovered machines were usable) of the failover and drill jobs that ended since the server started, by kind.",
		Buckets: jobBuckets,
	}, []string{"kind"})
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.jobDuration, m.jobRTO,
		(*metricsCollector)(m),
	)
	m.handler = promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		// A scrape that cannot read the database fails whole (the target
		// goes down in Prometheus), rather than serving machines missing.
		ErrorHandling:       promhttp.HTTPErrorOnError,
		ErrorLog:            promErrorLog{s.log},
		MaxRequestsInFlight: 4,
	})
	return m, nil
}

func newMetricsToken() string {
	b := make([]byte, 24)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// promErrorLog writes promhttp's errors to the server's log.
type promErrorLog struct{ log *slog.Logger }

func (l promErrorLog) Println(v ...any) { l.log.Warn("metrics scrape", "err", fmt.Sprint(v...)) }

// observeJob records an ended job's duration and, if it measured one,
// its RTO.
func (m *metrics) observeJob(j api.Job) {
	if j.EndedAt.IsZero() || j.StartedAt.IsZero() {
		return
	}
	m.jobDuration.WithLabelValues(j.Kind, j.State).Observe(max(j.EndedAt.Sub(j.StartedAt).Seconds(), 0))
	if j.RTO > 0 {
		m.jobRTO.WithLabelValues(j.Kind).Observe(j.RTO)
	}
}

// Token returns the current metrics token.
func (m *metrics) Token() string {
	m.tokenMu.Lock()
	defer m.tokenMu.Unlock()
	return m.token
}

// rotate replaces the metrics token, in its file first (atomically: a
// Prometheus reading the file with credentials_file sees the old token or
// the new one), then in memory.
func (m *metrics) rotate() (string, error) {
	m.tokenMu.Lock()
	defer m.tokenMu.Unlock()
	tok := newMetricsToken()
	if err := atomicfile.Write(m.path, []byte(tok+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write the metrics token: %w", err)
	}
	m.token = tok
	return tok, nil
}

// requireMetricsToken lets a request through with the admin token or the
// metrics token (Authorization: Bearer TOKEN), compared in constant time.
func (s *Server) requireMetricsToken(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		admin := subtle.ConstantTimeCompare([]byte(tok), []byte(s.token))
		met := subtle.ConstantTimeCompare([]byte(tok), []byte(s.metrics.Token()))
		if !ok || tok == "" || admin|met != 1 {
			time.Sleep(200 * time.Millisecond)
			writeError(w, errorf(http.StatusUnauthorized, "missing or wrong token (Authorization: Bearer TOKEN, with the metrics token in %s or the admin token in %s, both in the server's data directory)", MetricsTokenFile, AdminTokenFile))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// handleMetricsToken shows the metrics token (GET) or replaces it (POST
// with {"rotate": true}); admin token only.
func (s *Server) handleMetricsToken(w http.ResponseWriter, r *http.Request) error {
	tok := s.metrics.Token()
	if r.Method == http.MethodPost {
		var req api.MetricsTokenRequest
		if err := readJSON(r, &req); err != nil {
			return err
		}
		if !req.Rotate {
			return errorf(http.StatusBadRequest, `nothing to do: POST {"rotate": true} replaces the metrics token`)
		}
		var err error
		if tok, err = s.metrics.rotate(); err != nil {
			return err
		}
		s.log.Info("metrics token rotated", "file", s.metrics.path)
	}
	writeJSON(w, http.StatusOK, api.MetricsToken{Token: tok, File: s.metrics.path})
	return nil
}

// metricsCollector is metrics as a prometheus.Collector: at each scrape it
// reads the machines (database and process server, as the API shows them)
// and the process server's figures.
type metricsCollector metrics

// The metrics' descriptions. Names and units follow Prometheus's
// conventions: base units (seconds, bytes), _total for counters, _ratio
// for 0..1 fractions, a state as one series per state (1 for the current).
var (
	descMachineInfo = prometheus.NewDesc("asr_machine_info",
		"A protected machine (always 1), with its id, policy and replication group.",
		[]string{"machine", "id", "policy", "group"}, nil)
	descRPO = prometheus.NewDesc("asr_machine_rpo_seconds",
		"Current data-loss window: how far back the newest change the process server holds durably lies (only while known; see asr_machine_rpo_known).",
		[]string{"machine"}, nil)
	descRPOLowerBound = prometheus.NewDesc("asr_machine_rpo_lower_bound_seconds",
		"While the RPO is not known (its agent has not reported since the server started): a lower bound of it, from the agent's last contact or the machine's latest recovery point (absent when neither is known).",
		[]string{"machine"}, nil)
	descReverseRPO = prometheus.NewDesc("asr_machine_reverse_rpo_seconds",
		"A reprotected machine's reverse RPO: how far its original disks are behind the failed-over machine (the age of the oldest write not yet on them; 0 when none is pending). Present only while its changes are sent back and the age is known.",
		[]string{"machine"}, nil)
	descReversePending = prometheus.NewDesc("asr_machine_reverse_pending_bytes",
		"A reprotected machine's bytes written since the failover not yet on its original disks. Present only while its changes are sent back.",
		[]string{"machine"}, nil)
	descAlertsActive = prometheus.NewDesc("asr_alerts_active",
		"Active alerts, by kind and severity (warning, critical).", []string{"kind", "severity"}, nil)
	descAlertPasses = prometheus.NewDesc("asr_alert_engine_passes_total",
		"Passes of the alert engine (each evaluates every condition, then sends the notices not sent yet) since the server started.", nil, nil)
	descRPOKnown = prometheus.NewDesc("asr_machine_rpo_known",
		"1 if the machine's RPO is known (its agent reported since the server started), else 0.",
		[]string{"machine"}, nil)
	descMachineState = prometheus.NewDesc("asr_machine_state",
		"The machine's replication state: 1 for the current one (initial, protected, resync, unprotected), 0 for the others.",
		[]string{"machine", "state"}, nil)
	descConnected = prometheus.NewDesc("asr_machine_connected",
		"1 if the machine's agent is connected to the process server, else 0.",
		[]string{"machine"}, nil)
	descReceived = prometheus.NewDesc("asr_machine_received_bytes_total",
		"Bytes received from the machine's agent, as they came over the wire (compressed), over the vault's life.",
		[]string{"machine"}, nil)
	descApplied = prometheus.NewDesc("asr_machine_applied_bytes_total",
		"Cache bytes (as received) of the machine applied to the target since the server started.",
		[]string{"machine"}, nil)
	descBacklog = prometheus.NewDesc("asr_machine_backlog_bytes",
		"Cache bytes of the machine received and not yet applied to the target.",
		[]string{"machine"}, nil)
	descBacklogAge = prometheus.NewDesc("asr_machine_backlog_age_seconds",
		"Age of the machine's oldest data not yet applied to the target (0: no backlog).",
		[]string{"machine"}, nil)
	descPoints = prometheus.NewDesc("asr_machine_points",
		"Recovery points the machine has.",
		[]string{"machine"}, nil)
	descLastPoint = prometheus.NewDesc("asr_machine_last_point_timestamp_seconds",
		"Time of the machine's latest recovery point, in seconds since the Unix epoch (absent: no point yet).",
		[]string{"machine"}, nil)
	descMachineProgress = prometheus.NewDesc("asr_machine_initial_progress_ratio",
		"Initial replication of the machine over all its disks, by bytes, 0..1.",
		[]string{"machine"}, nil)
	descDiskSize = prometheus.NewDesc("asr_disk_size_bytes",
		"Size of a protected disk.",
		[]string{"machine", "disk"}, nil)
	descDiskState = prometheus.NewDesc("asr_disk_state",
		"The disk's replication state: 1 for the current one (initial, protected, resync), 0 for the others.",
		[]string{"machine", "disk", "state"}, nil)
	descDiskInitial = prometheus.NewDesc("asr_disk_initial_progress_ratio",
		"Initial replication of the disk, by bytes, 0..1.",
		[]string{"machine", "disk"}, nil)
	descDiskResync = prometheus.NewDesc("asr_disk_resync_progress_ratio",
		"Progress of the disk's resync (bytes compared of bytes to compare), 0..1; present only while the disk has a resync scheduled, running or failed.",
		[]string{"machine", "disk"}, nil)
	descDiskResyncState = prometheus.NewDesc("asr_disk_resync_state",
		"The disk's resync: 1 for its current state (scheduled, running, failed), 0 for the others; present only while the disk has one.",
		[]string{"machine", "disk", "state"}, nil)

	descPSBacklog = prometheus.NewDesc("asr_process_server_backlog_bytes",
		"Cache bytes received from every agent and not yet applied to the target.", nil, nil)
	descPSBacklogAge = prometheus.NewDesc("asr_process_server_backlog_age_seconds",
		"Age of the oldest data not yet applied to the target (0: no backlog).", nil, nil)
	descPSUploadRate = prometheus.NewDesc("asr_process_server_upload_bytes_per_second",
		"Bytes per second written to the target, over the last 10 s (rate(asr_process_server_uploaded_bytes_total) over any window).", nil, nil)
	descPSUploaded = prometheus.NewDesc("asr_process_server_uploaded_bytes_total",
		"Bytes written to the target (kept segments and applied records) since the server started.", nil, nil)
	descPSRaw = prometheus.NewDesc("asr_process_server_received_raw_bytes_total",
		"Change-record bytes received from agents, uncompressed, since the server started.", nil, nil)
	descPSWire = prometheus.NewDesc("asr_process_server_received_wire_bytes_total",
		"The same records' bytes as they came over the wire (compressed), since the server started.", nil, nil)
	descPSCompression = prometheus.NewDesc("asr_process_server_compression_ratio",
		"Uncompressed over compressed bytes of the records received since the server started, as cached (compressed by the agent or the process server; 0: nothing received).", nil, nil)
	descPSCacheFree = prometheus.NewDesc("asr_process_server_cache_free_ratio",
		"Fraction of the cache disk free, 0..1 (warning under 0.30, critical under 0.25).", nil, nil)
	descPSCacheFreeB = prometheus.NewDesc("asr_process_server_cache_free_bytes",
		"Free bytes on the cache disk.", nil, nil)
	descPSCacheState = prometheus.NewDesc("asr_process_server_cache_state",
		"The cache disk's state: 1 for the current one (ok, warning, critical, unknown), 0 for the others.", []string{"state"}, nil)
	descPSCPU = prometheus.NewDesc("asr_process_server_cpu_ratio",
		"Fraction of the host's CPUs busy over the last 5 s, 0..1 (absent until measured).", nil, nil)
	descPSMemory = prometheus.NewDesc("asr_process_server_memory_ratio",
		"Fraction of the host's memory in use, 0..1.", nil, nil)
	descPSMemoryTotal = prometheus.NewDesc("asr_process_server_memory_total_bytes",
		"The host's memory.", nil, nil)
	descJobsRunning = prometheus.NewDesc("asr_jobs_running",
		"Jobs running now, by kind.", []string{"kind"}, nil)
	descInfo = prometheus.NewDesc("asr_server_info",
		"The asr server (always 1), with its version.", []string{"version"}, nil)
)

var (
	machineStates = []string{replication.StateInitial, replication.StateProtected, replication.StateResync, api.StateUnprotected}
	diskStates    = []string{replication.StateInitial, replication.StateProtected, replication.StateResync}
	resyncStates  = []string{api.ResyncScheduled, api.ResyncRunning, api.ResyncFailed}
	cacheStates   = []string{api.CacheOK, api.CacheWarning, api.CacheCritical, api.CacheUnknown}
)

// Describe sends the collector's descriptions.
func (c *metricsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descMachineInfo, descRPO, descRPOLowerBound, descRPOKnown, descMachineState, descConnected,
		descReceived, descApplied, descBacklog, descBacklogAge, descPoints, descLastPoint, descMachineProgress,
		descDiskSize, descDiskState, descDiskInitial, descDiskResync, descDiskResyncState,
		descPSBacklog, descPSBacklogAge, descPSUploadRate, descPSUploaded, descPSRaw, descPSWire, descPSCompression,
		descPSCacheFree, descPSCacheFreeB, descPSCacheState, descPSCPU, descPSMemory, descPSMemoryTotal,
		descJobsRunning, descInfo, descAlertsActive, descAlertPasses, descReverseRPO, descReversePending} {
		ch <- d
	}
}

// Collect reads the server's current views and sends them as metrics.
func (c *metricsCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge(descInfo, 1, Version)

	ps := s.ProcessServer()
	gauge(descPSBacklog, float64(ps.BacklogBytes))
	gauge(descPSBacklogAge, ps.BacklogAge.Seconds())
	gauge(descPSUploadRate, ps.UploadRate)
	counter(descPSUploaded, float64(ps.Uploaded))
	counter(descPSRaw, float64(ps.RawBytes))
	counter(descPSWire, float64(ps.WireBytes))
	gauge(descPSCompression, ps.Compression)
	gauge(descPSCacheFree, ps.CacheFree)
	gauge(descPSCacheFreeB, float64(ps.CacheFreeB))
	for _, st := range cacheStates {
		gauge(descPSCacheState, bool01(ps.CacheState == st), st)
	}
	if ps.CPU >= 0 {
		gauge(descPSCPU, ps.CPU)
	}
	if ps.MemoryTotal > 0 {
		gauge(descPSMemory, ps.Memory)
		gauge(descPSMemoryTotal, float64(ps.MemoryTotal))
	}

	s.jobs.mu.Lock()
	jobs := make([]*job, 0, len(s.jobs.running))
	for _, j := range s.jobs.running {
		jobs = append(jobs, j)
	}
	s.jobs.mu.Unlock()
	running := map[string]int{}
	for _, j := range jobs {
		running[j.snapshot().Kind]++
	}
	for kind, n := range running {
		gauge(descJobsRunning, float64(n), kind)
	}

	ctx, cancel := context.WithTimeout(s.ctx, metricsScrapeTimeout)
	defer cancel()
	if err := c.collectMachines(ctx, gauge, counter); err != nil {
		ch <- prometheus.NewInvalidMetric(descMachineInfo, fmt.Errorf("read the machines: %w", err))
	}
	counter(descAlertPasses, float64(s.alerts.passes.Load()))
	if err := c.collectAlerts(ctx, gauge); err != nil {
		ch <- prometheus.NewInvalidMetric(descAlertsActive, fmt.Errorf("read the alerts: %w", err))
	}
}

// alertKinds are the kinds asr_alerts_active always shows (0 when none is
// active), so that an alert rule on them has a series to read.
var alertKinds = []string{api.AlertRPO, api.AlertReverseRPO, api.AlertHeartbeat, api.AlertPSCPU, api.AlertPSMemory, api.AlertPSCacheFree,
	api.AlertPSUpload, api.AlertResyncFailed, api.AlertScrubDamage, api.AlertScrubFailed, api.AlertJobFailed,
	api.AlertVCenter, api.AlertTarget, api.AlertCertificate}

// collectAlerts sends the count of active alerts by kind and severity.
func (c *metricsCollector) collectAlerts(ctx context.Context, gauge func(*prometheus.Desc, float64, ...string)) error {
	as, err := c.s.db.ActiveAlerts(ctx)
	if err != nil {
		return err
	}
	type ks struct{ kind, sev string }
	n := map[ks]int{}
	for _, k := range alertKinds {
		n[ks{k, api.SeverityWarning}], n[ks{k, api.SeverityCritical}] = 0, 0
	}
	for _, a := range as {
		n[ks{a.Kind, a.Severity}]++
	}
	for k, v := range n {
		gauge(descAlertsActive, float64(v), k.kind, k.sev)
	}
	return nil
}

// collectMachines sends every machine's and disk's metrics.
func (c *metricsCollector) collectMachines(ctx context.Context, gauge, counter func(*prometheus.Desc, float64, ...string)) error {
	s := c.s
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return err
	}
	seen := make(map[string]bool, len(ms))
	for _, row := range ms {
		// No VM links: the metrics do not show them, and the inventory
		// is the costly part of a machine's view.
		v, err := s.machineView(ctx, row, &links{})
		if err != nil {
			return err
		}
		name := v.Name
		seen[v.ID] = true
		gauge(descMachineInfo, 1, name, v.ID, v.Policy, v.Group)
		gauge(descRPOKnown, bool01(v.RPOKnown), name)
		if v.RPOKnown {
			gauge(descRPO, v.RPO.Seconds(), name)
		} else if r, exact, ok := v.RPOAtLeast(s.now()); ok && !exact {
			gauge(descRPOLowerBound, r.Seconds(), name)
		}
		for _, st := range machineStates {
			gauge(descMachineState, bool01(v.State == st), name, st)
		}
		gauge(descConnected, bool01(v.Connected), name)
		if l, ok := s.reverseLagOf(v.ID, s.now()); ok {
			gauge(descReversePending, float64(l.pending), name)
			if l.known {
				gauge(descReverseRPO, l.rpo.Seconds(), name)
			}
		}
		counter(descReceived, c.receivedCount(v.ID, float64(v.BytesReceived)), name)
		gauge(descPoints, float64(v.PointCount), name)
		if v.LastPoint != nil {
			gauge(descLastPoint, float64(v.LastPoint.Time.UnixNano())/1e9, name)
		}
		gauge(descMachineProgress, v.Progress, name)
		var backlog, applied float64
		var backlogAge time.Duration
		if st, ok := s.machineStats(v.ID); ok {
			backlog, applied = float64(st.BacklogBytes), float64(st.AppliedBytes)
			if !st.BacklogSince.IsZero() {
				backlogAge = max(time.Since(st.BacklogSince), 0)
			}
		}
		counter(descApplied, applied, name)
		gauge(descBacklog, backlog, name)
		gauge(descBacklogAge, backlogAge.Seconds(), name)
		for _, d := range v.Disks {
			disk := d.Name
			if disk == "" {
				disk = strconv.Itoa(int(d.Index))
			}
			gauge(descDiskSize, float64(d.Size), name, disk)
			for _, st := range diskStates {
				gauge(descDiskState, bool01(d.State == st), name, disk, st)
			}
			gauge(descDiskInitial, d.Progress, name, disk)
			if r := d.Resync; r != nil {
				p := 0.0
				if r.Total > 0 {
					p = min(float64(r.Compared)/float64(r.Total), 1)
				}
				gauge(descDiskResync, p, name, disk)
				for _, st := range resyncStates {
					gauge(descDiskResyncState, bool01(r.State == st), name, disk, st)
				}
			}
		}
	}
	c.receivedMu.Lock()
	for id := range c.received {
		if !seen[id] {
			delete(c.received, id)
		}
	}
	c.receivedMu.Unlock()
	return nil
}

// receivedCount returns a machine's received count, never lower than
// the last one scraped (see metrics.received).
func (c *metricsCollector) receivedCount(id string, n float64) float64 {
	c.receivedMu.Lock()
	defer c.receivedMu.Unlock()
	if n < c.received[id] {
		return c.received[id]
	}
	c.received[id] = n
	return n
}

func bool01(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
