package hoststat

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

func write(t *testing.T, dir, name, s string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestSampleCPUAndMemory(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "meminfo", "MemTotal:       1000 kB\nMemFree: 10 kB\nMemAvailable:    250 kB\n")
	write(t, dir, "stat", "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")
	s := NewAt(dir)
	f, err := s.Sample(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if f.CPU != -1 {
		t.Errorf("first sample CPU = %v, want -1 (no interval yet)", f.CPU)
	}
	if f.Memory != 0.75 || f.MemoryTotal != 1000*1024 {
		t.Errorf("memory = %v of %d, want 0.75 of 1024000", f.Memory, f.MemoryTotal)
	}
	// 100 more jiffies: 90 busy (user, system), 10 idle.
	write(t, dir, "stat", "cpu  150 0 140 705 105 0 0 0 0 0\n")
	if f, err = s.Sample(time.Now()); err != nil {
		t.Fatal(err)
	}
	if f.CPU < 0.899 || f.CPU > 0.901 {
		t.Errorf("CPU = %v, want 0.9", f.CPU)
	}
}

func TestSampleRefusesBadFiles(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "stat", "intr 1 2 3\n")
	write(t, dir, "meminfo", "MemTotal: 1 kB\nMemAvailable: 1 kB\n")
	s := NewAt(dir)
	if _, err := s.Sample(time.Now()); err == nil {
		t.Fatal("a stat without a cpu line was accepted")
	}
	write(t, dir, "stat", "cpu 1 2 3 4 5\n")
	write(t, dir, "meminfo", "MemTotal: 1 kB\n")
	if _, err := s.Sample(time.Now()); err == nil {
		t.Fatal("a meminfo without MemAvailable was accepted")
	}
	if s.Last().Err == nil {
		t.Fatal("Last does not say why the sample failed")
	}
}

func TestSampleThisMachine(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads Linux's /proc")
	}
	s := New()
	if _, err := s.Sample(time.Now()); err != nil {
		t.Fatal(err)
	}
	f, err := s.Sample(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if f.Memory <= 0 || f.Memory > 1 || f.MemoryTotal == 0 {
		t.Errorf("memory figures %+v out of range", f)
	}
}

// TestSampleRefusesAHugeFile: a file past maxProcFile is an error, not a
// sample from its first MiB (the bound on what is read).
func TestSampleRefusesAHugeFile(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "stat", "cpu 1 2 3 4 5\n")
	write(t, dir, "meminfo", "MemTotal: 4 kB\nMemAvailable: 1 kB\n"+strings.Repeat("x", maxProcFile))
	if _, err := NewAt(dir).Sample(time.Now()); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("a meminfo of over %d bytes: err = %v, want larger than", maxProcFile, err)
	}
}

// TestSampleAllocatesWithTheFile: a sample allocates about what the files
// hold, not a MiB each (it ran with every heartbeat). It fails if
// readSmall goes back to a fixed 1 MiB buffer.
func TestSampleAllocatesWithTheFile(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "meminfo", "MemTotal:       1000 kB\nMemAvailable:    250 kB\n")
	write(t, dir, "stat", "cpu  100 0 100 700 100 0 0 0 0 0\n")
	s := NewAt(dir)
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	for range 10 {
		if _, err := s.Sample(time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&ms1)
	if per := (ms1.TotalAlloc - ms0.TotalAlloc) / 10; per > 64<<10 {
		t.Fatalf("a sample allocated %d bytes for two files of under 100 bytes", per)
	}
}
