package nbd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// memBackend is an in-memory Backend that records any call the server
// should never have made: out-of-range or zero-length accesses.
type memBackend struct {
	mu         sync.RWMutex
	data       []byte
	flushes    atomic.Int64
	violations atomic.Int64
	lastBad    atomic.Pointer[string]
}

var _ Backend = (*memBackend)(nil)

func newMemBackend(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

// bytes returns a copy of n bytes at off.
func (m *memBackend) bytes(off, n int) string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return string(m.data[off : off+n])
}

func (m *memBackend) Size() int64 { return int64(len(m.data)) }

func (m *memBackend) check(op string, off, n int64) bool {
	if off < 0 || n <= 0 || off > int64(len(m.data)) || n > int64(len(m.data))-off {
		m.violations.Add(1)
		s := fmt.Sprintf("%s off=%d n=%d size=%d", op, off, n, len(m.data))
		m.lastBad.Store(&s)
		return false
	}
	return true
}

func (m *memBackend) ReadAt(p []byte, off int64) error {
	if !m.check("read", off, int64(len(p))) {
		return EINVAL
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memBackend) WriteAt(p []byte, off int64, fua bool) error {
	if !m.check("write", off, int64(len(p))) {
		return EINVAL
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}

func (m *memBackend) WriteZeroes(off, n int64, fua bool) error {
	if !m.check("zero", off, n) {
		return EINVAL
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}

func (m *memBackend) Trim(off, n int64, fua bool) error {
	if !m.check("trim", off, n) {
		return EINVAL
	}
	return nil
}

func (m *memBackend) Flush() error {
	m.flushes.Add(1)
	return nil
}

func (m *memBackend) assertClean(t testing.TB) {
	t.Helper()
	if n := m.violations.Load(); n > 0 {
		t.Fatalf("server made %d invalid backend calls, last: %s", n, *m.lastBad.Load())
	}
}

// hookBackend wraps a Backend and lets a test intercept calls.
type hookBackend struct {
	Backend
	onRead  func(p []byte, off int64) error
	onWrite func(p []byte, off int64, fua bool) error
	onFlush func() error
}

func (h *hookBackend) ReadAt(p []byte, off int64) error {
	if h.onRead != nil {
		return h.onRead(p, off)
	}
	return h.Backend.ReadAt(p, off)
}

func (h *hookBackend) WriteAt(p []byte, off int64, fua bool) error {
	if h.onWrite != nil {
		return h.onWrite(p, off, fua)
	}
	return h.Backend.WriteAt(p, off, fua)
}

func (h *hookBackend) Flush() error {
	if h.onFlush != nil {
		return h.onFlush()
	}
	return h.Backend.Flush()
}

// mustFileBackend creates a zero-filled file of the given size and a
// FileBackend over it.
func mustFileBackend(t testing.TB, size int64) (*FileBackend, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	b, err := NewFileBackend(f)
	if err != nil {
		t.Fatal(err)
	}
	return b, path
}

// exports builds Lookup and List over a fixed map.
func exports(m map[string]Backend) (func(string) (Backend, bool), func() []string) {
	lookup := func(name string) (Backend, bool) {
		b, ok := m[name]
		return b, ok
	}
	list := func() []string {
		var names []string
		for n := range m {
			names = append(names, n)
		}
		return names
	}
	return lookup, list
}

// logBuffer collects log output from concurrent goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func newTestLogger() (*slog.Logger, *logBuffer) {
	lb := &logBuffer{}
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})), lb
}

// socketPath returns a unix socket path short enough for sun_path.
func socketPath(t testing.TB) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "nbd.sock")
	if len(p) < 100 {
		return p
	}
	dir, err := os.MkdirTemp("", "nbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "nbd.sock")
}

// mustServe runs srv on a fresh unix socket until the test ends and
// returns the socket's address.
func mustServe(t testing.TB, srv *Server) string {
	t.Helper()
	addr := "unix:" + socketPath(t)
	l, err := Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
	})
	return addr
}

