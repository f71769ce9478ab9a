package agent

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/asrdr/asr/internal/allocguard"
	"github.com/asrdr/asr/replication"
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

// alFile encodes an activity log file of the given entries.
func alFile(entries [][2]uint64) []byte {
	b := []byte("ASRAL1")
	b = binary.LittleEndian.AppendUint32(b, uint32(len(entries)))
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint32(b, uint32(e[0]))
		b = binary.LittleEndian.AppendUint64(b, e[1])
	}
	return binary.LittleEndian.AppendUint32(b, replication.Checksum(b))
}

// FuzzAtRisk reads activity logs, as they are and with their checksum
// recomputed: what atRisk returns must be ranges a Hello may carry (the
// server refuses a Hello that breaks a limit), and reading costs memory in
// proportion to the file.
func FuzzAtRisk(f *testing.F) {
	f.Add(alFile([][2]uint64{{0, 1}, {0, 2}, {1, 7}}))
	f.Add(alFile([][2]uint64{{0, 1 << 62}}))
	many := make([][2]uint64, 3*replication.MaxDivergedRanges)
	for i := range many {
		many[i] = [2]uint64{0, uint64(3 * i)}
	}
	f.Add(alFile(many))
	f.Add([]byte("ASRAL1\xff\xff\xff\xff\x00\x00\x00\x00"))
	dir := f.TempDir()
	path := filepath.Join(dir, "activity.log")
	f.Fuzz(func(t *testing.T, data []byte) {
		fixed := slices.Clone(data)
		if len(fixed) >= 4 {
			binary.LittleEndian.PutUint32(fixed[len(fixed)-4:], replication.Checksum(fixed[:len(fixed)-4]))
		}
		for _, b := range [][]byte{data, fixed} {
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
		}
	})
}
