package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server/api"
)

// scaleOutAgents is how many agents write at once in `asrbench scaleout`.
const scaleOutAgents = 4

// benchScaleOut measures aggregate churn through one process server (the
// configuration server's built-in one) against two (the built-in one and
// one scale-out `asr process-server`, the machines split 2 and 2), side by
// side in one run, alternating 1, 2, 2, 1. Each round is a fresh cluster:
// four agents on sparse 1 GiB disks, fio random writes (4-64 KiB,
// incompressible) on all four at once, each at -rate MiB/s (default 20,
// ASR's per-disk churn limit; unlimited, the agents' spools overflow into
// their changed-block maps, resynced later, and the churn measured here
// would be short of what fio wrote) for -seconds, then the wait until
// every change is acknowledged and applied. Per process server: the record
// bytes it received and applied over that time (fio's start to every
// backlog at zero), its process's CPU-seconds over the same time
// (/proc/PID/stat) per GB, the cache's bytes per GB (wire/raw: what the
// cache holds of each GB of churn), the largest backlog seen, and its
// agents' p99 acknowledgement latency (NBD reply to durable on the
// process server: the RPO of a change).
func benchScaleOut(dir string) error {
	fmt.Printf("scale-out: %d agents, fio randwrite 4-64 KiB iodepth 4 at %d MiB/s (-rate) for %d s (-seconds) on each at once (incompressible); one process server vs two\n",
		scaleOutAgents, *rateMB, *seconds)
	fmt.Println("(every process on the same cores: a second process server gets no core of its own here; the figures are for the record)")
	fmt.Printf("\n%-6s %-4s %-8s %4s %9s %9s %8s %9s %9s %10s %9s\n", "round", "PSs", "PS", "VMs", "GB", "MB/s", "CPU-s", "CPU-s/GB", "cache/GB", "max backlog", "RPO p99")
	totals := map[int][]float64{}
	var cpuPerGB []float64
	var cacheRatio []float64
	for i, n := range []int{1, 2, 2, 1} {
		r, err := scaleOutRound(filepath.Join(dir, fmt.Sprintf("round%d", i+1)), n)
		if err != nil {
			return fmt.Errorf("round %d (%d process servers): %w", i+1, n, err)
		}
		var bytes float64
		for _, p := range r.ps {
			gb := float64(p.raw) / 1e9
			fmt.Printf("%-6d %-4d %-8s %4d %9.2f %9.1f %8.1f %9.1f %9.2f %7.0f MB %6.0f ms\n", i+1, n, p.name, p.machines, gb,
				float64(p.raw)/1e6/r.window.Seconds(), p.cpu, p.cpu/gb, float64(p.wire)/float64(p.raw), float64(p.maxBacklog)/1e6, p.p99)
			bytes += float64(p.raw)
			cpuPerGB = append(cpuPerGB, p.cpu/gb)
			cacheRatio = append(cacheRatio, float64(p.wire)/float64(p.raw))
		}
		total := bytes / 1e6 / r.window.Seconds()
		totals[n] = append(totals[n], total)
		fmt.Printf("%-6d %-4d %-8s %4d %9.2f %9.1f %8s %9s %9s %10s %6.0f ms   (%.1f s from fio's start to every change applied; fio wrote %.2f GB)\n",
			i+1, n, "total", scaleOutAgents, bytes/1e9, total, "", "", "", "", r.p99, r.window.Seconds(), r.fioMBps*float64(*seconds)/1e3)
		if bytes < r.fioMBps*float64(*seconds)*1e6*0.95 {
			fmt.Printf("       (applied less than fio wrote: an agent's spool overflowed into its changed-block map; lower -rate)\n")
		}
	}
	one, two := mean(totals[1]), mean(totals[2])
	fmt.Printf("\naggregate applied: one process server %.1f MB/s, two %.1f MB/s: %.2fx (mean of 2 rounds each)\n", one, two, two/one)
	c := mean(cpuPerGB)
	fmt.Printf("CPU-seconds per GB of churn on a process server (mean of every row): %.1f -> %.0f GB/day per core busy with it (86400 / that)\n", c, 86400/c)
	fmt.Printf("cache bytes per byte of churn (wire/raw, incompressible writes): %.2f\n", mean(cacheRatio))
	return nil
}

