package nbd

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"time"
)

// splitAddr turns "unix:/path.sock" (or a bare absolute path) into a unix
// socket address and anything else into a TCP "HOST:PORT" address.
func splitAddr(addr string) (network, address string, err error) {
	switch {
	case strings.HasPrefix(addr, "unix:"):
		address = strings.TrimPrefix(addr, "unix:")
		if address == "" {
			return "", "", fmt.Errorf("nbd address %q: empty socket path", addr)
		}
		return "unix", address, nil
	case strings.HasPrefix(addr, "/"):
		return "unix", addr, nil
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", "", fmt.Errorf("nbd address %q: want unix:/path or host:port: %w", addr, err)
	}
	return "tcp", addr, nil
}

// Listen returns a listener for addr, which is "unix:/path.sock" (or an
// absolute path) for a unix socket, or "HOST:PORT" for TCP. A socket file
// left behind by a process that is gone is removed first; a live socket or
// a file that is not a socket is an error. The socket file is removed when
// the listener is closed.
func Listen(addr string) (net.Listener, error) {
	network, address, err := splitAddr(addr)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := removeStaleSocket(address); err != nil {
			return nil, err
		}
	}
	l, err := net.Listen(network, address)
	if err != nil {
		return nil, fmt.Errorf("nbd listen: %w", err)
	}
	return l, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("nbd listen: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("nbd listen: %s exists and is not a socket", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("nbd listen: %s is in use by a running server", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("nbd listen: remove stale socket: %w", err)
	}
	return nil
}
