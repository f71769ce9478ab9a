package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server/api"
)

// The performance baseline against the peers (issue 13), one command each:
//
//	initial-peers  asr's initial replication vs zstd|ssh|zstd -d|dd and rsync over ssh
//	guest-write    fio through the agent vs nbdkit's file plugin, pinned
//	churn          the highest random-write rate one disk holds with RPO p99 < 2 s,
//	               nbdkit's raw ceiling, and the server's CPU-seconds per GB
//
// Every contender runs on the same machine in the same run, alternating, for
// -rounds rounds; the tables give each round, the median and the ratio.

var (
	rounds       = flag.Int("rounds", 3, "initial-peers, guest-write: rounds (contenders alternate)")
	fioSize      = flag.String("fio-size", "1GiB", "guest-write: size of each contender's fresh sparse disk (fio's --size)")
	spoolMaxArg  = flag.String("spool-max", "1GiB", "guest-write, churn: the agent's --spool-max")
	churnRates   = flag.String("churn-rates", "20,50,100,150,200", "churn: fio --rate steps, MB/s, tried in order until one fails")
	churnSeconds = flag.Int("churn-seconds", 60, "churn: duration of each step")
	churnDepth   = flag.Int("churn-iodepth", 4, "churn: fio iodepth")
	guestCases   = flag.String("guest-cases", "randwrite:4k,write:1M", "guest-write: fio RW:BS cases, comma-separated")
	asrBase      = flag.String("asr-base", "", "initial-peers, guest-write, churn: a second asr binary (e.g. main's) run as one more contender, alternating with -asr, to compare the two side by side")
	agentArgs    = flag.String("agent-args", "", "initial-peers, guest-write, churn: extra flags of the -asr agent, space-separated (e.g. --compress)")
	baseArgs     = flag.String("base-agent-args", "", "initial-peers, guest-write, churn: extra flags of the -asr-base agent, space-separated")
)

const (
	rpoGoal       = 2 * time.Second
	guestCPU      = "0" // fio and the NBD server (agent or nbdkit)
	serverCPU     = "1" // the asr server
	sshCipher     = "aes128-gcm@openssh.com"
	sshdBinary    = "/usr/sbin/sshd"
	drainDeadline = 5 * time.Minute
)

// needTools fails with a clear message when a peer is not installed.
func needTools(tools ...string) error {
	var missing []string
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing tools: %s (install them: make peers; sshd is Debian's openssh-server, rsync and zstd their packages)", strings.Join(missing, ", "))
	}
	return nil
}

// needSpace fails with a clear message when dir's file system has less
// than n bytes free (the machine's disk is shared: a benchmark that runs
// out midway reports a misleading error).
func needSpace(dir string, n int64) error {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return err
	}
	if free := int64(st.Bavail) * st.Bsize; free < n {
		return fmt.Errorf("%s has %.1f GB free; this benchmark needs about %.1f GB (use -dir elsewhere)", dir, float64(free)/1e9, float64(n)/1e9)
	}
	return nil
}

// median of a non-empty slice.
func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func joinFloats(xs []float64, format string) string {
	var parts []string
	for _, x := range xs {
		parts = append(parts, fmt.Sprintf(format, x))
	}
	return strings.Join(parts, " ")
}

// --- a real sshd on a loopback port (as e2e/sshd_test.go starts it) ---

// benchSSHD is Debian's OpenSSH server on a loopback port with a host key
// and an authorized client key generated in its directory.
type benchSSHD struct {
	dir, port, key string
	proc           *exec.Cmd
}

func startBenchSSHD(dir string) (*benchSSHD, error) {
	if _, err := os.Stat(sshdBinary); err != nil {
		return nil, fmt.Errorf("OpenSSH server missing (%v): install openssh-server", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	s := &benchSSHD{dir: dir, key: filepath.Join(dir, "client_key")}
	for _, k := range []string{filepath.Join(dir, "host_key"), s.key} {
		if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("ssh-keygen: %v: %s", err, out)
		}
	}
	pub, err := os.ReadFile(s.key + ".pub")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "authorized_keys"), pub, 0o600); err != nil {
		return nil, err
	}
	os.MkdirAll("/run/sshd", 0o755) // sshd's privilege-separation directory
	for attempt := 1; ; attempt++ {
		s.port = freePort()
		conf := filepath.Join(dir, "sshd_config")
		cfg := fmt.Sprintf(`Port %s
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
`, s.port, filepath.Join(dir, "host_key"), filepath.Join(dir, "authorized_keys"))
		if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
			return nil, err
		}
		logPath := filepath.Join(dir, "sshd.log")
		logf, err := os.Create(logPath)
		if err != nil {
			return nil, err
		}
		s.proc = exec.Command(sshdBinary, "-D", "-e", "-f", conf)
		s.proc.Stdout, s.proc.Stderr = logf, logf
		err = s.proc.Start()
		logf.Close()
		if err != nil {
			return nil, fmt.Errorf("sshd: %w", err)
		}
		exited := make(chan struct{})
		go func() { s.proc.Wait(); close(exited) }()
		if s.up(exited) {
			if err := exec.Command("ssh", append(s.args(), "true")...).Run(); err != nil {
				s.stop()
				return nil, fmt.Errorf("ssh to the bench sshd: %w (see %s)", err, logPath)
			}
			return s, nil
		}
		s.stop()
		log, _ := os.ReadFile(logPath)
		if attempt < 5 && strings.Contains(string(log), "Address already in use") {
			continue
		}
		return nil, fmt.Errorf("sshd did not start: %s", log)
	}
}

