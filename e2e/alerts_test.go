//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
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

// startMailpit starts mailpit on loopback ports; the test fails when it is
// not installed.
func startMailpit(t *testing.T, dir string) *mailpit {
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
	m.proc = startProcCmd(t, "mailpit", filepath.Join(dir, "mailpit.log"), bin,
		"--smtp", m.smtp, "--listen", m.api, "--database", filepath.Join(dir, "mailpit.db"))
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
	resp, err := http.Get("http://" + m.api + "/api/v1/messages?limit=500")
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

// TestE2EAlertMail: an agent stopped (SIGSTOP) past its policy's RPO
// threshold makes exactly one RPO mail through a real SMTP server
// (mailpit) to both recipients and one webhook notice; continued, exactly
// one "resolved" mail and notice. Bad settings are refused; a test mail
// arrives.
func TestE2EAlertMail(t *testing.T) {
	c := newClusterArgs(t, "--alert-clear", "2s")
	mp := startMailpit(t, c.dir)

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

	// Bad input is refused and changes nothing.
	for _, bad := range [][]string{
		{"alerts", "email", "--smtp", "nohostport", "--from", "asr@example.com", "--to", "ops@example.com"},
		{"alerts", "email", "--smtp", mp.smtp, "--from", "not-an-address", "--to", "ops@example.com"},
		{"alerts", "email", "--smtp", "127.0.0.1:70000", "--from", "asr@example.com", "--to", "ops@example.com"},
		{"alerts", "webhook", "--url", "ftp://example.com/hook"},
	} {
		if out, err := c.cli(bad...); err == nil {
			t.Fatalf("%v accepted: %s", bad, out)
		}
	}
	if out, err := c.cli("alerts", "test"); err == nil {
		t.Fatalf("test with nothing set: %s", out)
	}
	c.mustCLI("alerts", "email", "--smtp", mp.smtp, "--starttls=false", "--from", "asr@example.com",
		"--to", "ops@example.com,oncall@example.com", "--digest", "3s")
	c.mustCLI("alerts", "webhook", "--url", hook.URL+"/asr")
	c.mustCLI("alerts", "test")
	mp.waitMail(t, "[asr] TEST")

	disk := filepath.Join(c.dir, "vm1.img")
	makeDisk(t, disk, 8<<20, 1)
	ag := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", hungAfter)
	c.mustCLI("policy", "set", "default", "--rpo-threshold", "30s")

	// The agent stops: nothing reaches the server, the RPO grows past
	// the threshold.
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
		if a.ID == rpoAlert.ID && (a.State != api.AlertResolved || a.Acked.IsZero()) {
			t.Errorf("RPO alert after the resolve: %+v", a)
		}
	}
	if n := mp.count(t, "[asr] WARNING rpo vm1") + mp.count(t, "[asr] CRITICAL rpo vm1") + mp.count(t, "[asr] ESCALATED"); n != 1 {
		t.Errorf("%d RPO mails, want exactly 1", n)
	}
	if n := mp.count(t, "[asr] RESOLVED rpo vm1"); n != 1 {
		t.Errorf("%d resolved mails, want exactly 1", n)
	}
	if n := mp.count(t, "[asr] digest"); n != 0 {
		t.Errorf("%d digests: notices other than the RPO's were sent", n)
	}
	if r, s := hookCount(api.AlertChangeRaised), hookCount(api.AlertChangeResolved); r != 1 || s != 1 {
		t.Errorf("webhook: %d raised, %d resolved notices, want 1 and 1", r, s)
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
