package server

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/overlay"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// The reverse map: marks, takes, acknowledgements and failures; saved as
// dirty or in flight; a damaged or foreign file refused.
func TestReverseMap(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "d.rev")
	size := int64(100*overlay.BlockSize + 123)
	m := newReverseMap(path, size, func() {})
	m.mark(0, 1)
	m.mark(5*overlay.BlockSize-1, 2)  // blocks 4 and 5
	m.mark(size-1, 1)                 // the last, partial block
	m.mark(size+overlay.BlockSize, 1) // past the end: ignored
	if got := m.pending(); got != 4*overlay.BlockSize {
		t.Fatalf("pending %d, want 4 blocks", got)
	}
	got := m.take(3)
	if len(got) != 3 || got[0] != 0 || got[1] != 4 || got[2] != 5 {
		t.Fatalf("take %v", got)
	}
	m.mark(4*overlay.BlockSize, 1) // written again while in flight
	m.done(got)
	if err := m.save(); err != nil {
		t.Fatal(err)
	}
	rest := m.take(10)
	if len(rest) != 2 || !slices.Contains(rest, 4) || !slices.Contains(rest, 100) {
		t.Fatalf("take after done %v, want blocks 4 and 100", rest)
	}
	m.fail(rest)
	if m.pending() != 2*overlay.BlockSize {
		t.Fatalf("pending after a failure %d", m.pending())
	}
	// Loaded: what was dirty or in flight at the save.
	l, err := loadReverseMap(path, size, func() {})
	if err != nil {
		t.Fatal(err)
	}
	if l.pending() != 2*overlay.BlockSize {
		t.Fatalf("loaded pending %d", l.pending())
	}
	if _, err := loadReverseMap(path, size+overlay.BlockSize*64, func() {}); !errors.Is(err, replication.ErrCorrupt) {
		t.Fatalf("a map of another disk: %v", err)
	}
	b, _ := os.ReadFile(path)
	b[30] ^= 1
	os.WriteFile(path, b, 0o600)
	if _, err := loadReverseMap(path, size, func() {}); !errors.Is(err, replication.ErrCorrupt) {
		t.Fatalf("a damaged map: %v", err)
	}
	if _, err := loadReverseMap(path+".none", size, func() {}); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a missing map: %v", err)
	}
}

// A plan failback's record past its switch is read back as written;
// what is not one (another version, a kind, a phase, groups and members
// that do not match) is refused.
func TestDecodePFRecord(t *testing.T) {
	t.Parallel()
	x := fbSet{kind: "plan", p: api.Plan{Name: "p", Groups: []api.PlanGroup{{Machines: []string{"a"}}, {Machines: []string{"b"}}}}}
	rec := newPFRecord(x, [][]*switchMember{{{m: store.Machine{ID: "1", Name: "a"}, f: store.Failover{ID: "f1"}}}, {{m: store.Machine{ID: "2", Name: "b"}, f: store.Failover{ID: "f2"}}}})
	rec.Next = pfCursor{Group: 1, Phase: "post", Action: 2}
	row, err := rec.row("j", "plan p")
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodePFRecord(row.Data)
	if err != nil || got.Next != rec.Next || got.Members[1][0] != (pfMember{Machine: "2", Name: "b", Failover: "f2"}) || got.Plan.Name != "p" {
		t.Fatalf("decoded %+v %v", got, err)
	}
	for _, bad := range []string{
		``, `{`, `{"v":2,"kind":"plan","plan":{"groups":[{}]},"members":[[]],"next":{"phase":"pre"}}`,
		`{"v":1,"kind":"x","plan":{"groups":[{}]},"members":[[]],"next":{"phase":"pre"}}`,
		`{"v":1,"kind":"plan","plan":{"groups":[{}]},"members":[[],[]],"next":{"phase":"pre"}}`,
		`{"v":1,"kind":"plan","plan":{"groups":[{}]},"members":[[]],"next":{"phase":"later"}}`,
		`{"v":1,"kind":"plan","plan":{"groups":[{}]},"members":[[]],"next":{"phase":"pre","action":-1}}`,
	} {
		if _, err := decodePFRecord(bad); err == nil {
			t.Fatalf("record %q accepted", bad)
		}
	}
}
