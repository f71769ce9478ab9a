// Package vmware is asr's vCenter adapter: it connects to a vCenter Server
// with the server's certificate pinned by its SHA-256 thumbprint (never an
// unpinned connection), and keeps an in-memory inventory of the virtual
// machines current by following the PropertyCollector's updates (a
// ContainerView over the whole inventory, WaitForUpdatesEx), not by
// polling. The rest of asr sees only the types here: Endpoint, VM, Disk,
// Status and the Watcher's callbacks.
package vmware

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
)

// Endpoint is one vCenter Server as the operator registered it. The
// password never appears in an error or a log line of this package
// (Endpoint's LogValue leaves it out).
type Endpoint struct {
	// Name is the operator's name for the vCenter (VM.VCenter, log lines).
	Name string
	// URL is the SDK address, https://HOST[:PORT]/sdk; user information in
	// it is refused (User and Password are separate so neither is echoed).
	URL      string
	User     string
	Password string
	// Thumbprint pins the vCenter's certificate: the SHA-256 of its leaf
	// certificate, in any form NormalizeThumbprint accepts. Required.
	Thumbprint string
}

// String shows an Endpoint (%v, %+v) by name, URL and user: never the
// password.
func (ep Endpoint) String() string {
	return fmt.Sprintf("vcenter %s (%s as %s)", ep.Name, ep.URL, ep.User)
}

// LogValue logs an Endpoint by name, URL and user: never the password.
func (ep Endpoint) LogValue() slog.Value {
	return slog.GroupValue(slog.String("name", ep.Name), slog.String("url", ep.URL), slog.String("user", ep.User))
}

// Errors Connect's callers branch on.
var (
	// ErrThumbprintMismatch: the vCenter presented a certificate other than
	// the pinned one. The error is a *ThumbprintMismatchError.
	ErrThumbprintMismatch = errors.New("vcenter certificate thumbprint mismatch")
	// ErrNoThumbprint: the endpoint has no thumbprint; asr never connects
	// to a vCenter without one.
	ErrNoThumbprint = errors.New("no vcenter certificate thumbprint (register the vcenter with --thumbprint)")
	// ErrLogin: the vCenter refused the user name or password.
	ErrLogin = errors.New("vcenter login failed")
)

// ThumbprintMismatchError is what an operator must act on when a vCenter's
// certificate changed: compare Got with the certificate the vCenter really
// has, then register it again with that thumbprint. It matches
// ErrThumbprintMismatch under errors.Is.
type ThumbprintMismatchError struct {
	Host      string // host[:port] dialled
	Want, Got string // normalized thumbprints: pinned, presented
}

func (e *ThumbprintMismatchError) Error() string {
	return fmt.Sprintf("the certificate of %s changed: expected %s, got %s; verify and re-register with --thumbprint %s",
		e.Host, e.Want, e.Got, e.Got)
}

// Is makes errors.Is(err, ErrThumbprintMismatch) true.
func (e *ThumbprintMismatchError) Is(target error) bool { return target == ErrThumbprintMismatch }

// certThumbprint is the SHA-256 thumbprint of a certificate as vCenter
// shows it: 32 upper-case hex pairs joined with ':'.
func certThumbprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return formatThumbprint(sum[:])
}

func formatThumbprint(b []byte) string {
	var sb strings.Builder
	for i, c := range b {
		if i > 0 {
			sb.WriteByte(':')
		}
		fmt.Fprintf(&sb, "%02X", c)
	}
	return sb.String()
}

// NormalizeThumbprint turns an operator's SHA-256 thumbprint into the form
// vCenter shows (AB:CD:..., 32 pairs). It accepts hex with or without
// colons (or spaces or dashes between the pairs), in either case, with an
// optional "SHA256:" prefix; after that prefix also the unpadded or padded
// base64 form OpenSSH-style tools print. Anything that is not 32 bytes is
// an error; a 20-byte value is named as the SHA-1 thumbprint it likely is.
func NormalizeThumbprint(s string) (string, error) {
	s = strings.TrimSpace(s)
	prefixed := false
	if len(s) >= 7 && strings.EqualFold(s[:7], "SHA256:") {
		s, prefixed = strings.TrimSpace(s[7:]), true
	}
	if s == "" {
		return "", ErrNoThumbprint
	}
	clean := strings.Map(func(r rune) rune {
		switch r {
		case ':', ' ', '-':
			return -1
		}
		return r
	}, s)
	b, err := hex.DecodeString(clean)
	if err != nil && prefixed {
		if b2, err2 := base64.RawStdEncoding.DecodeString(strings.TrimRight(s, "=")); err2 == nil {
			b, err = b2, nil
		}
	}
	switch {
	case err != nil:
		return "", fmt.Errorf("thumbprint %q: not hex pairs", s)
	case len(b) == sha256.Size:
		return formatThumbprint(b), nil
	case len(b) == 20:
		return "", fmt.Errorf("thumbprint %q is 20 bytes, a SHA-1 thumbprint: asr needs the SHA-256 one (32 bytes)", s)
	default:
		return "", fmt.Errorf("thumbprint %q is %d bytes, want 32 (SHA-256)", s, len(b))
	}
}

