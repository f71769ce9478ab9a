package main

import (
	"os"
	"path/filepath"
	"testing"
)

// The machine's free page reporting is read from the kernel's module
// parameters; a missing, garbled or out-of-range value means nothing is
// said about it.
func TestPageReporting(t *testing.T) {
	dir := t.TempDir()
	if _, ok := pageReportingOrder(dir); ok {
		t.Fatal("reporting said on without its parameters")
	}
	for _, c := range []struct {
		order string
		want  int
		ok    bool
	}{{"9\n", 9, true}, {"11", 11, true}, {"x\n", 0, false}, {"-1", 0, false}, {"64", 0, false}} {
		if err := os.WriteFile(filepath.Join(dir, "page_reporting_order"), []byte(c.order), 0o600); err != nil {
			t.Fatal(err)
		}
		if got, ok := pageReportingOrder(dir); got != c.want || ok != c.ok {
			t.Errorf("order %q: %d, %v; want %d, %v", c.order, got, ok, c.want, c.ok)
		}
	}
	path := filepath.Join(dir, "reported_kib")
	if _, ok := readKiB(path); ok {
		t.Fatal("a missing count read")
	}
	os.WriteFile(path, []byte("183552560\n"), 0o600)
	if n, ok := readKiB(path); !ok || n != 183552560 {
		t.Fatalf("count %d, %v", n, ok)
	}
	os.WriteFile(path, []byte("-5"), 0o600)
	if _, ok := readKiB(path); ok {
		t.Fatal("a negative count read")
	}
}
