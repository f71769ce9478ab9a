//go:build e2e

package drill

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server/drill/bootdisk"
)

// mustServeImage serves the image as export "boot" on a unix socket in a
// temp dir with our own NBD server, until the test ends.
func mustServeImage(t *testing.T, image string) string {
	t.Helper()
	f, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := nbd.NewFileBackend(f)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := nbd.Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &nbd.Server{
		Lookup: func(name string) (nbd.Backend, bool) { return b, name == "boot" },
		List:   func() []string { return []string{"boot"} },
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("nbd serve: %v", err)
		}
		f.Close()
	})
	return sock
}

func mustMakeDisk(t *testing.T, o bootdisk.Options) string {
	t.Helper()
	image := filepath.Join(t.TempDir(), "disk.img")
	if err := bootdisk.Make(image, 64, o); err != nil {
		t.Fatal(err)
	}
	return image
}

// TestBootPasses boots a good disk over NBD and checks the console marker,
// the guest's HTTP port, the disk's contents reaching the guest, the
// guest's write reaching the NBD backend, and that there is no uplink: the
// namespace holds only lo and the guest cannot reach a listener on the
// host's loopback.
func TestBootPasses(t *testing.T) {
	// A host listener the guest must not reach: user-mode networking maps
	// 10.0.2.2 to the host's loopback, which restrict=on and the empty
	// namespace must both prevent.
	hostL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hostL.Close()
	var accepted sync.WaitGroup
	hostConns := 0
	accepted.Add(1)
	go func() {
		defer accepted.Done()
		for {
			c, err := hostL.Accept()
			if err != nil {
				return
			}
			hostConns++
			c.Close()
		}
	}()
	probe := "10.0.2.2:" + strings.TrimPrefix(hostL.Addr().String(), "127.0.0.1:")

	image := mustMakeDisk(t, bootdisk.Options{Hostname: "drill-vm1", Marker: "recovered-contents-42", Probe: probe})
	sock := mustServeImage(t, image)

	var nsIfaces string
	startHook = func(pid int) {
		// The namespace exists once QEMU has started; read its devices now.
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "net/dev"))
		if err == nil {
			nsIfaces = string(b)
		}
	}
	defer func() { startHook = nil }()

	logPath := filepath.Join(t.TempDir(), "console.log")
	res, err := Boot(context.Background(), Options{
		Disks:     []Disk{{Name: "boot", Socket: sock, Export: "boot"}},
		BootCheck: regexp.MustCompile(`^ASR-DRILL-BOOTED drill-vm1$`),
		TCPPort:   80,
		Timeout:   2 * time.Minute,
		LogPath:   logPath,
		Accel:     AccelTCG,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("accel %s boot time %s", res.Accel, res.BootTime)
	if !res.Passed {
		t.Fatalf("drill failed: %s", res.Reason)
	}
	if res.BootTime <= 0 || res.Accel != AccelTCG {
		t.Errorf("boot time %s accel %q", res.BootTime, res.Accel)
	}
	console, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		bootdisk.MarkerPrefix + " recovered-contents-42",
		bootdisk.UplinkPrefix + " unreachable",
		bootdisk.BootedMarker + " drill-vm1",
	} {
		if !strings.Contains(string(console), want) {
			t.Errorf("console lacks %q:\n%s", want, console)
		}
	}
	if !strings.Contains(res.ConsoleTail, bootdisk.BootedMarker) {
		t.Errorf("console tail lacks the marker: %q", res.ConsoleTail)
	}
	hostL.Close()
	accepted.Wait()
	if hostConns != 0 {
		t.Errorf("the guest reached the host's loopback %d times", hostConns)
	}
	if ifaces := netDevNames(nsIfaces); len(ifaces) != 1 || ifaces[0] != "lo" {
		t.Errorf("drill namespace interfaces %v, want only lo:\n%s", ifaces, nsIfaces)
	}
	// /init wrote and synced this before printing the boot marker, so it
	// went through QEMU's NBD client to our backend.
	got, err := bootdisk.ReadFile(image, bootdisk.WrittenFile)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(got)) != "booted drill-vm1" {
		t.Errorf("guest wrote %q", got)
	}
}