// up waits until sshd accepts connections (true) or exits (false).
func (s *benchSSHD) up(exited chan struct{}) bool {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", "127.0.0.1:"+s.port); err == nil {
			c.Close()
			return true
		}
		select {
		case <-exited:
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
	return false
}

// args are ssh's options to reach this sshd as root, with the bench cipher;
// the destination is 127.0.0.1.
func (s *benchSSHD) args() []string {
	return []string{"-c", sshCipher, "-p", s.port, "-i", s.key, "-o", "BatchMode=yes",
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-l", "root", "127.0.0.1"}
}

// sshCommand is args as one shell word list (for rsync -e and pipelines);
// the temporary paths hold no characters a shell would interpret.
func (s *benchSSHD) sshCommand() string {
	return "ssh " + strings.Join(s.args()[:len(s.args())-1], " ")
}

func (s *benchSSHD) stop() {
	if s.proc != nil && s.proc.Process != nil {
		s.proc.Process.Signal(syscall.SIGTERM)
		// Wait is called by the goroutine in startBenchSSHD; give it a moment,
		// then make sure.
		for i := 0; i < 100 && alivePID(s.proc.Process.Pid); i++ {
			time.Sleep(10 * time.Millisecond)
		}
		s.proc.Process.Kill()
	}
}

func alivePID(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z'
}

// runGroup runs a shell script in its own process group and kills the group
// if it fails or when it ends (no child outlives it); it returns the wall
// time.
func runGroup(script string) (time.Duration, error) {
	cmd := exec.Command("sh", "-c", script)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	kill := func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	untrack := track(kill)
	err := cmd.Wait()
	d := time.Since(start)
	kill()
	untrack()
	if err != nil {
		return 0, fmt.Errorf("%s: %w", script, err)
	}
	return d, nil
}

// fsyncTree fsyncs every regular file under dir.
func fsyncTree(dir string) error {
	return filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		return f.Sync()
	})
}

// --- initial-peers ---

