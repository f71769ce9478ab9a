//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// mailpit is a real SMTP server with an HTTP API (github.com/axllent/mailpit,
// installed by scripts/install-peers.sh into bin/).
type mailpit struct {
	smtp, api string
	proc      *proc
}

// smtpTLS is what mailpit needs for STARTTLS and AUTH, and what asr needs
// to trust it and log in.
type smtpTLS struct {
	caFile, certFile, keyFile string // a CA of the test's own, a certificate for 127.0.0.1 it signed
	authFile, passFile        string // mailpit's users; asr's password
	user                      string
}

// makeSMTPTLS makes a CA, a server certificate for 127.0.0.1 signed by it,
// mailpit's password file and asr's.
func makeSMTPTLS(t *testing.T, dir string) smtpTLS {
	t.Helper()
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "asr e2e SMTP CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	s := smtpTLS{caFile: filepath.Join(dir, "smtp-ca.pem"), certFile: filepath.Join(dir, "smtp-cert.pem"), keyFile: filepath.Join(dir, "smtp-key.pem"),
		authFile: filepath.Join(dir, "mailpit-auth"), passFile: filepath.Join(dir, "smtp-password"), user: "asr-alerts"}
	const password = "e2e-smtp-s3cret"
	for path, b := range map[string][]byte{
		s.caFile:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		s.certFile: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		s.keyFile:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		s.authFile: []byte(s.user + ":" + password + "\n"),
		s.passFile: []byte(password + "\n"),
	} {
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// startMailpit starts mailpit on loopback ports, requiring STARTTLS (with
// the certificate of tl) and AUTH (its users), or plain SMTP for the zero
// smtpTLS; the test fails when mailpit is not installed.
func startMailpit(t *testing.T, dir string, tl smtpTLS) *mailpit {
	t.Helper()
	bin, err := exec.LookPath("mailpit")
	if err != nil {
		root, _ := filepath.Abs("..")
		bin = filepath.Join(root, "bin", "mailpit")
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("mailpit is required for this test but is not installed: run scripts/install-peers.sh (go install github.com/axllent/mailpit@v1.33.1)")
		}
	}
	m := &mailpit{smtp: "127.0.0.1:" + freePort(t), api: "127.0.0.1:" + freePort(t)}
	args := []string{"--smtp", m.smtp, "--listen", m.api, "--database", filepath.Join(dir, "mailpit.db"),
		// Nothing beyond loopback: no reverse DNS of the client before the
		// greeting (a resolver that drops packets would delay every
		// session), no version check.
		"--smtp-disable-rdns", "--disable-version-check"}
	if tl.certFile != "" { // the zero smtpTLS: plain SMTP, no AUTH
		args = append(args, "--smtp-tls-cert", tl.certFile, "--smtp-tls-key", tl.keyFile, "--smtp-require-starttls", "--smtp-auth-file", tl.authFile)
	}
	m.proc = startProcCmd(t, "mailpit", filepath.Join(dir, "mailpit.log"), bin, args...)
	deadline := time.Now().Add(hungAfter)
	for time.Now().Before(deadline) {
		if _, err := m.messages(); err == nil {
			return m
		}
		if m.proc.exited() {
			t.Fatalf("mailpit exited: %v\n%s", m.proc.err, m.proc.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("mailpit did not come up:\n%s", m.proc.logTail())
	return nil
}

// mailpitMessage is what mailpit's GET /api/v1/messages says of a message.
type mailpitMessage struct {
	Subject string
	To      []struct{ Address string }
	From    struct{ Address string }
}

func (m *mailpit) messages() ([]mailpitMessage, error) {
	// A bounded request: a mailpit that stops answering fails the test, it
	// does not hang it.
	cl := http.Client{Timeout: 30 * time.Second}
	resp, err := cl.Get("http://" + m.api + "/api/v1/messages?limit=500")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("mailpit: HTTP %d", resp.StatusCode)
	}
	var out struct{ Messages []mailpitMessage }
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(&out); err != nil {
		return nil, err
	}
	return out.Messages, nil
}

// count counts the messages whose subject starts with prefix.
func (m *mailpit) count(t *testing.T, prefix string) int {
	t.Helper()
	ms, err := m.messages()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, x := range ms {
		if strings.HasPrefix(x.Subject, prefix) {
			n++
		}
	}
	return n
}

// waitMail waits until a message whose subject starts with one of the
// prefixes arrived.
func (m *mailpit) waitMail(t *testing.T, prefixes ...string) mailpitMessage {
	t.Helper()
	deadline := time.Now().Add(hungAfter)
	for time.Now().Before(deadline) {
		ms, err := m.messages()
		if err != nil {
			t.Fatal(err)
		}
		for _, x := range ms {
			for _, p := range prefixes {
				if strings.HasPrefix(x.Subject, p) {
					return x
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	ms, _ := m.messages()
	t.Fatalf("no mail %q arrived; mails: %+v", prefixes, ms)
	return mailpitMessage{}
}

// alertPasses reads the alert engine's pass count from /metrics.
func (c *cluster) alertPasses(t *testing.T) int {
	t.Helper()
	tok, err := os.ReadFile(filepath.Join(c.srvDir, "metrics-token"))
	if err != nil {
		t.Fatal(err)
	}
	code, body := bearerGet(t, caClient(t, filepath.Join(c.srvDir, "ca.pem")), c.url()+"/metrics", strings.TrimSpace(string(tok)))
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "asr_alert_engine_passes_total "); ok {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("asr_alert_engine_passes_total %q: %v", v, err)
			}
			return int(n)
		}
	}
	t.Fatalf("no asr_alert_engine_passes_total in /metrics")
	return 0
}

// waitAlertPasses waits until the alert engine made n more passes.
func (c *cluster) waitAlertPasses(t *testing.T, n int) {
	t.Helper()
	until := c.alertPasses(t) + n
	deadline := time.Now().Add(hungAfter)
	for c.alertPasses(t) < until {
		if time.Now().After(deadline) {
			t.Fatalf("the alert engine did not make %d more passes", n)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestE2EAlertMail: an agent stopped (SIGSTOP) past its policy's RPO
// threshold makes exactly one RPO mail through a real SMTP server
// (mailpit, STARTTLS required with a certificate from a private CA, AUTH
// required) to both recipients and one webhook notice; continued, exactly
// one "resolved" mail and notice, and no other after more passes of the
// engine. Bad settings are refused; without the CA the test mail is
// refused, with it (the password kept for the same server and user) it
// arrives.
func TestE2EAlertMail(t *testing.T) {
	t.Parallel()
	c := newClusterArgs(t, "--alert-clear", "2s")
	tl := makeSMTPTLS(t, c.dir)
	mp := startMailpit(t, c.dir, tl)

	var mu sync.Mutex
	var hooks []api.WebhookBody
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var b api.WebhookBody
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&b); err == nil {
			mu.Lock()
			hooks = append(hooks, b)
			mu.Unlock()
		}
	}))
	defer hook.Close()
	hookCount := func(change string) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, b := range hooks {
			if b.Alert.Kind == api.AlertRPO && b.Alert.Machine == "vm1" && b.Change == change {
				n++
			}
		}
		return n
	}
	hookTotal := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(hooks)
	}

	// Bad input is refused and changes nothing.
	notPEM := filepath.Join(c.dir, "not-a-ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]string{
		{"alerts", "email", "--smtp", "nohostport", "--from", "asr@example.com", "--to", "ops@example.com"},
		{"alerts", "email", "--smtp", mp.smtp, "--from", "not-an-address", "--to", "ops@example.com"},
		{"alerts", "email", "--smtp", "127.0.0.1:70000", "--from", "asr@example.com", "--to", "ops@example.com"},
		{"alerts", "email", "--smtp", mp.smtp, "--from", "asr@example.com", "--to", "ops@example.com", "--smtp-ca-file", notPEM},
		{"alerts", "webhook", "--url", "ftp://example.com/hook"},
	} {
		if out, err := c.cli(bad...); err == nil {
			t.Fatalf("%v accepted: %s", bad, out)
		}
	}
	if out, err := c.cli("alerts", "test"); err == nil {
		t.Fatalf("test with nothing set: %s", out)
	}
	email := []string{"alerts", "email", "--smtp", mp.smtp, "--from", "asr@example.com",
		"--to", "ops@example.com,oncall@example.com", "--digest", "3s", "--user", tl.user}
	// Without the CA, mailpit's certificate is not trusted: refused.
	c.mustCLI(append(email, "--password-file", tl.passFile)...)
	if out, err := c.cli("alerts", "test"); err == nil || !strings.Contains(out+err.Error(), "certificate") {
		t.Fatalf("test mail without the CA: %v %s", err, out)
	}
	// With it; the password stays (same server, same user).
	c.mustCLI(append(email, "--smtp-ca-file", tl.caFile)...)
	c.mustCLI("alerts", "webhook", "--url", hook.URL+"/asr")
	c.mustCLI("alerts", "test")
	mp.waitMail(t, "[asr] TEST")

	disk := filepath.Join(c.dir, "vm1.img")
	makeDisk(t, disk, 8<<20, 1)
	ag := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", hungAfter)
	const threshold = 30 * time.Second
	c.mustCLI("policy", "set", "default", "--rpo-threshold", threshold.String())

	// The agent stops: nothing reaches the server, the RPO grows past
	// the threshold.
	paused := time.Now()
	ag.proc.pause()
	raised := mp.waitMail(t, "[asr] WARNING rpo vm1", "[asr] CRITICAL rpo vm1")
	if len(raised.To) != 2 {
		t.Errorf("RPO mail to %+v, want both recipients", raised.To)
	}
	var as []api.Alert
	if err := json.Unmarshal([]byte(c.mustCLI("alerts", "--json")), &as); err != nil {
		t.Fatal(err)
	}
	var rpoAlert api.Alert
	for _, a := range as {
		if a.Kind == api.AlertRPO && a.Machine == "vm1" {
			rpoAlert = a
		}
	}
	if rpoAlert.ID == 0 || !strings.Contains(rpoAlert.Action, "asr status --machine vm1") {
		t.Fatalf("no RPO alert with an action in %+v", as)
	}
	c.mustCLI("alerts", "ack", fmt.Sprint(rpoAlert.ID))
	ag.proc.resume()
	// Escalation to critical takes an RPO over twice the threshold. The
	// agent was stopped with an RPO of a few seconds and reports within
	// seconds of its resume: resumed well before 2x the threshold, it
	// cannot escalate, and must not have.
	pausedFor := time.Since(paused)
	mayEscalate := pausedFor > 2*threshold-15*time.Second

	// Continued, the agent reports again; the alert clears after 2 s
	// clearly under the threshold.
	mp.waitMail(t, "[asr] RESOLVED rpo vm1")
	deadline := time.Now().Add(hungAfter)
	for hookCount(api.AlertChangeResolved) == 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if err := json.Unmarshal([]byte(c.mustCLI("alerts", "--all", "--json")), &as); err != nil {
		t.Fatal(err)
	}
	for _, a := range as {
		if a.ID == rpoAlert.ID && (a.State != api.AlertResolved || a.Acked.IsZero() && !mayEscalate) {
			t.Errorf("RPO alert after the resolve: %+v", a)
		}
	}
	check := func(when string) {
		t.Helper()
		if n := mp.count(t, "[asr] WARNING rpo vm1") + mp.count(t, "[asr] CRITICAL rpo vm1"); n != 1 {
			t.Errorf("%s: %d RPO mails, want exactly 1", when, n)
		}
		esc := mp.count(t, "[asr] ESCALATED") + mp.count(t, "[asr] digest")
		switch {
		case !mayEscalate && esc != 0:
			t.Errorf("%s: %d escalation or digest mails; the agent was stopped %s only, under 2x the threshold", when, esc, pausedFor)
		case mayEscalate && esc > 1:
			t.Errorf("%s: %d escalation or digest mails, want at most 1", when, esc)
		}
		if n := mp.count(t, "[asr] RESOLVED rpo vm1"); n != 1 {
			t.Errorf("%s: %d resolved mails, want exactly 1", when, n)
		}
		if r, s := hookCount(api.AlertChangeRaised), hookCount(api.AlertChangeResolved); r != 1 || s != 1 {
			t.Errorf("%s: webhook: %d raised, %d resolved notices, want 1 and 1", when, r, s)
		}
	}
	check("at the resolve")
	mails, posts := mp.count(t, ""), hookTotal()
	// Several more passes of the engine: nothing is sent again.
	c.waitAlertPasses(t, 3)
	check("3 passes later")
	if m, p := mp.count(t, ""), hookTotal(); m != mails || p != posts {
		t.Errorf("3 passes after the resolve: %d mails, %d webhook posts; were %d and %d", m, p, mails, posts)
	}
	if out := c.mustCLI("events", "--machine", "vm1"); !strings.Contains(out, "rpo-exceeded") || !strings.Contains(out, "rpo-recovered") {
		t.Errorf("events:\n%s", out)
	}
	c.mustCLI("alerts", "email", "--off")
	c.mustCLI("alerts", "webhook", "--off")
	if _, err := c.cli("alerts", "test"); err == nil {
		t.Error("test with everything off succeeded")
	}
}
