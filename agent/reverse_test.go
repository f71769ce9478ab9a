package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"strings"
	"testing"

	"github.com/asrdr/asr/replication"
)

// Failback's writes are accepted only while frozen under their failover,
// land in the backing disk outside the log, and the disk's sum is the
// file's.
func TestReverseWritesOnlyWhileFrozen(t *testing.T) {
	a := mustAgent(t, agentSetup{})
	d := a.disks[0]
	data := bytes.Repeat([]byte{0x5c}, 8192)
	if ack := a.reverseWrite(7, replication.ReverseData{ID: "f", Disk: d.Index, Off: 4096, Data: data}); ack.Error == "" || !strings.Contains(ack.Error, "not frozen") {
		t.Fatalf("a reverse write to a thawed machine: %+v", ack)
	}
	a.fo.ready = func() bool { return false } // no final point in this test
	if err := a.freeze(context.Background(), replication.Freeze{ID: "f", Req: 1}); err != nil {
		t.Fatal(err)
	}
	before := a.spool.Next()
	if ack := a.reverseWrite(8, replication.ReverseData{ID: "g", Disk: d.Index, Off: 4096, Data: data}); !strings.Contains(ack.Error, "frozen under planned failover f") {
		t.Fatalf("a reverse write of another failover: %+v", ack)
	}
	if ack := a.reverseWrite(9, replication.ReverseData{ID: "f", Disk: 99, Off: 0, Data: data}); ack.Error == "" {
		t.Fatalf("a reverse write to an unknown disk: %+v", ack)
	}
	if ack := a.reverseWrite(10, replication.ReverseData{ID: "f", Disk: d.Index, Off: d.Size() - 100, Data: data}); ack.Error == "" {
		t.Fatalf("a reverse write past the disk: %+v", ack)
	}
	ack := a.reverseWrite(11, replication.ReverseData{ID: "f", Disk: d.Index, Off: 4096, Data: data})
	if ack.Error != "" || ack.Seq != 11 || ack.ID != "f" {
		t.Fatalf("a reverse write while frozen: %+v", ack)
	}
	if a.spool.Next() != before {
		t.Fatal("a reverse write was logged")
	}
	b, err := os.ReadFile(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[4096:4096+len(data)], data) {
		t.Fatal("the reverse write is not on the backing disk")
	}
	sum := sha256.Sum256(b)
	if s := a.reverseSum(replication.ReverseSum{ID: "f", Seq: 12, Disk: d.Index}); s.Error != "" || s.Sum != hex.EncodeToString(sum[:]) || s.Size != int64(len(b)) || s.Seq != 12 {
		t.Fatalf("disk sum %+v", s)
	}
	// The guest's writes are still refused.
	if err := d.WriteAt(make([]byte, 512), 0, false); err == nil {
		t.Fatal("a guest write while frozen")
	}
}

// Block sums (an unplanned failover's checksum compare) are the resync's
// hash of each block of the backing disk, the last one cut at the disk's
// end, and only while frozen under the failover.
func TestReverseBlockSums(t *testing.T) {
	a := mustAgent(t, agentSetup{})
	d := a.disks[0]
	const block = 65536
	req := replication.ReverseSum{ID: "f", Seq: 3, Disk: d.Index, Block: block, Count: replication.MaxReverseHashes}
	if ack := a.reverseSum(req); !strings.Contains(ack.Error, "not frozen") || len(ack.Hashes) != 0 {
		t.Fatalf("block sums of a thawed machine: %+v", ack)
	}
	a.fo.ready = func() bool { return false }
	if err := a.freeze(context.Background(), replication.Freeze{ID: "f", Req: 1}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	n := (len(b) + block - 1) / block
	ack := a.reverseSum(req)
	if ack.Error != "" || ack.Seq != 3 || ack.Size != int64(len(b)) || len(ack.Hashes) != 16*n {
		t.Fatalf("block sums: error %q, size %d, %d bytes of sums for %d blocks", ack.Error, ack.Size, len(ack.Hashes), n)
	}
	for i := range n {
		s := replication.BlockSum(b[i*block : min((i+1)*block, len(b))])
		if !bytes.Equal(ack.Hashes[16*i:16*i+16], s[:]) {
			t.Fatalf("block %d: the sum differs from the disk's", i)
		}
	}
	// From the last block on: one sum.
	req.Off = int64(n-1) * block
	if ack := a.reverseSum(req); ack.Error != "" || len(ack.Hashes) != 16 {
		t.Fatalf("the last block's sum: %+v", ack)
	}
	req.Off = int64(n) * block
	if ack := a.reverseSum(req); ack.Error == "" {
		t.Fatalf("block sums past the disk's end: %+v", ack)
	}
	// Leaves: the resync's 4 KiB leaf hashes, as a recovered agent's
	// resync compares them.
	leaves := replication.ReverseSum{ID: "f", Seq: 4, Disk: d.Index, Off: 65536, Block: replication.HashBlock, Count: replication.HashFanout, Leaves: true}
	ack = a.reverseSum(leaves)
	want := replication.ChunkLeaves(b[65536:min(65536+replication.HashChunk, len(b))])
	if ack.Error != "" || len(ack.Hashes) != 16*len(want) {
		t.Fatalf("leaf hashes: error %q, %d bytes for %d blocks", ack.Error, len(ack.Hashes), len(want))
	}
	for i, l := range want {
		if !bytes.Equal(ack.Hashes[16*i:16*i+16], l[:]) {
			t.Fatalf("leaf %d differs from the disk's", i)
		}
	}
}
