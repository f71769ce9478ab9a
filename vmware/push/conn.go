package push

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// handshakeTimeout bounds the TCP connection and the SSH handshake when the
// caller's context has no earlier deadline.
const handshakeTimeout = 30 * time.Second

// maxOutput caps what is kept of a remote command's stdout and of its stderr:
// the guest is not trusted to send a bounded amount.
const maxOutput = 64 << 10

// remote is an authenticated SSH connection to the guest.
type remote struct {
	host   string // Target.Addr, for messages
	client *ssh.Client
	sudo   bool   // commands run through sudo -n (login user is not root)
	uid    string // the login user's uid, when sudo
}

// dial connects to t.Addr, checks the host key and authenticates with t.Key.
func dial(ctx context.Context, t Target) (*remote, error) {
	signer, err := ssh.ParsePrivateKey(t.Key)
	if err != nil {
		// The parser's error is not passed on: it may quote the input.
		var pm *ssh.PassphraseMissingError
		if errors.As(err, &pm) {
			return nil, fmt.Errorf("push %s: the SSH private key is passphrase-protected; give an unencrypted key", t.Addr)
		}
		return nil, fmt.Errorf("push %s: the SSH private key is not a valid PEM private key", t.Addr)
	}
	hk, algos, err := hostKeyCheck(t)
	if err != nil {
		return nil, err
	}
	cfg := &ssh.ClientConfig{
		User:              t.User,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback:   hk,
		HostKeyAlgorithms: algos,
		Timeout:           handshakeTimeout,
	}
	c, err := dialConfig(ctx, t.Addr, cfg)
	if err != nil {
		return nil, err
	}
	return &remote{host: t.Addr, client: c}, nil
}

