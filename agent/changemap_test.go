package agent

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// The changed-block map agrees with a plain set of blocks under random
// marks and clears, and its runs are maximal, in order and bounded.
func TestChangeMapModel(t *testing.T) {
	const size = 64 << 40 // 64 TiB: only the pages touched exist
	m := newChangeMap(size)
	model := map[int64]bool{}
	r := rand.New(rand.NewPCG(9, 9))
	hot := []int64{0, 3 << 30, 17 << 40, size - 1<<20}
	for i := 0; i < 3000; i++ {
		off := hot[r.IntN(len(hot))] + r.Int64N(64<<20)
		off = min(off, size-1)
		n := 1 + r.Int64N(300<<10)
		if r.IntN(4) == 0 {
			first := off / mapBlock
			k := int(1 + r.Int64N(200))
			m.clear(first, k)
			for b := first; b < first+int64(k); b++ {
				delete(model, b)
			}
			continue
		}
		m.mark(off, n)
		for b := off / mapBlock; b <= (off+n-1)/mapBlock && b < size/mapBlock; b++ {
			model[b] = true
		}
	}
	if m.count != len(model) {
		t.Fatalf("count %d, model %d", m.count, len(model))
	}
	if len(m.pages) > 4*4 {
		t.Fatalf("%d pages for changes in 4 places", len(m.pages))
	}
	// The runs, in order, are exactly the marked blocks.
	want := make([]int64, 0, len(model))
	for b := range model {
		want = append(want, b)
	}
	slices.Sort(want)
	var got []int64
	for from := int64(0); ; {
		first, n, ok := m.next(from, 37)
		if !ok {
			break
		}
		if first < from || n < 1 || n > 37 {
			t.Fatalf("next(%d) = %d, %d", from, first, n)
		}
		for b := first; b < first+int64(n); b++ {
			got = append(got, b)
		}
		if n < 37 && model[first+int64(n)] {
			t.Fatalf("run at %d stopped early", first)
		}
		from = first + int64(n)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("walked %d blocks, %d marked", len(got), len(want))
	}
	for b := range model {
		m.clear(b, 1)
	}
	if !m.empty() || len(m.pages) != 0 || len(m.order) != 0 {
		t.Fatalf("after clearing all: count %d, %d pages", m.count, len(m.pages))
	}
}
