// Package bootdisk makes small raw disk images that boot in QEMU in a few
// seconds, for drill tests and demos. An image holds an MBR (syslinux's)
// and one FAT partition with syslinux, the host's Linux kernel and an
// initramfs built here around busybox. Its /init prints marker lines on the
// serial console, writes a file back to the disk, takes an address by DHCP
// and serves HTTP, so a drill can check the boot, the disk's contents, the
// write path and the network.
//
// Making an image needs neither root nor loop devices: the FAT file system
// is made and filled with mtools (mformat, mcopy) and syslinux installs
// itself into the image file at the partition's offset.
package bootdisk

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Marker lines /init prints on the serial console.
const (
	// BootedMarker starts the line "ASR-DRILL-BOOTED <hostname>", printed
	// once the guest's HTTP server has been started.
	BootedMarker = "ASR-DRILL-BOOTED"
	// MarkerPrefix starts the line that carries MarkerFile's content as
	// read by the guest from its disk.
	MarkerPrefix = "ASR-DRILL-MARKER"
	// UplinkPrefix starts the line "ASR-DRILL-UPLINK reachable|unreachable"
	// reporting the guest's attempt to reach Options.Probe.
	UplinkPrefix = "ASR-DRILL-UPLINK"
)

// File names in the FAT partition.
const (
	// MarkerFile is read by the guest and echoed after MarkerPrefix.
	MarkerFile = "marker.txt"
	// WrittenFile is written by the guest ("booted <hostname>") and synced
	// before BootedMarker is printed.
	WrittenFile = "written.txt"
)

// PartitionOffset is the byte offset of the FAT partition in the image:
// mtools reach it as IMAGE@@1048576.
const PartitionOffset = 1 << 20

// Options say what the image holds. The zero value makes a bootable image
// from the host's kernel and busybox.
type Options struct {
	// Kernel is the bzImage to boot. Default: the newest /boot/vmlinuz-*.
	Kernel string
	// Modules is the kernel's module directory, from which the virtio and
	// FAT modules are put in the initramfs. Default: /lib/modules/<the
	// kernel's version, from its file name>.
	Modules string
	// Busybox is a static busybox binary. Default: /bin/busybox.
	Busybox string
	// Hostname is set by /init and printed after BootedMarker. Default
	// "asr-drill".
	Hostname string
	// Marker is stored in MarkerFile. Default "no marker".
	Marker string
	// HTTPPort is the guest port busybox httpd listens on. Default 80.
	HTTPPort int
	// Probe, if set as "IP:PORT", is an address the guest tries to reach
	// over HTTP once its network is up (for no-uplink checks); the outcome
	// is printed after UplinkPrefix.
	Probe string
	// CorruptKernel overwrites the middle of the kernel copied into the
	// image, so that the image does not boot.
	CorruptKernel bool
}

// Make writes a bootable raw image of sizeMiB MiB (at least 32) to path,
// replacing any file there.
func Make(path string, sizeMiB int, o Options) error {
	if sizeMiB < 32 || sizeMiB > 2000 {
		return fmt.Errorf("bootdisk: size %d MiB: want 32..2000", sizeMiB)
	}
	if err := o.defaults(); err != nil {
		return fmt.Errorf("bootdisk: %w", err)
	}
	for _, tool := range []string{"mformat", "mcopy", "syslinux"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("bootdisk: %s not found (install mtools and syslinux): %w", tool, err)
		}
	}
	work, err := os.MkdirTemp("", "bootdisk-")
	if err != nil {
		return fmt.Errorf("bootdisk: %w", err)
	}
	defer os.RemoveAll(work)

	initrd, err := o.initramfs()
	if err != nil {
		return fmt.Errorf("bootdisk: initramfs: %w", err)
	}
	kernel, err := os.ReadFile(o.Kernel)
	if err != nil {
		return fmt.Errorf("bootdisk: %w", err)
	}
	if o.CorruptKernel {
		mid := len(kernel) / 2
		end := min(mid+256<<10, len(kernel))
		for i := mid; i < end; i++ {
			kernel[i] ^= 0xA5
		}
	}
	cfg := fmt.Sprintf("SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  INITRD initrd.gz\n  APPEND console=ttyS0,115200 loglevel=4 panic=-1 asr.hostname=%s asr.port=%d asr.probe=%s\n",
		o.Hostname, o.HTTPPort, o.Probe)
	files := map[string][]byte{
		"vmlinuz":      kernel,
		"initrd.gz":    initrd,
		"syslinux.cfg": []byte(cfg),
		MarkerFile:     []byte(o.Marker + "\n"),
	}

	if err := writeMBR(path, sizeMiB); err != nil {
		return fmt.Errorf("bootdisk: %w", err)
	}
	part := fmt.Sprintf("%s@@%d", path, PartitionOffset)
	sectors := (int64(sizeMiB)<<20 - PartitionOffset) / 512
	if err := run("mformat", "-i", part, "-T", strconv.FormatInt(sectors, 10),
		"-h", "64", "-s", "32", "-H", strconv.Itoa(PartitionOffset/512), "-v", "ASRDRILL", "::"); err != nil {
		return err
	}
	if err := run("syslinux", "--offset", strconv.Itoa(PartitionOffset), "--install", path); err != nil {
		return err
	}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	args := []string{"-i", part, "-o"}
	for _, name := range names {
		p := filepath.Join(work, name)
		if err := os.WriteFile(p, files[name], 0o644); err != nil {
			return fmt.Errorf("bootdisk: %w", err)
		}
		args = append(args, p)
	}
	return run("mcopy", append(args, "::")...)
}

