//go:build e2e

package e2e

// The fault suite: the agent's link to the server is degraded and cut (the
// agent runs in a network namespace of the test's own, joined to the host by
// a veth pair), agents and servers are killed with SIGKILL at random
// moments, and the server's disk fills up. A checker writes through the
// agent's NBD splitter and remembers every write the client saw
// acknowledged; after healing, the latest point must hold all of them and
// every point must be a prefix of the write sequence.
//
// Link faults: this kernel has no sch_netem, so the suite makes loss with
// iptables' statistic match inside the namespace, delay with a tbf
// bandwidth limit (queueing delay), and outages by taking the link down.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/asrdr/asr/agent/nbd"
)

// --- network namespace -----------------------------------------------------

type netns struct {
	t          *testing.T
	name       string
	hostIf, ns string // veth ends
	hostIP, ip string
}

// newNetns makes a network namespace joined to the host by a veth pair.
// Names and the /24 derive from a number that is claimed by creating the
// namespace (which fails with "File exists" if another run, or a crashed
// one, has it), so concurrent runs on one machine never share them.
func newNetns(t *testing.T) *netns {
	t.Helper()
	for _, tool := range []string{"ip", "tc", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is required for the fault suite but is not installed (apt-get install iproute2 iptables)", tool)
		}
	}
	for attempt := 1; ; attempt++ {
		// 10.105.0.0-10.199.249.0: /24s of their own (older runs took
		// numbers under 1250, in 10.100-10.104).
		n := 1250 + rand.IntN(25000-1250)
		ns := &netns{t: t, name: fmt.Sprintf("asr%d", n), hostIf: fmt.Sprintf("asrh%d", n), ns: fmt.Sprintf("asrn%d", n),
			hostIP: fmt.Sprintf("10.%d.%d.1", 100+n/250%100, n%250), ip: fmt.Sprintf("10.%d.%d.2", 100+n/250%100, n%250)}
		taken := func(out []byte, err error) bool {
			return err != nil && strings.Contains(string(out), "File exists") && attempt < 100
		}
		out, err := exec.Command("ip", "netns", "add", ns.name).CombinedOutput()
		if taken(out, err) {
			continue
		} else if err != nil {
			t.Fatalf("ip netns add %s: %v\n%s", ns.name, err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns.name).Run() })
		out, err = exec.Command("ip", "link", "add", ns.hostIf, "type", "veth", "peer", "name", ns.ns).CombinedOutput()
		if taken(out, err) { // a leftover interface: leave it, take another number
			continue
		} else if err != nil {
			t.Fatalf("ip link add %s: %v\n%s", ns.hostIf, err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "link", "del", ns.hostIf).Run() })
		// The /24 may be in use by something other than a namespace of ours.
		if used, _ := exec.Command("ip", "-o", "-4", "addr", "show", "to", ns.hostIP+"/24").Output(); len(bytes.TrimSpace(used)) > 0 && attempt < 100 {
			continue
		}
		ns.run("ip", "link", "set", ns.ns, "netns", ns.name)
		ns.run("ip", "addr", "add", ns.hostIP+"/24", "dev", ns.hostIf)
		ns.run("ip", "link", "set", ns.hostIf, "up")
		ns.exec("ip", "addr", "add", ns.ip+"/24", "dev", ns.ns)
		ns.exec("ip", "link", "set", ns.ns, "up")
		ns.exec("ip", "link", "set", "lo", "up")
		return ns
	}
}

