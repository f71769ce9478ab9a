package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/vmware"
)

var (
	discoveryVMs = flag.String("vms", "100,1000,5000", "discovery benchmark: inventory sizes (VMs), one run each")
	discChanges  = flag.String("changes", "50,20,2", "discovery benchmark: renames and power-offs timed per inventory, one per -vms size (the last repeats)")
	discPolls    = flag.Int("polls", 5, "discovery benchmark: full retrieves timed per inventory")
	simChild     = flag.Int("sim-child", 0, "internal: serve a vCenter simulator with this many VMs (the discovery benchmark's child process)")
)

// changeTimeout bounds the wait for the watcher to show one change: the
// simulator collects its whole view again for every update it sends.
const changeTimeout = 20 * time.Minute

const (
	simUser     = "bench"
	simPassword = "bench-Passw0rd"
)

// simInfo is what the simulator child reports on its first stdout line.
type simInfo struct {
	URL, Thumbprint          string
	VMs, Hosts, Clusters     int
	Objects                  int
	BuildSeconds, HeapMiB    float64
	ClusterHosts, PerCluster int
}

// simModel is the simulator's inventory for n VMs: one data center with
// clusters of 8 hosts and 250 VMs each (one cluster below 250 VMs), no
// standalone host, one shared datastore and one portgroup. The model
// places Machine VMs in each cluster's root pool.
func simModel(n int) *simulator.Model {
	m := simulator.VPX()
	clusters := max(1, n/250)
	m.Host = 0
	m.Cluster = clusters
	m.ClusterHost = 8
	m.Machine = n / clusters
	return m
}

// runSimChild serves a simulator with n VMs over TLS on 127.0.0.1 until
// its stdin closes. It runs in its own process so that the benchmark's
// heap figures hold the watcher alone.
func runSimChild(n int) error {
	start := time.Now()
	m := simModel(n)
	if err := m.Create(); err != nil {
		return err
	}
	took := time.Since(start)
	cnt := m.Count()
	if cnt.Machine != n {
		return fmt.Errorf("the simulator made %d VMs, want %d", cnt.Machine, n)
	}
	m.Service.TLS = new(tls.Config) // the simulator's own localhost certificate
	m.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(simUser, simPassword)}
	srv := m.Service.NewServer() // not closed: the process ends with it (a Close waits for the watcher's wait)
	sum := sha256.Sum256(srv.Certificate().Raw)
	u := *srv.URL
	u.User = nil
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	info := simInfo{URL: u.String(), Thumbprint: fmt.Sprintf("%X", sum[:]), VMs: cnt.Machine, Hosts: cnt.Host,
		Clusters: cnt.Cluster, Objects: cnt.Datacenter + cnt.Portgroup + cnt.Cluster + cnt.Datastore + cnt.Host + cnt.Machine + cnt.Pool + cnt.App + cnt.Folder, BuildSeconds: took.Seconds(), HeapMiB: float64(ms.HeapAlloc) / (1 << 20),
		ClusterHosts: m.ClusterHost, PerCluster: m.Machine}
	b, _ := json.Marshal(info)
	fmt.Println(string(b))
	io.Copy(io.Discard, os.Stdin) // until the parent closes it
	m.Remove()
	os.Exit(0)
	return nil
}

// benchDiscovery compares the watcher (vmware.Watch: one ContainerView,
// WaitForUpdatesEx) with polling (a full RetrievePropertiesEx of the same
// properties) on simulated inventories of -vms sizes.
func benchDiscovery(string) error {
	var sizes, changes []int
	for _, f := range strings.Split(*discChanges, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("-changes %q", *discChanges)
		}
		changes = append(changes, n)
	}
	for i, f := range strings.Split(*discoveryVMs, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		c := changes[min(i, len(changes)-1)]
		if err != nil || n < c {
			return fmt.Errorf("-vms %q: sizes of at least their -changes (%d)", *discoveryVMs, c)
		}
		sizes = append(sizes, n)
	}
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("vCenter discovery: govmomi simulator (VPX model, clusters of 8 hosts and up to 250 VMs) in a child process over TLS; load %s\n",
		strings.Join(strings.Fields(string(load))[:3], " "))
	var rows []discRow
	for i, n := range sizes {
		r, err := discoveryRun(n, changes[min(i, len(changes)-1)])
		if err != nil {
			printDiscovery(rows)
			return fmt.Errorf("%d VMs: %w", n, err)
		}
		rows = append(rows, r)
	}
	printDiscovery(rows)
	return nil
}

