package agent

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"
)

// countConn records the size of every write that reaches the socket.
type countConn struct {
	net.Conn
	mu     sync.Mutex
	writes []int
}

func (c *countConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes = append(c.writes, len(p))
	c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *countConn) sizes() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]int(nil), c.writes...)
}

// tlsPair starts a TLS server on loopback that hands what it reads to
// got (or, with drain, reads it into one buffer and drops it), and
// returns a client connection over a countConn.
func tlsPair(t testing.TB, drain bool) (*tlsConn, *countConn, <-chan []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ps"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"ps"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	got := make(chan []byte, 1024)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		sc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
		if drain {
			io.Copy(io.Discard, sc)
			close(got)
			return
		}
		for {
			b := make([]byte, 256<<10)
			n, err := sc.Read(b)
			if n > 0 {
				got <- b[:n]
			}
			if err != nil {
				close(got)
				return
			}
		}
	}()
	raw, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cc := &countConn{Conn: raw}
	pool := x509.NewCertPool()
	cert, _ := x509.ParseCertificate(der)
	pool.AddCert(cert)
	tc, err := clientTLS(context.Background(), cc, &tls.Config{RootCAs: pool, ServerName: "ps", MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tc.Close() })
	return tc, cc, got
}

// readN reads n bytes of what the server received.
func readN(t *testing.T, got <-chan []byte, n int) []byte {
	t.Helper()
	var out []byte
	for len(out) < n {
		b, ok := <-got
		if !ok {
			t.Fatalf("server saw the end after %d of %d bytes", len(out), n)
		}
		out = append(out, b...)
	}
	if len(out) != n {
		t.Fatalf("server got %d bytes, want %d", len(out), n)
	}
	return out
}

// TestSendBufferGathersRecords: after the handshake the TLS records reach
// the socket in writes of at least sendChunk bytes, but for the last of
// each flush; a small write waits for the flush; the bytes arrive whole
// and in order.
func TestSendBufferGathersRecords(t *testing.T) {
	tc, cc, got := tlsPair(t, false)
	afterHandshake := len(cc.sizes())

	// A small frame is held until the flush.
	small := bytes.Repeat([]byte("h"), 100)
	if _, err := tc.Write(small); err != nil {
		t.Fatal(err)
	}
	if n := len(cc.sizes()); n != afterHandshake {
		t.Fatalf("a 100-byte write reached the socket before the flush (%d writes, %d after the handshake)", n, afterHandshake)
	}
	if err := tc.Flush(); err != nil {
		t.Fatal(err)
	}
	if b := readN(t, got, len(small)); !bytes.Equal(b, small) {
		t.Fatal("the flushed frame arrived changed")
	}

	// Frames of many sizes, one flush each, as the shipper writes them.
	var want []byte
	sizes := []int{4 << 10, 1 << 20, 37, 300 << 10, 4 << 20, 64 << 10, 1}
	start := len(cc.sizes())
	for i, n := range sizes {
		p := make([]byte, n)
		rand.Read(p)
		want = append(want, p...)
		if _, err := tc.Write(p); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		before := len(cc.sizes())
		if err := tc.Flush(); err != nil {
			t.Fatal(err)
		}
		// Every write of this frame before its flush's was a full chunk.
		w := cc.sizes()
		for j := start; j < before; j++ {
			if w[j] < sendChunk {
				t.Fatalf("frame %d (%d bytes): a write of %d bytes before the flush (want >= %d): records were not gathered", i, n, w[j], sendChunk)
			}
		}
		start = len(w)
	}
	if b := readN(t, got, len(want)); !bytes.Equal(b, want) {
		t.Fatal("the frames arrived changed or out of order")
	}
	// 16 KiB records written one by one would take at least total/16 KiB
	// writes; gathered, about total/64 KiB plus one per flush.
	total := 0
	for _, n := range sizes {
		total += n
	}
	writes := len(cc.sizes()) - afterHandshake - 1
	if max := total/sendChunk + 2*len(sizes); writes > max {
		t.Fatalf("%d writes for %d bytes in %d flushes, want at most %d", writes, total, len(sizes), max)
	}
}

// TestSendBufferWriteErrorSurfaces: a socket that fails makes the flush
// fail (the shipper then ends the session), and the failure stays.
func TestSendBufferWriteErrorSurfaces(t *testing.T) {
	tc, cc, _ := tlsPair(t, false)
	if _, err := tc.Write([]byte("frame")); err != nil {
		t.Fatal(err)
	}
	cc.Conn.Close()
	if err := tc.Flush(); err == nil {
		t.Fatal("a flush over a closed socket succeeded")
	}
	if _, err := io.Copy(tc, bytes.NewReader(make([]byte, 256<<10))); err == nil {
		t.Fatal("a write after a failed flush succeeded")
	}
}
