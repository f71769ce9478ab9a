//go:build e2e

package drill

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestBootFakeQEMU drives Boot's verdicts with a script in QEMU's place,
// in a real new network namespace (so it needs root, as drills do: an e2e
// test, failing without it), and checks that
// Boot leaves no goroutine behind.
func TestBootFakeQEMU(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("a new network namespace needs root, as every drill does: run the e2e tests as root")
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	if err := os.WriteFile(sock, nil, 0o600); err != nil { // Boot checks it exists
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		script  string
		timeout time.Duration
		passed  bool
		reason  []string
	}{
		{"passes", `echo "SeaBIOS"; echo "ASR-DRILL-BOOTED vm1"; exec sleep 600`, time.Minute, true, nil},
		{"exits early", `echo "Kernel panic - not syncing: VFS"; echo "cannot boot" >&2; exit 3`, time.Minute, false,
			[]string{"qemu exited (exit status 3)", "console never matched", "qemu: cannot boot", "Kernel panic - not syncing: VFS"}},
		{"times out", `echo "Loading..."; exec sleep 600`, 300 * time.Millisecond, false,
			[]string{"timed out after 300ms", "console never matched", "Loading..."}},
		{"only lo in the namespace", `if ! grep -v -e '|' -e '^ *lo:' /proc/net/dev | grep -q :; then echo "ASR-DRILL-BOOTED vm1"; fi; exec sleep 600`, time.Minute, true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := runtime.NumGoroutine()
			logPath := filepath.Join(t.TempDir(), "console.log")
			res, err := Boot(context.Background(), Options{
				Disks:     []Disk{{Socket: sock}},
				BootCheck: regexp.MustCompile(`^ASR-DRILL-BOOTED vm1$`),
				Timeout:   tc.timeout,
				QEMU:      fakeQEMU(t, tc.script),
				LogPath:   logPath,
				Accel:     AccelTCG,
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.Passed != tc.passed {
				t.Fatalf("passed %v, want %v: %s", res.Passed, tc.passed, res.Reason)
			}
			if tc.passed && (res.BootTime <= 0 || res.Reason != "") {
				t.Errorf("boot time %s reason %q", res.BootTime, res.Reason)
			}
			for _, want := range tc.reason {
				if !strings.Contains(res.Reason, want) {
					t.Errorf("reason lacks %q:\n%s", want, res.Reason)
				}
			}
			if b, _ := os.ReadFile(logPath); len(b) == 0 || !strings.Contains(res.ConsoleTail, strings.TrimSpace(strings.Split(string(b), "\n")[0])) {
				t.Errorf("console log %q, tail %q", b, res.ConsoleTail)
			}
			// Goroutines Boot ended may still be on their way out (the
			// runtime reaps them after they return): wait for the count to
			// come down, and fail only if it never does.
			deadline := time.Now().Add(30 * time.Second)
			for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if after := runtime.NumGoroutine(); after > before {
				t.Errorf("%d goroutines before Boot, %d after", before, after)
			}
		})
	}
}

// fakeQEMU writes a script that stands in for QEMU: it ignores its
// arguments and runs body.
func fakeQEMU(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}