// sdkURL checks an endpoint URL and returns it with the /sdk path and the
// host:port to dial. The messages never include user information.
func sdkURL(raw string) (*url.URL, string, error) {
	u, err := url.Parse(strings.TrimSpace(raw))
	if err != nil {
		return nil, "", errors.New("vcenter url: not a URL (want https://HOST[:PORT]/sdk)")
	}
	if u.User != nil {
		return nil, "", errors.New("vcenter url: has user information; give the user and password separately")
	}
	if u.Scheme != "https" || u.Host == "" {
		return nil, "", fmt.Errorf("vcenter url %q: want https://HOST[:PORT]/sdk", raw)
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/sdk"
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "443")
	}
	return u, addr, nil
}

// Thumbprint dials rawURL's host with TLS and returns the SHA-256
// thumbprint of the certificate it presents, for the operator to compare
// and register. It verifies nothing: it only reads the certificate.
func Thumbprint(ctx context.Context, rawURL string) (string, error) {
	_, addr, err := sdkURL(rawURL)
	if err != nil {
		return "", err
	}
	// Skipping verification is the point: the certificate is what we want
	// to read, and nothing is sent over this connection.
	d := tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // read-only, see above
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", fmt.Errorf("read the certificate of %s: %w", addr, err)
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return "", fmt.Errorf("read the certificate of %s: no certificate", addr)
	}
	return certThumbprint(certs[0]), nil
}

// Connect connects to the vCenter and logs in, with its certificate
// pinned: a TLS handshake succeeds only if the leaf certificate's SHA-256
// is ep.Thumbprint (any CA, any name: the pin is the trust). It refuses an
// endpoint without a thumbprint. Errors: a *ThumbprintMismatchError
// (ErrThumbprintMismatch) if the certificate differs, ErrLogin if the
// vCenter refused the credentials; neither names the password.
func Connect(ctx context.Context, ep Endpoint) (*govmomi.Client, error) {
	u, addr, err := sdkURL(ep.URL)
	if err != nil {
		return nil, err
	}
	if strings.TrimSpace(ep.Thumbprint) == "" {
		return nil, ErrNoThumbprint
	}
	want, err := NormalizeThumbprint(ep.Thumbprint)
	if err != nil {
		return nil, err
	}

	// The pin is checked in VerifyConnection on every handshake the
	// transport makes (reconnections included). govmomi's dialer uses this
	// config as it is; its own thumbprint fallback (SHA-1 or SHA-256, after
	// a failed CA check) never runs because InsecureSkipVerify leaves no
	// CA failure to fall back from. The last mismatch is kept to return it
	// whole: the soap layer wraps dial errors in its own text.
	var (
		mu       sync.Mutex
		mismatch *ThumbprintMismatchError
	)
	sc := soap.NewClient(u, true)
	sc.DefaultTransport().TLSClientConfig = &tls.Config{
		InsecureSkipVerify: true, //nolint:gosec // verified by the pin in VerifyConnection
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return fmt.Errorf("%s presented no certificate", addr)
			}
			got := certThumbprint(cs.PeerCertificates[0])
			if got != want {
				e := &ThumbprintMismatchError{Host: addr, Want: want, Got: got}
				mu.Lock()
				mismatch = e
				mu.Unlock()
				return e
			}
			return nil
		},
	}
	pinErr := func(err error) error {
		mu.Lock()
		defer mu.Unlock()
		if mismatch != nil {
			return mismatch
		}
		return err
	}

	vc, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, pinErr(err))
	}
	c := &govmomi.Client{Client: vc, SessionManager: session.NewManager(vc)}
	if err := c.Login(ctx, url.UserPassword(ep.User, ep.Password)); err != nil {
		if e := pinErr(nil); e != nil {
			return nil, fmt.Errorf("connect to %s: %w", addr, e)
		}
		if ctx.Err() != nil || !isLoginFault(err) {
			return nil, fmt.Errorf("log in to %s: %s", addr, redact(err, ep.Password))
		}
		return nil, fmt.Errorf("%w: %s as %q: %s", ErrLogin, addr, ep.User, redact(err, ep.Password))
	}
	return c, nil
}

// isLoginFault tells a refused login (InvalidLogin and its kin) from a
// transport failure during the login call.
func isLoginFault(err error) bool {
	return soap.IsSoapFault(err) || soap.IsVimFault(err)
}

// redact is err's message with the secret replaced, so no server or
// library message can carry the password into ours.
func redact(err error, secret string) string {
	msg := err.Error()
	if secret != "" {
		msg = strings.ReplaceAll(msg, secret, "***")
	}
	return msg
}