func printDiscovery(rows []discRow) {
	if len(rows) == 0 {
		return
	}

	fmt.Printf("\nwatcher (vmware.Watch)\n%6s %8s %6s %9s %9s %10s %10s %8s %8s %16s %16s %10s %10s %14s %6s\n", "VMs", "objects", "hosts",
		"sim build", "sim RSS", "initial", "heap", "heap/VM", "changes", "rename p50/p99", "power-off p50/p99", "call p50", "CPU/change", "sim CPU/change", "drops")
	for _, r := range rows {
		fmt.Printf("%6d %8d %6d %8.1fs %5.0f MiB %9.2fs %6.1f MiB %6.1f KiB %8d %7.0f/%4.0f ms %7.0f/%4.0f ms %7.0f ms %7.0f ms %10.0f ms %6d\n",
			r.vms, r.sim.Objects, r.sim.Hosts, r.sim.BuildSeconds, r.simRSS, r.initial.Seconds(), r.heap/(1<<20), r.heap/float64(r.vms)/1024, r.changes,
			ms(pct(r.rename, 50)), ms(pct(r.rename, 99)), ms(pct(r.powerOff, 50)), ms(pct(r.powerOff, 99)), ms(pct(r.calls, 50)), ms(r.cpu), ms(r.simCPU), r.drops)
	}
	fmt.Printf("\npolling (full RetrievePropertiesEx of the same properties over a ContainerView)\n%6s %16s %13s %11s %16s %16s %12s %12s\n", "VMs",
		"retrieve median", "(min-max)", "response", "latency @10s", "latency @60s", "@10s/watcher", "MB/h @10s")
	for _, r := range rows {
		med := pct(r.polls, 50)
		l10 := 5*time.Second + med
		l60 := 30*time.Second + med
		fmt.Printf("%6d %13.0f ms %5.0f-%5.0f ms %7.2f MB %13.2f s %13.2f s %11.2fx %11.0f\n", r.vms, ms(med), ms(slices.Min(r.polls)), ms(slices.Max(r.polls)),
			float64(r.pollBytes)/1e6, l10.Seconds(), l60.Seconds(), float64(l10)/float64(pct(r.rename, 50)), float64(r.pollBytes)*360/1e6)
	}
	fmt.Println(`
initial: from Watch to the first complete VM list. heap: runtime.MemStats.HeapAlloc of this
process after a GC, less the same before Watch (the simulator runs in another process; its RSS
is "sim RSS"). rename, power-off: from the start of the call (second session, Rename_Task /
PowerOffVM_Task) to the watcher's Updated() showing the new name or state; "call" is the
call's own round trip, task wait included. latency @Ns: a poller's mean delay, N/2 + one
retrieve; @10s/watcher divides it by the rename p50. response: SOAP body bytes of one retrieve.
CPU/change: this process's CPU time (watcher, second client, waiting) per rename or power-off;
sim CPU/change: the simulator child's. drops: watcher sessions lost (then read again whole).`)
}

type discRow struct {
	vms, changes            int
	sim                     simInfo
	simRSS                  float64 // MiB
	initial                 time.Duration
	heap                    float64 // bytes
	rename, powerOff, calls []time.Duration
	polls                   []time.Duration
	pollBytes               int64
	cpu, simCPU             time.Duration // per change: this process's, the simulator's
	drops                   int64         // watcher sessions lost during the changes
}