// dialConfig makes the TCP connection and the SSH handshake, translating
// failures into the package's errors.
func dialConfig(ctx context.Context, addr string, cfg *ssh.ClientConfig) (*ssh.Client, error) {
	hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(hctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("push %s: %w: %v", addr, ErrConnect, err)
	}
	// The handshake honours the context through the connection's deadline.
	if dl, ok := hctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	unwatch := context.AfterFunc(hctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	cc, chans, reqs, err := ssh.NewClientConn(conn, addr, cfg)
	unwatch()
	if err != nil {
		conn.Close()
		return nil, translateHandshake(addr, cfg.User, err)
	}
	conn.SetDeadline(time.Time{})
	return ssh.NewClient(cc, chans, reqs), nil
}

// translateHandshake maps a handshake error to the package's errors.
func translateHandshake(addr, user string, err error) error {
	var uk *UnknownHostKeyError
	var mm *hostKeyMismatch
	switch {
	case errors.As(err, &uk):
		return uk
	case errors.As(err, &mm):
		return fmt.Errorf("push %s: %w: the guest presented %s, which is not the key recorded for it; "+
			"this may be a man-in-the-middle attack or a reinstalled guest: check the guest's key on its console, "+
			"and remove the old entry from the known_hosts file only if the change is expected", addr, ErrHostKeyMismatch, mm.fingerprint)
	case strings.Contains(err.Error(), "unable to authenticate"):
		return fmt.Errorf("push %s: %w for user %q: check that the user exists and that the public half of the key is in its authorized_keys", addr, ErrAuth, user)
	}
	return fmt.Errorf("push %s: %w: %v", addr, ErrConnect, err)
}

// hostKeyMismatch is what the host-key callback returns for a known host
// presenting another key; translateHandshake turns it into ErrHostKeyMismatch.
type hostKeyMismatch struct{ fingerprint string }

func (e *hostKeyMismatch) Error() string { return "host key mismatch: " + e.fingerprint }

// hostKeyCheck builds the host-key callback for t, and the host-key
// algorithms to ask for: those of the keys already known for the host, so
// that a host known by its ed25519 key is not asked for its ECDSA key and
// taken for an impostor.
func hostKeyCheck(t Target) (ssh.HostKeyCallback, []string, error) {
	var files []string
	if len(t.KnownHosts) > 0 {
		// knownhosts reads files only; the content is public keys, not secrets.
		f, err := os.CreateTemp("", "asr-known-hosts-*")
		if err != nil {
			return nil, nil, fmt.Errorf("push %s: known hosts: %w", t.Addr, err)
		}
		_, err = f.Write(t.KnownHosts)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		defer os.Remove(f.Name())
		if err != nil {
			return nil, nil, fmt.Errorf("push %s: known hosts: %w", t.Addr, err)
		}
		files = append(files, f.Name())
	}
	if t.RecordFile != "" {
		if _, err := os.Stat(t.RecordFile); err == nil {
			files = append(files, t.RecordFile)
		} else if !errors.Is(err, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("push %s: known hosts: %w", t.Addr, err)
		}
	}
	known := func(string, net.Addr, ssh.PublicKey) error { return &knownhosts.KeyError{} }
	if len(files) > 0 {
		cb, err := knownhosts.New(files...)
		if err != nil {
			return nil, nil, fmt.Errorf("push %s: known hosts: %w", t.Addr, err)
		}
		known = cb
	}
	algos := knownAlgorithms(known, t.Addr)
	cb := func(host string, remote net.Addr, key ssh.PublicKey) error {
		err := known(host, remote, key)
		if err == nil {
			return nil
		}
		var ke *knownhosts.KeyError
		if !errors.As(err, &ke) {
			return err
		}
		fp := ssh.FingerprintSHA256(key)
		if len(ke.Want) > 0 {
			return &hostKeyMismatch{fingerprint: fp}
		}
		if t.AcceptHostKey == "" || t.AcceptHostKey != fp {
			return &UnknownHostKeyError{Host: t.Addr, Fingerprint: fp, KeyType: key.Type(), Offered: t.AcceptHostKey}
		}
		if t.RecordFile == "" {
			return nil
		}
		return recordHostKey(t.RecordFile, t.Addr, key)
	}
	return cb, algos, nil
}

// newHostAlgorithms are the host-key algorithms asked of a guest with no
// known key, in OpenSSH's order of preference (ed25519 first, no SHA-1
// RSA): the library's default prefers ECDSA, and the fingerprint shown to
// the operator should be of the key ssh would show. HostKeyFingerprint asks
// for the same, so that it shows the key Install will see.
var newHostAlgorithms = []string{
	ssh.KeyAlgoED25519,
	ssh.KeyAlgoECDSA256, ssh.KeyAlgoECDSA384, ssh.KeyAlgoECDSA521,
	ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256,
}

// knownAlgorithms returns the host-key algorithms of the keys known for
// addr, or newHostAlgorithms when none is known. It asks the
// callback about a throw-away key: the KeyError lists the known ones.
func knownAlgorithms(known ssh.HostKeyCallback, addr string) []string {
	pub, _, err := ed25519.GenerateKey(nil)
	if err != nil {
		return nil
	}
	probe, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil
	}
	var ke *knownhosts.KeyError
	err = known(addr, &net.TCPAddr{IP: net.IPv4zero}, probe)
	if !errors.As(err, &ke) || len(ke.Want) == 0 {
		return newHostAlgorithms
	}
	var algos []string
	seen := map[string]bool{}
	add := func(a ...string) {
		for _, s := range a {
			if !seen[s] {
				seen[s] = true
				algos = append(algos, s)
			}
		}
	}
	for _, k := range ke.Want {
		switch typ := k.Key.Type(); typ {
		case ssh.KeyAlgoRSA:
			add(ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA)
		default:
			add(typ)
		}
	}
	return algos
}

// recordHostKey appends addr's key to the known_hosts file at path,
// creating it (mode 0600) and its directory when missing.
func recordHostKey(path, addr string, key ssh.PublicKey) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("record host key of %s: %w", addr, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("record host key of %s: %w", addr, err)
	}
	_, err = fmt.Fprintln(f, knownhosts.Line([]string{knownhosts.Normalize(addr)}, key))
	if serr := f.Sync(); err == nil {
		err = serr
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("record host key of %s: %w", addr, err)
	}
	return nil
}

