package web

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

func TestHumanDuration(t *testing.T) {
	for _, tt := range []struct {
		d    time.Duration
		want string
	}{
		{-time.Second, "< 0.1 s"},
		{0, "< 0.1 s"},
		{99 * time.Millisecond, "< 0.1 s"},
		{800 * time.Millisecond, "0.8 s"},
		{9999 * time.Millisecond, "9.9 s"},
		{10 * time.Second, "10 s"},
		{59 * time.Second, "59 s"},
		{3*time.Minute + 59*time.Second, "3 min"},
		{2*time.Hour + 5*time.Minute, "2 h 5 min"},
		{76 * time.Hour, "3 d 4 h"},
	} {
		if got := humanDuration(tt.d); got != tt.want {
			t.Errorf("humanDuration(%v) = %q, want %q", tt.d, got, tt.want)
		}
	}
}

func TestAgo(t *testing.T) {
	for _, tt := range []struct {
		d    time.Duration
		want string
	}{
		{-time.Minute, "just now"},
		{4 * time.Second, "just now"},
		{40 * time.Second, "40 s ago"},
		{3*time.Minute + 12*time.Second, "3 min ago"},
		{47 * time.Hour, "47 h ago"},
		{50 * time.Hour, "2 d ago"},
	} {
		if got := ago(testNow, testNow.Add(-tt.d)); got != tt.want {
			t.Errorf("ago(%v) = %q, want %q", tt.d, got, tt.want)
		}
	}
}

func TestHumanBytes(t *testing.T) {
	for _, tt := range []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1 KiB"},
		{1536, "1.5 KiB"},
		{40 << 30, "40 GiB"},
		{2048 << 30, "2 TiB"},
		{150<<20 + 1, "150 MiB"},
		{math.MaxInt64, "8 EiB"},
	} {
		if got := humanBytes(tt.n); got != tt.want {
			t.Errorf("humanBytes(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}

func TestPercent(t *testing.T) {
	for _, tt := range []struct {
		p    float64
		want string
	}{
		{0, "0%"}, {0.42, "42%"}, {0.999, "99%"}, {1, "100%"}, {1.2, "100%"}, {-1, "0%"}, {math.NaN(), "0%"},
	} {
		if got := percent(tt.p); got != tt.want {
			t.Errorf("percent(%v) = %q, want %q", tt.p, got, tt.want)
		}
	}
}

func TestMachineSummary(t *testing.T) {
	got := machineSummary(testMachines())
	want := "5 machines: 2 protected, 2 in initial replication, 1 needs resync · 2 agents disconnected"
	if got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if got := machineSummary([]api.Machine{protectedMachine}); got != "1 machine: 1 protected" {
		t.Errorf("one machine: %q", got)
	}
}

func TestAgentCommand(t *testing.T) {
	got := agentCommand("")
	for _, want := range []string{"--server https://SERVER:8443", "--passphrase-file FILE", "--state DIR", "--name NAME", "--disk NAME=PATH", "--nbd unix:/run/asr.sock"} {
		if !strings.Contains(got, want) {
			t.Errorf("%q lacks %q", got, want)
		}
	}
}
