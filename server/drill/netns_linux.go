package drill

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// Pacing of the TCP check. Polling is the only way to see a port open:
// nothing tells the host when the guest starts listening.
const (
	tcpRetryEvery  = 250 * time.Millisecond
	tcpDialTimeout = 2 * time.Second
	// tcpHandshake bounds the wait for the guest to answer the SYN that
	// QEMU's user-mode network sends on behalf of a host connection. A
	// SYN sent before the guest's network was up is retransmitted only
	// seconds later: a fresh connection is quicker, so keep this short.
	tcpHandshake  = time.Second
	tcpStateEvery = 100 * time.Millisecond
)

// waitTCP reports the time the guest first accepted a connection on port,
// polling until ctx is done.
//
// QEMU's user-mode network accepts a host connection before the guest
// has answered (and keeps it open while the guest stays silent), so a
// successful dial proves nothing; the slirp connection table, read over
// QMP, says whether the guest completed the handshake.
func waitTCP(ctx context.Context, pid int, qmpPath string, port int, log *slog.Logger) (time.Time, bool) {
	var q *qmpClient
	defer func() {
		if q != nil {
			q.Close()
		}
	}()
	var lastErr string
	for {
		if q == nil {
			q, _ = dialQMP(ctx, qmpPath) // QEMU may not have made the socket yet
		}
		if q != nil {
			ok, err := probeTCP(ctx, pid, q, port)
			if ok {
				return time.Now(), true
			}
			if err != nil && err.Error() != lastErr {
				lastErr = err.Error()
				log.Debug("drill TCP check", "port", port, "err", err)
			}
		}
		t := time.NewTimer(tcpRetryEvery)
		select {
		case <-ctx.Done():
			t.Stop()
			return time.Time{}, false
		case <-t.C:
		}
	}
}

// probeTCP makes one connection to the guest's port through the host
// forward and reports whether the guest completed the handshake.
func probeTCP(ctx context.Context, pid int, q *qmpClient, port int) (bool, error) {
	conn, err := dialInNetns(ctx, pid, fmt.Sprintf("127.0.0.1:%d", hostFwdPort), tcpDialTimeout)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	deadline := time.Now().Add(tcpHandshake)
	for {
		out, err := q.hmp(ctx, "info usernet")
		if err != nil {
			return false, err
		}
		state, found := usernetState(out, hostFwdPort, port)
		switch {
		case !found:
			return false, fmt.Errorf("guest refused port %d", port)
		case state == "ESTABLISHED":
			return true, nil
		case time.Now().After(deadline):
			return false, fmt.Errorf("guest did not answer on port %d (%s)", port, state)
		}
		t := time.NewTimer(tcpStateEvery)
		select {
		case <-ctx.Done():
			t.Stop()
			return false, ctx.Err()
		case <-t.C:
		}
	}
}

// dialInNetns dials addr from inside the network namespace of process
// pid. The socket is made on a thread moved into that namespace; the
// thread is never unlocked, so the runtime discards it with the goroutine
// and no other goroutine ever runs in the namespace. The namespace's lo
// is brought up first: a new namespace starts with it down.
func dialInNetns(ctx context.Context, pid int, addr string, timeout time.Duration) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see above
		c, err := func() (net.Conn, error) {
			fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+"/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				return nil, fmt.Errorf("open network namespace of %d: %w", pid, err)
			}
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
			if err != nil {
				return nil, fmt.Errorf("enter network namespace of %d: %w", pid, err)
			}
			if err := linkUp("lo"); err != nil {
				return nil, err
			}
			d := net.Dialer{Timeout: timeout}
			return d.DialContext(ctx, "tcp", addr)
		}()
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// linkUp sets the interface up in the calling thread's network namespace.
func linkUp(name string) error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("link %s up: %w", name, err)
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("link %s up: %w", name, err)
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("link %s flags: %w", name, err)
	}
	flags := ifr.Uint16()
	if flags&unix.IFF_UP != 0 {
		return nil
	}
	ifr.SetUint16(flags | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("link %s up: %w", name, err)
	}
	return nil
}
