package drill

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// hostFwdPort is the port QEMU's user-mode network listens on, on
// 127.0.0.1 inside the drill's own network namespace, and forwards to the
// guest's TCP port. The namespace is new and empty, so the port is free.
const hostFwdPort = 40080

// qemuArgs returns QEMU's command line. The serial console goes to stdout;
// QMP (for the TCP check) to a unix socket at qmpPath.
func qemuArgs(o Options, accel, qmpPath string) ([]string, error) {
	args := []string{
		"-name", "asr-drill",
		"-nodefaults", "-no-user-config",
		"-display", "none",
		"-accel", accel,
		"-smp", strconv.Itoa(o.CPUs),
		"-m", strconv.Itoa(o.MemoryMiB),
		"-serial", "stdio",
		// A guest that reboots or panics (with panic=N) ends the drill
		// at once rather than at the timeout.
		"-no-reboot",
		"-qmp", "unix:" + qmpPath + ",server=on,wait=off",
	}
	if accel == AccelKVM {
		args = append(args, "-cpu", "host")
	}
	for i, d := range o.Disks {
		// JSON -blockdev needs no escaping of commas or colons in paths.
		nbdOpts := map[string]any{
			"driver": "nbd",
			"server": map[string]string{"type": "unix", "path": d.Socket},
		}
		if d.Export != "" {
			nbdOpts["export"] = d.Export
		}
		node := fmt.Sprintf("disk%d", i)
		spec, err := json.Marshal(map[string]any{
			"driver":    "raw",
			"node-name": node,
			"cache":     map[string]bool{"direct": true}, // cache=none
			"discard":   "unmap",
			"file":      nbdOpts,
		})
		if err != nil {
			return nil, fmt.Errorf("drill: disk %s: %w", d.Name, err)
		}
		args = append(args,
			"-blockdev", string(spec),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=%s,bootindex=%d", node, i))
	}
	// The guest always has its NIC, as the source VM had; restrict=on
	// keeps user-mode networking from reaching anything outside, and the
	// namespace has no interface but lo anyway.
	netdev := "user,id=n0,restrict=on"
	if o.TCPPort != 0 {
		netdev += fmt.Sprintf(",hostfwd=tcp:127.0.0.1:%d-:%d", hostFwdPort, o.TCPPort)
	}
	args = append(args, "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0")
	return args, nil
}

// detectAccel returns AccelKVM when /dev/kvm can create a VM and the CPU
// advertises hardware virtualization, and AccelTCG otherwise. The second
// test matters in nested setups that expose a /dev/kvm whose guests fail
// with "KVM internal error" (seen on Firecracker hosts without VMX).
func detectAccel() string {
	if kvmUsable() && cpuHasVirt() {
		return AccelKVM
	}
	return AccelTCG
}

func kvmUsable() bool {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	const kvmGetAPIVersion, kvmCreateVM = 0xAE00, 0xAE01
	v, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmGetAPIVersion, 0)
	if errno != 0 || v != 12 {
		return false
	}
	vm, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmCreateVM, 0)
	if errno != 0 {
		return false
	}
	unix.Close(int(vm))
	return true
}

func cpuHasVirt() bool {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte("flags")) {
			continue
		}
		for _, f := range bytes.Fields(line) {
			if string(f) == "vmx" || string(f) == "svm" {
				return true
			}
		}
	}
	return false
}
