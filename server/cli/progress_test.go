package cli

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestFormatProgress(t *testing.T) {
	for _, tc := range []struct {
		done, total int64
		rate        float64
		bar         bool
		want        string
	}{
		{0, 1 << 30, 0, true, "x [>                   ]   0%  0 B / 1.0 GiB  ETA --:--"},
		{460 << 20, 1 << 30, 38 << 20, true, "x [========>           ]  44%  460.0 MiB / 1.0 GiB  38.0 MiB/s  ETA 0:15"},
		{1 << 30, 1 << 30, 38 << 20, true, "x [====================] 100%  1.0 GiB / 1.0 GiB  38.0 MiB/s"},
		{1 << 20, 1 << 40, 1 << 20, false, "x   0%  1.0 MiB / 1.0 TiB  1.0 MiB/s  ETA 291:16:15"},
		{1500, 0, 100, false, "x  1.5 KiB  100 B/s"},
	} {
		if got := formatProgress("x", tc.done, tc.total, tc.rate, 20, tc.bar); got != tc.want {
			t.Errorf("formatProgress(%d, %d, %v, %v) =\n%q, want\n%q", tc.done, tc.total, tc.rate, tc.bar, got, tc.want)
		}
	}
}

func TestHumanBytesAndClock(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 3 << 29: "1.5 GiB", 5 << 40: "5.0 TiB"} {
		if got := humanBytes(n); got != want {
			t.Errorf("humanBytes(%d) = %q, want %q", n, got, want)
		}
	}
	for d, want := range map[time.Duration]string{0: "0:00", 59 * time.Second: "0:59", 61 * time.Second: "1:01", 3723 * time.Second: "1:02:03"} {
		if got := clock(d); got != want {
			t.Errorf("clock(%v) = %q, want %q", d, got, want)
		}
	}
}

// Off a terminal, progress is a plain line every lineEvery (none for an
// operation shorter than that), with the rate since the first update, and
// no bar or control characters.
func TestProgressPlainLines(t *testing.T) {
	var buf bytes.Buffer
	now := time.Unix(1000, 0)
	p := newProgress(&buf, "recover d0", 100<<20)
	p.now = func() time.Time { return now }
	p.start = now
	p.update(10 << 20) // the base: the rate counts from here
	now = now.Add(10 * time.Second)
	p.update(20 << 20)
	if buf.Len() != 0 {
		t.Fatalf("a line before %v: %q", lineEvery, buf.String())
	}
	now = now.Add(lineEvery)
	p.update(50 << 20) // 40 MiB in 40 s
	p.update(60 << 20) // too soon for another line
	p.finish(100 << 20)
	want := "recover d0  50%  50.0 MiB / 100.0 MiB  1.0 MiB/s  ETA 0:50\n"
	if buf.String() != want {
		t.Fatalf("plain progress =\n%q, want\n%q", buf.String(), want)
	}
	if strings.ContainsAny(buf.String(), "\r\033") {
		t.Fatal("control characters off a terminal")
	}
}
