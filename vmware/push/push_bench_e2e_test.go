//go:build e2e

package push_test

import (
	"context"
	"crypto/rand"
	"flag"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/asrdr/asr/vmware/push"
)

var benchSizeOf = flag.String("push.size-of", "../../bin/asr", "BenchmarkInstall copies a binary of this file's size (`make build`'s asr)")

// BenchmarkInstall times each step of a push install to a local OpenSSH
// sshd (root, key login), and beside it scp of the same file to the same
// sshd and one bare `ssh true`. The binary copied is the fake agent padded
// with random bytes to the size of -push.size-of (the real asr would not
// run with the tests' --notify; the copy does not care what the bytes
// are). Each iteration installs, waits for the agent's start, uninstalls.
// Reported per iteration: each step's seconds (STEP-s), the whole install
// (install-s), scp-s and ssh-true-s.
func BenchmarkInstall(b *testing.B) {
	fi, err := os.Stat(*benchSizeOf)
	if err != nil {
		b.Fatalf("-push.size-of: %v (run make build, or point it at an asr binary)", err)
	}
	e := newEnv(b, false)
	bin := filepath.Join(b.TempDir(), "asr")
	padAgent(b, mustFakeAgent(b, 1), bin, fi.Size())
	o := e.opts
	o.Binary = bin
	key := filepath.Join(b.TempDir(), "key")
	if err := os.WriteFile(key, e.srv.ClientKey, 0o600); err != nil {
		b.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(e.srv.Addr)
	sshOpts := []string{"-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"}
	scpDst := filepath.Join(b.TempDir(), "asr.scp")

	sums := map[string]time.Duration{}
	order := []string{push.StepConnect, push.StepPrerequisites, push.StepCopy, push.StepReachability, push.StepConfigure, push.StepService}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		began := map[string]time.Time{}
		t0 := time.Now()
		err := push.Install(ctx, o, func(s push.Step) {
			switch s.State {
			case push.StateRunning:
				if _, ok := began[s.Name]; !ok {
					began[s.Name] = time.Now()
				}
			case push.StateDone:
				sums[s.Name] += time.Since(began[s.Name])
			}
		})
		sums["install"] += time.Since(t0)
		if err != nil {
			cancel()
			b.Fatal(err)
		}
		select {
		case s := <-e.starts:
			s.conn.Close()
		case <-time.After(waitTimeout):
			b.Fatal("the agent did not start")
		}
		t0 = time.Now()
		if err := push.Uninstall(ctx, o.Target, o.InstallDir, nil); err != nil {
			b.Fatal(err)
		}
		sums["uninstall"] += time.Since(t0)
		cancel()

		t0 = time.Now()
		cmd := exec.Command("scp", append(append([]string{"-q", "-P", port}, sshOpts...), bin, "root@"+host+":"+scpDst)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("scp: %v: %s", err, out)
		}
		sums["scp"] += time.Since(t0)
		t0 = time.Now()
		cmd = exec.Command("ssh", append(append([]string{"-p", port}, sshOpts...), "root@"+host, "true")...)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("ssh: %v: %s", err, out)
		}
		sums["ssh-true"] += time.Since(t0)
		os.Remove(scpDst)
	}
	b.StopTimer()
	for _, name := range append(order, "install", "uninstall", "scp", "ssh-true") {
		b.ReportMetric(sums[name].Seconds()/float64(b.N), name+"-s")
	}
	b.ReportMetric(float64(fi.Size())/(1<<20), "MiB-copied")
}

// padAgent writes the fake agent to dst followed by random bytes up to
// size (an ELF file runs with data appended).
func padAgent(b *testing.B, src, dst string, size int64) {
	in, err := os.ReadFile(src)
	if err != nil {
		b.Fatal(err)
	}
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(in); err != nil {
		b.Fatal(err)
	}
	if pad := size - int64(len(in)); pad > 0 {
		if _, err := io.CopyN(f, rand.Reader, pad); err != nil {
			b.Fatal(err)
		}
	}
}
