package procserver

import (
	"context"
	"testing"

	"github.com/asrdr/asr/replication"
)

// hashOf is the source's chunk hash of data (a chunk of 1 MiB).
func hashOf(data []byte) []byte {
	h := replication.ChunkHash(replication.ChunkLeaves(data))
	return h[:]
}

// The comparer answers a batch of the source's chunk hashes with the
// replica's block hashes of the chunks that differ, from the replica's
// checksums; a malformed batch is answered with an error.
func TestCompareAnswersTheChunksThatDiffer(t *testing.T) {
	data := []byte("on the replica")
	r := mustReplica(t, func(dir string) {
		writeSegment(t, dir, 2, replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: data})
	})
	r.waitApplied(t, 2)
	cp := startComparer(context.Background(), machineID, r.rep.log, r.rep, r.cache, nil)
	defer cp.close()

	chunk := make([]byte, replication.HashChunk)
	copy(chunk[4096:], data)
	zeros := make([]byte, replication.HashChunk)
	// The source: chunk 0 as the replica holds it but for one block, chunk 1
	// all zeros as on the replica.
	source := append([]byte(nil), chunk...)
	source[8192] = 1
	w := cp.compare(replication.Hashes{Disk: 0, After: 2, Offs: []int64{0, replication.HashChunk},
		Hashes: append(hashOf(source), hashOf(zeros)...)})
	if w.Error != "" || len(w.Chunks) != 1 || w.Chunks[0].Off != 0 {
		t.Fatalf("want %+v: want chunk 0 only", w)
	}
	leaves := replication.ChunkLeaves(chunk)
	got := w.Chunks[0].Leaves
	if len(got) != 16*len(leaves) || string(got[16:32]) != string(leaves[1][:]) || string(got[32:48]) != string(leaves[2][:]) {
		t.Fatalf("the replica's block hashes of chunk 0 are not in the answer")
	}
	// The same chunks as on the replica: nothing wanted.
	if w := cp.compare(replication.Hashes{Disk: 0, After: 2, Offs: []int64{0}, Hashes: hashOf(chunk)}); w.Error != "" || len(w.Chunks) != 0 {
		t.Fatalf("want %+v for an equal chunk", w)
	}
	for _, bad := range []replication.Hashes{
		{Disk: 0, Offs: []int64{0}, Hashes: make([]byte, 8)},
		{Disk: 0, Offs: []int64{4096}, Hashes: make([]byte, 16)},
		{Disk: 0, Offs: []int64{2 << 20}, Hashes: make([]byte, 16)},
		{Disk: 3, Offs: []int64{0}, Hashes: make([]byte, 16)},
	} {
		if w := cp.compare(bad); w.Error == "" {
			t.Fatalf("batch %+v answered without an error: %+v", bad, w)
		}
	}
}