func benchInitialPeers(dir string) error {
	if err := needTools("ssh", "ssh-keygen", sshdBinary, "zstd", "rsync", "dd", "cmp"); err != nil {
		return err
	}
	if *rounds < 1 {
		return errors.New("-rounds: want 1 or more")
	}
	size := parseSize(*sizeArg)
	// The disk, a peer's copy, and asr's cache, replica and spool.
	if err := needSpace(dir, 4*size); err != nil {
		return err
	}
	disk := filepath.Join(dir, "disk.img")
	if err := makeMixedDisk(disk, size); err != nil {
		return err
	}
	// The source is in the page cache for every contender: warmed again
	// before each (untimed), because asr's initial copy drops the pages
	// it read (agent/initial.go), which left the contender after it, asr
	// included, reading the disk from the device.
	warm := func() error {
		_, err := timeCmd("cat " + disk + " > /dev/null")
		return err
	}
	sshd, err := startBenchSSHD(filepath.Join(dir, "sshd"))
	if err != nil {
		return err
	}
	defer track(sshd.stop)()
	defer sshd.stop()
	ssh := sshd.sshCommand()
	out := filepath.Join(dir, "out")
	zstdScript := fmt.Sprintf("zstd -q -1 -T0 < %s | %s 127.0.0.1 'zstd -q -d | dd of=%s conv=sparse,fsync bs=1M status=none'", disk, ssh, out)
	rsyncScript := fmt.Sprintf("rsync -S --whole-file -e '%s' %s 127.0.0.1:%s && sync %s", ssh, disk, out, out)
	type contender struct {
		name, cmd string
		goal      float64
		run       func() (time.Duration, error)
		secs      []float64
	}
	peer := func(script string) func() (time.Duration, error) {
		return func() (time.Duration, error) {
			os.Remove(out)
			exec.Command("sync").Run()
			return runGroup(script)
		}
	}
	cts, err := asrContenders()
	if err != nil {
		return err
	}
	asrExtra := make([][]string, len(cts))
	asrCPU := make([][]float64, len(cts))
	var cs []*contender
	for i, ct := range cts {
		name := "asr initial replication"
		if ct.name != "asr" {
			name = "asr (" + ct.name + ") initial replication"
		}
		cs = append(cs, &contender{name: name, cmd: fmt.Sprintf("%s server (started first, not timed) + agent %s, from the agent's start until protected, + fsync of the replica", ct.bin, strings.Join(ct.args, " ")), run: func() (time.Duration, error) {
			d, cpu, extra, err := asrInitialRound(dir, disk, ct)
			asrExtra[i] = append(asrExtra[i], extra)
			asrCPU[i] = append(asrCPU[i], cpu)
			return d, err
		}})
	}
	cs = append(cs, []*contender{
		{name: "zstd -1 -T0 | ssh | zstd -d | dd", cmd: zstdScript, goal: 1.0, run: peer(zstdScript)},
		{name: "rsync -S --whole-file over ssh", cmd: rsyncScript, goal: 1.3, run: peer(rsyncScript)},
	}...)
	fmt.Printf("initial replication of a %s mixed disk (1/3 zero, 1/3 text-like, 1/3 random; source in the page cache), %d rounds, contenders alternating\n", *sizeArg, *rounds)
	for r := 0; r < *rounds; r++ {
		for i := range cs {
			c := cs[(i+r)%len(cs)]
			if err := warm(); err != nil {
				return err
			}
			rep0, repOK := hostReportedKiB()
			d, err := c.run()
			if err != nil {
				return fmt.Errorf("%s, round %d: %w", c.name, r+1, err)
			}
			rep1, _ := hostReportedKiB()
			if r == 0 && c.goal > 0 { // a peer's copy must be the disk
				if msg, err := exec.Command("cmp", disk, out).CombinedOutput(); err != nil {
					return fmt.Errorf("%s made a wrong copy: %v: %s", c.name, err, msg)
				}
			}
			c.secs = append(c.secs, d.Seconds())
			if repOK {
				fmt.Printf("  round %d: %-34s %7.2f s  (the guest freed back to the hypervisor meanwhile: %.2f GiB)\n", r+1, c.name, d.Seconds(), float64(rep1-rep0)/(1<<20))
			} else {
				fmt.Printf("  round %d: %-34s %7.2f s\n", r+1, c.name, d.Seconds())
			}
		}
	}
	os.Remove(out)
	asrMed := median(cs[0].secs)
	fmt.Printf("\n%-34s %-24s %8s %14s %-20s %8s\n", "contender", "seconds per round", "median", "ratio asr/peer", "ratio per round", "goal")
	for _, c := range cs {
		ratio, perRound, goal := "", "", ""
		if c.goal > 0 {
			ratio = fmt.Sprintf("%.2fx", median(c.secs)/asrMed)
			var rs []float64
			for r := range c.secs {
				rs = append(rs, c.secs[r]/cs[0].secs[r])
			}
			perRound = joinFloats(rs, "%.2f")
			goal = fmt.Sprintf(">= %.1fx", c.goal)
		}
		fmt.Printf("%-34s %-24s %8.2f %14s %-20s %8s\n", c.name, joinFloats(c.secs, "%.2f"), median(c.secs), ratio, perRound, goal)
	}
	fmt.Println("\n(ratio = peer's median time / asr's median time, and per round the peer's time / asr's in that round: above 1 means asr is faster)")
	for _, c := range cs {
		fmt.Printf("%s: %s\n", c.name, c.cmd)
	}
	for i, es := range asrExtra {
		for r, e := range es {
			fmt.Printf("%s round %d: %s\n", cts[i].name, r+1, e)
		}
	}
	fmt.Printf("\n%-34s %-24s %8s %16s\n", "asr server's CPU-seconds", "per round", "median", "ratio to asr")
	for i, ct := range cts {
		fmt.Printf("%-34s %-24s %8.2f %15.2fx\n", ct.name, joinFloats(asrCPU[i], "%.2f"), median(asrCPU[i]), median(asrCPU[i])/median(asrCPU[0]))
	}
	fmt.Println("(the server's utime+stime from the agent's start to the disk protected, its own start not counted, read from /proc before it stops)")
	return nil
}

// asrInitialRound replicates disk with a fresh server and agent in a fresh
// directory: the time from starting the agent (the server already up) to
// the disk protected, plus an fsync of every file of the target (the
// replica), and the server's CPU-seconds.
func asrInitialRound(dir, disk string, ct asrContender) (time.Duration, float64, string, error) {
	rd, err := os.MkdirTemp(dir, "asr")
	if err != nil {
		return 0, 0, "", err
	}
	defer os.RemoveAll(rd)
	exec.Command("sync").Run()
	written0 := diskWritten()
	// The server is up before the clock starts, as the peers' sshd is: a
	// process server is a service that runs already (its start derives
	// the vault key with Argon2id, about 0.7 CPU-seconds). The agent's
	// start and registration are timed, as ssh's connection and login are.
	t0 := time.Now()
	c, err := startServerBin(ct.bin, rd, noNBDListen...)
	if err != nil {
		return 0, 0, "", err
	}
	defer track(c.stop)()
	defer c.stop()
	srvStart := time.Since(t0)
	cpu0 := cpuSeconds(c.server) // its start's, not counted
	start := time.Now()
	if c.agent, err = c.addAgent("bench", c.sock, map[string]string{"d0": disk}, ct.args...); err != nil {
		return 0, 0, "", err
	}
	if err := c.waitUsable(10 * time.Minute); err != nil {
		return 0, 0, "", err
	}
	if err := fsyncTree(filepath.Join(c.srvDir, "target")); err != nil {
		return 0, 0, "", err
	}
	d := time.Since(start)
	cpu := cpuSeconds(c.server) - cpu0
	_, agentPeak := rssKiB(c.agent)
	_, srvPeak := rssKiB(c.server)
	du, _ := exec.Command("du", "-sk", filepath.Join(c.srvDir, "target")).Output()
	return d, cpu, fmt.Sprintf("server start %.2f s (not timed), server CPU-s after it %.2f, agent peak RSS %d MiB, server peak RSS %d MiB, target %s KiB, %.2f GB written to the block devices",
		srvStart.Seconds(), cpu, agentPeak>>10, srvPeak>>10, strings.Fields(string(du) + " ?")[0], float64(diskWritten()-written0)/1e9), nil
}

