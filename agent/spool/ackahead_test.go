package spool

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestOpenAckedAheadOfFiles: the caller's record of acknowledgements is
// ahead of what the spool's files kept (a forced shutdown lost their tail
// with the page cache, after the state file had recorded the server's
// acks). The next records are numbered after the acked one and must be
// found under those numbers, in this run and after a reopen, not written
// into a file whose header names an earlier first number.
func TestOpenAckedAheadOfFiles(t *testing.T) {
	dir := t.TempDir()
	opts := Options{MaxBytes: 64 << 20, FileBytes: 1 << 20}
	s, _ := mustOpen(t, dir, opts)
	data := bytes.Repeat([]byte{1}, 4096)
	for i := range 3 {
		s.Complete(mustAppend(t, s, 0, uint64(i)*4096, data))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// The old file, kept aside: put back below as a stop before the
	// start's trim would leave it.
	olds, _ := filepath.Glob(filepath.Join(dir, "*"+suffix))
	if len(olds) != 1 {
		t.Fatalf("files %v, want one", olds)
	}
	old, err := os.ReadFile(olds[0])
	if err != nil {
		t.Fatal(err)
	}
	const acked = 10 // the state file says the server held up to 10
	s2, _, err := Open(dir, opts, acked)
	if err != nil {
		t.Fatal(err)
	}
	if s2.Next() != acked+1 {
		t.Fatalf("next %d, want %d", s2.Next(), acked+1)
	}
	seq := mustAppend(t, s2, 0, 1<<20, bytes.Repeat([]byte{2}, 4096))
	s2.Complete(seq)
	if got := readAll(t, s2, acked+1); len(got) != 1 || got[0].Seq != acked+1 || got[0].Offset != 1<<20 {
		t.Fatalf("records from %d in the same run: %+v", acked+1, got)
	}
	if err := s2.Sync(); err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if err := os.WriteFile(olds[0], old, 0o600); err != nil {
		t.Fatal(err)
	}
	s3, _, err := Open(dir, opts, acked)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s3.Close()
	if got := readAll(t, s3, acked+1); len(got) != 1 || got[0].Seq != acked+1 || got[0].Offset != 1<<20 {
		t.Fatalf("records from %d after a reopen: %+v", acked+1, got)
	}
}