// ReadFile returns a file from the image's FAT partition (mtools' mtype),
// for checking what a guest wrote.
func ReadFile(image, name string) ([]byte, error) {
	cmd := exec.Command("mcopy", "-i", fmt.Sprintf("%s@@%d", image, PartitionOffset), "::"+name, "-")
	cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("bootdisk: read %s from %s: %w: %s", name, image, err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

func (o *Options) defaults() error {
	if o.Kernel == "" {
		ks, _ := filepath.Glob("/boot/vmlinuz-*")
		if len(ks) == 0 {
			return errors.New("no /boot/vmlinuz-* (install linux-image-cloud-amd64)")
		}
		sort.Strings(ks)
		o.Kernel = ks[len(ks)-1]
	}
	if o.Modules == "" {
		o.Modules = filepath.Join("/lib/modules", strings.TrimPrefix(filepath.Base(o.Kernel), "vmlinuz-"))
	}
	if o.Busybox == "" {
		o.Busybox = "/bin/busybox"
	}
	if o.Hostname == "" {
		o.Hostname = "asr-drill"
	}
	if strings.ContainsAny(o.Hostname, " \t\n'\"$`\\") || strings.ContainsAny(o.Probe, " \t\n'\"$`\\") {
		return errors.New("hostname and probe must not contain spaces or shell quoting")
	}
	if o.Marker == "" {
		o.Marker = "no marker"
	}
	if o.HTTPPort == 0 {
		o.HTTPPort = 80
	}
	return nil
}

// writeMBR creates the image file with syslinux's MBR boot code and one
// active FAT16 (LBA) partition from PartitionOffset to the end.
func writeMBR(path string, sizeMiB int) error {
	code, err := os.ReadFile("/usr/lib/syslinux/mbr/mbr.bin")
	if err != nil {
		return fmt.Errorf("syslinux MBR (install syslinux-common): %w", err)
	}
	if len(code) > 440 {
		return fmt.Errorf("syslinux MBR is %d bytes, want at most 440", len(code))
	}
	mbr := make([]byte, 512)
	copy(mbr, code)
	copy(mbr[440:444], []byte{0x41, 0x53, 0x52, 0x44}) // disk signature "ASRD"
	e := mbr[446:462]
	e[0] = 0x80                            // active
	copy(e[1:4], []byte{0xFE, 0xFF, 0xFF}) // CHS unused: LBA only
	e[4] = 0x0E                            // FAT16, LBA
	copy(e[5:8], []byte{0xFE, 0xFF, 0xFF})
	start := uint32(PartitionOffset / 512)
	count := uint32(int64(sizeMiB)<<20/512) - start
	putLE32(e[8:12], start)
	putLE32(e[12:16], count)
	mbr[510], mbr[511] = 0x55, 0xAA

	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.Write(mbr); err != nil {
		f.Close()
		return err
	}
	if err := f.Truncate(int64(sizeMiB) << 20); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

func run(name string, args ...string) error {
	cmd := exec.Command(name, args...)
	// mtools refuse images whose geometry does not divide their size.
	cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("bootdisk: %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// wantModules are loaded by /init, in this order after their dependencies:
// the cloud kernel builds virtio and FAT as modules.
var wantModules = []string{
	"virtio_pci", "virtio_blk", "virtio_net",
	"vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859-1",
}

// moduleOrder returns the module files (relative to dir) for wantModules
// and their dependencies from dir/modules.dep, dependencies first.
func moduleOrder(dir string) ([]string, error) {
	f, err := os.Open(filepath.Join(dir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	deps := map[string][]string{} // module name -> [path, dep paths...]
	byPath := map[string][]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		p, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		base := filepath.Base(p)
		name := strings.TrimSuffix(base, filepath.Ext(base))
		if strings.HasSuffix(name, ".ko") {
			return nil, fmt.Errorf("module %s is compressed; uncompressed .ko files are needed", p)
		}
		d := strings.Fields(rest)
		deps[strings.ReplaceAll(name, "-", "_")] = append([]string{p}, d...)
		byPath[p] = d
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	var order []string
	seen := map[string]bool{}
	var visit func(p string)
	visit = func(p string) {
		if seen[p] {
			return
		}
		seen[p] = true
		for _, d := range byPath[p] {
			visit(d)
		}
		order = append(order, p)
	}
	for _, m := range wantModules {
		d, ok := deps[strings.ReplaceAll(m, "-", "_")]
		if !ok {
			// Built into the kernel, or absent: /init gets by without it.
			continue
		}
		visit(d[0])
	}
	return order, nil
}

const initScript = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m 2>/dev/null; done
for w in $(cat /proc/cmdline); do
  case "$w" in
  asr.hostname=*) hostname "${w#asr.hostname=}" ;;
  asr.port=*) port="${w#asr.port=}" ;;
  asr.probe=*) probe="${w#asr.probe=}" ;;
  esac
done
i=0
while [ ! -b /dev/vda1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /mnt
if mount -t vfat /dev/vda1 /mnt; then
  echo "ASR-DRILL-MARKER $(cat /mnt/marker.txt)"
  echo "booted $(hostname)" > /mnt/written.txt
  sync
else
  echo "ASR-DRILL-ERROR no disk"
fi
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  udhcpc -i eth0 -q -n -t 10 -T 1 -s /etc/udhcpc.sh >/dev/null 2>&1 || echo "ASR-DRILL-ERROR no dhcp lease"
fi
mkdir -p /www
echo "asr drill $(hostname)" > /www/index.html
httpd -p "${port:-80}" -h /www
if [ -n "$probe" ]; then
  if wget -q -T 3 -O /dev/null "http://$probe/" 2>/dev/null; then
    echo "ASR-DRILL-UPLINK reachable"
  else
    echo "ASR-DRILL-UPLINK unreachable"
  fi
fi
echo "ASR-DRILL-BOOTED $(hostname)"
while true; do sleep 3600; done
`

const udhcpcScript = `#!/bin/sh
case "$1" in
bound|renew)
  ifconfig "$interface" "$ip" netmask "$subnet"
  [ -n "$router" ] && route add default gw "${router%% *}" dev "$interface"
  ;;
esac
exit 0
`

// initramfs returns the gzipped newc cpio archive /init runs from.
func (o *Options) initramfs() ([]byte, error) {
	busybox, err := os.ReadFile(o.Busybox)
	if err != nil {
		return nil, err
	}
	mods, err := moduleOrder(o.Modules)
	if err != nil {
		return nil, fmt.Errorf("kernel modules: %w", err)
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	w := &cpioWriter{w: zw}
	for _, d := range []string{"bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "sys", "tmp"} {
		w.dir(d)
	}
	w.node("dev/console", 0o020600, 5, 1)
	w.file("init", 0o755, []byte(initScript))
	w.file("bin/busybox", 0o755, busybox)
	w.file("etc/udhcpc.sh", 0o755, []byte(udhcpcScript))
	var order []string
	dirs := map[string]bool{}
	for _, m := range mods {
		b, err := os.ReadFile(filepath.Join(o.Modules, m))
		if err != nil {
			return nil, err
		}
		name := filepath.Base(m)
		order = append(order, name)
		if !dirs[name] {
			dirs[name] = true
			w.file("lib/modules/"+name, 0o644, b)
		}
	}
	w.file("etc/modules.order", 0o644, []byte(strings.Join(order, "\n")+"\n"))
	w.trailer()
	if w.err != nil {
		return nil, w.err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