// noNBDListen keeps the server off the failover NBD port (10809), which
// another asr on the machine may hold; these benchmarks make no failover.
var noNBDListen = []string{"--nbd-listen", "off"}

// asrContender is one asr build (and agent flags) a benchmark runs.
type asrContender struct {
	name string
	bin  string
	args []string
}

// asrContenders returns -asr ("asr") and, with -asr-base, the base build
// ("base").
func asrContenders() ([]asrContender, error) {
	cs := []asrContender{{name: "asr", bin: *asrBin, args: strings.Fields(*agentArgs)}}
	if *asrBase != "" {
		abs, err := filepath.Abs(*asrBase)
		if err != nil {
			return nil, err
		}
		if _, err := os.Stat(abs); err != nil {
			return nil, fmt.Errorf("-asr-base: %w", err)
		}
		cs = append(cs, asrContender{name: "base", bin: abs, args: strings.Fields(*baseArgs)})
	}
	return cs, nil
}

// rotate returns xs rotated left by k: contenders take turns going first.
func rotate[T any](xs []T, k int) []T {
	k %= len(xs)
	return append(append([]T{}, xs[k:]...), xs[:k]...)
}

// --- pinning ---

// pinSelf pins every thread of this process to guestCPU, so that the
// processes it starts (fio, nbdkit, the agent) inherit it; the asr server
// is moved to serverCPU with pinServer.
func pinSelf() error {
	if err := needTools("taskset"); err != nil {
		return err
	}
	if out, err := exec.Command("taskset", "-a", "-p", "-c", guestCPU, strconv.Itoa(os.Getpid())).CombinedOutput(); err != nil {
		return fmt.Errorf("taskset: %v: %s", err, out)
	}
	return nil
}

// pin sets the CPU of every thread of a process and checks it took.
func pin(p *exec.Cmd, cpu string) error {
	pid := strconv.Itoa(p.Process.Pid)
	if out, err := exec.Command("taskset", "-a", "-p", "-c", cpu, pid).CombinedOutput(); err != nil {
		return fmt.Errorf("taskset %s: %v: %s", pid, err, out)
	}
	tasks, _ := os.ReadDir("/proc/" + pid + "/task")
	for _, t := range tasks {
		b, _ := os.ReadFile("/proc/" + pid + "/task/" + t.Name() + "/status")
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "Cpus_allowed_list:"); ok && strings.TrimSpace(v) != cpu {
				return fmt.Errorf("process %s thread %s runs on CPUs %s, want %s", pid, t.Name(), strings.TrimSpace(v), cpu)
			}
		}
	}
	return nil
}

// pinnedCluster starts a server (moved to serverCPU; it starts with this
// process's CPU, so its Go runtime sizes itself for one) and an agent
// (guestCPU, inherited) on a fresh sparse disk of size bytes, and waits
// until the disk is protected and its NBD socket answers. The caller calls
// stop.
func pinnedCluster(dir string, size int64, ct asrContender) (c *cluster, stop func(), err error) {
	disk := filepath.Join(dir, "disk.img")
	if err := sparseFile(disk, size); err != nil {
		return nil, nil, err
	}
	if c, err = startServerBin(ct.bin, dir, noNBDListen...); err != nil {
		return nil, nil, err
	}
	untrack := track(c.stop)
	stop = func() { c.stop(); untrack() }
	defer func() {
		if err != nil {
			stop()
		}
	}()
	if err := pin(c.server, serverCPU); err != nil {
		return nil, nil, err
	}
	if c.agent, err = c.addAgent("bench", c.sock, map[string]string{"d0": disk}, append([]string{"--spool-max", *spoolMaxArg}, ct.args...)...); err != nil {
		return nil, nil, err
	}
	if err := c.waitSocket(); err != nil {
		return nil, nil, err
	}
	if err := c.waitUsable(5 * time.Minute); err != nil {
		return nil, nil, err
	}
	// Threads the server made while it was being moved follow their parent:
	// check again.
	if err := pin(c.server, serverCPU); err != nil {
		return nil, nil, err
	}
	if err := pin(c.agent, guestCPU); err != nil {
		return nil, nil, err
	}
	return c, stop, nil
}

