package cli

import (
	"context"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// The demo's --crash-interval is written into the policy its agents get
// (which overrides an agent's own interval), with the short retention
// that bounds its data.
func TestDemoPolicy(t *testing.T) {
	srv, conn := startServer(t)
	if err := setDemoPolicy(context.Background(), srv, 7*time.Second); err != nil {
		t.Fatal(err)
	}
	var p api.PolicyJSON
	mustJSON(t, mustRun(t, append([]string{"policy", "show", "default", "--json"}, conn...)...), &p)
	if p.CrashInterval != "7s" || p.Retention != "10m0s" || p.PITWindow != "5m0s" || p.AppFrequency != "0s" {
		t.Fatalf("the demo's policy: %+v", p)
	}
	mustFail(t, "--crash-interval 1s: 5s to 5m", "demo", "--crash-interval", "1s")
}

// The bound the demo prints: its disks and replicas, the write load kept
// by retention and the any-point window, the spools, fixed costs.
func TestDemoBound(t *testing.T) {
	got := demoBound(2, 256<<20, 0.5)
	want := int64(2*(2*(256<<20)+450_000_000+demoSpoolMax) + 128<<20)
	if got != want {
		t.Fatalf("demoBound = %d, want %d", got, want)
	}
	if got > 3<<30 {
		t.Fatalf("the default demo's bound is %s: more than 3 GiB", humanBytes(got))
	}
}
