package sshguest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

func dial(t *testing.T, g *Guest, signer ssh.Signer) (*ssh.Client, error) {
	t.Helper()
	return ssh.Dial("tcp", g.Addr, &ssh.ClientConfig{User: g.User, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: func(_ string, _ net.Addr, key ssh.PublicKey) error {
			if ssh.FingerprintSHA256(key) != g.Fingerprint {
				return errors.New("host key differs")
			}
			return nil
		}})
}

// TestGuestRunsCommandsAndSFTP logs in with the guest's key, runs commands
// (output, exit status), copies a file over SFTP, and is refused with
// another key; a restart keeps the address and the host key.
func TestGuestRunsCommandsAndSFTP(t *testing.T) {
	dir := t.TempDir()
	g, err := Start(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(g.LoginKey)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(b)
	if err != nil {
		t.Fatal(err)
	}
	c, err := dial(t, g, signer)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	s.Stdout = &out
	s.Stdin = bytes.NewReader([]byte("from stdin"))
	err = s.Run("cat; echo; echo to-out; exit 3")
	var ee *ssh.ExitError
	if !errors.As(err, &ee) || ee.ExitStatus() != 3 || out.String() != "from stdin\nto-out\n" {
		t.Fatalf("run = %v, out %q", err, out.String())
	}
	sc, err := sftp.NewClient(c)
	if err != nil {
		t.Fatal(err)
	}
	f, err := sc.Create(filepath.Join(dir, "copied"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(f, bytes.NewReader(bytes.Repeat([]byte("x"), 1<<20))); err != nil {
		t.Fatal(err)
	}
	f.Close()
	sc.Close()
	c.Close()
	if st, err := os.Stat(filepath.Join(dir, "copied")); err != nil || st.Size() != 1<<20 {
		t.Fatalf("copied over SFTP: %v %v", st, err)
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	other, _ := ssh.NewSignerFromKey(priv)
	if c, err := dial(t, g, other); err == nil {
		c.Close()
		t.Fatal("another key logged in")
	}
	addr, fp := g.Addr, g.Fingerprint
	g.Close()
	g2, err := Start(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	if g2.Addr != addr || g2.Fingerprint != fp {
		t.Fatalf("restart: %s %s, was %s %s", g2.Addr, g2.Fingerprint, addr, fp)
	}
}
