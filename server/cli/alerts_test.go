package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/asrdr/asr/server/notify/smtptest"
)

// asr alerts against a real server: the list, bad input refused with a
// clear message and nothing changed, e-mail settings, a test mail.
func TestAlertsCommand(t *testing.T) {
	_, conn := startServer(t)
	with := func(args ...string) []string { return append(args, conn...) }
	if got := mustRun(t, with("alerts")...); got != "no active alert\n" {
		t.Errorf("alerts = %q", got)
	}
	if got := mustRun(t, with("alerts", "list", "--all", "--json")...); strings.TrimSpace(got) != "[]" {
		t.Errorf("alerts --all --json = %q", got)
	}
	mustFail(t, `unknown subcommand "bogus"`, with("alerts", "bogus")...)
	mustFail(t, "usage: asr alerts ack ID", with("alerts", "ack")...)
	mustFail(t, `alert id "x": not a number`, with("alerts", "ack", "x")...)
	mustFail(t, "alert 42: not found", with("alerts", "ack", "42")...)
	mustFail(t, "--smtp, --from and --to are required", with("alerts", "email", "--smtp", "mail.example.com:25")...)
	mustFail(t, "want HOST:PORT", with("alerts", "email", "--smtp", "mail.example.com", "--from", "a@example.com", "--to", "b@example.com")...)
	mustFail(t, "is not a number from 1 to 65535", with("alerts", "email", "--smtp", "mail.example.com:0", "--from", "a@example.com", "--to", "b@example.com")...)
	mustFail(t, `recipient "b"`, with("alerts", "email", "--smtp", "mail.example.com:25", "--from", "a@example.com", "--to", "b@example.com,b")...)
	mustFail(t, "--password-file needs --user", with("alerts", "email", "--smtp", "mail.example.com:25", "--from", "a@example.com", "--to", "b@example.com", "--password-file", "/nonexistent")...)
	mustFail(t, "minimum severity", with("alerts", "email", "--smtp", "mail.example.com:25", "--from", "a@example.com", "--to", "b@example.com", "--min-severity", "all")...)
	mustFail(t, "--url is required", with("alerts", "webhook")...)
	mustFail(t, "want http(s)://", with("alerts", "webhook", "--url", "ftp://example.com/x")...)
	mustFail(t, "no notification channel is set up", with("alerts", "test")...)

	mail, err := smtptest.Start(smtptest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer mail.Close()
	// STARTTLS is on by default: this server does not offer it.
	mustRun(t, with("alerts", "email", "--smtp", mail.Addr, "--from", "asr@example.com", "--to", "a@example.com,b@example.com")...)
	mustFail(t, "does not offer STARTTLS", with("alerts", "test")...)
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, with("alerts", "email", "--smtp", mail.Addr, "--starttls=false", "--from", "asr@example.com", "--to", "a@example.com, b@example.com", "--digest", "1m")...)
	if got := mustRun(t, with("alerts", "test")...); got != "test notification sent: email\n" {
		t.Errorf("alerts test = %q", got)
	}
	if ms := mail.Mails(); len(ms) != 1 || len(ms[0].To) != 2 || !strings.Contains(ms[0].Data, "Subject: [asr] TEST") {
		t.Fatalf("mails %+v", ms)
	}
	// A CA for STARTTLS from a file: checked before it is sent.
	bad := filepath.Join(t.TempDir(), "bad.pem")
	if err := os.WriteFile(bad, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustFail(t, "CA file", with("alerts", "email", "--smtp", mail.Addr, "--from", "asr@example.com", "--to", "a@example.com", "--smtp-ca-file", bad)...)
	mustFail(t, "choose one", with("alerts", "email", "--smtp", mail.Addr, "--from", "asr@example.com", "--to", "a@example.com", "--smtp-ca-file", bad, "--no-smtp-ca")...)
	tlsMail, err := smtptest.Start(smtptest.Options{StartTLS: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tlsMail.Close()
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, tlsMail.CAPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, with("alerts", "email", "--smtp", tlsMail.Addr, "--from", "asr@example.com", "--to", "a@example.com", "--smtp-ca-file", ca)...)
	mustRun(t, with("alerts", "test")...)
	if ms := tlsMail.Mails(); len(ms) != 1 || !ms[0].TLS {
		t.Fatalf("mails over STARTTLS %+v", ms)
	}
	mustRun(t, with("alerts", "email", "--off")...)
	mustFail(t, "no notification channel is set up", with("alerts", "test")...)
}
