package server

import (
	"fmt"
	"testing"
	"time"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func TestNonceTableBoundsPerSourceAndOverall(t *testing.T) {
	t.Parallel()
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	tab := newNonceTable(3, 10, time.Minute, clk.now)

	// A source past its bound loses its own oldest nonce, nobody else's.
	other := tab.issue("192.0.2.1")
	var flood [][]byte
	for range 1000 {
		flood = append(flood, tab.issue("192.0.2.66"))
	}
	if n := tab.count(); n != 4 {
		t.Fatalf("%d nonces outstanding after a flood from one source, want 3 + 1", n)
	}
	if tab.take(flood[0]) || tab.take(flood[996]) {
		t.Error("an evicted nonce of the flooding source was taken")
	}
	if !tab.take(flood[999]) {
		t.Error("the flooding source's newest nonce was lost")
	}
	if !tab.take(other) {
		t.Fatal("a flood from one source evicted another source's nonce")
	}

	// Single use.
	n := tab.issue("192.0.2.1")
	if !tab.take(n) || tab.take(n) {
		t.Error("a nonce was taken twice, or not once")
	}
	if tab.take([]byte("never issued")) || tab.take(nil) {
		t.Error("a nonce never issued was taken")
	}

	// Past the overall bound the oldest goes, whoever it belongs to; a new
	// challenge is never refused.
	tab = newNonceTable(3, 10, time.Minute, clk.now)
	first := tab.issue("198.51.100.1")
	second := tab.issue("198.51.100.2")
	var newest []byte
	for i := range 9 {
		newest = tab.issue(fmt.Sprintf("203.0.113.%d", i))
	}
	if n := tab.count(); n != 10 {
		t.Fatalf("%d nonces outstanding, want the bound, 10", n)
	}
	if tab.take(first) {
		t.Error("the oldest nonce outlived the overall bound")
	}
	if !tab.take(second) || !tab.take(newest) {
		t.Error("the overall bound evicted more than the oldest")
	}
}

func TestNonceTableExpiry(t *testing.T) {
	t.Parallel()
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	tab := newNonceTable(3, 10, time.Minute, clk.now)
	old := tab.issue("192.0.2.1")
	clk.t = clk.t.Add(30 * time.Second)
	young := tab.issue("192.0.2.1")
	clk.t = clk.t.Add(31 * time.Second)
	if tab.take(old) {
		t.Error("an expired nonce was taken")
	}
	// A new challenge drops the expired ones.
	tab.issue("192.0.2.2")
	if n := tab.count(); n != 2 {
		t.Errorf("%d nonces outstanding, want 2 (the expired one dropped)", n)
	}
	if !tab.take(young) {
		t.Error("a nonce within its life was not taken")
	}
}

func TestNonceSource(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ a, b string }{
		{"192.0.2.1:1000", "192.0.2.1:2000"},
		{"192.0.2.1:1000", "[::ffff:192.0.2.1]:2000"},          // IPv4-mapped
		{"[2001:db8:1:2::1]:1000", "[2001:db8:1:2:ffff::9]:5"}, // one /64
		{"[fe80::1%eth0]:1000", "[fe80::2%eth1]:1000"},
	} {
		if nonceSource(tc.a) != nonceSource(tc.b) {
			t.Errorf("%s and %s are different sources (%s, %s)", tc.a, tc.b, nonceSource(tc.a), nonceSource(tc.b))
		}
	}
	for _, tc := range []struct{ a, b string }{
		{"192.0.2.1:1000", "192.0.2.2:1000"},
		{"127.0.0.1:1000", "127.0.0.2:1000"},
		{"[2001:db8:1:2::1]:1000", "[2001:db8:1:3::1]:1000"}, // next /64
		{"[2001:db8::1]:1000", "192.0.2.1:1000"},
	} {
		if nonceSource(tc.a) == nonceSource(tc.b) {
			t.Errorf("%s and %s are the same source (%s)", tc.a, tc.b, nonceSource(tc.a))
		}
	}
	if got := nonceSource("garbage"); got != "garbage" {
		t.Errorf("nonceSource(garbage) = %q", got)
	}
}
