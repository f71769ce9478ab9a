package allocguard

import (
	"testing"
)

var sink []byte

func TestAllocatedCountsLargeAllocations(t *testing.T) {
	const n = 8 << 20
	got := Allocated(func() { sink = make([]byte, n) })
	if got < n {
		t.Fatalf("an allocation of %d bytes measured as %d", n, got)
	}
	sink = nil
	if got := Allocated(func() {}); got > Slack {
		t.Fatalf("an empty call measured as %d bytes", got)
	}
}

func TestCheckFails(t *testing.T) {
	ft := &fakeT{TB: t}
	func() {
		defer func() { recover() }()
		Check(ft, "make", Bound(10), func() { sink = make([]byte, 4<<20) })
	}()
	sink = nil
	if !ft.failed {
		t.Fatal("a 4 MiB allocation for 10 input bytes passed the check")
	}
}

// fakeT records a failure instead of ending the test.
type fakeT struct {
	testing.TB
	failed bool
}

func (f *fakeT) Helper() {}

func (f *fakeT) Fatalf(string, ...any) {
	f.failed = true
	panic("fatal")
}
