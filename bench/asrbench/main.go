// Command asrbench runs asr's benchmarks against their reference tools, on
// the same data in one run, and prints a table of figures and ratios:
//
//	asrbench initial   initial replication of a mixed disk vs zstd -1 -T0 and cat
//	asrbench splitter  fio through the agent's write-splitter vs nbdkit's file plugin
//	asrbench rpo       change-to-durable latency under a 20 MB/s random write load
//	asrbench points    the cost of a point at 5 s intervals
//	asrbench group     the write stall of a 4-machine group's cuts
//	asrbench pit       any-point-in-time recovery against cp --sparse=always
//	asrbench storage   stored bytes under steady churn with retention
//	asrbench resync    checksum-delta resync vs rsync --inplace --no-whole-file, and vs sha256sum
//	asrbench azure     upload path to Azurite vs a bare azblob upload; compression ratio
//	asrbench capacity  server memory with 1, 16 and 64 TiB of sparse protected disks
//	asrbench discovery vCenter inventory watch (100, 1,000, 5,000 simulated VMs) vs polling
//	asrbench failover  time to a usable test-failover NBD export, 1 GiB and 1 TiB sparse disks
//	asrbench scaleout  aggregate churn of 4 agents through one process server vs two (scaleout.go)
//	asrbench initial-peers, guest-write, churn: against the peers (issue 13, peers.go)
//
// It needs a built asr binary (-asr, default bin/asr) and the peers that
// `make peers` installs (zstd, fio, nbdkit, rsync, Azurite); discovery
// needs neither (govmomi's simulator runs in a child process). See
// BENCHMARKS.md.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/asrdr/asr/e2e/freeport"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
)

var (
	asrBin  = flag.String("asr", "bin/asr", "asr binary")
	workDir = flag.String("dir", "", "scratch directory (default: a new temporary directory)")
	sizeArg = flag.String("size", "2GiB", "disk size for the initial-replication benchmark")
	seconds = flag.Int("seconds", 20, "duration of each fio run")
	rateMB  = flag.Int("rate", 20, "write rate of the RPO benchmark, MB/s")
)

func main() {
	flag.Parse()
	if *simChild > 0 {
		if err := runSimChild(*simChild); err != nil {
			fail(err)
		}
		return
	}
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: asrbench [flags] initial|splitter|rpo|points|group|pit|storage|resync|azure|capacity|discovery|failover|initial-peers|guest-write|churn|scaleout")
		os.Exit(2)
	}
	abs, err := filepath.Abs(*asrBin)
	if err != nil {
		fail(err)
	}
	*asrBin = abs
	dir := *workDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "asrbench"); err != nil {
			fail(err)
		}
		defer os.RemoveAll(dir)
	}
	fmt.Printf("machine: %d cores, %s; %s\n", runtime.NumCPU(), cpuModel(), time.Now().UTC().Format(time.RFC3339))
	if order, ok := pageReportingOrder(pageReportingDir); ok {
		fmt.Printf("machine: free page reporting on (blocks of %d KiB freed go back to the hypervisor, and a fresh page-cache page then costs a fault there: BENCHMARKS.md, \"The bench machine's memory\")\n", 4<<order)
	}
	switch flag.Arg(0) {
	case "initial":
		err = benchInitial(dir)
	case "splitter":
		err = benchSplitter(dir)
	case "rpo":
		err = benchRPO(dir)
	case "points":
		err = benchPoints(dir)
	case "group":
		err = benchGroup(dir)
	case "pit":
		err = benchPIT(dir)
	case "storage":
		err = benchStorage(dir)
	case "resync":
		err = benchResync(dir)
	case "azure":
		err = benchAzure(dir)
	case "capacity":
		err = benchCapacity(dir)
	case "discovery":
		err = benchDiscovery(dir)
	case "failover":
		err = benchFailover(dir)
	case "scaleout":
		err = benchScaleOut(dir)
	case "initial-peers", "guest-write", "churn":
		err = benchPeers(flag.Arg(0), dir)
	default:
		err = fmt.Errorf("unknown benchmark %q", flag.Arg(0))
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "asrbench:", err)
	os.Exit(1)
}

// pageReportingDir holds the kernel's free page reporting parameters
// (page_reporting_order; reported_kib where the kernel counts them).
const pageReportingDir = "/sys/module/page_reporting/parameters"

