package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/asrdr/asr/server/api"
)

// The resync benchmark (issue 4): asr's checksum delta against rsync's, on
// the same change, and a compare of two identical disks against sha256sum.

var resyncSize = flag.String("resync-size", "4GiB", "resync: disk size")

// loBytes is the bytes that crossed the loopback interface so far (every
// packet, both directions, with its TCP/IP headers).
func loBytes() int64 {
	b, _ := os.ReadFile("/proc/net/dev")
	for _, l := range strings.Split(string(b), "\n") {
		name, rest, ok := strings.Cut(l, ":")
		if !ok || strings.TrimSpace(name) != "lo" {
			continue
		}
		f := strings.Fields(rest)
		n, _ := strconv.ParseInt(f[8], 10, 64) // transmit bytes (= received, on lo)
		return n
	}
	return 0
}

// resyncsDone counts the machine's resync-done events and returns the
// message of the newest.
func (c *cluster) resyncsDone() (int, string) {
	var es []api.EventJSON
	if err := c.api(http.MethodGet, "/api/v1/events?machine=bench", nil, &es); err != nil {
		return -1, ""
	}
	n, last := 0, ""
	for _, e := range es { // newest first
		if e.Kind == "resync-done" {
			if n == 0 {
				last = e.Message
			}
			n++
		}
	}
	return n, last
}

