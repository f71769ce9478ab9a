package freeport

import (
	"net"
	"strconv"
	"testing"
)

func TestPortBelowEphemeralRangeAndNeverTwice(t *testing.T) {
	start := ephemeralStart()
	seen := map[string]bool{}
	for range 500 {
		p, err := Port()
		if err != nil {
			t.Fatal(err)
		}
		if seen[p] {
			t.Fatalf("port %s handed out twice", p)
		}
		seen[p] = true
		n, _ := strconv.Atoi(p)
		if start-low >= 1000 && (n < low || n >= start) {
			t.Fatalf("port %d outside [%d, %d)", n, low, start)
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+p)
		if err != nil {
			t.Fatalf("port %s handed out but not free: %v", p, err)
		}
		l.Close()
	}
}

func TestFreeSeesABoundPort(t *testing.T) {
	// free() is what keeps a port some other process holds out of Port's
	// answers.
	var held []net.Listener
	taken := map[string]bool{}
	for p := low; p < low+200; p++ {
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		held = append(held, l)
		taken[strconv.Itoa(p)] = true
	}
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	for p := range taken {
		n, _ := strconv.Atoi(p)
		if free(n) {
			t.Fatalf("free(%d) while it is bound", n)
		}
	}
}

func TestParseRangeStart(t *testing.T) {
	for in, want := range map[string]int{
		"32768\t60999\n": 32768,
		"1024 65535":     1024,
		"":               49152,
		"x 60999":        49152,
		"0 10":           49152,
		"70000 80000":    49152,
		"32768":          49152,
	} {
		if got := parseRangeStart(in); got != want {
			t.Errorf("parseRangeStart(%q) = %d, want %d", in, got, want)
		}
	}
}