func (n *netns) run(args ...string) {
	n.t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		n.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// exec runs a command inside the namespace.
func (n *netns) exec(args ...string) {
	n.t.Helper()
	n.run(append([]string{"ip", "netns", "exec", n.name}, args...)...)
}

// loss drops a fraction p of packets both ways (0 clears).
func (n *netns) loss(p float64) {
	n.exec("iptables", "-F")
	if p > 0 {
		for _, chain := range []string{"INPUT", "OUTPUT"} {
			n.exec("iptables", "-A", chain, "-m", "statistic", "--mode", "random", "--probability", fmt.Sprint(p), "-j", "DROP")
		}
	}
}

// slow limits the link's bandwidth (queueing delay); "" clears.
func (n *netns) slow(rate string) {
	exec.Command("ip", "netns", "exec", n.name, "tc", "qdisc", "del", "dev", n.ns, "root").Run()
	if rate != "" {
		n.exec("tc", "qdisc", "add", "dev", n.ns, "root", "tbf", "rate", rate, "burst", "32kb", "latency", "2s")
	}
}

// link takes the link down or up (an outage).
func (n *netns) link(up bool) {
	state := "down"
	if up {
		state = "up"
	}
	n.exec("ip", "link", "set", n.ns, state)
}

// --- the checker ---------------------------------------------------------------

// checker writes blocks 0, 1, 2, ... of a region one after the other, each
// carrying its own number, and counts those the NBD client saw
// acknowledged. A write that failed (the agent was killed) is retried with
// the same contents after reconnecting.
type checker struct {
	sock, export string
	base         []byte // the region before any write
	off          int64  // region start on the disk
	blocks       int
	pace         time.Duration // pause between writes
	acked        atomic.Int64
	stop         chan struct{}
	done         chan struct{}
	errs         atomic.Int64
}

const checkBlock = 4096

func checkPattern(k int) []byte {
	b := make([]byte, checkBlock)
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], uint64(k+1)*0x9e3779b97f4a7c15)
	}
	return b
}

func startChecker(t *testing.T, disk, sock, export string, off int64, blocks int, pace time.Duration) *checker {
	t.Helper()
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	base := make([]byte, blocks*checkBlock)
	f.ReadAt(base, off)
	f.Close()
	c := &checker{sock: sock, export: export, base: base, off: off, blocks: blocks, pace: pace, stop: make(chan struct{}), done: make(chan struct{})}
	go c.run()
	t.Cleanup(c.halt)
	return c
}

func (c *checker) run() {
	defer close(c.done)
	var cl *nbd.Client
	defer func() {
		if cl != nil {
			cl.Close()
		}
	}()
	for k := 0; k < c.blocks; {
		select {
		case <-c.stop:
			return
		default:
		}
		if cl == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			var err error
			cl, err = nbd.Dial(ctx, "unix:"+c.sock, c.export)
			cancel()
			if err != nil {
				cl = nil
				time.Sleep(100 * time.Millisecond)
				continue
			}
		}
		if err := cl.WriteAt(checkPattern(k), c.off+int64(k)*checkBlock); err != nil {
			c.errs.Add(1)
			cl.Close()
			cl = nil
			continue // retried: the same block, the same contents
		}
		k++
		c.acked.Store(int64(k))
		time.Sleep(c.pace)
	}
}

// waitAcked waits until at least n writes are acknowledged (or all of
// them were made).
func (c *checker) waitAcked(t *testing.T, n int64) {
	t.Helper()
	n = min(n, int64(c.blocks))
	deadline := time.Now().Add(hungAfter) // a hung agent, not a slow one
	for c.acked.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d writes acknowledged, waiting for %d", c.acked.Load(), n)
		}
		select {
		case <-c.done:
			if c.acked.Load() < n {
				t.Fatalf("the checker stopped after %d writes, waiting for %d", c.acked.Load(), n)
			}
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (c *checker) halt() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
}

// prefix checks an image's region: blocks 0..K-1 hold their writes, the
// rest are untouched, and K >= min. It returns K.
func (c *checker) prefix(t *testing.T, image string, min int64) int64 {
	t.Helper()
	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	region := make([]byte, len(c.base))
	f.ReadAt(region, c.off)
	k := 0
	for k < c.blocks && bytes.Equal(region[k*checkBlock:(k+1)*checkBlock], checkPattern(k)) {
		k++
	}
	if !bytes.Equal(region[k*checkBlock:], c.base[k*checkBlock:]) {
		t.Fatalf("%s: blocks 0..%d hold their writes but a later block changed: not a prefix of the write sequence", image, k-1)
	}
	if int64(k) < min {
		t.Fatalf("%s: holds %d writes but %d were acknowledged before the point was asked for", image, k, min)
	}
	return int64(k)
}