func mustDial(t testing.TB, addr, export string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, export)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// checkGoroutines fails the test if the goroutine count does not fall back
// to at most base.
func checkGoroutines(t testing.TB, base int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("goroutines leaked: %d > %d\n%s", runtime.NumGoroutine(), base, buf[:n])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// rawConn speaks the protocol byte by byte, for tests that send what the
// Client never would.
type rawConn struct {
	t  testing.TB
	c  net.Conn
	br *bufio.Reader
}

func dialRaw(t testing.TB, addr string) *rawConn {
	t.Helper()
	network, address, err := splitAddr(addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial(network, address)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(time.Minute))
	t.Cleanup(func() { c.Close() })
	return &rawConn{t: t, c: c, br: bufio.NewReader(c)}
}

func (r *rawConn) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

func (r *rawConn) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.br, b); err != nil {
		r.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// greet reads the server greeting and sends the client flags.
func (r *rawConn) greet(cflags uint32) {
	r.t.Helper()
	g := r.read(18)
	if be.Uint64(g) != nbdMagic || be.Uint64(g[8:]) != optMagic {
		r.t.Fatalf("bad greeting % x", g)
	}
	if f := be.Uint16(g[16:]); f != flagFixedNewstyle|flagNoZeroes {
		r.t.Fatalf("handshake flags %#x", f)
	}
	r.write(be.AppendUint32(nil, cflags))
}

func (r *rawConn) sendOpt(opt uint32, data []byte) {
	r.t.Helper()
	r.write(append(appendOption(nil, opt, len(data)), data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (r *rawConn) readOptReply() optReply {
	r.t.Helper()
	h := r.read(20)
	if m := be.Uint64(h); m != optReplyMagic {
		r.t.Fatalf("option reply magic %#x", m)
	}
	return optReply{opt: be.Uint32(h[8:]), typ: be.Uint32(h[12:]), data: r.read(int(be.Uint32(h[16:])))}
}

func infoRequest(name string, infos ...uint16) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = be.AppendUint16(b, i)
	}
	return b
}

// goExport completes a handshake with NBD_OPT_GO and returns the replies.
func (r *rawConn) goExport(name string, infos ...uint16) []optReply {
	r.t.Helper()
	r.greet(flagCFixedNewstyle | flagCNoZeroes)
	r.sendOpt(optGo, infoRequest(name, infos...))
	var reps []optReply
	for {
		rep := r.readOptReply()
		reps = append(reps, rep)
		if rep.typ == repAck {
			return reps
		}
		if rep.typ&repErrBit != 0 {
			r.t.Fatalf("NBD_OPT_GO failed: %#x %s", rep.typ, rep.data)
		}
	}
}

func (r *rawConn) sendReq(flags, typ uint16, handle, off uint64, length uint32, payload []byte) {
	r.t.Helper()
	b := be.AppendUint32(nil, requestMagic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, handle)
	b = be.AppendUint64(b, off)
	b = be.AppendUint32(b, length)
	r.write(append(b, payload...))
}

func (r *rawConn) readReply() (Errno, uint64) {
	r.t.Helper()
	h := r.read(simpleReplySize)
	if m := be.Uint32(h); m != simpleReplyMagic {
		r.t.Fatalf("reply magic %#x", m)
	}
	return Errno(be.Uint32(h[4:])), be.Uint64(h[8:])
}

// expectReply reads one reply and checks its handle and error.
func (r *rawConn) expectReply(handle uint64, want Errno) {
	r.t.Helper()
	errno, h := r.readReply()
	if h != handle || errno != want {
		r.t.Fatalf("reply handle %d errno %d, want handle %d errno %d", h, errno, handle, want)
	}
}

// expectClosed checks that the server closes the connection without
// sending anything more.
func (r *rawConn) expectClosed() {
	r.t.Helper()
	// Under DefaultHandshakeTimeout, so that a server that only closes an
	// idle handshake by its default does not pass: a safety net, not a pace.
	r.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	b, err := io.ReadAll(r.br)
	if err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
		r.t.Fatalf("want connection closed, got %v", err)
	}
	if len(b) > 0 {
		r.t.Fatalf("want connection closed, got %d more bytes: % x", len(b), b[:min(len(b), 64)])
	}
}
