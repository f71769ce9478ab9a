package server_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication/procserver"
)

// stripeWriter writes whole 4 KiB blocks of its own stripe of a disk
// (block b is writer b%stripes's), one at a time, and remembers the last
// write to each block that was acknowledged: since no other writer
// touches its blocks, that is what the block must hold in any point taken
// after it.
type stripeWriter struct {
	c       *nbd.Client
	disk    string
	id      int
	stripes int

	mu    sync.Mutex
	last  map[int64][]byte // block offset -> last acknowledged contents
	count int
}

// run writes until a write fails and returns that failure.
func (w *stripeWriter) run(progress chan<- struct{}) error {
	rnd := rand.New(rand.NewPCG(uint64(w.id), 7))
	blocks := w.c.Size() / 4096
	for {
		b := int64(rnd.IntN(int(blocks/int64(w.stripes))))*int64(w.stripes) + int64(w.id)
		if b >= blocks {
			continue
		}
		data := make([]byte, 4096)
		var err error
		switch rnd.IntN(8) {
		case 0:
			err = w.c.WriteZeroes(b*4096, 4096)
		case 1:
			for i := range data {
				data[i] = byte(rnd.IntN(256))
			}
			err = w.c.WriteAtFUA(data, b*4096)
		default:
			for i := range data {
				data[i] = byte(rnd.IntN(256))
			}
			err = w.c.WriteAt(data, b*4096)
		}
		if err != nil {
			return err
		}
		w.mu.Lock()
		w.last[b*4096] = data
		w.count++
		w.mu.Unlock()
		select {
		case progress <- struct{}{}:
		default:
		}
	}
}

// A planned failover under a constant write load: every write the guest
// was told had completed is in the final point Freeze returns, and the
// point equals the source disks byte for byte, since nothing can be
// written after the freeze. Thaw allows writes again.
func TestPlannedFailoverFreezeLosesNoAcknowledgedWrite(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	r := startServer(t, dir)
	d0, d1 := filepath.Join(dir, "d0.img"), filepath.Join(dir, "d1.img")
	mustDisk(t, d0, 8<<20, 11)
	mustDisk(t, d1, 2<<20, 12)
	cfg := r.agentConfig("vm1", agent.DiskSpec{Name: "d0", Path: d0}, agent.DiskSpec{Name: "d1", Path: d1})
	startAgent(t, cfg)
	r.waitProtected("vm1")
	id := r.machine("vm1").ID
	ps := r.srv.ProcessServerForTest()

	if _, err := ps.Freeze(ctx, "00nosuchmachine", "planned-1"); !errors.Is(err, procserver.ErrNotConnected) {
		t.Fatalf("Freeze of an unknown machine: %v, want ErrNotConnected", err)
	}
	if _, err := ps.Freeze(ctx, id, "../bad id"); err == nil {
		t.Fatal("Freeze with an invalid id succeeded")
	}

	// Three writers per disk, each on its own connection and stripe.
	var writers []*stripeWriter
	progress := make(chan struct{}, 1)
	refused := make(chan error, 6)
	for _, disk := range []string{"d0", "d1"} {
		for i := range 3 {
			c, err := nbd.Dial(ctx, cfg.NBD, disk)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			w := &stripeWriter{c: c, disk: disk, id: i, stripes: 3, last: map[int64][]byte{}}
			writers = append(writers, w)
			go func() { refused <- w.run(progress) }()
		}
	}
	for range 300 { // the load is well under way
		<-progress
	}
	p, err := ps.Freeze(ctx, id, "planned-1")
	if err != nil {
		t.Fatal(err)
	}
	for range writers {
		if err := <-refused; !errors.Is(err, nbd.EPERM) {
			t.Fatalf("a writer stopped with %v, want EPERM (frozen)", err)
		}
	}
	total := 0
	for _, w := range writers {
		total += w.count
	}
	t.Logf("final point %s after %d acknowledged writes", p.ID, total)

	out := filepath.Join(dir, "failover")
	r.recover("vm1", p.ID, out)
	for _, disk := range []string{"d0", "d1"} {
		src, err := os.ReadFile(filepath.Join(dir, disk+".img"))
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(out, disk+".img"))
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range writers {
			if w.disk != disk {
				continue
			}
			for off, data := range w.last {
				if !bytes.Equal(got[off:off+4096], data) {
					t.Fatalf("disk %s: the acknowledged write at %d is not in the final point", disk, off)
				}
			}
		}
		if !bytes.Equal(got, src) {
			t.Fatalf("disk %s: the final point differs from the frozen source", disk)
		}
	}

	// The same failover again: another point, equal to the first.
	p2, err := ps.Freeze(ctx, id, "planned-1")
	if err != nil {
		t.Fatal(err)
	}
	if p2.Seq <= p.Seq {
		t.Fatalf("a repeated freeze gave point %s, not one after %s", p2.ID, p.ID)
	}

	// A thaw of another failover is refused; this one's allows writes.
	if err := ps.Thaw(ctx, id, "planned-0"); err == nil {
		t.Fatal("the thaw of another failover succeeded")
	}
	c, err := nbd.Dial(ctx, cfg.NBD, "d0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteAt(make([]byte, 4096), 0); !errors.Is(err, nbd.EPERM) {
		t.Fatalf("a write after another failover's thaw: %v, want EPERM", err)
	}
	if err := ps.Thaw(ctx, id, "planned-1"); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(bytes.Repeat([]byte{1}, 4096), 0); err != nil {
		t.Fatalf("a write after the thaw: %v", err)
	}
	if err := ps.Thaw(ctx, id, "planned-1"); err != nil {
		t.Fatalf("a second thaw: %v", err)
	}
	if err := ps.Thaw(ctx, "00nosuchmachine", "planned-1"); !errors.Is(err, procserver.ErrNotConnected) {
		t.Fatalf("Thaw of an unknown machine: %v, want ErrNotConnected", err)
	}
}
