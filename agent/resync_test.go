package agent

import (
	"bytes"
	"context"
	"log/slog"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// TestHashBatches: the pipelined, parallel reader hashes every chunk as
// ChunkLeaves/ChunkHash of the data would, in order, from the cursor on.
func TestHashBatches(t *testing.T) {
	const size = 3*replication.HashChunk + 5*4096 // a short last chunk
	d, _, _ := mustTestDisk(t, size)
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	if _, err := d.f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	offs := []int64{0, replication.HashChunk, 2 * replication.HashChunk, 3 * replication.HashChunk}
	for _, from := range []int{0, 2} {
		var got []int64
		for hb := range d.hashBatches(context.Background(), offs, from, nil) {
			if hb.err != nil {
				t.Fatal(hb.err)
			}
			for j, off := range hb.offs {
				end := min(off+replication.HashChunk, size)
				want := replication.ChunkLeaves(data[off:end])
				ch := replication.ChunkHash(want)
				if !bytes.Equal(hb.hashes[16*j:16*j+16], ch[:]) {
					t.Fatalf("chunk at %d: wrong chunk hash", off)
				}
				if len(hb.leaves[off]) != len(want) || hb.leaves[off][len(want)-1] != want[len(want)-1] {
					t.Fatalf("chunk at %d: wrong block hashes", off)
				}
				got = append(got, off)
			}
		}
		if len(got) != len(offs)-from || got[0] != offs[from] {
			t.Fatalf("from %d: hashed chunks %v", from, got)
		}
	}
}

// TestHashBatchesRate: --resync-rate paces the reads chunk by chunk (a
// lower bound: the limit must hold however fast the disk is; the first
// chunk is read at once).
func TestHashBatchesRate(t *testing.T) {
	const chunks = 8
	d, _, _ := mustTestDisk(t, chunks*replication.HashChunk)
	var offs []int64
	for i := range int64(chunks) {
		offs = append(offs, i*replication.HashChunk)
	}
	start := time.Now()
	for hb := range d.hashBatches(context.Background(), offs, 0, &pacer{rate: 16 << 20}) {
		if hb.err != nil {
			t.Fatal(hb.err)
		}
	}
	if took, min := time.Since(start), (chunks-1)*time.Second/16; took < min {
		t.Fatalf("8 MiB read in %s at a limit of 16 MiB/s, want at least %s", took, min)
	}
}

// TestPacerNoBurstAfterStall: time not used is not saved up.
func TestPacerNoBurstAfterStall(t *testing.T) {
	p := &pacer{rate: 1 << 20}
	ctx := context.Background()
	p.wait(ctx, 1<<20)                    // the next read may start in 1 s
	p.next = time.Now().Add(-time.Minute) // as after a long stall
	p.wait(ctx, 1<<20)
	start := time.Now()
	p.wait(ctx, 1<<20) // must wait about 1 s, not run on credit
	if took := time.Since(start); took < 900*time.Millisecond {
		t.Fatalf("a read after a stall waited %s, want about 1 s", took)
	}
}

func TestResyncRateFlag(t *testing.T) {
	base := []string{"--disk", "d=/dev/null", "--nbd", "unix:/tmp/x.sock", "--name", "vm1"}
	c, err := ParseFlags(append(base, "--resync-rate", "200MiB"))
	if err != nil || c.ResyncRate != 200<<20 {
		t.Fatalf("--resync-rate 200MiB: %d, %v", c.ResyncRate, err)
	}
	if _, err := ParseFlags(append(base, "--resync-rate", "fast")); err == nil || !strings.Contains(err.Error(), "--resync-rate") {
		t.Fatalf("--resync-rate fast: %v", err)
	}
}

// TestResyncDoneShipsLikeATag: the end of a resync makes its DATA frame
// carry FlagTag, so the server seals it at once (the disk is protected
// again without waiting for the next seal).
func TestResyncDoneShipsLikeATag(t *testing.T) {
	d, sp, dir := mustTestDisk(t, 1<<20)
	a := &Agent{cfg: Config{StateDir: dir}, disks: []*Disk{d}, spool: sp, log: slog.Default(), ctx: context.Background(),
		st: &state{Resync: &resyncState{Job: replication.ResyncJob{ID: 7}}}}
	first := sp.Next()
	if _, err := d.logResync(7, "test", false); err != nil {
		t.Fatal(err)
	}
	if a.hasTag(first, first) {
		t.Fatal("the start of a resync ships like a tag")
	}
	if err := d.logResyncDone(a, 7, 1<<20, 0, false); err != nil {
		t.Fatal(err)
	}
	if !a.hasTag(first+1, first+1) {
		t.Fatal("the end of a resync does not ship like a tag")
	}
}
