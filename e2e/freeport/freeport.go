// Package freeport hands tests a TCP port on 127.0.0.1 for a peer that
// binds it itself a moment later: an asr server, mailpit, sshd,
// Prometheus, each started as its own process with the port on its
// command line.
//
// The usual trick (listen on port 0, note the port, close) picks the port
// from the kernel's ephemeral range, the same range every outgoing
// connection's local port and every other bind to port 0 come from. On a
// busy machine (the unit and e2e stages run at once, each with its
// servers, agents and browsers) one of those took the port in the moment
// between the close and the peer's bind, and the peer exited with
// "address already in use" (CI, TestE2EConsoleAlerts: mailpit). Port
// picks below the ephemeral range instead, where the kernel never
// chooses on its own, checks that the port can be bound now, and never
// hands the same port out twice in one process. Only another process
// doing the same could still take it, and picking at random from some
// twenty thousand ports makes that as good as impossible.
package freeport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// low is the lowest port handed out: the well-known and registered
// services that might listen on this machine sit below it.
const low = 10000

var (
	mu    sync.Mutex
	given = map[int]bool{}
)

// Port returns a port that is free on 127.0.0.1 now and that this process
// has not handed out before.
func Port() (string, error) {
	mu.Lock()
	defer mu.Unlock()
	hi := ephemeralStart()
	if hi-low >= 1000 {
		for range 200 {
			p := low + rand.IntN(hi-low)
			if given[p] {
				continue
			}
			if free(p) {
				given[p] = true
				return strconv.Itoa(p), nil
			}
		}
	}
	// A machine whose ephemeral range starts low: the kernel's choice.
	for range 200 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", fmt.Errorf("freeport: %w", err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !given[p] {
			given[p] = true
			return strconv.Itoa(p), nil
		}
	}
	return "", fmt.Errorf("freeport: no free port on 127.0.0.1")
}

// free says whether port p can be listened on at 127.0.0.1 now.
func free(p int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// ephemeralStart is the first port of the kernel's ephemeral range
// (Linux: /proc/sys/net/ipv4/ip_local_port_range; elsewhere, or
// unreadable, IANA's 49152).
func ephemeralStart() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 49152
	}
	return parseRangeStart(string(b))
}

// parseRangeStart reads the first number of "32768\t60999\n"; a value
// that is missing or out of range gives IANA's 49152.
func parseRangeStart(s string) int {
	f := strings.Fields(s)
	if len(f) != 2 {
		return 49152
	}
	n, err := strconv.Atoi(f[0])
	if err != nil || n < 1 || n > 65535 {
		return 49152
	}
	return n
}