// cpuTime is a process's user and system CPU time so far (/proc/PID/stat).
func cpuTime(pid int) time.Duration {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 {
		s = s[i+1:]
	}
	f := strings.Fields(s)
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // fields 14 and 15 of stat, in clock ticks (100/s)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

func discoveryRun(n, changes int) (discRow, error) {
	row := discRow{vms: n, changes: changes}
	exe, err := os.Executable()
	if err != nil {
		return row, err
	}
	child := exec.Command(exe, "-sim-child", strconv.Itoa(n))
	child.Stderr = os.Stderr
	stdin, err := child.StdinPipe()
	if err != nil {
		return row, err
	}
	stdout, err := child.StdoutPipe()
	if err != nil {
		return row, err
	}
	if err := child.Start(); err != nil {
		return row, err
	}
	defer func() {
		stdin.Close() // the child exits at EOF
		child.Wait()
	}()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		return row, fmt.Errorf("simulator child: %w", err)
	}
	if err := json.Unmarshal([]byte(line), &row.sim); err != nil {
		return row, fmt.Errorf("simulator child: %w", err)
	}
	cur, _ := rssKiB(child)
	row.simRSS = float64(cur) / 1024
	fmt.Printf("%d VMs: simulator with %d objects (%d clusters of %d hosts, %d VMs each) built in %.1f s\n",
		n, row.sim.Objects, row.sim.Clusters, row.sim.ClusterHosts, row.sim.PerCluster, row.sim.BuildSeconds)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	ep := vmware.Endpoint{Name: "bench", URL: row.sim.URL, User: simUser, Password: simPassword, Thumbprint: row.sim.Thumbprint}

	before := liveHeap()
	start := time.Now()
	var drops atomic.Int64 // sessions lost after the first connection
	w := vmware.Watch(ctx, ep, vmware.WatchOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnStatus: func(st vmware.Status) {
			if !st.Connected && st.LastError != "" {
				drops.Add(1)
				fmt.Fprintf(os.Stderr, "%d VMs: watcher disconnected: %s\n", n, st.LastError)
			}
		}})
	defer w.Close()
	vms, err := waitWatcher(w, 10*time.Minute, func(vms []vmware.VM) bool { return len(vms) == n })
	if err != nil {
		return row, fmt.Errorf("initial discovery: %w (status %+v)", err, w.Status())
	}
	row.initial = time.Since(start)
	vms = nil
	row.heap = float64(liveHeap()) - float64(before)
	vms = w.VMs()

	// The second client, as an operator's or another tool's session.
	c, err := vmware.Connect(ctx, ep)
	if err != nil {
		return row, err
	}
	defer c.Logout(context.Background())
	counter := &countingTransport{base: c.Client.Client.Transport}
	c.Client.Client.Transport = counter

	step := n / changes
	cpu0, simCPU0 := cpuTime(os.Getpid()), cpuTime(child.Process.Pid)
	for i := 0; i < changes; i++ {
		v := vms[i*step]
		vm := object.NewVirtualMachine(c.Client, types.ManagedObjectReference{Type: "VirtualMachine", Value: v.Ref})
		name := fmt.Sprintf("%s-renamed-%d", v.Name, i)
		t0 := time.Now()
		task, err := vm.Rename(ctx, name)
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			return row, fmt.Errorf("rename %s: %w", v.Name, err)
		}
		call := time.Since(t0)
		if _, err := waitWatcher(w, changeTimeout, func(vms []vmware.VM) bool { return hasVM(vms, v.Ref, func(x vmware.VM) bool { return x.Name == name }) }); err != nil {
			return row, fmt.Errorf("rename of %s not seen: %w", v.Name, err)
		}
		row.rename = append(row.rename, time.Since(t0))
		row.calls = append(row.calls, call)
	}
	for i := 0; i < changes; i++ {
		v := vms[i*step+step/2]
		if v.PowerState != string(types.VirtualMachinePowerStatePoweredOn) {
			return row, fmt.Errorf("%s is %s, want poweredOn", v.Name, v.PowerState)
		}
		vm := object.NewVirtualMachine(c.Client, types.ManagedObjectReference{Type: "VirtualMachine", Value: v.Ref})
		t0 := time.Now()
		task, err := vm.PowerOff(ctx)
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			return row, fmt.Errorf("power off %s: %w", v.Name, err)
		}
		call := time.Since(t0)
		off := string(types.VirtualMachinePowerStatePoweredOff)
		if _, err := waitWatcher(w, changeTimeout, func(vms []vmware.VM) bool {
			return hasVM(vms, v.Ref, func(x vmware.VM) bool { return x.PowerState == off })
		}); err != nil {
			return row, fmt.Errorf("power-off of %s not seen: %w", v.Name, err)
		}
		row.powerOff = append(row.powerOff, time.Since(t0))
		row.calls = append(row.calls, call)
	}

	row.drops = drops.Load()
	row.cpu = (cpuTime(os.Getpid()) - cpu0) / time.Duration(2*changes)
	row.simCPU = (cpuTime(child.Process.Pid) - simCPU0) / time.Duration(2*changes)

	// The poller: the same types and properties as the watcher, over its
	// own ContainerView, read whole each time.
	cv, err := view.NewManager(c.Client).CreateContainerView(ctx, c.ServiceContent.RootFolder, watchedTypes, true)
	if err != nil {
		return row, err
	}
	spec := types.PropertyFilterSpec{ObjectSet: []types.ObjectSpec{{
		Obj: cv.Reference(), Skip: types.NewBool(true),
		SelectSet: []types.BaseSelectionSpec{&types.TraversalSpec{Type: "ContainerView", Path: "view"}},
	}}}
	for _, t := range watchedTypes {
		ps := []string{"name", "parent"}
		if t == "VirtualMachine" {
			ps = watchedVMProps
		}
		spec.PropSet = append(spec.PropSet, types.PropertySpec{Type: t, PathSet: ps})
	}
	pc := property.DefaultCollector(c.Client)
	for i := 0; i < *discPolls; i++ {
		counter.bytes.Store(0)
		t0 := time.Now()
		res, err := pc.RetrieveProperties(ctx, types.RetrieveProperties{SpecSet: []types.PropertyFilterSpec{spec}})
		if err != nil {
			return row, fmt.Errorf("retrieve: %w", err)
		}
		row.polls = append(row.polls, time.Since(t0))
		row.pollBytes = counter.bytes.Load()
		got := 0
		for _, oc := range res.Returnval {
			if oc.Obj.Type == "VirtualMachine" {
				got++
			}
		}
		if got != n {
			return row, fmt.Errorf("a full retrieve returned %d VMs, want %d", got, n)
		}
	}
	return row, nil
}

