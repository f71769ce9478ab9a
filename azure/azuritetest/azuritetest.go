// Package azuritetest starts Azurite, the Azure Storage emulator, for tests
// that need a real blob service: the Azure target's own tests and the
// end-to-end tests. A missing Azurite fails the test rather than skipping it:
// scripts/install-peers.sh installs it into the repository's bin/npm.
package azuritetest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
)

// Account and Key are Azurite's well-known development account.
const (
	Account = "devstoreaccount1"
	Key     = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

// EnvBinary names the azurite-blob executable to use instead of the one
// install-peers.sh puts in <repo>/bin/npm.
const EnvBinary = "AZURITE_BLOB"

// startTimeout bounds Azurite's start-up (Node takes a few seconds), and
// stopTimeout its shut-down (it saves its index first): safety nets for a
// hung Azurite, generous enough for a loaded machine.
const (
	startTimeout = 3 * time.Minute
	stopTimeout  = time.Minute
)

// listening is the line Azurite prints once it serves, with its address.
var listening = regexp.MustCompile(`listens on (http://\S+)`)

// Azurite is a running Azurite blob service with its data in a temporary
// directory. It is stopped when the test that started it ends.
type Azurite struct {
	t    testing.TB
	bin  string
	dir  string
	port string // "0" until the first start has picked one
	out  *tail

	mu   sync.Mutex
	stop func() // kills the running process and waits for it; nil when down
	addr string // http://127.0.0.1:PORT
}

// Start starts Azurite and returns a connection string for its development
// account; a shortcut for New(t).ConnString().
func Start(t testing.TB) (connString string) {
	t.Helper()
	return New(t).ConnString()
}

// New starts an Azurite blob service on a port of its choosing.
func New(t testing.TB) *Azurite {
	t.Helper()
	a, err := Run(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	a.t = t
	t.Cleanup(func() {
		a.Kill()
		if t.Failed() {
			t.Logf("azurite output:\n%s", a.out)
		}
	})
	return a
}

// Run starts an Azurite blob service with its data in dir, outside a test
// (the benchmarks use it). Stop it with Kill.
func Run(dir string) (*Azurite, error) {
	bin, err := binary()
	if err != nil {
		return nil, fmt.Errorf("azurite: %w", err)
	}
	a := &Azurite{bin: bin, dir: dir, port: "0", out: &tail{}}
	if err := a.start(); err != nil {
		return nil, err
	}
	return a, nil
}

// ConnString returns a connection string for the development account, which
// stays valid across Kill and Restart.
func (a *Azurite) ConnString() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return fmt.Sprintf("DefaultEndpointsProtocol=http;AccountName=%s;AccountKey=%s;BlobEndpoint=%s/%s;", Account, Key, a.addr, Account)
}

// Kill stops Azurite, as an outage would: it serves no more requests at
// once. What it acknowledged stays for Restart.
func (a *Azurite) Kill() {
	a.mu.Lock()
	stop := a.stop
	a.stop = nil
	a.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// Restart starts Azurite again after Kill, on the same port, with the same
// data.
func (a *Azurite) Restart() {
	a.t.Helper()
	a.Kill()
	if err := a.start(); err != nil {
		a.t.Fatal(err)
	}
}

// Download copies a blob into the file at path.
func (a *Azurite) Download(container, name, path string) error {
	c, err := blob.NewClientFromConnectionString(a.ConnString(), container, name, nil)
	if err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	_, err = c.DownloadFile(ctx, f, nil)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("download %s/%s: %w", container, name, err)
	}
	return nil
}

// start runs azurite-blob and waits until it serves.
func (a *Azurite) start() error {
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, a.bin,
		"--blobHost", "127.0.0.1", "--blobPort", a.port,
		"--location", a.dir,
		"--skipApiVersionCheck", "--disableTelemetry", "--loose", "--silent")
	// Azurite saves its index of blobs every few seconds; stopped with
	// SIGTERM, it saves it first, so that it keeps all it acknowledged, as
	// the real service does. SIGKILL only if it hangs.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = stopTimeout
	pr, pw := io.Pipe()
	cmd.Stdout = io.MultiWriter(a.out, pw)
	cmd.Stderr = a.out
	if err := cmd.Start(); err != nil {
		cancel()
		return fmt.Errorf("azurite: start %s: %w", a.bin, err)
	}
	exited := make(chan error, 1)
	go func() {
		exited <- cmd.Wait()
		pw.Close()
	}()
	a.mu.Lock()
	a.stop = func() {
		cancel()
		<-exited
	}
	a.mu.Unlock()

	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if m := listening.FindStringSubmatch(sc.Text()); m != nil {
				found <- m[1]
				break
			}
		}
		io.Copy(io.Discard, pr) // keep the pipe drained
	}()
	var addr string
	select {
	case addr = <-found:
	case err := <-exited:
		exited <- err // for stop
		return fmt.Errorf("azurite exited before serving (%v):\n%s", err, a.out)
	case <-time.After(startTimeout):
		a.Kill()
		return fmt.Errorf("azurite did not start within %s:\n%s", startTimeout, a.out)
	}
	u, err := url.Parse(addr)
	if err != nil {
		a.Kill()
		return fmt.Errorf("azurite: listening address %q: %w", addr, err)
	}
	if err := waitReady(addr + "/" + Account); err != nil {
		a.Kill()
		return fmt.Errorf("azurite at %s: %w\n%s", addr, err, a.out)
	}
	a.mu.Lock()
	a.addr, a.port = addr, u.Port()
	a.mu.Unlock()
	return nil
}

// binary finds azurite-blob: $AZURITE_BLOB, else <repo>/bin/npm, the repo
// being the nearest directory above the working directory with a go.mod.
func binary() (string, error) {
	if p := os.Getenv(EnvBinary); p != "" {
		return p, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory; set " + EnvBinary)
		}
		dir = parent
	}
	p := filepath.Join(dir, "bin", "npm", "node_modules", ".bin", "azurite-blob")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s is missing: run scripts/install-peers.sh (make peers), or set %s", p, EnvBinary)
	}
	return p, nil
}

// waitReady waits until the service answers HTTP at all (an error status is
// an answer: the request is unsigned).
func waitReady(endpoint string) error {
	deadline := time.Now().Add(startTimeout)
	c := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := c.Get(endpoint + "?comp=list")
		if err == nil {
			resp.Body.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// tail keeps the last 64 KiB of Azurite's output for failure reports.
type tail struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf.Write(p)
	if n := t.buf.Len() - 64<<10; n > 0 {
		t.buf.Next(n)
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buf.String()
}