// pageReportingOrder returns the order of the free blocks the guest hands
// back to its hypervisor, if it does.
func pageReportingOrder(dir string) (int, bool) {
	b, err := os.ReadFile(filepath.Join(dir, "page_reporting_order"))
	if err != nil {
		return 0, false
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || n < 0 || n > 20 {
		return 0, false
	}
	return n, true
}

// hostReportedKiB returns the KiB the guest has handed back to its
// hypervisor so far, where the kernel counts them.
func hostReportedKiB() (int64, bool) {
	return readKiB(filepath.Join(pageReportingDir, "reported_kib"))
}

func readKiB(path string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "model name") {
			if _, v, ok := strings.Cut(l, ":"); ok {
				return strings.TrimSpace(v)
			}
		}
	}
	return "unknown CPU"
}

// parseSize parses a size flag (replication.ParseSize); a bad one ends the run.
func parseSize(s string) int64 {
	n, err := replication.ParseSize(s)
	if err != nil {
		fail(err)
	}
	return n
}

// makeMixedDisk writes the benchmark disk: a third zeros, a third text-like,
// a third random, in 1 MiB stripes.
func makeMixedDisk(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	r := rand.New(rand.NewPCG(1, 2))
	cr := rand.NewChaCha8([32]byte{1})
	words := []string{"the ", "replica ", "of ", "disk ", "block ", "journal ", "recovery ", "point ", "site ", "and ", "\n", "2026-11-26 ", "INFO ", "vm-042 "}
	buf := make([]byte, 1<<20)
	for off, i := int64(0), 0; off < size; off, i = off+int64(len(buf)), i+1 {
		switch i % 3 {
		case 0:
			continue
		case 1:
			for j := 0; j < len(buf); {
				j += copy(buf[j:], words[r.IntN(len(words))])
			}
		case 2:
			cr.Read(buf)
		}
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
			return err
		}
	}
	return f.Sync()
}

// timeCmd runs a shell command and returns its wall time.
func timeCmd(script string) (time.Duration, error) {
	start := time.Now()
	cmd := exec.Command("sh", "-c", script)
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("%s: %w", script, err)
	}
	return time.Since(start), nil
}

// cluster is an asr server and one agent started as processes.
type cluster struct {
	bin              string // the asr binary of the server and the agents
	dir, srvDir, url string
	server, agent    *exec.Cmd
	extra            []*exec.Cmd // every agent started
	sock             string
	ctl              *api.Client // the control API, as the operator CLI uses it
}

// freePort is a port for a server the bench starts as its own process
// (e2e/freeport: below the kernel's ephemeral range, so that no other
// process's connection takes it before the server binds it).
func freePort() string {
	p, err := freeport.Port()
	if err != nil {
		fail(err)
	}
	return p
}

