package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/asrdr/asr/replication/retry"
	"golang.org/x/sync/semaphore"
)

// Backend is a disk exported over NBD. Methods may be called concurrently,
// also with overlapping ranges; the server checks that every range lies
// within [0, Size()) before calling, and never passes a zero length.
// Buffers passed to ReadAt and WriteAt are reused once the method returns.
//
// Errors are reported to the client as EIO, as ENOSPC when they wrap
// syscall.ENOSPC, EDQUOT or EFBIG, as EPERM when they wrap EPERM, EROFS or
// EACCES, or as the Errno they wrap.
type Backend interface {
	// Size returns the export's size in bytes. It is read once per
	// connection, when the client selects the export.
	Size() int64
	// ReadAt fills p from offset off.
	ReadAt(p []byte, off int64) error
	// WriteAt writes p at offset off; with fua set the data must be
	// durable before WriteAt returns.
	WriteAt(p []byte, off int64, fua bool) error
	// WriteZeroes makes n bytes at off read as zero (NBD_CMD_WRITE_ZEROES).
	// The client's NO_HOLE hint is not passed on.
	WriteZeroes(off, n int64, fua bool) error
	// Trim tells the backend that n bytes at off are no longer needed
	// (NBD_CMD_TRIM). Their contents are undefined afterwards.
	Trim(off, n int64, fua bool) error
	// Flush makes every write that has completed, on any connection,
	// durable (NBD_CMD_FLUSH). The server advertises NBD_FLAG_CAN_MULTI_CONN,
	// so Flush must not be scoped to one connection.
	Flush() error
}

// DefaultMaxInFlight is the number of requests a connection may have
// outstanding when Server.MaxInFlight is zero.
const DefaultMaxInFlight = 32

// DefaultHandshakeTimeout bounds the handshake when
// Server.HandshakeTimeout is zero.
const DefaultHandshakeTimeout = 30 * time.Second

// shutdownWriteGrace is how long replies to in-flight requests may take
// to drain once the server is shutting down.
const shutdownWriteGrace = 5 * time.Second

// Server serves Backends over NBD. Its fields must not change while it is
// serving; the zero value serves nothing.
type Server struct {
	// Lookup returns the export with the given name. The empty name, the
	// protocol's default export, is mapped to the only name List returns
	// when it returns exactly one; otherwise it is unknown.
	Lookup func(name string) (Backend, bool)
	// List returns the export names for NBD_OPT_LIST. If nil, listing is
	// refused and there is no default export.
	List func() []string
	// Logger receives connection events and protocol errors. If nil,
	// slog.Default() is used.
	Logger *slog.Logger
	// MaxInFlight bounds the requests processed concurrently on one
	// connection (DefaultMaxInFlight if zero). Their payload buffers
	// together are bounded by MaxBytes, across every connection.
	MaxInFlight int
	// HandshakeTimeout bounds the time a client may take to select an
	// export (DefaultHandshakeTimeout if zero, no limit if negative).
	HandshakeTimeout time.Duration
	// MaxBytes bounds the payload bytes (WRITE data read, READ data to
	// send) of the requests in flight on all of the server's connections
	// together (DefaultMaxBytes if zero). A connection's reader waits for
	// room before it reads a payload, so a client writing faster than the
	// backend completes is slowed, not buffered. A request larger than
	// MaxBytes runs once it is the only one in flight.
	MaxBytes int64

	connID   atomic.Uint64
	queued   atomic.Int64 // replies queued (reply), on every connection
	batches  atomic.Int64 // the writes that sent them (writeReplies)
	handlers atomic.Int64 // handler goroutines started (readRequests)
	initOnce sync.Once
	budget   *semaphore.Weighted
	maxBytes int64
}

// DefaultMaxBytes is the payload budget of a Server whose MaxBytes is zero:
// one request of the largest size, or many smaller ones.
const DefaultMaxBytes = MaxPayload

// payloadBudget returns the server's shared budget and its size.
func (s *Server) payloadBudget() (*semaphore.Weighted, int64) {
	s.initOnce.Do(func() {
		s.maxBytes = s.MaxBytes
		if s.maxBytes <= 0 {
			s.maxBytes = DefaultMaxBytes
		}
		s.budget = semaphore.NewWeighted(s.maxBytes)
	})
	return s.budget, s.maxBytes
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

func (s *Server) maxInFlight() int {
	if s.MaxInFlight > 0 {
		return s.MaxInFlight
	}
	return DefaultMaxInFlight
}

// Serve accepts connections on l and serves each in its own goroutine
// until ctx is done or l is closed, and returns nil in both cases. Before
// returning it closes l, shuts down every connection it accepted (letting
// in-flight requests finish) and waits for their goroutines. It returns an
// error only if Accept fails permanently.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		l.Close()
		wg.Wait()
	}()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	log := s.logger()
	backoff := retry.New(5*time.Millisecond, time.Second)
	for {
		nc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			if !temporaryAcceptError(err) {
				return fmt.Errorf("nbd accept on %s: %w", l.Addr(), err)
			}
			delay := backoff.Next()
			log.Warn("nbd accept failed, retrying", "err", err, "delay", delay)
			if retry.Sleep(ctx, delay) != nil {
				return nil
			}
			continue
		}
		backoff.Reset()
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = s.ServeConn(ctx, nc) // ServeConn logs its own errors
		}()
	}
}