// bootToFail boots a drill that must fail. A failing drill runs until its
// timeout, and waiting out a long one proves no more than a short one once
// the guest got as far as the test needs: the timeout starts short and is
// doubled (up to 4 minutes) only while far(res) says the guest did not get
// that far, as on a loaded machine.
func bootToFail(t *testing.T, o Options, far func(Result) bool) Result {
	t.Helper()
	for o.Timeout = 20 * time.Second; ; o.Timeout *= 2 {
		start := time.Now()
		res, err := Boot(context.Background(), o)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("timeout %s, after %s: %s", o.Timeout, time.Since(start), res.Reason)
		if res.Passed || far(res) {
			return res
		}
		if o.Timeout >= 4*time.Minute {
			t.Fatalf("the guest never got far enough in %s", o.Timeout)
		}
	}
}

// TestBootCorruptKernelFails boots a disk whose kernel is damaged: the
// drill must fail with a reason, within its timeout. The damaged kernel
// hangs without a word, so the drill can only end at its timeout; the test
// needs that timeout to run past the loader's hand-over to the kernel (a
// good one boots a few seconds later: TestBootPasses).
func TestBootCorruptKernelFails(t *testing.T) {
	image := mustMakeDisk(t, bootdisk.Options{CorruptKernel: true})
	sock := mustServeImage(t, image)
	res := bootToFail(t, Options{
		Disks:     []Disk{{Socket: sock, Export: "boot"}},
		BootCheck: regexp.MustCompile(bootdisk.BootedMarker),
		TCPPort:   80,
		Accel:     AccelTCG,
	}, func(res Result) bool { return strings.Contains(res.ConsoleTail, "Loading initrd.gz...ok") })
	if res.Passed {
		t.Fatal("a corrupted kernel passed the drill")
	}
	for _, want := range []string{"never matched", "port 80 never answered"} {
		if !strings.Contains(res.Reason, want) {
			t.Errorf("reason lacks %q: %s", want, res.Reason)
		}
	}
}

// TestBootPortNotListening boots a good disk but checks a port the guest
// does not listen on: the console check passes, the TCP check must not
// (user-mode networking accepts the host side regardless). The guest
// starts its only listener before it prints the marker: once the console
// matched, no port opens later, and the drill ends at its timeout.
func TestBootPortNotListening(t *testing.T) {
	image := mustMakeDisk(t, bootdisk.Options{})
	sock := mustServeImage(t, image)
	res := bootToFail(t, Options{
		Disks:     []Disk{{Socket: sock, Export: "boot"}},
		BootCheck: regexp.MustCompile(bootdisk.BootedMarker),
		TCPPort:   8081,
		Accel:     AccelTCG,
	}, func(res Result) bool { return !strings.Contains(res.Reason, "never matched") })
	if res.Passed {
		t.Fatal("a port nobody listens on passed")
	}
	if !strings.Contains(res.Reason, "port 8081 never answered") || strings.Contains(res.Reason, "never matched") {
		t.Errorf("reason: %s", res.Reason)
	}
	if !strings.Contains(res.ConsoleTail, bootdisk.BootedMarker) {
		t.Errorf("guest did not boot: %s", res.ConsoleTail)
	}
}

// TestBootCancel cancels a drill mid-boot: Boot returns the context's
// error promptly and QEMU is gone.
func TestBootCancel(t *testing.T) {
	image := mustMakeDisk(t, bootdisk.Options{})
	sock := mustServeImage(t, image)
	ctx, cancel := context.WithCancel(context.Background())
	var qemuPid int
	startHook = func(pid int) { qemuPid = pid; cancel() }
	defer func() { startHook = nil }()
	_, err := Boot(ctx, Options{
		Disks:     []Disk{{Socket: sock, Export: "boot"}},
		BootCheck: regexp.MustCompile(bootdisk.BootedMarker),
		Accel:     AccelTCG,
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(qemuPid))); err == nil {
		t.Errorf("qemu %d still exists", qemuPid)
	}
}

func netDevNames(netDev string) []string {
	var names []string
	for _, line := range strings.Split(netDev, "\n") {
		name, _, ok := strings.Cut(line, ":")
		if ok && !strings.Contains(name, "|") {
			names = append(names, strings.TrimSpace(name))
		}
	}
	return names
}