func startCluster(dir string, disks map[string]string, agentArgs ...string) (*cluster, error) {
	c, err := startServer(dir)
	if err != nil {
		return nil, err
	}
	if c.agent, err = c.addAgent("bench", c.sock, disks, agentArgs...); err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

// protectedMixedDisk makes a mixed disk of size bytes at dir/disk.img,
// starts a server and an agent for it, and waits until it is protected.
// The caller stops the cluster.
func protectedMixedDisk(dir string, size int64, timeout time.Duration) (*cluster, string, error) {
	disk := filepath.Join(dir, "disk.img")
	if err := makeMixedDisk(disk, size); err != nil {
		return nil, "", err
	}
	c, err := startCluster(dir, map[string]string{"d0": disk})
	if err != nil {
		return nil, "", err
	}
	if err := c.waitMachine("bench", timeout); err != nil {
		c.stop()
		return nil, "", err
	}
	return c, disk, nil
}

// startServer starts an asr server in dir/srv and waits for its API.
func startServer(dir string, extra ...string) (*cluster, error) {
	return startServerBin(*asrBin, dir, extra...)
}

// startServerBin is startServer with the asr binary bin, which the
// cluster's agents run too.
func startServerBin(bin, dir string, extra ...string) (*cluster, error) {
	c := &cluster{bin: bin, dir: dir, srvDir: filepath.Join(dir, "srv"), sock: filepath.Join(dir, "nbd.sock")}
	listen := "127.0.0.1:" + freePort()
	c.url = "https://" + listen
	c.server = exec.Command(bin, append([]string{"server", "--data", c.srvDir, "--listen", listen, "--data-listen", "127.0.0.1:" + freePort()}, extra...)...)
	logf, _ := os.Create(filepath.Join(dir, "server.log"))
	c.server.Stdout, c.server.Stderr = logf, logf
	if err := c.server.Start(); err != nil {
		return nil, err
	}
	c.ctl = &api.Client{URL: c.url, HTTP: &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}}
	for i := 0; ; i++ {
		if tok, err := os.ReadFile(filepath.Join(c.srvDir, "admin-token")); err == nil {
			c.ctl.Token = strings.TrimSpace(string(tok))
			if _, err := c.machines(); err == nil {
				break
			}
		}
		if i > 300 {
			c.stop()
			return nil, errors.New("server did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c, nil
}

// addAgent starts an agent named name serving its disks on sock.
func (c *cluster) addAgent(name, sock string, disks map[string]string, agentArgs ...string) (*exec.Cmd, error) {
	args := []string{"agent", "--server", c.url, "--passphrase-file", filepath.Join(c.srvDir, "passphrase"),
		"--state", filepath.Join(c.dir, "agent-"+name), "--name", name, "--nbd", "unix:" + sock}
	for dn, path := range disks {
		args = append(args, "--disk", dn+"="+path)
	}
	a := exec.Command(c.bin, append(args, agentArgs...)...)
	alog, _ := os.Create(filepath.Join(c.dir, "agent-"+name+".log"))
	a.Stdout, a.Stderr = alog, alog
	if err := a.Start(); err != nil {
		return nil, err
	}
	c.extra = append(c.extra, a)
	return a, nil
}

func (c *cluster) machines() ([]api.Machine, error) {
	var ms []api.Machine
	return ms, c.ctl.Do(context.Background(), http.MethodGet, "/api/v1/machines", nil, &ms)
}

func (c *cluster) waitProtected(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if ms, err := c.machines(); err == nil && len(ms) == 1 && ms[0].State == api.StateProtected {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return errors.New("not protected in time; see " + c.dir)
}

func (c *cluster) waitSocket() error {
	for i := 0; i < 600; i++ {
		if conn, err := net.Dial("unix", c.sock); err == nil {
			conn.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New("agent NBD socket did not appear")
}

func (c *cluster) stop() {
	for _, p := range append(c.extra, c.server) {
		if p != nil && p.Process != nil {
			p.Process.Signal(syscall.SIGTERM)
			p.Wait()
		}
	}
}

// diskWritten returns the bytes written to all block devices so far.
func diskWritten() int64 {
	b, _ := os.ReadFile("/proc/diskstats")
	var total int64
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		// Whole disks only (vda, sda, nvme0n1), not partitions.
		if len(f) < 10 || strings.HasPrefix(f[2], "loop") || strings.HasPrefix(f[2], "ram") {
			continue
		}
		name := f[2]
		if last := name[len(name)-1]; last >= '0' && last <= '9' && !strings.HasPrefix(name, "nvme") {
			continue
		}
		sectors, _ := strconv.ParseInt(f[9], 10, 64)
		total += sectors * 512
	}
	return total
}

// rssKiB returns a process's current and peak resident set (VmRSS, VmHWM).
func rssKiB(p *exec.Cmd) (cur, peak int64) {
	m := procStatus(p)
	return m["VmRSS:"], m["VmHWM:"]
}

// procStatus returns the KiB figures of a process's /proc/PID/status.
func procStatus(p *exec.Cmd) map[string]int64 {
	m := map[string]int64{}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Process.Pid))
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			m[f[0]] = v
		}
	}
	return m
}

// resetPeakRSS starts a process's VmHWM again from its current RSS
// (clear_refs 5), so that a peak read later is the peak of what follows.
func resetPeakRSS(p *exec.Cmd) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", p.Process.Pid), []byte("5"), 0)
}

