package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication"
)

// hungAfter bounds the waits of these tests for a state: a safety net
// against a hung run, not the pace a loaded machine must keep.
const hungAfter = time.Minute

// runAgent runs a until the end of the test (or until the returned stop).
func runAgent(t *testing.T, a *Agent) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// restartAgent stops a cleanly and opens a new agent on the same state
// directory and disks, as a restart of the service would.
func restartAgent(t *testing.T, a *Agent, stop func()) *Agent {
	t.Helper()
	stop()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := New(context.Background(), a.cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func mustDial(t *testing.T, a *Agent, export string) *nbd.Client {
	t.Helper()
	c, err := nbd.Dial(context.Background(), "unix:"+a.NBDAddr().String(), export)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ackedWrite is a write the guest was told had completed.
type ackedWrite struct {
	disk string
	off  int64
	data []byte
}

// writeUntilRefused writes random blocks through c until a write is
// refused, recording on acked every write that succeeded, and returns the
// refusal.
func writeUntilRefused(c *nbd.Client, disk string, seed uint64, mu *sync.Mutex, acked *[]ackedWrite, progress chan<- struct{}) error {
	rnd := rand.New(rand.NewPCG(seed, 1))
	for {
		b := make([]byte, 512*(1+rnd.IntN(32)))
		for i := range b {
			b[i] = byte(rnd.IntN(256))
		}
		off := rnd.Int64N((c.Size()-int64(len(b)))/512) * 512
		var err error
		switch rnd.IntN(10) {
		case 0:
			err = c.WriteZeroes(off, int64(len(b)))
			b = make([]byte, len(b))
		case 1:
			err = c.WriteAtFUA(b, off)
		default:
			err = c.WriteAt(b, off)
		}
		if err != nil {
			return err
		}
		mu.Lock()
		*acked = append(*acked, ackedWrite{disk, off, b})
		mu.Unlock()
		select {
		case progress <- struct{}{}:
		default:
		}
	}
}

// replay builds each disk's contents from the log records before seq
// (the disks start all zero).
func replay(t *testing.T, a *Agent, recs []replication.Record, before uint64) map[uint32][]byte {
	t.Helper()
	img := map[uint32][]byte{}
	for _, d := range a.disks {
		img[d.Index] = make([]byte, d.Size())
	}
	for _, r := range recs {
		if r.Seq >= before {
			break
		}
		switch r.Kind {
		case replication.KindWrite, replication.KindBase:
			copy(img[r.Disk][r.Offset:], r.Data)
		case replication.KindZero, replication.KindTrim:
			clear(img[r.Disk][r.Offset : r.Offset+uint64(r.Length)])
		}
	}
	return img
}

// findTag returns the tag record with request id req, waiting for it.
func findTag(t *testing.T, a *Agent, req uint64) (replication.Record, []replication.Record) {
	t.Helper()
	var tag replication.Record
	var recs []replication.Record
	waitFor(t, fmt.Sprintf("tag record of request %d", req), func() bool {
		recs = spoolRecords(t, a.spool, a.spool.First())
		for _, r := range recs {
			if r.Kind == replication.KindTag && r.Offset == req {
				tag = r
				return true
			}
		}
		return false
	})
	return tag, recs
}

// TestFreezeRefusesWritesAndTagsEveryAcknowledgedWrite: writers keep
// writing through NBD while the machine is frozen; from the freeze on
// every write, write-zeroes and trim is refused with EPERM, reads and
// flushes work, and the final point's tag comes after every write the
// guest was told had completed, and nothing after it. A repeated FREEZE
// only tags again; the freeze survives a restart; a THAW of another
// failover changes nothing, the THAW of this one allows writes again,
// also after the next restart.
func TestFreezeRefusesWritesAndTagsEveryAcknowledgedWrite(t *testing.T) {
	a := mustAgent(t, agentSetup{sizes: []int64{4 << 20, 1 << 20}})
	stop := runAgent(t, a)
	waitFor(t, "initial copy", a.copies.allDone)
	ctx := context.Background()

	var mu sync.Mutex
	var acked []ackedWrite
	progress := make(chan struct{}, 1)
	refusals := make(chan error, 4)
	for i, disk := range []string{"d0", "d0", "d1", "d1"} {
		c := mustDial(t, a, disk)
		go func() { refusals <- writeUntilRefused(c, disk, uint64(i), &mu, &acked, progress) }()
	}
	for range 200 { // the writers are well under way
		<-progress
	}
	if err := a.freeze(ctx, replication.Freeze{ID: "planned-1", Req: 77}); err != nil {
		t.Fatal(err)
	}
	// From here every change is refused: each writer's next one.
	for range 4 {
		select {
		case err := <-refusals:
			if !errors.Is(err, nbd.EPERM) {
				t.Fatalf("a write while frozen: %v, want EPERM", err)
			}
		case <-time.After(hungAfter):
			t.Fatal("the writers' changes are not refused")
		}
	}
	c0 := mustDial(t, a, "d0")
	for name, op := range map[string]func() error{
		"write":        func() error { return c0.WriteAt(make([]byte, 4096), 0) },
		"write FUA":    func() error { return c0.WriteAtFUA(make([]byte, 4096), 4096) },
		"write zeroes": func() error { return c0.WriteZeroes(0, 8192) },
		"trim":         func() error { return c0.Trim(0, 8192) },
	} {
		if err := op(); !errors.Is(err, nbd.EPERM) {
			t.Fatalf("%s while frozen: %v, want EPERM", name, err)
		}
	}
	if err := c0.Flush(); err != nil {
		t.Fatalf("flush while frozen: %v", err)
	}
	src, err := os.ReadFile(a.disks[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(src))
	if err := c0.ReadAt(got, 0); err != nil || !bytes.Equal(got, src) {
		t.Fatalf("read while frozen: %v, or not the disk's contents", err)
	}

	tag, recs := findTag(t, a, 77)
	if a.status().Failover != "planned-1" {
		t.Fatalf("status says failover %q, want planned-1", a.status().Failover)
	}
	// Every acknowledged write is logged before the tag...
	mu.Lock()
	n := len(acked)
	mu.Unlock()
	for _, w := range acked[:n] {
		d := a.disks[0]
		if w.disk == "d1" {
			d = a.disks[1]
		}
		if !slices.ContainsFunc(recs, func(r replication.Record) bool {
			return r.Seq < tag.Seq && r.Disk == d.Index && r.Offset == uint64(w.off) &&
				(bytes.Equal(r.Data, w.data) || (r.Kind == replication.KindZero && int(r.Length) == len(w.data)))
		}) {
			t.Fatalf("an acknowledged write to %s at %d is not in the log before the final tag", w.disk, w.off)
		}
	}
	// ... and the point is the disks as they stay.
	img := replay(t, a, recs, tag.Seq)
	for _, d := range a.disks {
		b, err := os.ReadFile(d.Path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(img[d.Index], b) {
			t.Fatalf("disk %s differs from the log up to the final tag", d.Name)
		}
	}
	for _, r := range recs {
		if r.Seq > tag.Seq && (r.Kind == replication.KindWrite || r.Kind == replication.KindZero || r.Kind == replication.KindTrim) {
			t.Fatalf("a %s record after the final tag", r.Kind)
		}
	}

	// The same failover again: tagged again, still frozen.
	if err := a.freeze(ctx, replication.Freeze{ID: "planned-1", Req: 78}); err != nil {
		t.Fatal(err)
	}
	tag2, recs := findTag(t, a, 78)
	for _, r := range recs[tag.Seq-recs[0].Seq+1 : tag2.Seq-recs[0].Seq] {
		if r.Kind == replication.KindWrite || r.Kind == replication.KindZero || r.Kind == replication.KindTrim {
			t.Fatalf("a guest change (%s) between the failover's two tags", r.Kind)
		}
	}

	// A restart stays frozen.
	a = restartAgent(t, a, stop)
	stop = runAgent(t, a)
	c0 = mustDial(t, a, "d0")
	if err := c0.WriteAt(make([]byte, 512), 0); !errors.Is(err, nbd.EPERM) {
		t.Fatalf("a write after a restart while frozen: %v, want EPERM", err)
	}
	// Another failover's thaw changes nothing; this one's thaws.
	if err := a.thaw(replication.Freeze{ID: "planned-0"}); err != nil {
		t.Fatal(err)
	}
	if err := c0.WriteAt(make([]byte, 512), 0); !errors.Is(err, nbd.EPERM) {
		t.Fatalf("a write after another failover's thaw: %v, want EPERM", err)
	}
	if err := a.thaw(replication.Freeze{ID: "planned-1"}); err != nil {
		t.Fatal(err)
	}
	if err := c0.WriteAt(bytes.Repeat([]byte{7}, 512), 0); err != nil {
		t.Fatalf("a write after the thaw: %v", err)
	}
	if a.status().Failover != "" {
		t.Fatalf("status says failover %q after the thaw", a.status().Failover)
	}
	// Thawed for good: also after the next restart.
	a = restartAgent(t, a, stop)
	runAgent(t, a)
	c0 = mustDial(t, a, "d0")
	if err := c0.WriteAt(bytes.Repeat([]byte{8}, 512), 512); err != nil {
		t.Fatalf("a write after the thaw and a restart: %v", err)
	}
}

// A thaw cancels a freeze still waiting to tag (here: for the initial
// copy), and a freeze that cannot be saved refuses nothing.
func TestFreezeWaitsForTheCopyAndThawCancels(t *testing.T) {
	a := mustAgent(t, agentSetup{})
	// Not running: the copy never completes, so the point waits.
	ready := make(chan bool)
	a.fo.ready = func() bool { return <-ready }
	ctx := context.Background()
	if err := a.freeze(ctx, replication.Freeze{ID: "f", Req: 5}); err != nil {
		t.Fatal(err)
	}
	ready <- false // the final point is waiting
	if err := a.disks[0].WriteAt(make([]byte, 512), 0, false); !errors.Is(err, errFrozen) {
		t.Fatalf("a write while frozen: %v", err)
	}
	if err := a.thaw(replication.Freeze{ID: "f"}); err != nil {
		t.Fatal(err)
	}
	close(ready) // ready() now says false at once; the point gives up on the thaw
	a.fo.Close()
	for _, r := range spoolRecords(t, a.spool, a.spool.First()) {
		if r.Kind == replication.KindTag {
			t.Fatal("a tag after the thaw")
		}
	}
	if err := a.disks[0].WriteAt(make([]byte, 512), 0, false); err != nil {
		t.Fatalf("a write after the thaw: %v", err)
	}

	// The state file cannot be written (a directory took its name: even
	// root cannot rename a file over it): not frozen.
	sf := filepath.Join(a.cfg.StateDir, stateFile)
	if err := os.Remove(sf); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(sf, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := a.fo.freeze(ctx, replication.Freeze{ID: "g", Req: 6}); err == nil {
		t.Fatal("a freeze that could not be saved reported no error")
	}
	if err := a.disks[0].WriteAt(make([]byte, 512), 0, false); err != nil {
		t.Fatalf("a write after a freeze that could not be saved: %v", err)
	}
}
