package server_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// dialAs opens a data connection with an agent's certificate and completes
// the Hello, returning the connection and the server's durable seq.
func dialAs(t *testing.T, r *rig, cfg agent.Config, hello replication.Hello) (*tls.Conn, *bufio.Reader, uint64) {
	t.Helper()
	caPEM, _ := os.ReadFile(filepath.Join(r.dir, "srv", "ca.pem"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(filepath.Join(cfg.StateDir, "cert.pem"), filepath.Join(cfg.StateDir, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.Dial("tcp", r.srv.DataAddr().String(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	hf, _ := replication.JSONFrame(replication.FrameHello, hello)
	if err := replication.WriteFrame(c, &hf); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(hung))
	f, _, err := replication.ReadFrame(br, nil)
	if err != nil || f.Type != replication.FrameWelcome {
		t.Fatalf("welcome: %v %v %s", f.Type, err, f.Payload)
	}
	var w replication.Welcome
	if err := replication.DecodeJSON(&f, &w); err != nil {
		t.Fatal(err)
	}
	return c, br, w.DurableSeq
}

// A DATA frame whose header claims 0xFFFFFFFF records around one real one
// is refused before it is written or acknowledged: the connection is
// closed with the reason on the machine, the server stays up, and the real
// agent goes on replicating.
func TestDataFrameCountRefusedBeforeAck(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	var logs syncBuffer
	r := &rig{t: t, dir: dir, log: slog.New(slog.NewTextHandler(&logs, nil))}
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 2<<20, 1)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	id := ra.a.MachineID()
	ra.close()

	m := r.machine("vm1")
	c, br, durable := dialAs(t, r, cfg, replication.Hello{MachineID: id, Disks: []replication.DiskInfo{{Index: m.Disks[0].Index, Name: "d", Size: 2 << 20}},
		NextSeq: 1 << 40, SpoolFirst: 1})
	rec := replication.Record{Seq: durable + 1, Kind: replication.KindWrite, Offset: 0, Data: []byte("one real record"), Length: 15}
	f := replication.Frame{Type: replication.FrameData, Seq: durable + 1, Count: 0xFFFFFFFF}
	f.Payload = replication.AppendRecord(nil, &rec)
	f.RawLen = uint32(len(f.Payload))
	if err := replication.WriteFrame(c, &f); err != nil {
		t.Fatal(err)
	}
	// Nothing may be acknowledged; the server closes the connection.
	c.SetReadDeadline(time.Now().Add(hung))
	for {
		f, _, err := replication.ReadFrame(br, nil)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("the server kept the connection open after a malformed frame")
			}
			break
		}
		if f.Type == replication.FrameAck && f.Seq > durable {
			t.Fatalf("the malformed frame was acknowledged (ack %d, durable was %d)", f.Seq, durable)
		}
	}
	c.Close()
	// The reason reaches the machine's row off the connection's path.
	waitFor(t, "the machine to say why", func() bool { return strings.Contains(r.machine("vm1").Error, "refused a data frame") })
	// The agent resumes where the server's durable log ends.
	startAgent(t, cfg)
	p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatalf("tag after the malformed frame: %v", err)
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("the recovered disk differs from the source")
	}
}

// Bit rot in the replica: recovery through the server fails naming the
// disk, the offset and every point that shares the block; with accepted
// damage it writes the image and lists the block; a scrub finds it and
// marks it, and `asr verify` (the compare with the source) resends it, so
// that a new point is whole again while the old ones stay damaged.
func TestBitRotFoundAndRepaired(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 4<<20, 7)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	p1, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	// One flipped byte in the replica file, in a block with data.
	replica := filepath.Join(dir, "srv", "target", "disks", "machines", ra.a.MachineID(), "disks", "0.disk", "replica.img")
	f, err := os.OpenFile(replica, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	const rot = 3<<20 + 8192 + 17
	b := make([]byte, 1)
	f.ReadAt(b, rot)
	b[0] ^= 0x80
	f.WriteAt(b, rot)
	f.Close()

	out := filepath.Join(dir, "out")
	_, err = r.client.RecoverPoint(ctx, "vm1", p1.ID, out, replication.RecoverOptions{})
	if err == nil || !strings.Contains(err.Error(), "offset 3153920") || !strings.Contains(err.Error(), "point "+p1.ID) ||
		!strings.Contains(err.Error(), p2.ID) || !strings.Contains(err.Error(), "current") {
		t.Fatalf("recover through the server = %v; want damage at 3153920 in point %s, also %s and current", err, p1.ID, p2.ID)
	}
	if _, err := os.Stat(filepath.Join(out, "d.img")); !os.IsNotExist(err) {
		t.Fatalf("a failed recovery left an image: %v", err)
	}
	res, err := r.client.RecoverPoint(ctx, "vm1", p1.ID, out, replication.RecoverOptions{AcceptDamage: true})
	if err != nil || !slices.Equal(res.Disks[0].Damaged, []int64{3153920}) {
		t.Fatalf("recover with accepted damage: %v, %+v", err, res.Disks)
	}
	evs, _ := r.srv.DB().Events(ctx, "", 100)
	if !hasEvent(evs, "damage", "3153920") {
		t.Fatalf("no damage event: %+v", evs)
	}

	// asr verify: the scrub finds the block, the compare resends it.
	var vres api.VerifyJSON
	if err := r.client.Do(ctx, "POST", "/api/v1/machines/vm1/verify", api.VerifyRequest{}, &vres); err != nil {
		t.Fatal(err)
	}
	if !vres.Damaged || len(vres.Scrub.Disks) != 1 || !slices.Equal(vres.Scrub.Disks[0].Damaged, []int64{3153920}) {
		t.Fatalf("scrub found %+v", vres.Scrub)
	}
	waitFor(t, "the verify to finish", func() bool {
		evs, _ := r.srv.DB().Events(ctx, "", 200)
		return hasEvent(evs, "verify-done", "")
	})
	p3, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	out3 := filepath.Join(dir, "out3")
	res, err = r.client.RecoverPoint(ctx, "vm1", p3.ID, out3, replication.RecoverOptions{})
	if err != nil || !res.Disks[0].Checked {
		t.Fatalf("recover the point after the repair: %v", err)
	}
	if fileSum(t, filepath.Join(out3, "d.img")) != fileSum(t, disk) {
		t.Fatal("the repaired point differs from the source")
	}
	// The old points keep the damage (the source has moved on).
	if _, err := r.client.RecoverPoint(ctx, "vm1", p1.ID, filepath.Join(dir, "out4"), replication.RecoverOptions{}); !strings.Contains(fmtErr(err), "does not match its checksum") {
		t.Fatalf("old point after the repair: %v", err)
	}
	// A second scrub finds the current contents whole.
	m, _ := r.srv.DB().MachineByName(ctx, "vm1")
	rep, err := r.srv.ScrubMachine(ctx, m, false)
	if err != nil || len(rep.Disks[0].Damaged) != 0 {
		t.Fatalf("scrub after the repair: %v %+v", err, rep.Disks)
	}
}

func fmtErr(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func hasEvent(evs []store.Event, kind, text string) bool {
	for _, e := range evs {
		if e.Kind == kind && strings.Contains(e.Message, text) {
			return true
		}
	}
	return false
}

// waitFor waits for cond, failing after a generous bound (a hung test, not
// a slow one).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The scheduled scrub runs once an interval has passed since the last one,
// only inside the machine's resync window; damage it finds is marked and
// resynced from the source in the window, and the next point is whole.
func TestScheduledScrub(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	var clock atomic.Int64
	day := time.Date(2026, 11, 27, 12, 0, 0, 0, time.Local) // outside the default window (22:00-06:00)
	clock.Store(day.UnixNano())
	r := &rig{t: t, dir: dir, log: quietLogger(), tune: func(c *server.Config) {
		c.Now = func() time.Time { return time.Unix(0, clock.Load()) }
		c.ResyncEvery = 20 * time.Millisecond
	}}
	r.start()
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 4<<20, 9)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk})
	ra := startAgent(t, cfg)
	r.waitProtected("vm1")
	if err := r.client.Do(ctx, http.MethodPut, "/api/v1/settings/scrub", api.ScrubRequest{Every: "24h"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.client.Do(ctx, http.MethodPut, "/api/v1/settings/scrub", api.ScrubRequest{Every: "5m"}, nil); err == nil {
		t.Fatal("a scrub interval under an hour was accepted")
	}
	scrubbed := func() time.Time {
		m, err := r.srv.DB().MachineByName(ctx, "vm1")
		if err != nil {
			t.Fatal(err)
		}
		return m.LastScrub
	}
	// A day later, but outside the window: nothing.
	clock.Store(day.Add(25 * time.Hour).UnixNano())
	waitScheduledTicks(t, r)
	if !scrubbed().IsZero() {
		t.Fatal("a scrub ran outside the resync window")
	}
	// In the window: it runs, finds nothing.
	night := day.Add(35 * time.Hour) // 23:00 the next day
	clock.Store(night.UnixNano())
	waitFor(t, "the scheduled scrub", func() bool { return !scrubbed().IsZero() })
	evs, _ := r.srv.DB().Events(ctx, "", 100)
	if !hasEvent(evs, "scrub-ok", "no damage") {
		t.Fatalf("no scrub-ok event: %+v", evs)
	}
	// Bit rot; the next night's scrub finds it, and the resync it marks
	// runs in the window and repairs it.
	replica := filepath.Join(dir, "srv", "target", "disks", "machines", ra.a.MachineID(), "disks", "0.disk", "replica.img")
	f, _ := os.OpenFile(replica, os.O_RDWR, 0)
	b := make([]byte, 1)
	f.ReadAt(b, 2<<20+5)
	b[0] ^= 1
	f.WriteAt(b, 2<<20+5)
	f.Close()
	clock.Store(night.Add(24 * time.Hour).UnixNano())
	waitFor(t, "the scrub to find the damage and the resync to repair it", func() bool {
		evs, _ := r.srv.DB().Events(ctx, "", 200)
		return hasEvent(evs, "damage", "2097152") && hasEvent(evs, "resync-done", "sent 4096")
	})
	p, err := r.client.Tag(ctx, "vm1", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	r.recover("vm1", p.ID, out)
	if fileSum(t, filepath.Join(out, "d.img")) != fileSum(t, disk) {
		t.Fatal("the point after the repair differs from the source")
	}
}

// waitScheduledTicks waits until the resync loop (where scrubs are
// scheduled) has run several times since the call.
func waitScheduledTicks(t *testing.T, r *rig) {
	t.Helper()
	for i := 0; i < 3; i++ {
		before := server.LoopTicks(r.srv)
		waitFor(t, "the resync loop", func() bool { return server.LoopTicks(r.srv) > before })
	}
}