func benchInitial(dir string) error {
	size := parseSize(*sizeArg)
	disk := filepath.Join(dir, "disk.img")
	fmt.Printf("initial replication of a %s disk (1/3 zero, 1/3 text-like, 1/3 random) to the local target\n", *sizeArg)
	if err := makeMixedDisk(disk, size); err != nil {
		return err
	}
	// Warm the page cache so every contender reads from memory.
	if _, err := timeCmd("cat " + disk + " > /dev/null"); err != nil {
		return err
	}
	catT, err := timeCmd("cat " + disk + " > /dev/null")
	if err != nil {
		return err
	}
	zstdT, err := timeCmd("zstd -1 -T0 -c " + disk + " > /dev/null")
	if err != nil {
		return err
	}
	exec.Command("sync").Run()
	written0 := diskWritten()
	start := time.Now()
	c, err := startCluster(dir, map[string]string{"d0": disk})
	if err != nil {
		return err
	}
	defer c.stop()
	if err := c.waitProtected(10 * time.Minute); err != nil {
		return err
	}
	asrT := time.Since(start)
	written := diskWritten() - written0
	_, agentPeak := rssKiB(c.agent)
	_, srvPeak := rssKiB(c.server)
	target, _ := exec.Command("du", "-sk", filepath.Join(c.srvDir, "target")).Output()
	mb := float64(size) / 1e6
	fmt.Printf("\n%-34s %9s %10s %14s\n", "contender", "seconds", "MB/s", "vs zstd -1 -T0")
	for _, r := range []struct {
		name string
		d    time.Duration
	}{{"cat > /dev/null", catT}, {"zstd -1 -T0 > /dev/null", zstdT}, {"asr initial replication", asrT}} {
		fmt.Printf("%-34s %9.2f %10.0f %13.2fx\n", r.name, r.d.Seconds(), mb/r.d.Seconds(), zstdT.Seconds()/r.d.Seconds())
	}
	fmt.Printf("\nasr: agent peak RSS %d MiB, server peak RSS %d MiB; target holds %s",
		agentPeak>>10, srvPeak>>10, strings.Fields(string(target))[0]+" KiB\n")
	fmt.Printf("asr wrote %.2f GB to the block devices meanwhile (cache fsync'd before each ack, replica fsync'd before each checkpoint)\n", float64(written)/1e9)
	fmt.Println("(asr time: from starting the server and agent processes until the server reports the disk protected: every block durable and applied to the replica)")
	return nil
}

// fioResult runs fio and returns IOPS and MB/s of the write job.
func fioResult(args ...string) (iops, mbps float64, err error) {
	cmd := exec.Command("fio", append(append([]string{"--thread"}, args...), "--output-format=json")...)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return 0, 0, fmt.Errorf("fio %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOPS  float64 `json:"iops"`
				BWKiB float64 `json:"bw"`
			} `json:"write"`
		} `json:"jobs"`
	}
	if i := strings.Index(string(out), "{"); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal(out, &res); err != nil || len(res.Jobs) == 0 {
		return 0, 0, fmt.Errorf("fio output: %v", err)
	}
	if res.Jobs[0].Error != 0 {
		return 0, 0, fmt.Errorf("fio job error %d", res.Jobs[0].Error)
	}
	return res.Jobs[0].Write.IOPS, res.Jobs[0].Write.BWKiB * 1024 / 1e6, nil
}

func fioArgs(uri, rw, bs string, depth int) []string {
	return []string{"--name=bench", "--ioengine=nbd", "--uri=" + uri, "--rw=" + rw, "--bs=" + bs,
		"--iodepth=" + strconv.Itoa(depth), "--size=1G", "--time_based", "--runtime=" + strconv.Itoa(*seconds),
		"--randrepeat=0", "--refill_buffers", "--norandommap"}
}

// dropCaches writes back and drops the page cache (as root), so contenders
// start from the same state; it reports whether it could.
func dropCaches() bool {
	exec.Command("sync").Run()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0) == nil
}

func sparseFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Truncate(size)
}

func benchSplitter(dir string) error {
	// Each contender gets its own fresh sparse file and a dropped page cache.
	kitDisk, asrDisk := filepath.Join(dir, "nbdkit.img"), filepath.Join(dir, "asr.img")
	if err := sparseFile(kitDisk, 1<<30); err != nil {
		return err
	}
	if err := sparseFile(asrDisk, 1<<30); err != nil {
		return err
	}
	dropped := dropCaches()
	type row struct {
		name       string
		iops, mbps float64
	}
	cases := []struct{ rw, bs string }{{"randwrite", "4k"}, {"write", "1M"}}
	var rows []row
	// nbdkit's file plugin serving the same file.
	nsock := filepath.Join(dir, "nbdkit.sock")
	nbdkit := exec.Command("nbdkit", "--foreground", "--unix", nsock, "file", kitDisk)
	if err := nbdkit.Start(); err != nil {
		return fmt.Errorf("nbdkit: %w", err)
	}
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(nsock); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	var kit []row
	for _, cs := range cases {
		iops, mbps, err := fioResult(fioArgs("nbd+unix:///?socket="+nsock, cs.rw, cs.bs, 8)...)
		if err != nil {
			nbdkit.Process.Kill()
			return err
		}
		kit = append(kit, row{"nbdkit file " + cs.rw + " " + cs.bs, iops, mbps})
	}
	nbdkit.Process.Signal(syscall.SIGTERM)
	nbdkit.Wait()
	dropped = dropCaches() && dropped
	c, err := startCluster(dir, map[string]string{"d0": asrDisk})
	if err != nil {
		return err
	}
	defer c.stop()
	if err := c.waitSocket(); err != nil {
		return err
	}
	if err := c.waitProtected(5 * time.Minute); err != nil {
		return err
	}
	fmt.Printf("write-splitter: fio (nbd engine, iodepth 8, %d s each) on a fresh sparse 1 GiB file each, replication running; page cache dropped before each: %v\n\n", *seconds, dropped)
	fmt.Printf("%-30s %12s %10s %12s\n", "contender", "IOPS", "MB/s", "vs nbdkit")
	for i, cs := range cases {
		iops, mbps, err := fioResult(fioArgs("nbd+unix:///d0?socket="+c.sock, cs.rw, cs.bs, 8)...)
		if err != nil {
			return err
		}
		rows = append(rows, kit[i], row{"asr agent " + cs.rw + " " + cs.bs, iops, mbps})
	}
	for i, r := range rows {
		ratio := ""
		if i%2 == 1 {
			ratio = fmt.Sprintf("%11.2fx", r.iops/rows[i-1].iops)
		}
		fmt.Printf("%-30s %12.0f %10.1f %12s\n", r.name, r.iops, r.mbps, ratio)
	}
	return nil
}

