package nbd

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asrdr/asr/replication/allocguard"
)

// errorCatcher is a slog.Handler that counts Error records: the server logs
// at Error only for panics, which no input may cause.
type errorCatcher struct {
	n    *atomic.Int64
	last *atomic.Pointer[string]
}

func newErrorCatcher() errorCatcher {
	return errorCatcher{n: new(atomic.Int64), last: new(atomic.Pointer[string])}
}

func (h errorCatcher) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelError }

func (h errorCatcher) Handle(_ context.Context, r slog.Record) error {
	h.n.Add(1)
	msg := r.Message
	r.Attrs(func(a slog.Attr) bool {
		msg += " " + a.String()
		return true
	})
	h.last.Store(&msg)
	return nil
}

func (h errorCatcher) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h errorCatcher) WithGroup(string) slog.Handler      { return h }

// fuzzServer serves one export, "disk", from memory.
func fuzzServer(size int) (*Server, *memBackend, errorCatcher) {
	mb := newMemBackend(size)
	lookup, list := exports(map[string]Backend{"disk": mb})
	ec := newErrorCatcher()
	return &Server{Lookup: lookup, List: list, Logger: slog.New(ec), MaxInFlight: 4}, mb, ec
}

// sessionBound is what a session may allocate beyond its input: the
// connection's 64 KiB read buffer and, per request in flight, a payload
// buffer of at most the fuzz export's size (64 KiB).
const sessionBound = 64<<10 + 4*64<<10

// feedServer runs a session in which the client sends data and hangs up,
// and fails if the server does not finish, misbehaves, or allocates more
// than the input and the export justify (a length trusted before its
// bytes arrived).
func feedServer(t *testing.T, srv *Server, mb *memBackend, ec errorCatcher, data []byte) {
	allocguard.Check(t, "nbd session", allocguard.Bound(len(data))+sessionBound, func() {
		serveSession(t, srv, mb, ec, data)
	})
}

// serveSession runs the server on a connection from a client that sends
// data, half-closes and reads every reply: unlike a net.Pipe closed after
// the write, the server gets to act on the whole input, transmission
// phase included, before it sees the end.
func serveSession(t *testing.T, srv *Server, mb *memBackend, ec errorCatcher, data []byte) {
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), &scriptConn{r: bytes.NewReader(data)}) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("ServeConn did not return after the client hung up")
	}
	mb.assertClean(t)
	if n := ec.n.Load(); n > 0 {
		t.Fatalf("server logged %d errors, last: %s", n, *ec.last.Load())
	}
}

// scriptConn is the server's end of a connection from a scripted client:
// reads return the script and then io.EOF (the client's half-close),
// writes are taken and dropped, deadlines have nothing to bound.
type scriptConn struct {
	r      *bytes.Reader
	closed atomic.Bool
}

func (c *scriptConn) Read(p []byte) (int, error) {
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	return c.r.Read(p)
}

func (c *scriptConn) Write(p []byte) (int, error) {
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	return len(p), nil
}

func (c *scriptConn) Close() error                     { c.closed.Store(true); return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return scriptAddr{} }
func (c *scriptConn) RemoteAddr() net.Addr             { return scriptAddr{} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

type scriptAddr struct{}

func (scriptAddr) Network() string { return "script" }
func (scriptAddr) String() string  { return "client" }

func clientFlags() []byte { return be.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes) }

func option(opt uint32, data []byte) []byte {
	return append(appendOption(nil, opt, len(data)), data...)
}

