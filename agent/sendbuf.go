package agent

import (
	"context"
	"crypto/tls"
	"net"
	"sync"
)

// sendChunk is the size of the writes a sendBuffer makes: 64 KiB, the
// largest segment TCP hands to a device at once (GSO/TSO), so one write
// is one trip down the stack, where each 16 KiB TLS record was one.
const sendChunk = 64 << 10

// sendBuffer sits between TLS and the TCP connection and gathers the TLS
// records of the data connection into writes of about sendChunk: Go's
// crypto/tls writes every record (at most 16 KiB of data) with its own
// write(2), and the kernel's cost per call (on loopback the receiving
// side's too, which runs on the sender's CPU there) was most of what
// shipping cost the guest's core beside AES-GCM (BENCHMARKS.md, "Guest
// writes: TLS records in 64 KiB writes, ...").
//
// It passes writes through until startGathering (the handshake reads and
// writes in turn, and must not wait in a buffer), then keeps them
// until it holds sendChunk bytes or Flush is called. The shipper flushes
// after every frame it writes (tlsConn.Flush), so nothing waits for more
// data. Close drops what is buffered: by then the session has failed or
// ended, and a close_notify is not what anything waits for.
type sendBuffer struct {
	net.Conn

	mu     sync.Mutex
	gather bool
	buf    []byte
}

func (b *sendBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.gather || len(p) >= sendChunk {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
		return b.Conn.Write(p)
	}
	if b.buf == nil {
		// One TLS record more than a chunk: a record that crosses the
		// threshold is kept whole, and then written with the others.
		b.buf = make([]byte, 0, sendChunk+maxTLSRecord)
	}
	b.buf = append(b.buf, p...)
	if len(b.buf) >= sendChunk {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// maxTLSRecord bounds a TLS record on the wire: 16 KiB of data plus the
// header and AEAD overhead (RFC 8446, 5.2: at most 2^14 + 256 bytes of
// ciphertext).
const maxTLSRecord = 5 + 16<<10 + 256

func (b *sendBuffer) startGathering() {
	b.mu.Lock()
	b.gather = true
	b.mu.Unlock()
}

// Flush writes what the buffer holds.
func (b *sendBuffer) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.flushLocked()
}

func (b *sendBuffer) flushLocked() error {
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.Conn.Write(b.buf)
	b.buf = b.buf[:0]
	return err
}

// tlsConn is the data connection: TLS over a sendBuffer. Flush sends the
// records its writes made.
type tlsConn struct {
	*tls.Conn
	sb *sendBuffer
}

func (c *tlsConn) Flush() error { return c.sb.Flush() }

// flusher is a connection that gathers its writes (tlsConn); the shipper
// flushes one after each frame.
type flusher interface{ Flush() error }

// dialTLS connects to addr, shakes hands, and returns the connection with
// its records gathered into larger writes from then on.
func dialTLS(ctx context.Context, d *net.Dialer, addr string, cfg *tls.Config) (*tlsConn, error) {
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return clientTLS(ctx, raw, cfg)
}

// clientTLS is dialTLS's handshake over raw.
func clientTLS(ctx context.Context, raw net.Conn, cfg *tls.Config) (*tlsConn, error) {
	sb := &sendBuffer{Conn: raw}
	tc := tls.Client(sb, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	sb.startGathering()
	return &tlsConn{Conn: tc, sb: sb}, nil
}
