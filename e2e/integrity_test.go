//go:build e2e

package e2e

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// TestE2EBitRotDetectedAndRepaired: one byte flipped in the replica file
// (bit rot on the target). Both recovery paths, through the server and
// straight from the target, fail and say which disk, which offset and
// which points; --accept-damage writes the image and lists the block; asr
// verify scrubs, finds it and repairs it from the source (through the
// agent), after which a new point recovers bit-exact while the old points
// still report their damage.
func TestE2EBitRotDetectedAndRepaired(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeDisk(t, disk, 32<<20, 11)
	a := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", 3*time.Minute)
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x61 4M 1M")
	p1 := c.tag("vm1")
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x62 12M 64k")
	p2 := c.tag("vm1")

	// Rot in block 4M+8k, written before both points and not since.
	id := machineID(t, a)
	replica := filepath.Join(c.srvDir, "target", "disks", "machines", id, "disks", "0.disk", "replica.img")
	const rot = 4<<20 + 8192 + 300
	flipByte(t, replica, rot)
	const block = "offset 4202496"

	out := filepath.Join(c.dir, "out")
	_, err := c.cli("recover", "--machine", "vm1", "--point", p1, "--out", out)
	if err == nil || !strings.Contains(err.Error(), "disk d") || !strings.Contains(err.Error(), block) ||
		!strings.Contains(err.Error(), "point "+p1) || !strings.Contains(err.Error(), p2) {
		t.Fatalf("recover through the server = %v; want the disk, %s, point %s and also %s", err, block, p1, p2)
	}
	if _, err := os.Stat(filepath.Join(out, "d.img")); !os.IsNotExist(err) {
		t.Fatal("a failed recovery left an image behind")
	}
	res, err := c.cli("recover", "--machine", "vm1", "--point", p1, "--out", out, "--accept-damage")
	if err != nil || !strings.Contains(res, "WARNING: 1 damaged blocks") || !strings.Contains(res, "4202496") {
		t.Fatalf("recover with accepted damage: %v\n%s", err, res)
	}
	ev := c.mustCLI("events", "--machine", "vm1")
	if !strings.Contains(ev, "damage") || !strings.Contains(ev, "4202496") {
		t.Fatalf("no damage event:\n%s", ev)
	}

	// asr verify: the scrub finds the block; the compare with the source
	// resends it. It exits non-zero: damage was found.
	vout, err := c.cli("verify", "--machine", "vm1", "--wait")
	if err == nil || !strings.Contains(vout, "1 damaged blocks") || !strings.Contains(vout, "verify-done") {
		t.Fatalf("asr verify = %v\n%s", err, vout)
	}
	p3 := c.tag("vm1")
	c.recoverAndCheck("vm1", p3, map[string]string{"d": sha256File(t, disk)})
	// A second scrub finds the replica whole; the damaged copy now lives in
	// point p2's saved blocks (the repair saved it there for p1 and p2,
	// which held it), and is reported there.
	vout, err = c.cli("verify", "--machine", "vm1", "--no-source")
	if err == nil || !strings.Contains(vout, "replica checked, 0 damaged blocks") ||
		!strings.Contains(vout, "point "+p2+" disk d: 1 damaged blocks in the blocks it holds at 4202496") {
		t.Fatalf("verify after the repair = %v\n%s", err, vout)
	}

	// The site is gone: straight from the target, the same verdicts.
	a.stop()
	c.server.stop()
	target := "file://" + filepath.Join(c.srvDir, "target")
	pass := filepath.Join(c.srvDir, "passphrase")
	// (A new --out: out holds p1's image, which recover does not replace.)
	_, err = runAsr("recover", "--machine", "vm1", "--point", p2, "--out", filepath.Join(c.dir, "out-target"), "--target", target, "--passphrase-file", pass)
	if err == nil || !strings.Contains(err.Error(), block) || !strings.Contains(err.Error(), "point "+p2) || !strings.Contains(err.Error(), p1) {
		t.Fatalf("recover from the target = %v; want %s in point %s, also %s", err, block, p2, p1)
	}
	c.recoverAndCheck("vm1", p3, map[string]string{"d": sha256File(t, disk)}, "--target", target, "--passphrase-file", pass)
	vout, err = runAsr("verify", "--machine", "vm1", "--target", target, "--passphrase-file", pass)
	if err == nil || !strings.Contains(vout, "point "+p2+" disk d") || !strings.Contains(vout, "1 damaged blocks at 4202496") {
		t.Fatalf("offline verify = %v\n%s", err, vout)
	}
}

// TestE2EHugeSparseDisk: an agent protecting a sparse 15 TiB disk (the
// server used to allocate 17 bytes per 4 KiB of it at the Hello, 64 GB,
// and crash, again after every restart) is protected in seconds, makes
// points and survives a server restart; a disk larger than asr supports is
// refused with a clear error, and the server stays up.
func TestE2EHugeSparseDisk(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	disk := filepath.Join(c.dir, "big.img")
	f, err := os.Create(disk)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(15 << 40); err != nil {
		t.Fatalf("this file system cannot hold a 15 TiB sparse file: %v", err)
	}
	f.Close()
	a := c.startAgent("big", nil, "d="+disk)
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x44 7T 1M", "-c", "write -P 0x45 15359G 4k")
	c.waitState("big", "protected", 3*time.Minute)
	p := c.tag("big")
	c.server.stop()
	c.startServer()
	if p2 := c.tag("big"); p2 == p {
		t.Fatal("no new point after the restart")
	}

	// A Hello naming a 70 TiB disk (more than any VMware disk) is refused
	// with the reason; nothing is created and the server goes on.
	id := machineID(t, a)
	w := helloAs(t, c, a, replication.Hello{MachineID: id, Disks: []replication.DiskInfo{
		{Index: 0, Name: "d", Size: 15 << 40}, {Index: 1, Name: "huge", Size: 70 << 40}}, NextSeq: 1 << 40, SpoolFirst: 1})
	if !strings.Contains(w, "larger than asr supports") {
		t.Fatalf("a 70 TiB disk: server answered %q", w)
	}
	if _, err := os.Stat(filepath.Join(c.srvDir, "target", "disks", "machines", id, "disks", "1.disk")); !os.IsNotExist(err) {
		t.Fatalf("a replica was made for the refused disk: %v", err)
	}
	if c.server.exited() {
		t.Fatal("the server exited")
	}
	c.tag("big")
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x10
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// machineID reads an agent's machine id from its state.
func machineID(t *testing.T, a *agentProc) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(a.state, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, `"machine_id": "`)
	if i < 0 {
		t.Fatalf("no machine id in %s", s)
	}
	s = s[i+len(`"machine_id": "`):]
	return s[:strings.IndexByte(s, '"')]
}

// helloAs opens a data connection with an agent's certificate, sends h and
// returns the server's answer: "welcome" or the error message.
func helloAs(t *testing.T, c *cluster, a *agentProc, h replication.Hello) string {
	t.Helper()
	caPEM, _ := os.ReadFile(filepath.Join(c.srvDir, "ca.pem"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(filepath.Join(a.state, "cert.pem"), filepath.Join(a.state, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := tls.Dial("tcp", "127.0.0.1:"+c.dataPort, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hf, _ := replication.JSONFrame(replication.FrameHello, h)
	if err := replication.WriteFrame(conn, &hf); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(time.Minute))
	f, _, err := replication.ReadFrame(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	if f.Type == replication.FrameWelcome {
		return "welcome"
	}
	var e replication.ErrorMessage
	replication.DecodeJSON(&f, &e)
	return fmt.Sprint(e.Message)
}
