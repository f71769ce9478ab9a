package server

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"testing"
)

// seqSum gives the SHA-256 of a disk only when it was read once, in
// order, whole: a read out of order, a read again or a short read give
// none (the export is then read again to compare).
func TestSeqSum(t *testing.T) {
	t.Parallel()
	disk := bytes.Repeat([]byte("asr-failback-"), 10000)
	want := sha256.Sum256(disk)
	n := int64(len(disk))
	read := func(ranges ...[2]int64) (string, bool) {
		s := &seqSum{r: bytes.NewReader(disk), h: sha256.New()}
		for _, r := range ranges {
			s.ReadAt(make([]byte, r[1]-r[0]), r[0])
		}
		return s.sum(n)
	}
	if got, ok := read([2]int64{0, 4096}, [2]int64{4096, 70000}, [2]int64{70000, n}); !ok || got != hex.EncodeToString(want[:]) {
		t.Fatalf("in order: %s %v", got, ok)
	}
	for _, rs := range [][][2]int64{
		{{0, 4096}, {70000, n}, {4096, 70000}}, // out of order
		{{0, 4096}, {0, 4096}, {4096, n}},      // a range read again
		{{4096, n}},                            // the start missing
		{{0, 4096}, {4096, 70000}},             // the end missing
	} {
		if got, ok := read(rs...); ok {
			t.Fatalf("reads %v gave a sum %s", rs, got)
		}
	}
}