// waitUsable waits until the disk is protected, and fails at once if the
// server refuses the agent (a sticky error such as a full cache disk, which
// only a restart clears).
func (c *cluster) waitUsable(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if ms, err := c.machines(); err == nil && len(ms) == 1 && ms[0].State == api.StateProtected {
			return nil
		}
		if b, _ := os.ReadFile(filepath.Join(c.dir, "agent-bench.log")); strings.Contains(string(b), "the server refuses this agent") {
			return fmt.Errorf("the server refuses the agent; see %s", filepath.Join(c.dir, "agent-bench.log"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New("not protected in time; see " + c.dir)
}

// startNbdkit serves path with nbdkit's file plugin on dir/nbdkit.sock
// (on this process's CPU, inherited).
func startNbdkit(dir, path string) (stop func(), uri string, err error) {
	sock := filepath.Join(dir, "nbdkit.sock")
	k := exec.Command("nbdkit", "--foreground", "--unix", sock, "file", path)
	logf, err := os.Create(filepath.Join(dir, "nbdkit.log"))
	if err != nil {
		return nil, "", err
	}
	defer logf.Close()
	k.Stdout, k.Stderr = logf, logf
	if err := k.Start(); err != nil {
		return nil, "", fmt.Errorf("nbdkit: %w", err)
	}
	untrack := track(func() { k.Process.Kill() })
	stop = func() { stopProc(k); untrack() }
	for i := 0; i < 200; i++ {
		if conn, err := net.Dial("unix", sock); err == nil {
			conn.Close()
			return stop, "nbd+unix:///?socket=" + sock, nil
		}
		time.Sleep(25 * time.Millisecond)
	}
	stop()
	return nil, "", errors.New("nbdkit did not start")
}

func stopProc(p *exec.Cmd) {
	p.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { p.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		p.Process.Kill()
		<-done
	}
}

// agentStats reads the agent's stats file.
func (c *cluster) agentStats() (agent.Stats, error) {
	var st agent.Stats
	b, err := os.ReadFile(filepath.Join(c.dir, "agent-bench", "stats.json"))
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal(b, &st)
}

// drained waits until the server has acknowledged every change the agent
// logged, as a stats file written (every second) after the last guest
// write says.
func (c *cluster) drained() (agent.Stats, error) {
	after := time.Now()
	deadline := after.Add(drainDeadline)
	path := filepath.Join(c.dir, "agent-bench", "stats.json")
	for time.Now().Before(deadline) {
		fi, err := os.Stat(path)
		if err == nil && fi.ModTime().After(after) {
			if st, err := c.agentStats(); err == nil && st.NextSeq > 0 && st.Acked+1 >= st.NextSeq {
				return st, nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	st, _ := c.agentStats()
	return st, fmt.Errorf("the server did not acknowledge every change within %v (acked %d, next %d, spool %d bytes); see %s", drainDeadline, st.Acked, st.NextSeq, st.SpoolBytes, c.dir)
}

// caughtUp waits until the agent's overflow is resolved (its log says
// so) and the server acknowledged every change, and returns the agent's
// stats then and the time since since (to about a second: the stats file
// is written every second).
func (c *cluster) caughtUp(since time.Time) (agent.Stats, time.Duration, error) {
	deadline := time.Now().Add(drainDeadline)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(filepath.Join(c.dir, "agent-bench.log"))
		if strings.Contains(string(b), "overflow resolved") {
			st, err := c.drained()
			return st, time.Since(since), err
		}
		time.Sleep(100 * time.Millisecond)
	}
	return agent.Stats{}, 0, fmt.Errorf("the agent's overflow was not resolved within %v; see %s", drainDeadline, c.dir)
}

// overflows counts the agent's spool overflows (its log says each).
func (c *cluster) overflows() int {
	b, _ := os.ReadFile(filepath.Join(c.dir, "agent-bench.log"))
	return strings.Count(string(b), "spool overflow: tracking changed blocks")
}

// sampler records the agent's peak spool and RSS while a run goes on.
type sampler struct {
	c                *cluster
	stop             chan struct{}
	done             chan struct{}
	spoolMax         int64
	agentRSS, srvRSS int64 // VmRSS, max sampled
	agentAnon        int64 // RssAnon, max sampled
	agentPeak        int64 // VmHWM from the sample's start to its end
}

// sample starts sampling; the agent's peak RSS (VmHWM) counts from now.
func (c *cluster) sample() *sampler {
	s := &sampler{c: c, stop: make(chan struct{}), done: make(chan struct{})}
	if err := resetPeakRSS(c.agent); err != nil {
		fmt.Fprintf(os.Stderr, "asrbench: reset the agent's peak RSS: %v (its peak counts from its start)\n", err)
	}
	go func() {
		defer close(s.done)
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
				if st, err := c.agentStats(); err == nil {
					s.spoolMax = max(s.spoolMax, st.SpoolBytes)
				}
				am := procStatus(c.agent)
				v, _ := rssKiB(c.server)
				s.agentRSS, s.srvRSS = max(s.agentRSS, am["VmRSS:"]), max(s.srvRSS, v)
				s.agentAnon = max(s.agentAnon, am["RssAnon:"])
			}
		}
	}()
	return s
}

func (s *sampler) end() {
	close(s.stop)
	<-s.done
	_, s.agentPeak = rssKiB(s.c.agent)
}

// --- guest-write ---

func benchGuestWrite(dir string) error {
	if err := needTools("fio", "nbdkit", "taskset"); err != nil {
		return err
	}
	if *rounds < 1 {
		return errors.New("-rounds: want 1 or more")
	}
	size := parseSize(*fioSize)
	spoolMax := parseSize(*spoolMaxArg)
	// The disk, the replica, the spool and the cache.
	if err := needSpace(dir, 3*size+2*spoolMax); err != nil {
		return err
	}
	if err := pinSelf(); err != nil {
		return err
	}
	var cases []struct{ rw, bs string }
	for _, c := range strings.Split(*guestCases, ",") {
		rw, bs, ok := strings.Cut(c, ":")
		if !ok || rw == "" || bs == "" {
			return fmt.Errorf("-guest-cases: %q: want RW:BS, e.g. randwrite:4k", c)
		}
		cases = append(cases, struct{ rw, bs string }{rw, bs})
	}
	cts, err := asrContenders()
	if err != nil {
		return err
	}
	// Per case, per contender (nbdkit is index 0, then cts in order): MB/s
	// and the agent's peak RSS (KiB) of each round.
	type res struct {
		mbps [][]float64
		rss  [][]int64
	}
	results := make([]res, len(cases))
	for i := range results {
		results[i] = res{mbps: make([][]float64, 1+len(cts)), rss: make([][]int64, 1+len(cts))}
	}
	fmt.Printf("guest writes: fio %s (nbd engine, iodepth 8, %d s, --size=%s on a fresh sparse %s file per run), fio and the NBD server (asr agent or nbdkit file) on CPU %s, asr server on CPU %s; agent --spool-max %s; %d rounds, contenders alternating\n",
		fioVersion(), *seconds, *fioSize, *fioSize, guestCPU, serverCPU, *spoolMaxArg, *rounds)
	for _, ct := range cts {
		fmt.Printf("  %s: %s %s\n", ct.name, ct.bin, strings.Join(ct.args, " "))
	}
	order := make([]int, 1+len(cts))
	for i := range order {
		order[i] = i
	}
	for r := 0; r < *rounds; r++ {
		for ci, cs := range cases {
			for _, k := range rotate(order, r+ci) {
				rd, err := os.MkdirTemp(dir, "run")
				if err != nil {
					return err
				}
				job := func(uri string) []string {
					args := fioArgs(uri, cs.rw, cs.bs, 8)
					for i, a := range args {
						if strings.HasPrefix(a, "--size=") {
							args[i] = "--size=" + strconv.FormatInt(size, 10)
						}
					}
					return args
				}
				if k == 0 {
					mbps, err := nbdkitWrite(rd, size, job)
					os.RemoveAll(rd)
					if err != nil {
						return err
					}
					results[ci].mbps[0] = append(results[ci].mbps[0], mbps)
					fmt.Printf("  round %d: nbdkit %s %s: %.1f MB/s\n", r+1, cs.rw, cs.bs, mbps)
				} else {
					ct := cts[k-1]
					mbps, rss, note, err := asrWrite(rd, size, spoolMax, job, ct)
					os.RemoveAll(rd)
					if err != nil {
						return err
					}
					results[ci].mbps[k] = append(results[ci].mbps[k], mbps)
					results[ci].rss[k] = append(results[ci].rss[k], rss)
					fmt.Printf("  round %d: %-6s %s %s: %.1f MB/s (%s)\n", r+1, ct.name, cs.rw, cs.bs, mbps, note)
				}
			}
		}
	}
	fmt.Printf("\n%-26s %-22s %8s %14s %-18s %-16s %6s\n", "contender", "MB/s per round", "median", "ratio to kit", "ratio per round", "agent RSS peak", "goal")
	for ci, cs := range cases {
		kit := results[ci].mbps[0]
		fmt.Printf("%-26s %-22s %8.1f %14s %-18s %-16s %6s\n", "nbdkit file "+cs.rw+" "+cs.bs, joinFloats(kit, "%.0f"), median(kit), "", "", "", "")
		for k, ct := range cts {
			a := results[ci].mbps[k+1]
			var rs []float64
			for r := range a {
				rs = append(rs, a[r]/kit[r])
			}
			var rss []float64
			for _, v := range results[ci].rss[k+1] {
				rss = append(rss, float64(v>>10))
			}
			fmt.Printf("%-26s %-22s %8.1f %13.2fx %-18s %-16s %6s\n", ct.name+" agent "+cs.rw+" "+cs.bs, joinFloats(a, "%.0f"), median(a), median(a)/median(kit),
				joinFloats(rs, "%.2f"), joinFloats(rss, "%.0f")+" MiB", ">=0.8x")
		}
		if len(cts) == 2 {
			a, b := results[ci].mbps[1], results[ci].mbps[2]
			var rs []float64
			for r := range a {
				rs = append(rs, a[r]/b[r])
			}
			fmt.Printf("%-26s %-22s %8s %13.2fx %-18s\n", "asr / base "+cs.rw+" "+cs.bs, "", "", median(a)/median(b), joinFloats(rs, "%.2f"))
		}
	}
	fmt.Printf("\n(agent RSS peak: VmHWM from fio's start to its end; spool bound %s: once the changes not yet acknowledged reach it, the agent stops spooling and only marks changed blocks, resent later; a run that reached it measures that mode, not steady replication)\n", *spoolMaxArg)
	return nil
}

func fioVersion() string {
	out, _ := exec.Command("fio", "--version").Output()
	return strings.TrimSpace(string(out))
}

// nbdkitWrite runs the fio job against nbdkit's file plugin on a fresh
// sparse file.
func nbdkitWrite(dir string, size int64, job func(uri string) []string) (float64, error) {
	disk := filepath.Join(dir, "nbdkit.img")
	if err := sparseFile(disk, size); err != nil {
		return 0, err
	}
	stop, uri, err := startNbdkit(dir, disk)
	if err != nil {
		return 0, err
	}
	defer stop()
	_, mbps, err := fioResult(job(uri)...)
	return mbps, err
}

// asrWrite runs the fio job through a fresh agent (and server) on a fresh
// sparse file; the note says how far the spool filled and how much fio
// wrote.
func asrWrite(dir string, size, spoolMax int64, job func(uri string) []string, ct asrContender) (float64, int64, string, error) {
	c, stop, err := pinnedCluster(dir, size, ct)
	if err != nil {
		return 0, 0, "", err
	}
	defer stop()
	smp := c.sample()
	_, mbps, err := fioResult(job("nbd+unix:///d0?socket=" + c.sock)...)
	smp.end()
	if err != nil {
		return 0, 0, "", err
	}
	fioEnd := time.Now()
	written := mbps * float64(*seconds)
	note := fmt.Sprintf("fio wrote %.2f GB; spool peak %.0f MiB of %d MiB", written/1e3, float64(smp.spoolMax)/(1<<20), spoolMax>>20)
	var st agent.Stats
	if n := c.overflows(); n > 0 {
		var took time.Duration
		st, took, err = c.caughtUp(fioEnd)
		if err != nil {
			return 0, 0, "", err
		}
		note += fmt.Sprintf("; spool bound reached (%d overflow); consistent again and acknowledged %.1f s after fio ended, %.2f GB of records sent", n, took.Seconds(), float64(st.RawSent)/1e9)
	} else {
		if st, err = c.drained(); err != nil {
			return 0, 0, "", err
		}
		note += "; spool bound not reached"
	}
	// What went to the spool's files: every change with the spool log,
	// the spills with the memory log.
	note += fmt.Sprintf("; %.2f GB written to the spool files", float64(st.SpoolWritten)/1e9)
	note += fmt.Sprintf("; agent RSS peak %d MiB (anon %d MiB)", smp.agentPeak>>10, smp.agentAnon>>10)
	return mbps, smp.agentPeak, note, nil
}

// --- churn ---

type churnStep struct {
	who            string  // the asr contender
	rate           int     // fio --rate, MB/s
	mbps           float64 // what fio did
	lat            agent.LatencyStats
	overflow       int
	agentRSS       int64 // KiB, VmHWM from fio's start until every change is acknowledged
	agentAnon      int64 // KiB, RssAnon, max sampled
	srvCPU, agtCPU float64
	guestBytes     int64 // the agent's raw record bytes (guest changes) sent
	wireBytes      int64 // frame bytes sent (compressed)
}

func (s churnStep) ok() bool { return s.why() == "holds" }

// why says whether the step holds, or what failed.
func (s churnStep) why() string {
	var r []string
	if s.mbps < 0.95*float64(s.rate) {
		r = append(r, "rate not reached")
	}
	if s.lat.Count == 0 || s.lat.P99Ms >= float64(rpoGoal/time.Millisecond) {
		r = append(r, "p99 too high")
	}
	if s.overflow > 0 {
		r = append(r, "spool overflow")
	}
	if len(r) == 0 {
		return "holds"
	}
	return strings.Join(r, ", ")
}

func benchChurn(dir string) error {
	if err := needTools("fio", "nbdkit", "taskset"); err != nil {
		return err
	}
	var steps []int
	for _, f := range strings.Split(*churnRates, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return fmt.Errorf("-churn-rates: %q is not a rate in MB/s", f)
		}
		steps = append(steps, n)
	}
	const diskSize = 4 << 30
	if err := needSpace(dir, 3*diskSize+2*parseSize(*spoolMaxArg)); err != nil {
		return err
	}
	if err := pinSelf(); err != nil {
		return err
	}
	job := func(uri string) []string {
		return []string{"--name=churn", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite", "--bsrange=4k-64k",
			"--iodepth=" + strconv.Itoa(*churnDepth), "--size=4G", "--time_based", "--runtime=" + strconv.Itoa(*churnSeconds),
			"--refill_buffers", "--norandommap", "--randrepeat=0"}
	}
	fmt.Printf("churn: fio randwrite 4-64 KiB (bsrange), iodepth %d, %d s per step, fresh sparse 4 GiB disk per step; fio and the agent (or nbdkit) on CPU %s, asr server on CPU %s; agent --spool-max %s\n",
		*churnDepth, *churnSeconds, guestCPU, serverCPU, *spoolMaxArg)
	fmt.Printf("a step holds when fio reaches 95%% of its rate, the agent's RPO p99 (NBD reply -> durable on the server) is under %v and the spool never overflows\n\n", rpoGoal)
	// nbdkit's ceiling: the same job, unlimited.
	rd, err := os.MkdirTemp(dir, "kit")
	if err != nil {
		return err
	}
	kitDisk := filepath.Join(rd, "nbdkit.img")
	if err := sparseFile(kitDisk, diskSize); err != nil {
		return err
	}
	stopKit, uri, err := startNbdkit(rd, kitDisk)
	if err != nil {
		return err
	}
	_, kitMBps, err := fioResult(job(uri)...)
	stopKit()
	os.RemoveAll(rd)
	if err != nil {
		return err
	}
	fmt.Printf("nbdkit file plugin, same job without --rate: %.1f MB/s (the raw ceiling)\n\n", kitMBps)
	cts, err := asrContenders()
	if err != nil {
		return err
	}
	for _, ct := range cts {
		fmt.Printf("%s: %s %s\n", ct.name, ct.bin, strings.Join(ct.args, " "))
	}
	fmt.Printf("\n%-5s %8s %9s %8s %8s %9s %9s %9s %9s %11s %9s %10s %s\n", "who", "rate", "fio MB/s", "p50 ms", "p99 ms", "max ms", "overflow", "agent RSS", "anon", "server CPU", "agent CPU", "guest GB", "result")
	var results []churnStep
	best := map[string]int{}
	for i, rate := range steps {
		held := false
		for _, ct := range rotate(cts, i) { // contenders take turns going first
			st, err := churnRun(dir, rate, job, ct)
			if err != nil {
				return err
			}
			results = append(results, st)
			fmt.Printf("%-5s %5d MB/s %9.1f %8.0f %8.0f %9.0f %9d %6d MiB %5d MiB %9.1f s %7.1f s %10.2f %s\n", st.who, st.rate, st.mbps, st.lat.P50Ms, st.lat.P99Ms, st.lat.MaxMs, st.overflow, st.agentRSS>>10, st.agentAnon>>10, st.srvCPU, st.agtCPU, float64(st.guestBytes)/1e9, st.why())
			if st.ok() {
				best[st.who] = rate
				held = true
			}
		}
		if !held {
			break
		}
	}
	for _, ct := range cts {
		fmt.Printf("\n%s: highest rate held: %d MB/s (goal >= 100 MB/s); nbdkit's ceiling %.1f MB/s; ratio %.2fx of nbdkit", ct.name, best[ct.name], kitMBps, float64(best[ct.name])/kitMBps)
	}
	fmt.Println("\n(agent RSS: its VmHWM from fio's start until every change is acknowledged; anon: its RssAnon, max sampled every 0.5 s)")
	fmt.Printf("\nprocess-server capacity (the asr server's utime+stime over each step, fio start to every change acknowledged):\n")
	fmt.Printf("%-5s %8s %12s %14s %14s %16s %22s\n", "who", "rate", "guest GB", "wire GB", "server CPU-s", "CPU-s per GB", "TB/day per core")
	for _, s := range results {
		if s.guestBytes == 0 {
			continue
		}
		perGB := s.srvCPU / (float64(s.guestBytes) / 1e9)
		fmt.Printf("%-5s %5d MB/s %12.2f %14.2f %14.1f %16.2f %22.1f\n", s.who, s.rate, float64(s.guestBytes)/1e9, float64(s.wireBytes)/1e9, s.srvCPU, perGB, 86400/perGB/1e3)
	}
	fmt.Println("(guest GB: the agent's record bytes sent, i.e. the guest's changes; wire GB: the frames sent (compressed only by an agent that compresses); one core sustains 86400 / (CPU-s per GB) GB per day; goal >= 5 TB/day per core)")
	return nil
}

// churnRun runs one rate-limited step on a fresh cluster.
func churnRun(dir string, rate int, job func(string) []string, ct asrContender) (churnStep, error) {
	s := churnStep{who: ct.name, rate: rate}
	rd, err := os.MkdirTemp(dir, "churn")
	if err != nil {
		return s, err
	}
	defer os.RemoveAll(rd)
	c, stop, err := pinnedCluster(rd, 4<<30, ct)
	if err != nil {
		return s, err
	}
	defer stop()
	st0, err := c.drained()
	if err != nil {
		return s, err
	}
	srv0, agt0 := cpuSeconds(c.server), cpuSeconds(c.agent)
	smp := c.sample()
	_, s.mbps, err = fioResult(append(job("nbd+unix:///d0?socket="+c.sock), "--rate="+strconv.Itoa(rate)+"m")...)
	if err != nil {
		smp.end()
		return s, err
	}
	st1, err := c.drained()
	smp.end()
	if err != nil {
		return s, err
	}
	s.srvCPU, s.agtCPU = cpuSeconds(c.server)-srv0, cpuSeconds(c.agent)-agt0
	s.lat, s.overflow, s.agentRSS, s.agentAnon = st1.Latency, c.overflows(), smp.agentPeak, smp.agentAnon
	s.guestBytes, s.wireBytes = st1.RawSent-st0.RawSent, st1.BytesSent-st0.BytesSent
	return s, nil
}

// live holds what this file's benchmarks have started and not stopped yet,
// so that an interrupt (SIGINT, SIGTERM) stops them too.
var live struct {
	sync.Mutex
	stops map[int]func()
	next  int
}

// track registers stop and returns the function that unregisters it.
func track(stop func()) (untrack func()) {
	live.Lock()
	defer live.Unlock()
	if live.stops == nil {
		live.stops = map[int]func(){}
	}
	id := live.next
	live.next++
	live.stops[id] = stop
	return func() {
		live.Lock()
		delete(live.stops, id)
		live.Unlock()
	}
}

// benchPeers runs one of this file's benchmarks.
func benchPeers(name, dir string) error {
	if *workDir == "" {
		// main's deferred removal does not run when a benchmark fails (fail
		// exits): remove the temporary directory here too.
		defer os.RemoveAll(dir)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		sig, ok := <-sigs
		if !ok {
			return
		}
		live.Lock()
		for _, stop := range live.stops {
			stop()
		}
		live.Unlock()
		if *workDir == "" {
			os.RemoveAll(dir)
		}
		fail(fmt.Errorf("interrupted (%v): every process stopped", sig))
	}()
	switch name {
	case "initial-peers":
		return benchInitialPeers(dir)
	case "guest-write":
		return benchGuestWrite(dir)
	default:
		return benchChurn(dir)
	}
}