// The watcher's types and VirtualMachine properties (vmware/inventory.go's
// viewTypes and vmProps, unexported there): the poller reads the same.
var (
	watchedTypes = []string{
		"VirtualMachine", "HostSystem", "ClusterComputeResource", "ComputeResource",
		"Datastore", "Folder", "ResourcePool", "Network", "DistributedVirtualPortgroup",
		"OpaqueNetwork", "VirtualApp",
	}
	watchedVMProps = []string{
		"name", "parent", "resourcePool", "datastore", "network",
		"config.uuid", "config.instanceUuid", "config.guestFullName", "config.guestId",
		"config.template", "config.hardware.numCPU", "config.hardware.memoryMB",
		"config.hardware.device",
		"runtime.powerState", "runtime.host",
		"guest.ipAddress", "guest.net", "guest.hostName",
		"config.changeVersion",
	}
)

// waitWatcher waits, woken by Updated, until cond holds for the watcher's
// VM list, and returns that list.
func waitWatcher(w *vmware.Watcher, timeout time.Duration, cond func([]vmware.VM) bool) ([]vmware.VM, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		ch := w.Updated()
		if vms := w.VMs(); cond(vms) {
			return vms, nil
		}
		select {
		case <-ch:
		case <-deadline.C:
			return nil, fmt.Errorf("timed out after %s", timeout)
		}
	}
}

func hasVM(vms []vmware.VM, ref string, ok func(vmware.VM) bool) bool {
	for _, v := range vms {
		if v.Ref == ref {
			return ok(v)
		}
	}
	return false
}

// liveHeap is the heap in use after a collection.
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// pct is the p-th percentile (nearest rank) of ds.
func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(0, min(len(s)-1, i-1))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// countingTransport counts the bytes of the responses' bodies.
type countingTransport struct {
	base  http.RoundTripper
	bytes atomic.Int64
}

func (t *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	res, err := t.base.RoundTrip(r)
	if err == nil {
		res.Body = &countingBody{ReadCloser: res.Body, n: &t.bytes}
	}
	return res, err
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}