// --- the tests -------------------------------------------------------------------

// faultCluster is a cluster whose agent runs inside a network namespace.
func faultCluster(t *testing.T) (*cluster, *netns) {
	ns := newNetns(t)
	c := &cluster{t: t, dir: t.TempDir(), agents: map[string]*agentProc{}}
	c.srvDir = filepath.Join(c.dir, "srv")
	c.listen = ns.hostIP + ":" + freePort(t)
	c.dataPort = freePort(t)
	c.serverArgs = []string{"--host", ns.hostIP}
	c.dataHost = ns.hostIP
	c.startServer()
	return c, ns
}

// pointCheck takes a point (it may fail during a fault: then none) and
// remembers how many writes were acknowledged before asking.
type pointCheck struct {
	id    string
	acked int64
}

// Timeouts of tryTag: during a fault a point may not come (the test goes
// on without it); once healed it must come, however slowly.
const (
	duringFault = "20s"
	healed      = "3m"
)

func tryTag(c *cluster, ck *checker, timeout string) (pointCheck, bool) {
	acked := ck.acked.Load()
	out, err := c.cli("tag", "--machine", "vm1", "--wait", "--timeout", timeout)
	if err != nil {
		return pointCheck{}, false
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	return pointCheck{lines[len(lines)-1], acked}, true
}

func (c *cluster) verifyPoints(t *testing.T, ck *checker, points []pointCheck) {
	t.Helper()
	for _, p := range points {
		out := filepath.Join(c.dir, "verify", p.id)
		if _, err := c.cli("recover", "--machine", "vm1", "--point", p.id, "--out", out); err != nil {
			t.Fatal(err)
		}
		k := ck.prefix(t, filepath.Join(out, "d.img"), p.acked)
		t.Logf("point %s: a prefix of %d writes (%d acknowledged before it was asked for)", p.id, k, p.acked)
		os.RemoveAll(out)
	}
}

// TestE2EFaultsLink degrades and cuts the agent's link during the initial
// copy and during delta replication.
func TestE2EFaultsLink(t *testing.T) {
	t.Parallel()
	c, ns := faultCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeRandomDisk(t, disk, 96<<20, 11)
	a := c.startAgentIn(ns, "vm1", nil, "d="+disk)
	ck := startChecker(t, disk, a.sock, "d", 0, 20000, 2*time.Millisecond)

	// During the initial copy.
	time.Sleep(300 * time.Millisecond)
	ns.loss(0.1)
	time.Sleep(2 * time.Second)
	ns.loss(0)
	ns.slow("4mbit")
	time.Sleep(2 * time.Second)
	ns.slow("")
	ns.link(false)
	time.Sleep(3 * time.Second)
	ns.link(true)
	c.waitState("vm1", "protected", 3*time.Minute)

	// During delta replication, with points taken through the faults.
	var points []pointCheck
	for round, fault := range []func(){
		func() { ns.loss(0.15) },
		func() { ns.slow("2mbit") },
		func() { ns.link(false) },
	} {
		fault()
		time.Sleep(2 * time.Second)
		if round != 2 { // during an outage a point cannot be asked for
			if p, ok := tryTag(c, ck, duringFault); ok {
				points = append(points, p)
			}
		}
		ns.loss(0)
		ns.slow("")
		ns.link(true)
		if p, ok := tryTag(c, ck, duringFault); ok {
			points = append(points, p)
		}
	}
	ck.halt()
	final, ok := tryTag(c, ck, healed)
	if !ok {
		t.Fatalf("no point after the link healed:\n%s", a.logTail())
	}
	final.acked = ck.acked.Load()
	points = append(points, final)
	c.verifyPoints(t, ck, points)
	c.recoverAndCheck("vm1", final.id, map[string]string{"d": sha256File(t, disk)})
	t.Logf("%d writes acknowledged, %d failed and retried", ck.acked.Load(), ck.errs.Load())
}

// TestE2EFaultsKills kills the agent and the server with SIGKILL at random
// moments, many times, while the checker writes.
func TestE2EFaultsKills(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeRandomDisk(t, disk, 64<<20, 12)
	a := c.startAgent("vm1", nil, "d="+disk)
	ck := startChecker(t, disk, a.sock, "d", 8<<20, 12000, 2*time.Millisecond)
	r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	var points []pointCheck
	kills := 0
	for i := 0; i < 10; i++ {
		time.Sleep(time.Duration(200+r.IntN(1300)) * time.Millisecond)
		if r.IntN(2) == 0 {
			a.kill()
			c.startAgent("vm1", nil)
		} else {
			c.server.kill()
			c.startServer()
		}
		kills++
		if i%3 == 2 {
			if p, ok := tryTag(c, ck, duringFault); ok {
				points = append(points, p)
			}
		}
	}
	c.waitState("vm1", "protected", 3*time.Minute)
	ck.halt()
	final, ok := tryTag(c, ck, healed)
	if !ok {
		t.Fatalf("no point after the kills:\n%s", a.logTail())
	}
	final.acked = ck.acked.Load()
	points = append(points, final)
	c.verifyPoints(t, ck, points)
	c.recoverAndCheck("vm1", final.id, map[string]string{"d": sha256File(t, disk)})
	t.Logf("%d kills; %d writes acknowledged, %d failed and retried", kills, ck.acked.Load(), ck.errs.Load())
}

// TestE2EFaultsServerDiskFull fills the file system of the server's data
// directory (cache and target) while the checker writes; once space is
// freed, replication resumes and nothing acknowledged is lost.
func TestE2EFaultsServerDiskFull(t *testing.T) {
	t.Parallel()
	c := &cluster{t: t, dir: t.TempDir(), agents: map[string]*agentProc{}}
	c.srvDir = filepath.Join(c.dir, "srv")
	if err := os.MkdirAll(c.srvDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", c.srvDir).CombinedOutput(); err != nil {
		t.Fatalf("mount a small file system for the server (needs root): %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", c.srvDir).Run() })
	c.listen = "127.0.0.1:" + freePort(t)
	c.dataPort = freePort(t)
	c.startServer()
	disk := filepath.Join(c.dir, "d.img")
	makeRandomDisk(t, disk, 32<<20, 13)
	a := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", time.Minute)
	ck := startChecker(t, disk, a.sock, "d", 0, 7000, 2*time.Millisecond)
	ck.waitAcked(t, 100)
	// Fill what is left, and wait until the server has run into it.
	filler := filepath.Join(c.srvDir, "filler")
	fillFS(t, filler)
	c.server.waitLog(t, "no space left on device")
	if _, ok := tryTag(c, ck, duringFault); ok {
		t.Log("a point was made while the disk was full (the cache had room)")
	}
	before := ck.acked.Load()
	os.Remove(filler)
	// The server may have stopped acknowledging (a failed fsync is not
	// retried); an operator restarts it once the disk has room again.
	if st := c.status("vm1"); !st.Connected || strings.Contains(st.Error, "could not be made durable") {
		c.server.stop()
		c.startServer()
	}
	ck.waitAcked(t, before+100) // the guest writes on after the space was freed
	ck.halt()
	final, ok := tryTag(c, ck, healed)
	if !ok {
		t.Fatalf("no point after the disk was freed:\n%s\n%s", c.server.logTail(), a.logTail())
	}
	final.acked = ck.acked.Load()
	c.verifyPoints(t, ck, []pointCheck{final})
	c.recoverAndCheck("vm1", final.id, map[string]string{"d": sha256File(t, disk)})
	t.Logf("%d writes acknowledged (%d before space was freed)", ck.acked.Load(), before)
}

// fillFS writes a file until its file system is full.
func fillFS(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Write(buf); err != nil {
			if !strings.Contains(err.Error(), syscall.ENOSPC.Error()) {
				t.Fatal(err)
			}
			return
		}
	}
}
