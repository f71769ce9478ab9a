package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// httpsClient trusts the rig's server CA.
func (r *rig) httpsClient() *http.Client {
	r.t.Helper()
	pem, err := os.ReadFile(filepath.Join(r.dir, "srv", "ca.pem"))
	if err != nil {
		r.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// get does GET path with a bearer token ("": none) and returns the status
// and body.
func (r *rig) get(hc *http.Client, path, token string) (int, []byte) {
	r.t.Helper()
	req, err := http.NewRequest(http.MethodGet, r.srv.URL()+path, nil)
	if err != nil {
		r.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		r.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		r.t.Fatal(err)
	}
	return resp.StatusCode, b
}

func mustSecret(t testing.TB, path string) string {
	t.Helper()
	b, err := api.ReadSecretFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// scrape is one parsed scrape of /metrics.
type scrape map[string]*dto.MetricFamily

func (r *rig) scrape(hc *http.Client, token string) scrape {
	r.t.Helper()
	code, body := r.get(hc, "/metrics", token)
	if code != http.StatusOK {
		r.t.Fatalf("GET /metrics: %d %s", code, body)
	}
	// The exposition follows Prometheus's naming and help conventions.
	problems, err := promlint.New(bytes.NewReader(body)).Lint()
	if err != nil {
		r.t.Fatal(err)
	}
	for _, p := range problems {
		r.t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		r.t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	return fams
}

// value is the value of the series of name with exactly these labels (a
// histogram's sample count); ok is false if there is none.
func (s scrape) value(name string, labels ...string) (float64, bool) {
	f := s[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.Metric {
		if len(m.Label) != len(labels)/2 {
			continue
		}
		for i := 0; i < len(labels); i += 2 {
			found := false
			for _, l := range m.Label {
				if l.GetName() == labels[i] && l.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		case m.Untyped != nil:
			return m.Untyped.GetValue(), true
		}
	}
	return 0, false
}

func (s scrape) must(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	v, ok := s.value(name, labels...)
	if !ok {
		t.Fatalf("no series %s%v in the scrape", name, labels)
	}
	return v
}

// TestMetrics scrapes /metrics of a server replicating a machine: the
// admin token and the metrics token read it, nothing else does; the
// metrics token reads nothing of the API; the values are the machine's
// and the process server's as the API shows them; an ended job is in the
// job histograms; a rotated token replaces the old one at once.
func TestMetrics(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.NBDListen = "127.0.0.1:0" }}
	r.start()
	d0 := filepath.Join(dir, "d0.img")
	mustDisk(t, d0, 8<<20, 1)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0})
	startAgent(t, cfg)
	r.waitProtected("vm1")
	src, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.WriteAt(bytes.Repeat([]byte{7}, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := r.client.Tag(ctx, "vm1", false, time.Minute); err != nil {
		t.Fatal(err)
	}
	// A test failover and its cleanup: two jobs that end.
	fo := r.mustJob(r.client.StartFailover(ctx, api.FailoverRequest{Machine: "vm1", Test: true, Point: "latest", To: api.ToNBD}))
	cl := r.mustJob(r.client.FailoverAction(ctx, "cleanup", api.FailoverAction{Machine: "vm1"}))

	srvDir := filepath.Join(dir, "srv")
	admin := mustSecret(t, filepath.Join(srvDir, server.AdminTokenFile))
	metricsTok := mustSecret(t, filepath.Join(srvDir, server.MetricsTokenFile))
	if admin == metricsTok || len(metricsTok) < 32 {
		t.Fatalf("metrics token %q: want a secret of its own", metricsTok)
	}
	if st, err := os.Stat(filepath.Join(srvDir, server.MetricsTokenFile)); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("metrics token file: %v %v, want mode 0600", st.Mode(), err)
	}
	hc := r.httpsClient()

	// Who may read what.
	for _, tc := range []struct {
		path, token string
		want        int
	}{
		{"/metrics", "", http.StatusUnauthorized},
		{"/metrics", "wrong", http.StatusUnauthorized},
		{"/metrics", metricsTok + "x", http.StatusUnauthorized},
		{"/metrics", admin, http.StatusOK},
		{"/metrics", metricsTok, http.StatusOK},
		{"/api/v1/machines", metricsTok, http.StatusUnauthorized},
		{"/api/v1/process-server", metricsTok, http.StatusUnauthorized},
		{"/api/v1/metrics/token", metricsTok, http.StatusUnauthorized},
		{"/api/v1/machines", admin, http.StatusOK},
	} {
		code, body := r.get(hc, tc.path, tc.token)
		if code != tc.want {
			t.Errorf("GET %s with token %q: %d, want %d: %s", tc.path, tc.token, code, tc.want, body)
		}
		if tc.want == http.StatusUnauthorized && tc.path == "/metrics" && !strings.Contains(string(body), server.MetricsTokenFile) {
			t.Errorf("GET /metrics refused without saying where the token is: %s", body)
		}
	}

	// The values are the machine's as the API shows them: read the API
	// before and after the scrape, and each counter lies between.
	before := r.machine("vm1")
	s := r.scrape(hc, metricsTok)
	after := r.machine("vm1")
	var ps api.ProcessServer
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/process-server", nil, &ps); err != nil {
		t.Fatal(err)
	}
	m := []string{"machine", "vm1"}
	if v := s.must(t, "asr_machine_info", "machine", "vm1", "id", before.ID, "policy", before.Policy, "group", ""); v != 1 {
		t.Errorf("asr_machine_info = %v", v)
	}
	for _, st := range []string{replication.StateInitial, replication.StateProtected, replication.StateResync, api.StateUnprotected} {
		want := 0.0
		if st == replication.StateProtected {
			want = 1
		}
		if v := s.must(t, "asr_machine_state", "machine", "vm1", "state", st); v != want {
			t.Errorf("asr_machine_state{state=%q} = %v, want %v", st, v, want)
		}
	}
	if v := s.must(t, "asr_machine_connected", m...); v != 1 {
		t.Errorf("asr_machine_connected = %v", v)
	}
	if v := s.must(t, "asr_machine_rpo_known", m...); v != 1 || !before.RPOKnown {
		t.Errorf("asr_machine_rpo_known = %v (API: %v)", v, before.RPOKnown)
	}
	if _, ok := s.value("asr_machine_rpo_lower_bound_seconds", m...); ok {
		t.Error("asr_machine_rpo_lower_bound_seconds shown while the RPO is known")
	}
	// The agent reports every few seconds, resetting the RPO: a sanity
	// bound only.
	if v := s.must(t, "asr_machine_rpo_seconds", m...); v < 0 || v > hung.Seconds() {
		t.Errorf("asr_machine_rpo_seconds = %v, API before %v after %v", v, before.RPO, after.RPO)
	}
	if v := s.must(t, "asr_machine_received_bytes_total", m...); v < float64(before.BytesReceived) || v > float64(after.BytesReceived) || v < 1<<20 {
		t.Errorf("asr_machine_received_bytes_total = %v, API %d .. %d", v, before.BytesReceived, after.BytesReceived)
	}
	if v := s.must(t, "asr_machine_points", m...); v != float64(before.PointCount) || v != float64(after.PointCount) || v < 1 {
		t.Errorf("asr_machine_points = %v, API %d .. %d", v, before.PointCount, after.PointCount)
	}
	if v := s.must(t, "asr_machine_last_point_timestamp_seconds", m...); int64(v) != before.LastPoint.Time.Unix() {
		t.Errorf("asr_machine_last_point_timestamp_seconds = %v, API %v", v, before.LastPoint.Time)
	}
	if v := s.must(t, "asr_machine_applied_bytes_total", m...); v <= 0 {
		t.Errorf("asr_machine_applied_bytes_total = %v, want the applied segments' bytes", v)
	}
	if v := s.must(t, "asr_machine_backlog_bytes", m...); v < 0 {
		t.Errorf("asr_machine_backlog_bytes = %v", v)
	}
	if v := s.must(t, "asr_machine_initial_progress_ratio", m...); v != 1 {
		t.Errorf("asr_machine_initial_progress_ratio = %v", v)
	}
	if v := s.must(t, "asr_disk_size_bytes", "machine", "vm1", "disk", "d0"); v != 8<<20 {
		t.Errorf("asr_disk_size_bytes = %v", v)
	}
	if v := s.must(t, "asr_disk_state", "machine", "vm1", "disk", "d0", "state", replication.StateProtected); v != 1 {
		t.Errorf("asr_disk_state{protected} = %v", v)
	}
	if v := s.must(t, "asr_disk_initial_progress_ratio", "machine", "vm1", "disk", "d0"); v != 1 {
		t.Errorf("asr_disk_initial_progress_ratio = %v", v)
	}
	if _, ok := s.value("asr_disk_resync_progress_ratio", "machine", "vm1", "disk", "d0"); ok {
		t.Error("asr_disk_resync_progress_ratio shown for a disk with no resync")
	}
	// The process server's counters, since the start: something came in
	// and went out, and no more than the API's later figures.
	for _, name := range []string{"asr_process_server_uploaded_bytes_total", "asr_process_server_received_raw_bytes_total",
		"asr_process_server_received_wire_bytes_total"} {
		if v := s.must(t, name); v <= 0 {
			t.Errorf("%s = %v", name, v)
		}
	}
	if v := s.must(t, "asr_process_server_received_wire_bytes_total"); v > float64(ps.WireBytes) {
		t.Errorf("asr_process_server_received_wire_bytes_total = %v, more than the API's later %d", v, ps.WireBytes)
	}
	if v := s.must(t, "asr_process_server_cache_free_ratio"); v <= 0 || v > 1 {
		t.Errorf("asr_process_server_cache_free_ratio = %v", v)
	}
	if v := s.must(t, "asr_process_server_cache_state", "state", ps.CacheState); v != 1 {
		t.Errorf("asr_process_server_cache_state{%s} = %v", ps.CacheState, v)
	}
	if v := s.must(t, "asr_process_server_memory_ratio"); v <= 0 || v > 1 {
		t.Errorf("asr_process_server_memory_ratio = %v", v)
	}
	for _, name := range []string{"asr_process_server_backlog_bytes", "asr_process_server_backlog_age_seconds",
		"asr_process_server_upload_bytes_per_second", "asr_process_server_compression_ratio",
		"asr_process_server_cache_free_bytes", "asr_process_server_memory_total_bytes", "go_goroutines", "process_cpu_seconds_total"} {
		s.must(t, name)
	}
	if v := s.must(t, "asr_server_info", "version", server.Version); v != 1 {
		t.Errorf("asr_server_info = %v", v)
	}
	// The jobs that ended.
	if n := s.must(t, "asr_job_duration_seconds", "kind", fo.Kind, "result", api.JobSucceeded); n != 1 {
		t.Errorf("asr_job_duration_seconds{kind=%q} count %v, want 1", fo.Kind, n)
	}
	if n := s.must(t, "asr_job_duration_seconds", "kind", cl.Kind, "result", api.JobSucceeded); n != 1 {
		t.Errorf("asr_job_duration_seconds{kind=%q} count %v, want 1", cl.Kind, n)
	}
	if fo.RTO <= 0 {
		t.Fatalf("the test failover measured no RTO: %+v", fo)
	}
	if n := s.must(t, "asr_job_rto_seconds", "kind", fo.Kind); n != 1 {
		t.Errorf("asr_job_rto_seconds{kind=%q} count %v, want 1", fo.Kind, n)
	}
	// The admin token reads the same metrics.
	if sa := r.scrape(hc, admin); sa["asr_machine_rpo_seconds"] == nil {
		t.Error("the admin token's scrape has no asr_machine_rpo_seconds")
	}

	// Rotation: the old token stops at once, the file holds the new one.
	var tok api.MetricsToken
	if err := r.client.Do(ctx, http.MethodGet, "/api/v1/metrics/token", nil, &tok); err != nil || tok.Token != metricsTok {
		t.Fatalf("GET /api/v1/metrics/token: %+v %v", tok, err)
	}
	if err := r.client.Do(ctx, http.MethodPost, "/api/v1/metrics/token", api.MetricsTokenRequest{Rotate: true}, &tok); err != nil {
		t.Fatal(err)
	}
	if tok.Token == metricsTok || tok.Token != mustSecret(t, filepath.Join(srvDir, server.MetricsTokenFile)) {
		t.Fatalf("rotated token %q: the old one %q, the file's %q", tok.Token, metricsTok, mustSecret(t, filepath.Join(srvDir, server.MetricsTokenFile)))
	}
	if code, _ := r.get(hc, "/metrics", metricsTok); code != http.StatusUnauthorized {
		t.Errorf("the old metrics token after rotation: %d", code)
	}
	if code, _ := r.get(hc, "/metrics", tok.Token); code != http.StatusOK {
		t.Errorf("the new metrics token: %d", code)
	}
	// The token survives a restart.
	r.stop()
	r.start()
	if code, _ := r.get(r.httpsClient(), "/metrics", tok.Token); code != http.StatusOK {
		t.Errorf("the rotated token after a restart: %d", code)
	}
}

// BenchmarkMetricsScrape measures one scrape of /metrics over HTTPS (keep-
// alive) of a server with 100 (and 1,000) machines of two disks and 100
// points each, a resync row on every tenth disk: the database reads of
// every machine's view and the exposition.
func BenchmarkMetricsScrape(b *testing.B) {
	for _, n := range []int{100, 1000} {
		b.Run(fmt.Sprintf("machines=%d", n), func(b *testing.B) { benchmarkMetricsScrape(b, n) })
	}
}

func benchmarkMetricsScrape(b *testing.B, machines int) {
	ctx := context.Background()
	dir := b.TempDir()
	srv, err := server.Open(ctx, server.Config{DataDir: filepath.Join(dir, "srv"), Listen: "127.0.0.1:0", DataListen: "127.0.0.1:0",
		NBDListen: "off", Logger: quietLogger()})
	if err != nil {
		b.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.Run(rctx) }()
	defer func() {
		cancel()
		<-done
		srv.Close()
	}()
	db := srv.DB()
	now := time.Now()
	for i := range machines {
		m, _, err := db.CreateMachine(ctx, fmt.Sprintf("%032x", i+1), fmt.Sprintf("vm%03d", i), "serial")
		if err != nil {
			b.Fatal(err)
		}
		for d := range 2 {
			if err := db.PutDisk(ctx, m.ID, store.Disk{Index: uint32(d), Name: fmt.Sprintf("d%d", d), Size: 64 << 30, State: replication.StateProtected}); err != nil {
				b.Fatal(err)
			}
			if (2*i+d)%10 == 0 {
				if err := db.PutResync(ctx, store.Resync{MachineID: m.ID, Disk: uint32(d), State: replication.ResyncRunning, Reason: "bench", Total: 64 << 30, Compared: 1 << 30}); err != nil {
					b.Fatal(err)
				}
			}
		}
		for p := range 100 {
			if err := db.AddPoint(ctx, store.Point{MachineID: m.ID, Seq: uint64(p + 1), Time: now.Add(time.Duration(p-100) * time.Minute), Kind: "crash"}); err != nil {
				b.Fatal(err)
			}
		}
		if err := db.TouchMachine(ctx, m.ID, "bench", int64(i)<<30); err != nil {
			b.Fatal(err)
		}
	}
	tok := mustSecret(b, filepath.Join(dir, "srv", server.MetricsTokenFile))
	pem, err := os.ReadFile(filepath.Join(dir, "srv", "ca.pem"))
	if err != nil {
		b.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	var size int
	b.ResetTimer()
	for b.Loop() {
		req, _ := http.NewRequest(http.MethodGet, srv.URL()+"/metrics", nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := hc.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			b.Fatalf("scrape: %d %v", resp.StatusCode, err)
		}
		size = len(body)
	}
	b.ReportMetric(float64(size), "bytes/scrape")
}

// A machine whose agent did not come back after a restart: its RPO is not
// known, its lower bound is shown and grows; the active alerts are
// counted by kind and severity, zero for the kinds with none.
func TestMetricsRPOLowerBoundAndAlerts(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger()}
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 1<<20, 1)
	ra := startAgent(t, r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk}))
	r.waitProtected("vm1")
	ra.close()
	r.stop()
	r.tune = func(c *server.Config) { c.PolicyEvery, c.HeartbeatLost = 10*time.Millisecond, time.Hour }
	r.start()
	mustFailedJob(t, r.srv.DB(), "00000000000000cc")
	r.waitAlert(api.AlertJobFailed, "", "")
	hc := r.httpsClient()
	tok := mustSecret(t, filepath.Join(dir, "srv", server.MetricsTokenFile))
	s := r.scrape(hc, tok)
	m := []string{"machine", "vm1"}
	if v := s.must(t, "asr_machine_rpo_known", m...); v != 0 {
		t.Fatalf("asr_machine_rpo_known = %v after a restart without the agent", v)
	}
	lb := s.must(t, "asr_machine_rpo_lower_bound_seconds", m...)
	if lb <= 0 {
		t.Fatalf("asr_machine_rpo_lower_bound_seconds = %v", lb)
	}
	if v := s.must(t, "asr_alerts_active", "kind", api.AlertJobFailed, "severity", api.SeverityWarning); v != 1 {
		t.Errorf("asr_alerts_active{job-failed,warning} = %v", v)
	}
	if v := s.must(t, "asr_alerts_active", "kind", api.AlertScrubDamage, "severity", api.SeverityCritical); v != 0 {
		t.Errorf("asr_alerts_active{scrub-damage,critical} = %v", v)
	}
	passes := s.must(t, "asr_alert_engine_passes_total")
	if passes < 1 {
		t.Errorf("asr_alert_engine_passes_total = %v", passes)
	}
	r.waitPasses(3)
	s2 := r.scrape(hc, tok)
	if v := s2.must(t, "asr_machine_rpo_lower_bound_seconds", m...); v <= lb {
		t.Errorf("the lower bound did not grow: %v then %v", lb, v)
	}
	if v := s2.must(t, "asr_alert_engine_passes_total"); v < passes+3 {
		t.Errorf("asr_alert_engine_passes_total %v then %v", passes, v)
	}
}