// HostKeyFingerprint connects to the SSH server at addr and returns the
// SHA-256 fingerprint of the host key it presents, as ssh-keygen -l shows it
// ("SHA256:..."), for an operator to compare with the guest's own before
// setting Target.AcceptHostKey. It does not authenticate.
func HostKeyFingerprint(ctx context.Context, addr string) (string, error) {
	var fp string
	errGot := errors.New("got the host key")
	cfg := &ssh.ClientConfig{
		User: "asr",
		HostKeyCallback: func(_ string, _ net.Addr, key ssh.PublicKey) error {
			fp = ssh.FingerprintSHA256(key)
			return errGot
		},
		HostKeyAlgorithms: newHostAlgorithms,
		Timeout:           handshakeTimeout,
	}
	c, err := dialConfig(ctx, addr, cfg)
	if c != nil {
		c.Close()
	}
	if fp != "" {
		return fp, nil
	}
	if err == nil {
		err = fmt.Errorf("push %s: %w: no host key presented", addr, ErrConnect)
	}
	return "", err
}

// close ends the connection.
func (r *remote) close() {
	r.client.Close()
}

// result is what a remote command left: its capped output and exit status.
type result struct {
	stdout, stderr string
	code           int
}

// out is the command's stdout without surrounding white space.
func (res result) out() string { return strings.TrimSpace(res.stdout) }

// msg is the command's stderr (or stdout, when stderr is empty), trimmed, for
// an error message.
func (res result) msg() string {
	m := strings.TrimSpace(res.stderr)
	if m == "" {
		m = res.out()
	}
	if len(m) > 512 {
		m = m[:512] + "..."
	}
	return m
}

// sh runs script with sh -c on the guest, through sudo -n when the login
// user is not root, feeding it stdin (nil: none). A non-zero exit status is
// not an error; a broken connection is.
func (r *remote) sh(ctx context.Context, script string, stdin []byte) (result, error) {
	cmd := "sh -c " + shellQuote(script)
	if r.sudo {
		cmd = "sudo -n " + cmd
	}
	return r.exec(ctx, cmd, stdin)
}

// exec runs cmd as the login user.
func (r *remote) exec(ctx context.Context, cmd string, stdin []byte) (result, error) {
	if err := ctx.Err(); err != nil {
		return result{}, err
	}
	s, err := r.client.NewSession()
	if err != nil {
		return result{}, r.connErr(ctx, err)
	}
	defer s.Close()
	// An ended context ends the command: the session is closed, which makes
	// Run return.
	stop := context.AfterFunc(ctx, func() {
		s.Signal(ssh.SIGKILL)
		s.Close()
	})
	defer stop()
	var stdout, stderr capped
	s.Stdout, s.Stderr = &stdout, &stderr
	if stdin != nil {
		s.Stdin = bytes.NewReader(stdin)
	}
	err = s.Run(cmd)
	res := result{stdout: stdout.String(), stderr: stderr.String()}
	var ee *ssh.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		res.code = ee.ExitStatus()
	default:
		return res, r.connErr(ctx, err)
	}
	if cerr := ctx.Err(); cerr != nil {
		return res, cerr
	}
	return res, nil
}

// connErr is the error for a failed session: the context's, when it ended.
func (r *remote) connErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	return fmt.Errorf("push %s: %w: %v", r.host, ErrConnect, err)
}

// capped keeps the first maxOutput bytes written to it and discards the rest.
type capped struct{ b bytes.Buffer }

func (c *capped) Write(p []byte) (int, error) {
	if room := maxOutput - c.b.Len(); room > 0 {
		c.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (c *capped) String() string { return c.b.String() }

var _ io.Writer = (*capped)(nil)
