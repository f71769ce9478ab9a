package notify

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"mime"
	"net"
	"net/smtp"
	"os"
	"slices"
	"strings"
	"time"
)

// smtpTimeout bounds one mail's whole exchange with the SMTP server.
const smtpTimeout = time.Minute

// SendMail sends one plain-text mail over SMTP: STARTTLS first when
// e.StartTLS (refusing to go on in clear if the server does not offer it),
// then AUTH PLAIN or LOGIN when e.User is set (never over a clear
// connection to another host than this one), then the mail to every
// recipient. A refusal comes back with the server's answer.
func SendMail(ctx context.Context, e Email, subject, body string) error {
	host, _, err := net.SplitHostPort(e.Addr)
	if err != nil {
		return fmt.Errorf("SMTP server %q: %w", e.Addr, err)
	}
	ctx, cancel := context.WithTimeout(ctx, smtpTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", e.Addr)
	if err != nil {
		return fmt.Errorf("connect to the SMTP server: %w", err)
	}
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	c, err := smtp.NewClient(conn, host)
	if err != nil {
		conn.Close()
		return fmt.Errorf("SMTP greeting: %w", err)
	}
	defer c.Close()
	name, _ := os.Hostname()
	if name == "" || strings.ContainsAny(name, " \r\n") {
		name = "localhost"
	}
	if err := c.Hello(name); err != nil {
		return fmt.Errorf("SMTP EHLO: %w", err)
	}
	if e.StartTLS {
		if ok, _ := c.Extension("STARTTLS"); !ok {
			return fmt.Errorf("the SMTP server %s does not offer STARTTLS (to send in clear, turn STARTTLS off: --starttls=false)", e.Addr)
		}
		cfg := &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
		if e.TLSConfig != nil {
			cfg = e.TLSConfig.Clone()
			cfg.ServerName = host
		}
		if err := c.StartTLS(cfg); err != nil {
			return fmt.Errorf("SMTP STARTTLS: %w", err)
		}
	}
	if e.User != "" {
		ok, mechs := c.Extension("AUTH")
		if !ok {
			return fmt.Errorf("the SMTP server %s offers no AUTH, but a user is set", e.Addr)
		}
		list := strings.Fields(strings.ToUpper(mechs))
		var a smtp.Auth
		switch {
		case slices.Contains(list, "PLAIN"):
			a = smtp.PlainAuth("", e.User, e.Password, host)
		case slices.Contains(list, "LOGIN"):
			a = &loginAuth{user: e.User, pass: e.Password, host: host}
		default:
			return fmt.Errorf("the SMTP server %s offers AUTH %s; asr speaks PLAIN and LOGIN", e.Addr, mechs)
		}
		if err := c.Auth(a); err != nil {
			return fmt.Errorf("SMTP AUTH: %w", err)
		}
	}
	if err := c.Mail(e.From); err != nil {
		return fmt.Errorf("SMTP MAIL FROM %s: %w", e.From, err)
	}
	for _, to := range e.To {
		if err := c.Rcpt(to); err != nil {
			return fmt.Errorf("SMTP RCPT TO %s: %w", to, err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("SMTP DATA: %w", err)
	}
	if _, err := w.Write(message(e, subject, body, time.Now())); err != nil {
		return fmt.Errorf("SMTP DATA: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("SMTP DATA: %w", err)
	}
	if err := c.Quit(); err != nil {
		return fmt.Errorf("SMTP QUIT: %w", err)
	}
	return nil
}

// message formats a plain-text mail (the SMTP client's writer turns line
// ends into CRLF and escapes leading dots).
func message(e Email, subject, body string, now time.Time) []byte {
	var id [12]byte
	rand.Read(id[:])
	var b strings.Builder
	fmt.Fprintf(&b, "From: %s\r\n", e.From)
	fmt.Fprintf(&b, "To: %s\r\n", strings.Join(e.To, ", "))
	fmt.Fprintf(&b, "Subject: %s\r\n", mime.QEncoding.Encode("utf-8", strings.ToValidUTF8(subject, "?")))
	fmt.Fprintf(&b, "Date: %s\r\n", now.Format(time.RFC1123Z))
	fmt.Fprintf(&b, "Message-ID: <%s@asr>\r\n", hex.EncodeToString(id[:]))
	b.WriteString("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nAuto-Submitted: auto-generated\r\n\r\n")
	for _, line := range strings.Split(strings.ToValidUTF8(body, "?"), "\n") {
		for len(line) > 900 { // SMTP's line limit is 998 bytes
			b.WriteString(line[:900] + "\r\n")
			line = line[900:]
		}
		b.WriteString(line + "\r\n")
	}
	return []byte(b.String())
}

// loginAuth is AUTH LOGIN, which net/smtp lacks; like its PlainAuth it
// refuses to send the password in clear to another host than this one.
type loginAuth struct{ user, pass, host string }

func (a *loginAuth) Start(server *smtp.ServerInfo) (string, []byte, error) {
	if !server.TLS && !isLocal(server.Name) {
		return "", nil, errors.New("unencrypted connection: asr sends no password in clear (turn STARTTLS on)")
	}
	if server.Name != a.host {
		return "", nil, errors.New("wrong host name")
	}
	return "LOGIN", nil, nil
}

func (a *loginAuth) Next(from []byte, more bool) ([]byte, error) {
	if !more {
		return nil, nil
	}
	switch p := strings.ToLower(strings.TrimSpace(string(from))); {
	case strings.HasPrefix(p, "user"):
		return []byte(a.user), nil
	case strings.HasPrefix(p, "pass"):
		return []byte(a.pass), nil
	}
	return nil, fmt.Errorf("unexpected AUTH LOGIN challenge %q", from)
}

func isLocal(name string) bool {
	return name == "localhost" || name == "127.0.0.1" || name == "::1"
}