func mean(v []float64) float64 {
	var s float64
	for _, x := range v {
		s += x
	}
	return s / float64(max(len(v), 1))
}

// psFigures are one process server's figures over a round.
type psFigures struct {
	name              string
	machines          int
	raw, wire         int64   // record bytes received, and as they came over the wire
	cpu               float64 // CPU-seconds of its process
	maxBacklog        int64
	p99               float64   // its agents' largest p99 acknowledgement latency, ms
	proc              *exec.Cmd // its process
	raw0, wire0, cpu0 float64
}

type scaleOutResult struct {
	ps      []*psFigures
	window  time.Duration // fio's start to every change applied
	p99     float64       // the largest p99 of every agent, ms
	fioMBps float64       // what fio wrote, all agents
}

// scaleOutRound runs one round with n process servers (1: the built-in
// one; 2: the built-in one and ps1, which gets the second half of the
// machines).
func scaleOutRound(dir string, n int) (*scaleOutResult, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir) // after the cluster stops: a round keeps GBs of replicas and segments
	// Heartbeats every second (a third of the lost interval): the
	// scale-out one's figures are at most a second old.
	c, err := startServer(dir, "--ps-heartbeat-lost", "3s", "--nbd-listen", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer c.stop()
	ctx := context.Background()
	names := make([]string, scaleOutAgents)
	for i := range names {
		names[i] = fmt.Sprintf("vm%d", i+1)
		disk := filepath.Join(dir, names[i]+".img")
		if err := sparseFile(disk, 1<<30); err != nil {
			return nil, err
		}
		if _, err := c.addAgent(names[i], filepath.Join(dir, names[i]+".sock"), map[string]string{"d0": disk}); err != nil {
			return nil, err
		}
	}
	if err := c.waitAll(func(ms []api.Machine) bool {
		ok := len(ms) == scaleOutAgents
		for _, m := range ms {
			ok = ok && m.State == api.StateProtected
		}
		return ok
	}, 5*time.Minute); err != nil {
		return nil, err
	}
	res := &scaleOutResult{ps: []*psFigures{{name: api.BuiltinProcessServer, machines: scaleOutAgents, proc: c.server}}}
	of := map[string]*psFigures{} // machine -> its process server
	for _, m := range names {
		of[m] = res.ps[0]
	}
	if n == 2 {
		ps := exec.Command(*asrBin, "process-server", "--config", c.url, "--passphrase-file", filepath.Join(c.srvDir, "passphrase"),
			"--data", filepath.Join(dir, "ps1"), "--data-listen", "127.0.0.1:0", "--name", "ps1")
		logf, _ := os.Create(filepath.Join(dir, "ps1.log"))
		ps.Stdout, ps.Stderr = logf, logf
		if err := ps.Start(); err != nil {
			return nil, err
		}
		c.extra = append([]*exec.Cmd{ps}, c.extra...) // stopped first
		if _, err := c.waitPSs(func(l map[string]api.ProcessServerInfo) bool { return l["ps1"].State == api.PSHealthy }, time.Minute); err != nil {
			return nil, err
		}
		p1 := &psFigures{name: "ps1", proc: ps}
		res.ps = append(res.ps, p1)
		for _, m := range names[scaleOutAgents/2:] {
			if _, err := c.ctl.SwitchProcessServer(ctx, m, "ps1"); err != nil {
				return nil, err
			}
			of[m] = p1
			p1.machines++
			res.ps[0].machines--
		}
	}
	for _, m := range names {
		if err := waitSock(filepath.Join(dir, m+".sock")); err != nil {
			return nil, err
		}
	}
	// Nothing in flight: the figures to start from are a heartbeat's
	// taken after now.
	since := time.Now()
	l, err := c.waitPSs(func(l map[string]api.ProcessServerInfo) bool {
		for _, p := range res.ps {
			if f := l[p.name]; !f.LastHeartbeat.After(since) || f.Figures.BacklogBytes != 0 {
				return false
			}
		}
		return true
	}, time.Minute)
	if err != nil {
		return nil, err
	}
	for _, p := range res.ps {
		f := l[p.name].Figures
		p.raw0, p.wire0, p.cpu0 = float64(f.RawBytes), float64(f.WireBytes), cpuSeconds(p.proc)
	}

	// fio on every machine at once; the backlogs sampled meanwhile.
	start := time.Now()
	stopSampling := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Go(func() {
		for {
			select {
			case <-stopSampling:
				return
			case <-time.After(500 * time.Millisecond):
			}
			if l, err := c.psInfos(); err == nil {
				for _, p := range res.ps {
					p.maxBacklog = max(p.maxBacklog, l[p.name].Figures.BacklogBytes)
				}
			}
		}
	})
	var wg sync.WaitGroup
	mbps := make([]float64, len(names))
	errs := make([]error, len(names))
	for i, m := range names {
		wg.Go(func() {
			_, mbps[i], errs[i] = fioResult("--name="+m, "--ioengine=nbd", "--uri=nbd+unix:///d0?socket="+filepath.Join(dir, m+".sock"),
				"--rw=randwrite", "--bsrange=4k-64k", "--iodepth=4", "--size=1G", "--time_based", "--runtime="+strconv.Itoa(*seconds),
				"--rate="+strconv.Itoa(*rateMB)+"m", "--refill_buffers", "--norandommap", "--randrepeat=0")
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		close(stopSampling)
		sampler.Wait()
		return nil, err
	}
	for _, v := range mbps {
		res.fioMBps += v
	}
	// Every change acknowledged by its process server...
	stats := map[string]agent.Stats{}
	for _, m := range names {
		st, err := waitAgentStats(filepath.Join(dir, "agent-"+m), func(st agent.Stats) bool { return st.NextSeq > 0 && st.Acked+1 >= st.NextSeq })
		if err != nil {
			close(stopSampling)
			sampler.Wait()
			return nil, fmt.Errorf("%s: %w", m, err)
		}
		stats[m] = st
	}
	// ... and applied: a heartbeat after that with no backlog.
	acked := time.Now()
	l, err = c.waitPSs(func(l map[string]api.ProcessServerInfo) bool {
		for _, p := range res.ps {
			if f := l[p.name]; !f.LastHeartbeat.After(acked) || f.Figures.BacklogBytes != 0 {
				return false
			}
		}
		return true
	}, 10*time.Minute)
	res.window = time.Since(start)
	close(stopSampling)
	sampler.Wait()
	if err != nil {
		return nil, err
	}
	for _, p := range res.ps {
		f := l[p.name].Figures
		p.raw, p.wire, p.cpu = f.RawBytes-int64(p.raw0), f.WireBytes-int64(p.wire0), cpuSeconds(p.proc)-p.cpu0
	}
	for m, st := range stats {
		of[m].p99 = max(of[m].p99, st.Latency.P99Ms)
		res.p99 = max(res.p99, st.Latency.P99Ms)
	}
	return res, nil
}

// waitAll waits until the machines' listing satisfies ok.
func (c *cluster) waitAll(ok func([]api.Machine) bool, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if ms, err := c.machines(); err == nil && ok(ms) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("the machines never reached the state waited for; see " + c.dir)
}

// psInfos is the process servers' listing (asr ps list), by name.
func (c *cluster) psInfos() (map[string]api.ProcessServerInfo, error) {
	l, err := c.ctl.ProcessServers(context.Background())
	if err != nil {
		return nil, err
	}
	m := make(map[string]api.ProcessServerInfo, len(l))
	for _, p := range l {
		m[p.Name] = p
	}
	return m, nil
}

// waitPSs waits until the process servers' listing satisfies ok.
func (c *cluster) waitPSs(ok func(map[string]api.ProcessServerInfo) bool, timeout time.Duration) (map[string]api.ProcessServerInfo, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if l, err := c.psInfos(); err == nil && ok(l) {
			return l, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil, errors.New("the process servers never reached the state waited for; see " + c.dir)
}

// waitAgentStats waits until an agent's stats.json satisfies ok.
func waitAgentStats(state string, ok func(agent.Stats) bool) (agent.Stats, error) {
	var st agent.Stats
	deadline := time.Now().Add(10 * time.Minute)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(filepath.Join(state, "stats.json")); err == nil && json.Unmarshal(b, &st) == nil && ok(st) {
			return st, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return st, fmt.Errorf("agent figures %+v never reached the state waited for", st)
}

func waitSock(path string) error {
	c := &cluster{sock: path}
	return c.waitSocket()
}
