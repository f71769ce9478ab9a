// Package sshdtest starts a real OpenSSH server (/usr/sbin/sshd) on the
// loopback interface for tests of push installation: a generated ed25519
// host key, one authorized client key, root login by key. A missing sshd
// fails the test rather than skipping it: scripts/install-peers.sh installs
// openssh-server. The tests run as root, as sshd needs.
package sshdtest

import (
	"bufio"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/asrdr/asr/e2e/freeport"
)

// Binary is the sshd the tests run.
const Binary = "/usr/sbin/sshd"

// startTimeout is a safety net for a hung sshd start, generous for a loaded
// machine; the start itself is awaited on sshd's "Server listening" line.
const startTimeout = time.Minute

// Options changes how the server runs.
type Options struct {
	// Wrap, if set, returns the command line to run given sshd's: to run it
	// in a private mount namespace, say. The command must end up exec'ing
	// sshd (its stderr is watched for the listening line).
	Wrap func(sshd []string) []string
}

// Server is a running sshd, stopped when the test ends.
type Server struct {
	t    testing.TB
	opts Options
	dir  string

	// Addr is 127.0.0.1:PORT; the port stays across restarts.
	Addr string
	// HostKey is the path of the private host key; HostKey+".pub" the public.
	HostKey string
	// ClientKey is the PEM private key the server authorizes, ClientKeyAuth
	// its authorized_keys line.
	ClientKey     []byte
	ClientKeyAuth string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	log  *tail
}

// Start starts sshd on a free loopback port.
func Start(t testing.TB, opts *Options) *Server {
	t.Helper()
	if _, err := os.Stat(Binary); err != nil {
		t.Fatalf("sshdtest: %s is missing (%v): run scripts/install-peers.sh (installs openssh-server)", Binary, err)
	}
	if os.Geteuid() != 0 {
		t.Fatalf("sshdtest: the push tests run sshd and log in as root: run them as root")
	}
	// sshd's privilege separation directory; Debian makes it in its unit.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, dir: t.TempDir(), log: &tail{}}
	if opts != nil {
		s.opts = *opts
	}
	s.HostKey = filepath.Join(s.dir, "hostkey")
	s.newHostKey()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	blk, err := ssh.MarshalPrivateKey(priv, "sshdtest client")
	if err != nil {
		t.Fatal(err)
	}
	s.ClientKey = pem.EncodeToMemory(blk)
	spub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	s.ClientKeyAuth = string(ssh.MarshalAuthorizedKey(spub))
	if err := os.WriteFile(filepath.Join(s.dir, "authorized_keys"), []byte(s.ClientKeyAuth), 0o600); err != nil {
		t.Fatal(err)
	}
	port, err := freeport.Port()
	if err != nil {
		t.Fatal(err)
	}
	s.Addr = net.JoinHostPort("127.0.0.1", port)
	cfg := strings.Join([]string{
		"ListenAddress 127.0.0.1",
		"Port " + port,
		"HostKey " + s.HostKey,
		"AuthorizedKeysFile " + filepath.Join(s.dir, "authorized_keys"),
		"StrictModes no",
		"PermitRootLogin prohibit-password",
		"PubkeyAuthentication yes",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"UsePAM no",
		"PidFile none",
		"Subsystem sftp internal-sftp",
		"LogLevel VERBOSE",
		"",
	}, "\n")
	if err := os.WriteFile(filepath.Join(s.dir, "sshd_config"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() {
			t.Logf("sshd output:\n%s", s.log)
		}
	})
	s.start()
	return s
}

// newHostKey makes a new ed25519 host key with ssh-keygen.
func (s *Server) newHostKey() {
	s.t.Helper()
	os.Remove(s.HostKey)
	os.Remove(s.HostKey + ".pub")
	out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshdtest host", "-f", s.HostKey).CombinedOutput()
	if err != nil {
		s.t.Fatalf("ssh-keygen: %v: %s", err, out)
	}
}

// start runs sshd and waits until it listens.
func (s *Server) start() {
	s.t.Helper()
	args := []string{Binary, "-D", "-e", "-f", filepath.Join(s.dir, "sshd_config")}
	if s.opts.Wrap != nil {
		args = s.opts.Wrap(args)
	}
	cmd := exec.Command(args[0], args[1:]...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		s.t.Fatal(err)
	}
	cmd.Stdout = s.log
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start sshd: %v", err)
	}
	listening := make(chan struct{})
	done := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(s.log, line)
			if strings.Contains(line, "Server listening on") {
				once.Do(func() { close(listening) })
			}
		}
		io.Copy(io.Discard, stderr)
		cmd.Wait()
		close(done)
	}()
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
	select {
	case <-listening:
	case <-done:
		s.t.Fatalf("sshd exited at start: %s\n%s", cmd.ProcessState, s.log)
	case <-time.After(startTimeout):
		s.t.Fatalf("sshd did not listen within %v:\n%s", startTimeout, s.log)
	}
	c, err := net.Dial("tcp", s.Addr)
	if err != nil {
		s.t.Fatalf("sshd says it listens but %s refuses: %v", s.Addr, err)
	}
	c.Close()
}

// Pid is the running sshd's process id (after a Wrap that execs, sshd's own).
func (s *Server) Pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd.Process.Pid
}

// Stop stops sshd and waits for it to exit. Sessions it forked end when
// their clients disconnect.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	<-done
}

// NewHostKey gives the server another host key and restarts it on the same
// port, as a reinstalled guest or a man in the middle would appear.
func (s *Server) NewHostKey() {
	s.t.Helper()
	s.Stop()
	s.newHostKey()
	s.start()
}

// HostKeyPublic returns the server's public host key.
func (s *Server) HostKeyPublic() ssh.PublicKey {
	s.t.Helper()
	b, err := os.ReadFile(s.HostKey + ".pub")
	if err != nil {
		s.t.Fatal(err)
	}
	k, _, _, _, err := ssh.ParseAuthorizedKey(b)
	if err != nil {
		s.t.Fatal(err)
	}
	return k
}

// Fingerprint returns the host key's fingerprint as ssh-keygen -lf prints it.
func (s *Server) Fingerprint() string {
	s.t.Helper()
	out, err := exec.Command("ssh-keygen", "-lf", s.HostKey+".pub").Output()
	if err != nil {
		s.t.Fatalf("ssh-keygen -lf: %v", err)
	}
	f := strings.Fields(string(out))
	if len(f) < 2 {
		s.t.Fatalf("ssh-keygen -lf: unexpected output %q", out)
	}
	return f[1]
}

// tail keeps the last 64 KiB of sshd's output for a failing test's log.
type tail struct {
	mu sync.Mutex
	b  []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if over := len(t.b) - 64<<10; over > 0 {
		t.b = t.b[over:]
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