// timedResync asks for a full resync of the bench machine and waits until
// it is done: wall time, loopback bytes, and the server's account of it.
func (c *cluster) timedResync() (time.Duration, int64, string, error) {
	before, _ := c.resyncsDone()
	lo := loBytes()
	start := time.Now()
	if err := c.api(http.MethodPost, "/api/v1/machines/bench/resync", api.ResyncRequest{}, nil); err != nil {
		return 0, 0, "", err
	}
	deadline := start.Add(30 * time.Minute)
	for time.Now().Before(deadline) {
		if n, msg := c.resyncsDone(); n > before {
			return time.Since(start), loBytes() - lo, msg, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return 0, 0, "", fmt.Errorf("resync not done in 30 min; see %s", c.dir)
}

// rsyncDaemon starts an rsync daemon on a loopback port serving dst (module
// "dst").
func rsyncDaemon(dir, dst string) (*exec.Cmd, string, error) {
	port := freePort()
	conf := filepath.Join(dir, "rsyncd.conf")
	err := os.WriteFile(conf, []byte(fmt.Sprintf(`port = %s
address = 127.0.0.1
use chroot = no
pid file = %s
log file = %s
[dst]
path = %s
read only = no
uid = 0
gid = 0
`, port, filepath.Join(dir, "rsyncd.pid"), filepath.Join(dir, "rsyncd.log"), dst)), 0o600)
	if err != nil {
		return nil, "", err
	}
	d := exec.Command("rsync", "--daemon", "--no-detach", "--config="+conf)
	d.Stderr = os.Stderr
	if err := d.Start(); err != nil {
		return nil, "", fmt.Errorf("rsync daemon (apt-get install rsync): %w", err)
	}
	for i := 0; i < 100; i++ {
		if exec.Command("rsync", "rsync://127.0.0.1:"+port+"/").Run() == nil {
			return d, port, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.Process.Kill()
	return nil, "", fmt.Errorf("rsync daemon did not start; see %s", filepath.Join(dir, "rsyncd.log"))
}

// rsyncStat pulls a "Total bytes sent: N" figure from rsync --stats.
func rsyncStat(out []byte, name string) int64 {
	i := bytes.Index(out, []byte(name+": "))
	if i < 0 {
		return -1
	}
	f := strings.Fields(string(out[i+len(name)+2:]))
	n, _ := strconv.ParseInt(strings.ReplaceAll(f[0], ",", ""), 10, 64)
	return n
}

func sha256Of(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// benchResync: a disk with 1% of its 4 KiB blocks changed at random places,
// resynced by asr (an operator's full resync: every block compared) and by
// rsync --inplace --no-whole-file to a daemon over loopback; then asr's
// compare of two identical disks against sha256sum of one. The page cache
// is dropped before each contender.
func benchResync(dir string) error {
	size := parseSize(*resyncSize)
	c, disk, err := protectedMixedDisk(dir, size, 30*time.Minute)
	if err != nil {
		return err
	}
	defer c.stop()
	// rsync's destinations start as the same image the replica holds: one
	// for rsync's default block size (about the square root of the file's
	// size), one for 4 KiB blocks, asr's own granularity.
	dst := filepath.Join(dir, "rsync-dst")
	os.MkdirAll(dst, 0o755)
	for _, name := range []string{"disk.img", "disk4k.img"} {
		if out, err := exec.Command("cp", disk, filepath.Join(dst, name)).CombinedOutput(); err != nil {
			return fmt.Errorf("cp: %v\n%s", err, out)
		}
	}
	daemon, port, err := rsyncDaemon(dir, dst)
	if err != nil {
		return err
	}
	defer func() { daemon.Process.Kill(); daemon.Wait() }()

	// Two identical disks: asr's compare against sha256sum of one.
	dropCaches()
	shaT, err := timeCmd("sha256sum " + disk + " >/dev/null")
	if err != nil {
		return err
	}
	dropCaches()
	sameT, sameWire, sameMsg, err := c.timedResync()
	if err != nil {
		return err
	}

	// 1% of the 4 KiB blocks, at random places, get new random contents
	// (behind the agent's back, as a lost log leaves them).
	blocks := size / 4096
	changed := blocks / 100
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	r := rand.New(rand.NewPCG(4, 4))
	cr := rand.NewChaCha8([32]byte{4})
	buf := make([]byte, 4096)
	for _, b := range r.Perm(int(blocks))[:changed] {
		cr.Read(buf)
		if _, err := f.WriteAt(buf, int64(b)*4096); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}

	rsync := func(name string, args ...string) ([]byte, time.Duration, int64, error) {
		dropCaches()
		lo := loBytes()
		start := time.Now()
		args = append(append([]string{"--inplace", "--no-whole-file", "--stats"}, args...), disk, "rsync://127.0.0.1:"+port+"/dst/"+name)
		out, err := exec.Command("rsync", args...).CombinedOutput()
		if err != nil {
			return nil, 0, 0, fmt.Errorf("rsync: %v\n%s", err, out)
		}
		return out, time.Since(start), loBytes() - lo, nil
	}
	rsyncOut, rsyncT, rsyncWire, err := rsync("disk.img")
	if err != nil {
		return err
	}
	rsync4kOut, rsync4kT, rsync4kWire, err := rsync("disk4k.img", "--block-size=4096")
	if err != nil {
		return err
	}
	dropCaches()
	asrT, asrWire, asrMsg, err := c.timedResync()
	if err != nil {
		return err
	}

	// Both ends must be bit-exact.
	want, err := sha256Of(disk)
	if err != nil {
		return err
	}
	var got string
	for _, name := range []string{"disk.img", "disk4k.img"} {
		if got, err = sha256Of(filepath.Join(dst, name)); err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("rsync's copy %s differs from the source", name)
		}
	}
	var p api.PointJSON
	if err := c.api(http.MethodPost, "/api/v1/machines/bench/points", api.TagRequest{}, &p); err != nil {
		return fmt.Errorf("point after the resync: %w", err)
	}
	out := filepath.Join(dir, "recovered")
	if o, err := exec.Command(*asrBin, "recover", "--machine", "bench", "--point", p.ID, "--out", out,
		"--server", c.url, "--data", c.srvDir).CombinedOutput(); err != nil {
		return fmt.Errorf("asr recover: %v\n%s", err, o)
	}
	if got, err = sha256Of(filepath.Join(out, "d0.img")); err != nil {
		return err
	}
	if got != want {
		return fmt.Errorf("asr's replica differs from the source after the resync")
	}

	mib := func(n int64) float64 { return float64(n) / (1 << 20) }
	fmt.Printf("resync of a %s disk (mixed data) with %d of its %d 4 KiB blocks (1%%) changed at random places;\n", *resyncSize, changed, blocks)
	fmt.Printf("replica on the local target; wire = loopback bytes, both directions, with TCP/IP headers; page cache dropped before each\n\n")
	fmt.Printf("%-44s %9s %11s %10s %10s\n", "contender", "seconds", "wire MiB", "time vs", "wire vs")
	fmt.Printf("%-44s %9.2f %11.1f %9.2fx %9.2fx\n", "rsync --inplace --no-whole-file (daemon)", rsyncT.Seconds(), mib(rsyncWire), 1.0, 1.0)
	fmt.Printf("%-44s %9.2f %11.1f %9.2fx %9.2fx\n", "rsync ... --block-size=4096", rsync4kT.Seconds(), mib(rsync4kWire),
		rsync4kT.Seconds()/rsyncT.Seconds(), float64(rsync4kWire)/float64(rsyncWire))
	fmt.Printf("%-44s %9.2f %11.1f %9.2fx %9.2fx\n", "asr resync (full compare)", asrT.Seconds(), mib(asrWire),
		asrT.Seconds()/rsyncT.Seconds(), float64(asrWire)/float64(rsyncWire))
	fmt.Printf("\nrsync --stats: sent %d, received %d bytes; literal data %d\n", rsyncStat(rsyncOut, "Total bytes sent"),
		rsyncStat(rsyncOut, "Total bytes received"), rsyncStat(rsyncOut, "Literal data"))
	fmt.Printf("rsync -B 4096 --stats: sent %d, received %d bytes; literal data %d\n", rsyncStat(rsync4kOut, "Total bytes sent"),
		rsyncStat(rsync4kOut, "Total bytes received"), rsyncStat(rsync4kOut, "Literal data"))
	fmt.Printf("asr: %s\n", asrMsg)
	fmt.Printf("changed data: %.1f MiB; both copies verified bit-exact (sha256)\n\n", mib(changed*4096))
	fmt.Printf("compare of two identical %s disks\n\n", *resyncSize)
	fmt.Printf("%-44s %9s %11s %10s\n", "contender", "seconds", "wire MiB", "time vs")
	fmt.Printf("%-44s %9.2f %11s %9.2fx\n", "sha256sum of one disk", shaT.Seconds(), "-", 1.0)
	fmt.Printf("%-44s %9.2f %11.1f %9.2fx\n", "asr resync of an identical disk", sameT.Seconds(), mib(sameWire), sameT.Seconds()/shaT.Seconds())
	fmt.Printf("asr: %s\n", sameMsg)
	return nil
}
