package agent

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/allocguard"
)

// TestLimitsMatchProtocol: what the agent sends stays within what the
// server accepts (replication/limits.go).
func TestLimitsMatchProtocol(t *testing.T) {
	if resyncBatch > replication.MaxHashBatch {
		t.Errorf("resync batches of %d chunks, the protocol accepts %d", resyncBatch, replication.MaxHashBatch)
	}
	if maxQueuedEvents > replication.MaxStatusEvents {
		t.Errorf("%d events queued per status, the protocol accepts %d", maxQueuedEvents, replication.MaxStatusEvents)
	}
}

func TestCoalesce(t *testing.T) {
	r := func(off, n int64) replication.Range { return replication.Range{Off: off, Len: n} }
	cases := []struct {
		in    []replication.Range
		limit int
		want  []replication.Range
	}{
		{[]replication.Range{r(0, 4), r(8, 4)}, 2, []replication.Range{r(0, 4), r(8, 4)}},
		{[]replication.Range{r(0, 4), r(8, 4), r(100, 4)}, 2, []replication.Range{r(0, 12), r(100, 4)}},
		{[]replication.Range{r(0, 4), r(90, 4), r(100, 4)}, 2, []replication.Range{r(0, 4), r(90, 14)}},
		{[]replication.Range{r(0, 4), r(90, 4), r(100, 4)}, 1, []replication.Range{r(0, 104)}},
		{[]replication.Range{r(0, 4), r(0, 4), r(4, 4)}, 1, []replication.Range{r(0, 8)}},
	}
	for _, c := range cases {
		got := coalesce(slices.Clone(c.in), c.limit)
		if !slices.Equal(got, c.want) {
			t.Errorf("coalesce(%v, %d) = %v, want %v", c.in, c.limit, got, c.want)
		}
	}
}

// alFile encodes an activity log journal of the given entries.
func alFile(entries [][2]uint64) []byte {
	b := alHeader()
	for _, e := range entries {
		b = appendALRecord(b, alKey{uint32(e[0]), e[1]})
	}
	return b
}

// alFixChecksums recomputes the header's and every whole record's checksum.
func alFixChecksums(b []byte) {
	if len(b) < alHeaderSize {
		return
	}
	binary.LittleEndian.PutUint32(b[12:], replication.Checksum(b[:12]))
	for p := b[alHeaderSize:]; len(p) >= alRecordSize; p = p[alRecordSize:] {
		binary.LittleEndian.PutUint32(p[20:], replication.Checksum(p[:20]))
	}
}

// expandAL turns a compact input into activity-log entries: each 11 bytes
// (disk u8, first extent u64, count u16) are count extents of the disk two
// apart, so that a few bytes make a log of thousands of extents with gaps
// to coalesce (at most 1<<14 in all).
func expandAL(in []byte) [][2]uint64 {
	var out [][2]uint64
	for ; len(in) >= 11 && len(out) < 1<<14; in = in[11:] {
		disk, first, n := uint64(in[0]), binary.LittleEndian.Uint64(in[1:]), int(binary.LittleEndian.Uint16(in[9:]))
		for k := range min(n, 1<<14-len(out)) {
			out = append(out, [2]uint64{disk, first + 2*uint64(k)})
		}
	}
	return out
}

// compactAL is a compact input of runs (disk, first, count).
func compactAL(runs ...[3]uint64) []byte {
	var b []byte
	for _, r := range runs {
		b = append(b, byte(r[0]))
		b = binary.LittleEndian.AppendUint64(b, r[1])
		b = binary.LittleEndian.AppendUint16(b, uint16(r[2]))
	}
	return b
}

// FuzzAtRisk reads activity logs: each input as a file, as it is and with
// its checksums recomputed, and as the log of the entries its compact form
// describes (expandAL). What atRisk returns must be ranges a Hello may
// carry (the server refuses a Hello that breaks a limit), and reading costs
// memory in proportion to the file.
func FuzzAtRisk(f *testing.F) {
	f.Add(alFile([][2]uint64{{0, 1}, {0, 2}, {1, 7}}))
	f.Add(alFile([][2]uint64{{0, 1 << 62}}))
	f.Add([]byte("ASRAL2\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\xa1\x00\x00\x00\xff\xff\xff\xff"))
	f.Add(compactAL([3]uint64{0, 0, 3 * replication.MaxDivergedRanges}, [3]uint64{1, 100, 5}))
	f.Add(compactAL([3]uint64{2, replication.MaxDiskSize/alExtent - 1, 2}))
	dir := f.TempDir()
	path := filepath.Join(dir, "activity.log")
	f.Fuzz(func(t *testing.T, data []byte) {
		fixed := slices.Clone(data)
		alFixChecksums(fixed)
		entries := expandAL(data)
		for i, b := range [][]byte{data, fixed, alFile(entries)} {
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			var risk map[uint32][]replication.Range
			var ok bool
			allocguard.Check(t, "atRisk", allocguard.Bound(len(b)), func() { risk, ok = atRisk(dir) })
			if !ok {
				continue
			}
			for disk, rs := range risk {
				d := replication.DiskInfo{Index: disk, Name: "d", Size: replication.MaxDiskSize, Diverged: "x", DivergedRanges: rs}
				if err := d.Validate(); err != nil {
					t.Fatalf("disk %d: atRisk gave ranges a Hello may not carry: %v", disk, err)
				}
				if !slices.IsSortedFunc(rs, func(a, b replication.Range) int { return int(a.Off - b.Off) }) {
					t.Fatalf("disk %d: ranges not sorted", disk)
				}
			}
			if i == 2 {
				// Every extent in the log is inside a range at risk.
				for _, e := range entries {
					off := int64(e[1]) * alExtent
					rs := risk[uint32(e[0])]
					j, _ := slices.BinarySearchFunc(rs, off, func(r replication.Range, off int64) int {
						if r.Off+r.Len <= off {
							return -1
						}
						if r.Off > off {
							return 1
						}
						return 0
					})
					if j == len(rs) || rs[j].Off > off || rs[j].Off+rs[j].Len < off+alExtent {
						t.Fatalf("disk %d: extent at %d not in the ranges at risk %v", e[0], off, rs)
					}
				}
			}
		}
	})
}