func temporaryAcceptError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS,
		syscall.ENOMEM, syscall.ECONNABORTED, syscall.ECONNRESET, syscall.EINTR} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// ServeConn runs one NBD session on c and closes c when it ends: after
// NBD_OPT_ABORT or NBD_CMD_DISC, when the client goes away, on a protocol
// violation, or when ctx is done (requests already received still get
// their replies). It logs why the session ended and returns nil for the
// normal endings; otherwise the error wraps ErrProtocol for malformed
// input, ErrUnknownExport for an NBD_OPT_EXPORT_NAME naming no export, or
// the I/O error that broke the connection.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) (err error) {
	id := s.connID.Add(1)
	remote := peerName(c)
	cn := &conn{
		srv: s,
		nc:  c,
		ctx: ctx,
		br:  bufio.NewReaderSize(c, 64<<10),
		log: s.logger().With("conn", id, "remote", remote),
	}
	defer func() {
		if r := recover(); r != nil {
			cn.log.Error("nbd connection panicked", "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("nbd connection %d: panic: %v", id, r)
		}
		c.Close()
	}()
	stop := context.AfterFunc(ctx, cn.interrupt)
	defer stop()

	err = cn.serve()
	switch {
	case err == nil:
		cn.log.Debug("nbd connection closed")
	case errors.Is(err, ErrProtocol), errors.Is(err, ErrUnknownExport):
		cn.log.Warn("nbd connection closed: client error", "reason", err)
	default:
		cn.log.Info("nbd connection closed: i/o error", "reason", err)
	}
	return err
}

// peerName names the client for logs. Unix socket peers are unnamed, so
// they are named after the socket they came in on; the conn id tells them
// apart.
func peerName(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	if a := c.LocalAddr(); a != nil && a.String() != "" {
		return a.Network() + ":" + a.String()
	}
	return "unknown"
}

// conn is the state of one NBD session.
type conn struct {
	srv *Server
	nc  net.Conn
	ctx context.Context
	br  *bufio.Reader
	log *slog.Logger

	// Replies in the transmission phase (reply): the queue, the handler
	// writing it, and the writer's own buffers.
	rmu     sync.Mutex
	replies []replyItem
	writing bool
	spare   []replyItem
	iov     net.Buffers

	failOnce sync.Once
	failErr  error // first error that broke the connection, set via fail
	failed   atomic.Bool
}

// interrupt stops the session after ctx is done: blocked reads return at
// once, replies to requests already accepted get a grace period.
func (c *conn) interrupt() {
	c.nc.SetReadDeadline(time.Now())
	c.nc.SetWriteDeadline(time.Now().Add(shutdownWriteGrace))
}

// setDeadline sets both deadlines without undoing a concurrent interrupt.
func (c *conn) setDeadline(t time.Time) {
	c.nc.SetDeadline(t)
	if c.ctx.Err() != nil {
		c.interrupt()
	}
}

// fail records the first error that broke the connection and closes it,
// which unblocks the request reader.
func (c *conn) fail(err error) {
	c.failOnce.Do(func() {
		c.failErr = err
		c.failed.Store(true)
		c.nc.Close()
	})
}

func (c *conn) serve() error {
	if t := c.srv.HandshakeTimeout; t >= 0 {
		if t == 0 {
			t = DefaultHandshakeTimeout
		}
		c.setDeadline(time.Now().Add(t))
	}
	exp, err := c.handshake()
	if err != nil || exp == nil {
		if c.ctx.Err() != nil {
			return nil
		}
		return err
	}
	c.setDeadline(time.Time{})
	c.log = c.log.With("export", exp.name)
	c.log.Info("nbd client attached", "size", exp.size)
	return c.transmit(exp)
}

// export is the export a client selected.
type export struct {
	name    string
	backend Backend
	size    int64
}

// resolve finds the export for a client-supplied name.
func (s *Server) resolve(name string) (*export, bool) {
	if name == "" {
		if s.List == nil {
			return nil, false
		}
		names := s.List()
		if len(names) != 1 {
			return nil, false
		}
		name = names[0]
	}
	if s.Lookup == nil {
		return nil, false
	}
	b, ok := s.Lookup(name)
	if !ok || b == nil {
		return nil, false
	}
	size := b.Size()
	if size < 0 {
		return nil, false
	}
	return &export{name: name, backend: b, size: size}, true
}