func benchRPO(dir string) error {
	disk := filepath.Join(dir, "disk.img")
	f, err := os.Create(disk)
	if err != nil {
		return err
	}
	f.Truncate(4 << 30)
	f.Close()
	c, err := startCluster(dir, map[string]string{"d0": disk})
	if err != nil {
		return err
	}
	defer c.stop()
	if err := c.waitSocket(); err != nil {
		return err
	}
	if err := c.waitProtected(5 * time.Minute); err != nil {
		return err
	}
	// Sample RSS during the run.
	ctx, cancel := context.WithCancel(context.Background())
	var agentMax, srvMax int64
	var rpoMax time.Duration
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				a, _ := rssKiB(c.agent)
				s, _ := rssKiB(c.server)
				agentMax, srvMax = max(agentMax, a), max(srvMax, s)
				if ms, err := c.machines(); err == nil && len(ms) == 1 {
					rpoMax = max(rpoMax, time.Duration(ms[0].RPO))
				}
			}
		}
	}()
	args := []string{"--name=rpo", "--ioengine=nbd", "--uri=nbd+unix:///d0?socket=" + c.sock, "--rw=randwrite",
		"--bsrange=4k-64k", "--iodepth=4", "--size=4G", "--time_based", "--runtime=" + strconv.Itoa(*seconds*3),
		"--rate=" + strconv.Itoa(*rateMB) + "m", "--refill_buffers", "--norandommap", "--randrepeat=0"}
	_, mbps, err := fioResult(args...)
	cancel()
	<-done
	if err != nil {
		return err
	}
	time.Sleep(2 * time.Second) // last acknowledgements
	b, err := os.ReadFile(filepath.Join(c.dir, "agent-bench", "stats.json"))
	if err != nil {
		return err
	}
	var st struct {
		Latency struct {
			Count uint64  `json:"count"`
			P50   float64 `json:"p50_ms"`
			P99   float64 `json:"p99_ms"`
			Max   float64 `json:"max_ms"`
		} `json:"ack_latency"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return err
	}
	fmt.Printf("RPO: fio random writes (4-64 KiB) at %d MB/s for %d s through the agent (measured %.1f MB/s)\n\n", *rateMB, *seconds*3, mbps)
	fmt.Printf("%-44s %10s\n", "figure", "value")
	fmt.Printf("%-44s %10d\n", "changes measured", st.Latency.Count)
	fmt.Printf("%-44s %8.0f ms\n", "p50 NBD reply -> durable on the server", st.Latency.P50)
	fmt.Printf("%-44s %8.0f ms\n", "p99 NBD reply -> durable on the server", st.Latency.P99)
	fmt.Printf("%-44s %8.0f ms\n", "max NBD reply -> durable on the server", st.Latency.Max)
	fmt.Printf("%-44s %8.1f s\n", "max RPO shown by the server (sampled)", rpoMax.Seconds())
	fmt.Printf("%-44s %7d MiB\n", "agent RSS (max sampled)", agentMax>>10)
	fmt.Printf("%-44s %7d MiB\n", "server RSS (max sampled)", srvMax>>10)
	return nil
}
