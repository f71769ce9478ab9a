// Package sshguest is the demo's guest: an SSH server (golang.org/x/crypto/ssh,
// with an SFTP subsystem from github.com/pkg/sftp) on a loopback port that
// runs the commands it is sent on this machine, as the user running `asr
// demo`. It lets a newcomer enable replication of a demo VM from the
// console with a real push install (vmware/push) on one machine. It is not
// for anything else: it trusts one key, made for it, and runs what that
// key's holder sends. Tests of push install use a real OpenSSH server.
package sshguest

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

// Files in the guest's directory.
const (
	HostKeyFile  = "host_key"  // the guest's host key (kept, so its fingerprint stays)
	LoginKeyFile = "login_key" // the private key that logs in (root or the demo's user)
	addrFile     = "addr"      // the address of the first run, reused
)

// Guest is a running demo guest.
type Guest struct {
	Addr        string // 127.0.0.1:PORT
	User        string // the login name to give (any is accepted)
	LoginKey    string // path of the private key that logs in
	Fingerprint string // the host key's, SHA256:...

	l    net.Listener
	cfg  *ssh.ServerConfig
	log  *slog.Logger
	wg   sync.WaitGroup
	mu   sync.Mutex
	done bool
	conn map[*ssh.ServerConn]bool
}

// Start starts the guest, keeping its keys and address in dir.
func Start(dir string, log *slog.Logger) (*Guest, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	host, err := loadOrMakeKey(filepath.Join(dir, HostKeyFile))
	if err != nil {
		return nil, err
	}
	login, err := loadOrMakeKey(filepath.Join(dir, LoginKeyFile))
	if err != nil {
		return nil, err
	}
	allowed := login.PublicKey().Marshal()
	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(_ ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			if string(key.Marshal()) == string(allowed) {
				return nil, nil
			}
			return nil, errors.New("key not accepted")
		},
	}
	cfg.AddHostKey(host)
	addr := "127.0.0.1:0"
	if b, err := os.ReadFile(filepath.Join(dir, addrFile)); err == nil {
		addr = strings.TrimSpace(string(b))
	}
	l, err := net.Listen("tcp", addr)
	if err != nil && addr != "127.0.0.1:0" {
		l, err = net.Listen("tcp", "127.0.0.1:0")
	}
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, addrFile), []byte(l.Addr().String()+"\n"), 0o600); err != nil {
		l.Close()
		return nil, err
	}
	user := "root"
	if os.Geteuid() != 0 {
		user = os.Getenv("USER")
		if user == "" {
			user = "demo"
		}
	}
	g := &Guest{Addr: l.Addr().String(), User: user, LoginKey: filepath.Join(dir, LoginKeyFile),
		Fingerprint: ssh.FingerprintSHA256(host.PublicKey()), l: l, cfg: cfg, log: log, conn: map[*ssh.ServerConn]bool{}}
	g.wg.Add(1)
	go g.serve()
	return g, nil
}

// loadOrMakeKey reads an OpenSSH private key, making an ed25519 one first
// if the file does not exist.
func loadOrMakeKey(path string) (ssh.Signer, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		blk, err := ssh.MarshalPrivateKey(priv, "asr demo guest")
		if err != nil {
			return nil, err
		}
		b = pem.EncodeToMemory(blk)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, err
	}
	return ssh.ParsePrivateKey(b)
}

// Close stops the guest and ends its connections.
func (g *Guest) Close() {
	g.mu.Lock()
	g.done = true
	for c := range g.conn {
		c.Close()
	}
	g.mu.Unlock()
	g.l.Close()
	g.wg.Wait()
}

func (g *Guest) serve() {
	defer g.wg.Done()
	for {
		nc, err := g.l.Accept()
		if err != nil {
			return
		}
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			g.handle(nc)
		}()
	}
}

func (g *Guest) handle(nc net.Conn) {
	sc, chans, reqs, err := ssh.NewServerConn(nc, g.cfg)
	if err != nil {
		nc.Close()
		return
	}
	g.mu.Lock()
	if g.done {
		g.mu.Unlock()
		sc.Close()
		return
	}
	g.conn[sc] = true
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		delete(g.conn, sc)
		g.mu.Unlock()
		sc.Close()
	}()
	go ssh.DiscardRequests(reqs)
	var wg sync.WaitGroup
	defer wg.Wait()
	for nch := range chans {
		if nch.ChannelType() != "session" {
			nch.Reject(ssh.UnknownChannelType, "only sessions")
			continue
		}
		ch, creqs, err := nch.Accept()
		if err != nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.session(ch, creqs)
		}()
	}
}

// session serves one session: an exec (run by sh -c) or the sftp
// subsystem; environment requests are ignored, shells refused.
func (g *Guest) session(ch ssh.Channel, reqs <-chan *ssh.Request) {
	defer ch.Close()
	for req := range reqs {
		switch req.Type {
		case "exec":
			cmd, ok := parseString(req.Payload)
			req.Reply(ok, nil)
			if !ok {
				return
			}
			status := g.run(ch, cmd)
			ch.SendRequest("exit-status", false, binary.BigEndian.AppendUint32(nil, uint32(status)))
			return
		case "subsystem":
			name, ok := parseString(req.Payload)
			if !ok || name != "sftp" {
				req.Reply(false, nil)
				continue
			}
			req.Reply(true, nil)
			srv, err := sftp.NewServer(ch)
			if err != nil {
				return
			}
			srv.Serve()
			srv.Close()
			return
		default:
			req.Reply(false, nil)
		}
	}
}

// run runs a command with the channel as its standard streams and returns
// its exit status.
func (g *Guest) run(ch ssh.Channel, command string) int {
	c := exec.Command("/bin/sh", "-c", command)
	c.Stdin, c.Stdout, c.Stderr = ch, ch, ch.Stderr()
	c.Dir = "/"
	err := c.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		if ee.ExitCode() >= 0 {
			return ee.ExitCode()
		}
		return 255
	}
	fmt.Fprintf(ch.Stderr(), "sshguest: %v\n", err)
	if g.log != nil {
		g.log.Warn("demo guest command failed to start", "err", err)
	}
	return 127
}

// parseString reads an SSH string (uint32 length, bytes) that is the whole
// payload.
func parseString(p []byte) (string, bool) {
	if len(p) < 4 {
		return "", false
	}
	n := binary.BigEndian.Uint32(p)
	if uint64(n) != uint64(len(p)-4) {
		return "", false
	}
	return string(p[4:]), true
}
