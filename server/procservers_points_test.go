package server_test

import (
	"context"
	"crypto/sha256"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// tagWhenConnected asks for a point of machine name until its agent is
// connected to its process server (after a switch) and one is made.
func (r *rig) tagWhenConnected(ctx context.Context, name string) api.PointJSON {
	r.t.Helper()
	for {
		p, err := r.client.Tag(ctx, name, false, time.Minute)
		if err == nil {
			return p
		}
		select {
		case <-ctx.Done():
			r.t.Fatalf("no point of %s: %v", name, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// The points of a machine on a scale-out process server are read there:
// `asr verify --point` (a command) checks the point whole; a recovery
// through the configuration server (the image POSTed by ps1 and streamed
// on) equals the source at the point although the replica changes under
// it mid-stream (the stream paused after 1 MiB while writes at the end of
// the disk are applied and a later point made), and so does a recovery to
// an instant between that point and the next; a damaged block in the
// point is reported by the check (and an event), fails the recovery
// naming the offset and the other points sharing it, and is listed by a
// recovery that accepts it; the built-in process server never opens the
// machine.
func TestProcessServerReadsItsPoints(t *testing.T) {
	// Not parallel: it runs scale-out process servers, whose heartbeats
	// and commands have deadlines (PSHeartbeatLost, psCommandWait) that
	// the package's other tests run beside it made them overrun.
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) { c.PSHeartbeatLost = 3 * time.Second }}
	if testing.Verbose() {
		r.log = slog.Default()
	}
	r.start()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	d0 := filepath.Join(dir, "d0.img")
	const size = 64 << 20
	mustDisk(t, d0, size, 12)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	r.runPS(ctx, "ps1")
	if _, err := r.client.SwitchProcessServer(ctx, "vm1", "ps1"); err != nil {
		t.Fatal(err)
	}
	c0, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer c0.Close()
	rnd := rand.New(rand.NewPCG(12, 12))
	write := func(off int64, n int) {
		t.Helper()
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rnd.IntN(256))
		}
		if err := c0.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	write(0, 1<<20)
	write(5<<20, 256<<10) // the block damaged below, written before p and never after
	p := r.tagWhenConnected(ctx, "vm1")
	atP := fileSum(t, d0)

	// The point checked whole, on ps1.
	var vj api.VerifyJSON
	if err := r.client.Do(ctx, "POST", "/api/v1/machines/vm1/verify", api.VerifyRequest{Point: p.ID}, &vj); err != nil {
		t.Fatalf("verify --point of a machine on ps1: %v", err)
	}
	if len(vj.Point) != 1 || vj.Point[0].Point != p.ID || vj.Point[0].Checked != size || vj.Damaged || !strings.Contains(vj.Summary, "0 damaged blocks") {
		t.Fatalf("verify --point %s on ps1: %+v", p.ID, vj)
	}

	// The image, paused after 1 MiB while the end of the disk changes and
	// the change is applied (the next point is on the target).
	img, err := r.client.Image(ctx, "vm1", p.ID, "d0", false)
	if err != nil {
		t.Fatalf("image of a machine on ps1: %v", err)
	}
	if img.Size != size || !img.Checked {
		t.Fatalf("image of %d bytes, checked %v", img.Size, img.Checked)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, img.Body, 1<<20); err != nil {
		t.Fatal(err)
	}
	write(size-2<<20, 2<<20)
	write(40<<20, 1<<20)
	written := time.Now()
	p2 := r.tagWhenConnected(ctx, "vm1")
	if _, err := io.CopyN(h, img.Body, img.Size-1<<20); err != nil {
		t.Fatalf("the rest of the image: %v", err)
	}
	if d, more, err := img.Finish(); err != nil || len(d) > 0 || more > 0 {
		t.Fatalf("the image's verdict: %v, damaged %v", err, d)
	}
	if [32]byte(h.Sum(nil)) != atP {
		t.Fatalf("the image of point %s, streamed while ps1 applied later writes, differs from the source at the point", p.ID)
	}
	out := filepath.Join(dir, "out2")
	r.recover("vm1", p2.ID, out)
	if fileSum(t, filepath.Join(out, "d0.img")) != fileSum(t, d0) {
		t.Fatalf("point %s recovered through the server differs from the source", p2.ID)
	}
	// To an instant between p and p2: p's image from ps1, then the kept
	// segments up to it.
	out = filepath.Join(dir, "pit")
	if _, err := r.client.RecoverTime(ctx, "vm1", written, out, replication.RecoverOptions{}); err != nil {
		t.Fatalf("recovery to a point in time of a machine on ps1: %v", err)
	}
	if fileSum(t, filepath.Join(out, "d0.img")) != fileSum(t, d0) {
		t.Fatalf("the disk at %s (after the writes before %s) differs from the source", written.Format(time.RFC3339Nano), p2.ID)
	}
	if l, _ := r.client.ProcessServers(ctx); l[0].Machines != 0 {
		t.Fatalf("the built-in process server opened %d machines", l[0].Machines)
	}

	// One flipped byte in a block p holds in the replica itself.
	replica := filepath.Join(dir, "srv", "target", "disks", "machines", ra.a.MachineID(), "disks", "0.disk", "replica.img")
	f, err := os.OpenFile(replica, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	const rot, block = 5<<20 + 8192 + 99, 5<<20 + 8192
	b := make([]byte, 1)
	f.ReadAt(b, rot)
	b[0] ^= 0x04
	f.WriteAt(b, rot)
	f.Close()

	if err := r.client.Do(ctx, "POST", "/api/v1/machines/vm1/verify", api.VerifyRequest{Point: p.ID}, &vj); err != nil {
		t.Fatal(err)
	}
	if !vj.Damaged || len(vj.Point) != 1 || !slices.Equal(vj.Point[0].Damaged, []int64{block}) {
		t.Fatalf("verify --point %s after the damage: %+v", p.ID, vj)
	}
	waitFor(t, "the damage event reported by ps1", func() bool {
		evs, _ := r.srv.DB().Events(ctx, "", 200)
		return hasEvent(evs, "damage", "found by verify")
	})
	_, err = r.client.RecoverPoint(ctx, "vm1", p.ID, filepath.Join(dir, "bad"), replication.RecoverOptions{})
	if err == nil || !strings.Contains(err.Error(), "offset 5251072") || !strings.Contains(err.Error(), "point "+p.ID) ||
		!strings.Contains(err.Error(), p2.ID) || !strings.Contains(err.Error(), "current") {
		t.Fatalf("recovery of the damaged point through ps1 = %v; want offset 5251072 in point %s, also %s and current", err, p.ID, p2.ID)
	}
	if _, err := os.Stat(filepath.Join(dir, "bad", "d0.img")); !os.IsNotExist(err) {
		t.Fatalf("a failed recovery left an image: %v", err)
	}
	res, err := r.client.RecoverPoint(ctx, "vm1", p.ID, filepath.Join(dir, "accepted"), replication.RecoverOptions{AcceptDamage: true})
	if err != nil || !slices.Equal(res.Disks[0].Damaged, []int64{block}) {
		t.Fatalf("recovery accepting the damage: %v, %+v", err, res.Disks)
	}
	waitFor(t, "the damage event of the recovery", func() bool {
		evs, _ := r.srv.DB().Events(ctx, "", 200)
		return hasEvent(evs, "damage", "found by a recovery")
	})
}
