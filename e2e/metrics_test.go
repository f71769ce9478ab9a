//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// prometheusTools are the Prometheus programs the metrics test runs, and
// the Debian package that has them.
var prometheusTools = map[string]string{"prometheus": "prometheus", "promtool": "prometheus"}

// TestE2EMetricsPrometheus scrapes the real server's /metrics: promtool
// finds no problem in the exposition, and a real Prometheus, configured as
// the README says (HTTPS checked against the vault's CA, the metrics token
// file as its credentials), scrapes it until it holds the protected
// machine's RPO. The metrics token reads nothing of the API.
func TestE2EMetricsPrometheus(t *testing.T) {
	t.Parallel()
	tools := map[string]string{}
	for tool, pkg := range prometheusTools {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Fatalf("%s is required for the metrics test but is not installed: install it (apt-get install %s, or scripts/install-peers.sh)", tool, pkg)
		}
		tools[tool] = p
	}
	c := newCluster(t)
	disk := filepath.Join(c.dir, "m1-d0.img")
	makeDisk(t, disk, 16<<20, 3)
	c.startAgent("m1", nil, "d0="+disk)
	c.waitState("m1", "protected", hungAfter)
	c.tag("m1")

	tokenFile := filepath.Join(c.srvDir, "metrics-token")
	token, err := os.ReadFile(tokenFile)
	if err != nil {
		t.Fatalf("the server made no metrics token file: %v", err)
	}
	tok := strings.TrimSpace(string(token))
	// The CLI shows the same token.
	if out := strings.TrimSpace(c.mustCLI("metrics", "token")); out != tok {
		t.Fatalf("asr metrics token printed %q, the file holds %q", out, tok)
	}

	// One scrape, checked by promtool.
	hc := caClient(t, filepath.Join(c.srvDir, "ca.pem"))
	code, body := bearerGet(t, hc, c.url()+"/metrics", tok)
	if code != http.StatusOK {
		t.Fatalf("GET /metrics with the metrics token: %d %s", code, body)
	}
	if !bytes.Contains(body, []byte(`asr_machine_rpo_seconds{machine="m1"}`)) {
		t.Fatalf("the scrape has no RPO for m1:\n%s", body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
	defer cancel()
	check := contain(exec.CommandContext(ctx, tools["promtool"], "check", "metrics"))
	check.Stdin = bytes.NewReader(body)
	if out, err := check.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
	// The metrics token is not the admin token.
	if code, body := bearerGet(t, hc, c.url()+"/api/v1/machines", tok); code != http.StatusUnauthorized {
		t.Fatalf("GET /api/v1/machines with the metrics token: %d %s", code, body)
	}
	if code, _ := bearerGet(t, hc, c.url()+"/metrics", ""); code != http.StatusUnauthorized {
		t.Fatalf("GET /metrics without a token: %d", code)
	}

	// A real Prometheus scraping the server over HTTPS.
	prom := startPrometheus(t, c, tools["prometheus"], tokenFile)
	deadline := time.Now().Add(hungAfter)
	prom.waitScrapedAfter(t, time.Time{}, deadline)
	for query, ok := range map[string]func(float64) bool{
		`asr_machine_rpo_seconds{machine="m1"}`:             func(v float64) bool { return v >= 0 },
		`asr_machine_state{machine="m1",state="protected"}`: func(v float64) bool { return v == 1 },
		`asr_machine_points{machine="m1"}`:                  func(v float64) bool { return v >= 1 },
		`asr_disk_size_bytes{machine="m1",disk="d0"}`:       func(v float64) bool { return v == 16<<20 },
		`up{job="asr"}`: func(v float64) bool { return v == 1 },
		`asr_machine_received_bytes_total{machine="m1"}`:          func(v float64) bool { return v > 0 },
		`asr_process_server_uploaded_bytes_total{job="asr"}`:      func(v float64) bool { return v > 0 },
		`asr_process_server_received_wire_bytes_total{job="asr"}`: func(v float64) bool { return v > 0 },
	} {
		v := prom.waitQuery(t, query, deadline)
		if !ok(v) {
			t.Errorf("Prometheus: %s = %v", query, v)
		}
	}

	// A rotated token: the old one is refused at once, and Prometheus,
	// reading the file at each scrape, goes on with the new one.
	newTok := strings.TrimSpace(c.mustCLI("metrics", "token", "--rotate"))
	rotated := time.Now()
	if newTok == tok || len(newTok) < 32 {
		t.Fatalf("asr metrics token --rotate printed %q (the old one: %q)", newTok, tok)
	}
	if code, _ := bearerGet(t, hc, c.url()+"/metrics", tok); code != http.StatusUnauthorized {
		t.Fatalf("GET /metrics with the rotated-out token: %d", code)
	}
	if code, _ := bearerGet(t, hc, c.url()+"/metrics", newTok); code != http.StatusOK {
		t.Fatalf("GET /metrics with the new token: %d", code)
	}
	prom.waitScrapedAfter(t, rotated, time.Now().Add(hungAfter))
}

// waitScrapedAfter waits until Prometheus's one target was scraped
// successfully by a scrape that started after since.
func (p *promProc) waitScrapedAfter(t *testing.T, since time.Time, deadline time.Time) {
	t.Helper()
	var last string
	for {
		var targets struct {
			Data struct {
				ActiveTargets []struct {
					Health     string    `json:"health"`
					LastError  string    `json:"lastError"`
					LastScrape time.Time `json:"lastScrape"`
					ScrapeURL  string    `json:"scrapeUrl"`
				} `json:"activeTargets"`
			} `json:"data"`
		}
		if err := promGet(p.url+"/api/v1/targets", &targets); err != nil {
			last = err.Error()
		} else if ts := targets.Data.ActiveTargets; len(ts) == 1 && ts[0].Health == "up" && ts[0].LastError == "" && ts[0].LastScrape.After(since) {
			return
		} else {
			last = fmt.Sprintf("%+v", ts)
		}
		p.alive(t)
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus's target never scraped well after %v: %s\n%s", since, last, p.logTail())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// caClient is an HTTPS client that trusts the CA in caFile.
func caClient(t *testing.T, caFile string) *http.Client {
	t.Helper()
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("%s holds no certificate", caFile)
	}
	return &http.Client{Timeout: hungAfter, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// bearerGet does GET with a bearer token ("": none).
func bearerGet(t *testing.T, hc *http.Client, u, token string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

// promProc is a running Prometheus.
type promProc struct {
	*proc
	url string
}

// startPrometheus starts Prometheus on a loopback port with a config that
// scrapes the cluster's server every 5 s (a scrape may take over a second
// on a loaded machine; one that times out is a failed scrape), as README.md
// shows.
func startPrometheus(t *testing.T, c *cluster, bin, tokenFile string) *promProc {
	t.Helper()
	dir := filepath.Join(c.dir, "prometheus")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`global:
  scrape_interval: 5s
  scrape_timeout: 5s
scrape_configs:
  - job_name: asr
    scheme: https
    tls_config:
      ca_file: %s
    authorization:
      credentials_file: %s
    static_configs:
      - targets: [%q]
`, filepath.Join(c.srvDir, "ca.pem"), tokenFile, c.listen)
	cfgFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(c.dir, "prometheus.log")
	for attempt := 1; ; attempt++ {
		listen := "127.0.0.1:" + freePort(t)
		p := &promProc{url: "http://" + listen, proc: startProcCmd(t, "prometheus", logPath, bin,
			"--config.file="+cfgFile, "--storage.tsdb.path="+filepath.Join(dir, "data"),
			"--web.listen-address="+listen)}
		// Ready when its API answers.
		deadline := time.Now().Add(hungAfter)
		for time.Now().Before(deadline) && !p.exited() {
			conn, err := net.Dial("tcp", listen)
			if err == nil {
				conn.Close()
				if err := promGet(p.url+"/api/v1/status/buildinfo", nil); err == nil {
					return p
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
		// Another process took the port between freePort and the bind.
		if attempt < 5 && p.exited() && strings.Contains(p.logTail(), "address already in use") {
			continue
		}
		t.Fatalf("Prometheus did not come up: %v\n%s", p.err, p.logTail())
	}
}

// alive fails the test if Prometheus exited.
func (p *promProc) alive(t *testing.T) {
	t.Helper()
	if p.exited() {
		t.Fatalf("Prometheus exited: %v\n%s", p.err, p.logTail())
	}
}

// waitQuery waits until an instant query returns one sample and returns
// its value.
func (p *promProc) waitQuery(t *testing.T, query string, deadline time.Time) float64 {
	t.Helper()
	var last string
	for {
		var res struct {
			Status string `json:"status"`
			Data   struct {
				Result []struct {
					Value [2]any `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		err := promGet(p.url+"/api/v1/query?query="+url.QueryEscape(query), &res)
		switch {
		case err != nil:
			last = err.Error()
		case res.Status != "success" || len(res.Data.Result) != 1:
			last = fmt.Sprintf("%+v", res)
		default:
			s, _ := res.Data.Result[0].Value[1].(string)
			v, err := strconv.ParseFloat(s, 64)
			if err != nil {
				t.Fatalf("Prometheus: %s: value %v: %v", query, res.Data.Result[0].Value, err)
			}
			return v
		}
		p.alive(t)
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus never had %s: %s\n%s", query, last, p.logTail())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// promGet GETs a Prometheus API URL and decodes its JSON into v (nil: only
// the status matters).
func promGet(u string, v any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", u, resp.Status, b)
	}
	if v == nil {
		return nil
	}
	return json.Unmarshal(b, v)
}
