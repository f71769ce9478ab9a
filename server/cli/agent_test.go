package cli

import (
	"io"
	"strings"
	"testing"
)

func TestResyncRateFlag(t *testing.T) {
	base := []string{"--disk", "d=/dev/null", "--nbd", "unix:/tmp/x.sock", "--name", "vm1"}
	c, err := agentFlags(&env{out: io.Discard, errOut: io.Discard}, append(base, "--resync-rate", "200MiB"))
	if err != nil || c.ResyncRate != 200<<20 {
		t.Fatalf("--resync-rate 200MiB: %d, %v", c.ResyncRate, err)
	}
	if _, err := agentFlags(&env{out: io.Discard, errOut: io.Discard}, append(base, "--resync-rate", "fast")); err == nil || !strings.Contains(err.Error(), "--resync-rate") {
		t.Fatalf("--resync-rate fast: %v", err)
	}
}

func TestNameFlagUsesTheServersRule(t *testing.T) {
	for _, name := range []string{"a/b", "x'; DROP TABLE machines;--", "\x1b[31mred", "m1 ", "-m1", strings.Repeat("m", 65)} {
		_, err := agentFlags(&env{out: io.Discard, errOut: io.Discard}, []string{"--disk", "d=/dev/null", "--nbd", "unix:/tmp/x.sock", "--name", name})
		if err == nil || !strings.Contains(err.Error(), "--name") {
			t.Errorf("--name %q: %v, want refused", name, err)
		}
	}
	if _, err := agentFlags(&env{out: io.Discard, errOut: io.Discard}, []string{"--disk", "d=/dev/null", "--nbd", "unix:/tmp/x.sock", "--name", "web-01.example"}); err != nil {
		t.Errorf("a good name refused: %v", err)
	}
}
