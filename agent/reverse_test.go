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
