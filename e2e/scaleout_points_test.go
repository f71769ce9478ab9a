//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// TestE2EProcessServerPoints: a real `asr server --cache-max 6GiB` and a
// real `asr process-server --cache-max 3GiB` (each bound in `asr ps
// list`), a machine switched to the scale-out one under fio. Its points
// are read there, while fio goes on writing and ps1 applying:
// `asr verify --point` passes; an image of the point through the
// configuration server, paused after 1 MiB while fio rewrites the end of
// the disk and a later point is made (so ps1 has applied those writes),
// equals the source at the point; `asr recover` of it, and of the latest
// point once fio stops, equal the source at those points. A byte flipped
// in a block the point holds in the replica is reported by `asr verify
// --point` (non-zero exit, the offset) and fails `asr recover` (the
// offset, the point).
func TestE2EProcessServerPoints(t *testing.T) {
	t.Parallel()
	c := newClusterArgs(t, "--cache-max", "6GiB")
	disk := filepath.Join(c.dir, "d0.img")
	makeDisk(t, disk, 64<<20, 21)
	a := c.startAgent("vm1", nil, "d0="+disk)
	c.waitState("vm1", "protected", 3*time.Minute)
	ps1 := c.startPS("ps1", "--cache-max", "3GiB")
	c.waitPS("ps1 healthy, both cache bounds", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps1"].State == api.PSHealthy && l["ps1"].Figures.CacheMaxB == 3<<30 && l[api.BuiltinProcessServer].Figures.CacheMaxB == 6<<30
	})
	if out := c.mustCLI("status", "--process-server"); !strings.Contains(out, "cache bound:  6442450944 bytes") {
		t.Fatalf("asr status --process-server of asr server --cache-max 6GiB:\n%s", out)
	}

	// 1 MiB at 48M, written before the point and never after (fio writes
	// below 24M, and at 56M-64M during the paused image).
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d0"), "-c", "write -P 0x5a 48M 1M")
	stop := make(chan struct{})
	var bg background
	fioRounds(t, &bg, stop, "vm1", a.uri("d0"), 31)
	c.switchTo("vm1", "ps1")
	close(stop)
	if err := bg.wait(); err != nil {
		t.Fatal(err)
	}
	id := c.tag("vm1")
	atID := sha256File(t, disk)

	// fio again, all through the reads of the point.
	stop = make(chan struct{})
	bg = background{}
	fioRounds(t, &bg, stop, "vm1", a.uri("d0"), 57)
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
			bg.wait()
		}
	}()
	if out := c.mustCLI("verify", "--machine", "vm1", "--point", id); !strings.Contains(out, "point "+id+": 67108864 bytes checked, 0 damaged blocks") {
		t.Fatalf("asr verify --point %s of vm1 on ps1:\n%s", id, out)
	}
	if b, _ := os.ReadFile(ps1.log); !strings.Contains(string(b), "point check asked by the configuration server") {
		t.Fatal("ps1 did not check the point")
	}

	client, err := api.NewClient(c.url(), filepath.Join(c.srvDir, "admin-token"), filepath.Join(c.srvDir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
	defer cancel()
	img, err := client.Image(ctx, "vm1", id, "d0", false)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, img.Body, 1<<20); err != nil {
		t.Fatal(err)
	}
	fctx, fcancel := context.WithTimeout(context.Background(), hungAfter)
	out, err := runTool(fctx, t, "fio", "--name=end", "--ioengine=nbd", "--uri="+a.uri("d0"), "--rw=randwrite", "--bs=4k", "--iodepth=4",
		"--size=8M", "--offset=56M", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--randseed=99")
	fcancel()
	if err != nil {
		t.Fatalf("fio at the end of the disk: %v\n%s", err, out)
	}
	later := c.tag("vm1") // on the target: ps1 applied fio's writes
	if _, err := io.CopyN(h, img.Body, img.Size-1<<20); err != nil {
		t.Fatalf("the rest of the image: %v", err)
	}
	if d, more, err := img.Finish(); err != nil || len(d) > 0 || more > 0 {
		t.Fatalf("the image's verdict: %v, damaged %v", err, d)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != atID {
		t.Fatalf("the image of point %s, streamed while ps1 applied fio's writes (point %s), is %s; the source had %s", id, later, got, atID)
	}
	c.recoverAndCheck("vm1", id, map[string]string{"d0": atID})

	// fio stops: the latest point equals the source.
	close(stop)
	if err := bg.wait(); err != nil {
		t.Fatal(err)
	}
	last := c.tag("vm1")
	c.recoverAndCheck("vm1", last, map[string]string{"d0": sha256File(t, disk)})
	var l []api.PointJSON
	if err := json.Unmarshal([]byte(c.mustCLI("points", "--machine", "vm1", "--json")), &l); err != nil || len(l) == 0 || l[len(l)-1].ID != last {
		t.Fatalf("points of vm1: %+v, %v; want %s last", l, err, last)
	}

	// Damage in a block point id holds in the replica itself.
	replica := filepath.Join(c.srvDir, "target", "disks", "machines", machineID(t, a), "disks", "0.disk", "replica.img")
	flipByte(t, replica, 48<<20+8192+77)
	const block = "50339840"
	vout, err := c.cli("verify", "--machine", "vm1", "--point", id)
	if err == nil || !strings.Contains(vout, "1 damaged blocks at "+block) {
		t.Fatalf("asr verify --point %s after the damage = %v\n%s", id, err, vout)
	}
	_, err = c.cli("recover", "--machine", "vm1", "--point", id, "--out", filepath.Join(c.dir, "damaged"))
	if err == nil || !strings.Contains(err.Error(), "offset "+block) || !strings.Contains(err.Error(), "point "+id) || !strings.Contains(err.Error(), last) {
		t.Fatalf("asr recover of the damaged point %s = %v; want offset %s, also point %s", id, err, block, last)
	}
	if _, err := os.Stat(filepath.Join(c.dir, "damaged", "d0.img")); !os.IsNotExist(err) {
		t.Fatal("a failed recovery left an image behind")
	}
	// The damage events ps1 reported (its heartbeats' news, written by
	// the configuration server's mirror).
	deadline := time.Now().Add(hungAfter)
	for {
		ev := c.mustCLI("events", "--machine", "vm1")
		if strings.Contains(ev, "found by verify") && strings.Contains(ev, "found by a recovery") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no damage events from ps1:\n%s", ev)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