func req(flags, typ uint16, handle, off uint64, length uint32, payload []byte) []byte {
	b := be.AppendUint32(nil, requestMagic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, handle)
	b = be.AppendUint64(b, off)
	b = be.AppendUint32(b, length)
	return append(b, payload...)
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// FuzzHandshake feeds arbitrary client bytes after the server greeting.
// Seeds are valid negotiations, some continuing into transmission.
func FuzzHandshake(f *testing.F) {
	disc := req(0, cmdDisc, 0, 0, 0, nil)
	f.Add(cat(clientFlags(), option(optGo, infoRequest("disk", infoBlockSize, infoName)),
		req(0, cmdRead, 1, 0, 512, nil), disc))
	f.Add(cat(clientFlags(), option(optList, nil), option(optInfo, infoRequest("disk")),
		option(optStructuredReply, nil), option(optStartTLS, nil), option(optGo, infoRequest(""))))
	f.Add(cat(be.AppendUint32(nil, flagCFixedNewstyle), option(optExportName, []byte("disk")),
		req(cmdFlagFUA, cmdWrite, 2, 100, 4, []byte("abcd")), req(0, cmdFlush, 3, 0, 0, nil), disc))
	f.Add(cat(clientFlags(), option(optAbort, nil)))
	f.Add(cat(clientFlags(), option(optInfo, []byte{0, 0, 0, 9}), option(optGo, infoRequest("nope")),
		option(optExportName, nil)))
	f.Add(cat(clientFlags(), appendOption(nil, optGo, maxOptionLen+1)))
	f.Add(cat(clientFlags(), option(9, cat(be.AppendUint32(nil, 4), []byte("disk"), be.AppendUint32(nil, 0)))))
	f.Add([]byte{0, 0, 0, 8})
	f.Add([]byte{})

	srv, mb, ec := fuzzServer(1 << 16)
	srv.HandshakeTimeout = -1
	f.Fuzz(func(t *testing.T, data []byte) {
		feedServer(t, srv, mb, ec, data)
	})
}

// FuzzTransmission feeds arbitrary request streams to a connection that
// has completed its handshake. Seeds are valid request sequences.
func FuzzTransmission(f *testing.F) {
	f.Add(cat(
		req(0, cmdWrite, 1, 0, 8, []byte("01234567")),
		req(cmdFlagFUA, cmdWrite, 2, 4096, 4, []byte("abcd")),
		req(0, cmdRead, 3, 0, 4100, nil),
		req(0, cmdFlush, 4, 0, 0, nil),
		req(0, cmdDisc, 5, 0, 0, nil),
	))
	f.Add(cat(
		req(0, cmdTrim, 1, 0, 1<<15, nil),
		req(cmdFlagNoHole, cmdWriteZeroes, 2, 512, 1024, nil),
		req(cmdFlagFUA, cmdWriteZeroes, 3, 0, 1<<16, nil),
		req(0, cmdRead, 4, (1<<16)-1, 1, nil),
	))
	f.Add(cat(
		req(0, cmdRead, 1, 1<<16, 1, nil),               // past the end
		req(0, cmdWrite, 2, 1<<16-2, 4, []byte("wxyz")), // straddles the end
		req(0, cmdRead, 3, 0, MaxPayload+1, nil),        // oversize read
		req(0, 5, 4, 0, 4096, nil),                      // NBD_CMD_CACHE
		req(0xffff, cmdRead, 5, 0, 1, nil),              // unknown flags
		req(0, cmdRead, 6, 0, 0, nil),                   // zero length
		req(0, cmdRead, 7, ^uint64(0), ^uint32(0), nil), // wraps around
	))
	f.Add(req(0, cmdWrite, 1, 0, MaxPayload+1, nil))
	f.Add(req(0, cmdWrite, 1, 0, 4096, []byte("short")))
	f.Add(req(0, cmdWrite, 1, 1<<20, MaxPayload, []byte("past the end"))) // refused: nothing allocated for it
	f.Add([]byte{0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1})
	f.Add([]byte("not a request at all, not at all"))

	handshake := cat(clientFlags(), option(optGo, infoRequest("disk")))
	srv, mb, ec := fuzzServer(1 << 16)
	f.Fuzz(func(t *testing.T, data []byte) {
		feedServer(t, srv, mb, ec, cat(handshake, data))
	})
}

// FuzzParseInfoRequest checks the NBD_OPT_INFO/NBD_OPT_GO decoder accepts
// exactly the well-formed inputs.
func FuzzParseInfoRequest(f *testing.F) {
	f.Add(infoRequest("disk", infoBlockSize))
	f.Add(infoRequest(""))
	f.Add([]byte{0, 0, 0, 5, 'a', 0, 0})
	f.Fuzz(func(t *testing.T, d []byte) {
		var name []byte
		var infos []uint16
		var ok bool
		allocguard.Check(t, "parseInfoRequest", allocguard.Bound(len(d)), func() { name, infos, ok = parseInfoRequest(d) })
		if !ok {
			return
		}
		if 4+len(name)+2+2*len(infos) != len(d) || len(name) > maxNameLen {
			t.Fatalf("accepted malformed request % x", d)
		}
		again := infoRequest(string(name), infos...)
		if string(again) != string(d) {
			t.Fatalf("round trip % x != % x", again, d)
		}
	})
}

// FuzzClient feeds arbitrary server bytes to the client: it must fail
// cleanly, never panic or hang.
func FuzzClient(f *testing.F) {
	greet := cat(be.AppendUint64(nil, nbdMagic), be.AppendUint64(nil, optMagic), be.AppendUint16(nil, flagFixedNewstyle|flagNoZeroes))
	optRep := func(typ uint32, data []byte) []byte {
		b := be.AppendUint64(nil, optReplyMagic)
		b = be.AppendUint32(b, optGo)
		b = be.AppendUint32(b, typ)
		b = be.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	export := cat(be.AppendUint16(nil, infoExport), be.AppendUint64(nil, 4096), be.AppendUint16(nil, serverTransmissionFlags))
	reply := func(errno uint32, handle uint64, data []byte) []byte {
		b := be.AppendUint32(nil, simpleReplyMagic)
		b = be.AppendUint32(b, errno)
		b = be.AppendUint64(b, handle)
		return append(b, data...)
	}
	f.Add(cat(greet, optRep(repInfo, export), optRep(repAck, nil), reply(0, 1, []byte("12345678"))))
	f.Add(cat(greet, optRep(repInfo, export), optRep(repAck, nil), reply(22, 1, nil)))
	f.Add(cat(greet, optRep(repErrUnsup, nil), be.AppendUint64(nil, 4096), be.AppendUint16(nil, 1)))
	f.Add(cat(greet, optRep(repErrUnknown, []byte("no such export"))))
	f.Add(cat(greet, optRep(repInfo, export), optRep(repAck, nil), reply(0, 99, nil)))

	f.Add(cat(greet, be.AppendUint64(nil, optReplyMagic), be.AppendUint32(nil, optGo), be.AppendUint32(nil, repInfo),
		be.AppendUint32(nil, 0xffffffff))) // a reply that says it is 4 GiB

	f.Fuzz(func(t *testing.T, data []byte) {
		// The client's read buffer, and an option reply of at most 64 KiB.
		allocguard.Check(t, "nbd client", allocguard.Bound(len(data))+2*64<<10, func() { runClient(data) })
	})
}

func runClient(data []byte) {
	cs, ss := net.Pipe()
	go func() {
		go io.Copy(io.Discard, ss)
		ss.SetWriteDeadline(time.Now().Add(5 * time.Second))
		ss.Write(data)
		ss.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := NewClient(ctx, cs, "disk")
	if err != nil {
		return
	}
	c.ReadAt(make([]byte, 8), 0)
	c.Close()
}
