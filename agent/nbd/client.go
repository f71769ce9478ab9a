package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

var (
	aLongTimeAgo = time.Unix(1, 0)
	noDeadline   time.Time
)

// Client is a connection to one NBD export, for tests, load generators and
// benchmarks. Its methods may be called from several goroutines; their
// requests are pipelined on the one connection and may complete out of
// order. Requests larger than MaxPayload are split.
type Client struct {
	nc    net.Conn
	br    *bufio.Reader
	size  int64
	flags uint16

	wmu sync.Mutex // serialises request writes

	mu      sync.Mutex
	pending map[uint64]*call
	next    uint64
	err     error // why the connection is unusable; nil while it works
	closing bool
	calls   sync.WaitGroup

	readerDone chan struct{}
}

type call struct {
	dst  []byte // where a READ's data goes
	done chan error
}

// Dial connects to the NBD server at addr ("unix:/path.sock", an absolute
// socket path, or "HOST:PORT") and selects export with NBD_OPT_GO.
func Dial(ctx context.Context, addr, export string) (*Client, error) {
	network, address, err := splitAddr(addr)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("nbd dial: %w", err)
	}
	c, err := NewClient(ctx, nc, export)
	if err != nil {
		return nil, fmt.Errorf("nbd dial %s: %w", addr, err)
	}
	return c, nil
}

// NewClient runs the handshake on nc, selecting export with NBD_OPT_GO (or
// NBD_OPT_EXPORT_NAME if the server does not know NBD_OPT_GO). The Client
// owns nc from then on; NewClient closes it if the handshake fails.
func NewClient(ctx context.Context, nc net.Conn, export string) (*Client, error) {
	if len(export) > maxNameLen {
		nc.Close()
		return nil, fmt.Errorf("nbd handshake: export name of %d bytes exceeds %d", len(export), maxNameLen)
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(aLongTimeAgo) })
	c := &Client{
		nc:         nc,
		br:         bufio.NewReaderSize(nc, 64<<10),
		pending:    make(map[uint64]*call),
		readerDone: make(chan struct{}),
	}
	err := c.handshake(export)
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd handshake: %w", err)
	}
	nc.SetDeadline(noDeadline)
	go c.readLoop()
	return c, nil
}

func (c *Client) handshake(export string) error {
	var greet [18]byte
	if _, err := io.ReadFull(c.br, greet[:]); err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	if be.Uint64(greet[0:]) != nbdMagic || be.Uint64(greet[8:]) != optMagic {
		return protocolErrorf("not a newstyle NBD server")
	}
	sflags := be.Uint16(greet[16:])
	if sflags&flagFixedNewstyle == 0 {
		return protocolErrorf("server does not support fixed newstyle negotiation")
	}
	cflags := uint32(flagCFixedNewstyle)
	noZeroes := sflags&flagNoZeroes != 0
	if noZeroes {
		cflags |= flagCNoZeroes
	}

	// Client flags and NBD_OPT_GO with no information requests: the
	// client obeys no block size constraints beyond the defaults.
	msg := make([]byte, 0, 4+optHeaderSize+4+len(export)+2)
	msg = be.AppendUint32(msg, cflags)
	msg = appendOption(msg, optGo, 4+len(export)+2)
	msg = be.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	msg = be.AppendUint16(msg, 0)
	if _, err := c.nc.Write(msg); err != nil {
		return fmt.Errorf("send NBD_OPT_GO: %w", err)
	}

	var gotExport bool
	for {
		var h [20]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return fmt.Errorf("read option reply: %w", err)
		}
		if m := be.Uint64(h[0:]); m != optReplyMagic {
			return protocolErrorf("bad option reply magic %#x", m)
		}
		opt, typ, n := be.Uint32(h[8:]), be.Uint32(h[12:]), be.Uint32(h[16:])
		if opt != optGo {
			return protocolErrorf("reply to option %d, want %d", opt, optGo)
		}
		if n > 64<<10 {
			return protocolErrorf("option reply of %d bytes", n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return fmt.Errorf("read option reply: %w", err)
		}
		switch {
		case typ == repInfo:
			if len(data) == 12 && be.Uint16(data) == infoExport {
				c.size = int64(be.Uint64(data[2:]))
				c.flags = be.Uint16(data[10:])
				gotExport = true
			}
		case typ == repAck:
			if !gotExport {
				return protocolErrorf("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
			}
			return c.checkSize()
		case typ == repErrUnsup:
			return c.exportName(export, noZeroes)
		case typ == repErrUnknown:
			return fmt.Errorf("%w %q: %s", ErrUnknownExport, export, data)
		case typ&repErrBit != 0:
			return fmt.Errorf("server refused export %q (reply %#x): %s", export, typ, data)
		default:
			return protocolErrorf("unexpected reply type %d to NBD_OPT_GO", typ)
		}
	}
}

// exportName is the fallback for servers without NBD_OPT_GO.
func (c *Client) exportName(export string, noZeroes bool) error {
	msg := appendOption(nil, optExportName, len(export))
	msg = append(msg, export...)
	if _, err := c.nc.Write(msg); err != nil {
		return fmt.Errorf("send NBD_OPT_EXPORT_NAME: %w", err)
	}
	rep := make([]byte, 10+124)
	if noZeroes {
		rep = rep[:10]
	}
	if _, err := io.ReadFull(c.br, rep); err != nil {
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%w %q", ErrUnknownExport, export)
		}
		return fmt.Errorf("read export info: %w", err)
	}
	c.size = int64(be.Uint64(rep))
	c.flags = be.Uint16(rep[8:])
	return c.checkSize()
}

func (c *Client) checkSize() error {
	if c.size < 0 {
		return protocolErrorf("export size %d out of range", uint64(c.size))
	}
	return nil
}

func appendOption(b []byte, opt uint32, n int) []byte {
	b = be.AppendUint64(b, optMagic)
	b = be.AppendUint32(b, opt)
	return be.AppendUint32(b, uint32(n))
}

// Size returns the size of the export in bytes.
func (c *Client) Size() int64 { return c.size }

// readLoop delivers replies to the calls waiting for them.
func (c *Client) readLoop() {
	defer close(c.readerDone)
	var h [simpleReplySize]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			c.fail(fmt.Errorf("read reply: %w", err))
			return
		}
		if m := be.Uint32(h[0:]); m != simpleReplyMagic {
			c.fail(protocolErrorf("bad reply magic %#x", m))
			return
		}
		errno := Errno(be.Uint32(h[4:]))
		handle := be.Uint64(h[8:])
		c.mu.Lock()
		cl, ok := c.pending[handle]
		delete(c.pending, handle)
		c.mu.Unlock()
		if !ok {
			c.fail(protocolErrorf("reply for unknown handle %d", handle))
			return
		}
		if errno != 0 {
			cl.done <- errno
			continue
		}
		if len(cl.dst) > 0 {
			if _, err := io.ReadFull(c.br, cl.dst); err != nil {
				err = fmt.Errorf("read reply data: %w", err)
				cl.done <- err
				c.fail(err)
				return
			}
		}
		cl.done <- nil
	}
}

// fail marks the connection broken, closes it and fails every pending call.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	err = c.err
	pending := c.pending
	c.pending = make(map[uint64]*call)
	c.mu.Unlock()
	c.nc.Close()
	for _, cl := range pending {
		cl.done <- err
	}
}

// do sends one request and waits for its reply.
func (c *Client) do(typ, flags uint16, off int64, length uint32, payload, dst []byte) error {
	if off < 0 {
		return fmt.Errorf("negative offset %d: %w", off, EINVAL)
	}
	cl := &call{dst: dst, done: make(chan error, 1)}
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return ErrClosed
	}
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.next++
	handle := c.next
	c.pending[handle] = cl
	c.calls.Add(1)
	c.mu.Unlock()
	defer c.calls.Done()

	var h [requestSize]byte
	be.PutUint32(h[0:], requestMagic)
	be.PutUint16(h[4:], flags)
	be.PutUint16(h[6:], typ)
	be.PutUint64(h[8:], handle)
	be.PutUint64(h[16:], uint64(off))
	be.PutUint32(h[24:], length)
	bufs := net.Buffers{h[:]}
	if len(payload) > 0 {
		bufs = append(bufs, payload)
	}
	c.wmu.Lock()
	_, err := bufs.WriteTo(c.nc)
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("send request: %w", err))
	}
	return <-cl.done
}

func (c *Client) require(flag uint16, what string) error {
	if c.flags&flag == 0 {
		return fmt.Errorf("nbd %s: %w", what, ErrUnsupported)
	}
	return nil
}

// ReadAt reads len(p) bytes at off.
func (c *Client) ReadAt(p []byte, off int64) error {
	for len(p) > 0 {
		n := min(len(p), MaxPayload)
		if err := c.do(cmdRead, 0, off, uint32(n), nil, p[:n]); err != nil {
			return fmt.Errorf("nbd read %d bytes at %d: %w", n, off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// WriteAt writes p at off.
func (c *Client) WriteAt(p []byte, off int64) error {
	return c.writeAt(p, off, 0)
}

// WriteAtFUA writes p at off and returns once the server has made it
// durable (NBD_CMD_FLAG_FUA).
func (c *Client) WriteAtFUA(p []byte, off int64) error {
	if err := c.require(flagSendFUA, "write with FUA"); err != nil {
		return err
	}
	return c.writeAt(p, off, cmdFlagFUA)
}

func (c *Client) writeAt(p []byte, off int64, flags uint16) error {
	for len(p) > 0 {
		n := min(len(p), MaxPayload)
		if err := c.do(cmdWrite, flags, off, uint32(n), p[:n], nil); err != nil {
			return fmt.Errorf("nbd write %d bytes at %d: %w", n, off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// WriteZeroes makes n bytes at off read as zero (NBD_CMD_WRITE_ZEROES).
func (c *Client) WriteZeroes(off, n int64) error {
	if err := c.require(flagSendWriteZeroes, "write zeroes"); err != nil {
		return err
	}
	return c.ranged(cmdWriteZeroes, off, n, MaxPayload)
}

// Trim tells the server that n bytes at off are no longer needed
// (NBD_CMD_TRIM); their contents are undefined afterwards.
func (c *Client) Trim(off, n int64) error {
	if err := c.require(flagSendTrim, "trim"); err != nil {
		return err
	}
	return c.ranged(cmdTrim, off, n, 1<<30)
}

// ranged sends a payload-free command over [off, off+n) in pieces of at
// most chunk bytes.
func (c *Client) ranged(typ uint16, off, n, chunk int64) error {
	if n < 0 {
		return fmt.Errorf("nbd %s: negative length %d: %w", cmdName(typ), n, EINVAL)
	}
	for n > 0 {
		k := min(n, chunk)
		if err := c.do(typ, 0, off, uint32(k), nil, nil); err != nil {
			return fmt.Errorf("nbd %s %d bytes at %d: %w", cmdName(typ), k, off, err)
		}
		off, n = off+k, n-k
	}
	return nil
}

// Flush asks the server to make every completed write durable
// (NBD_CMD_FLUSH).
func (c *Client) Flush() error {
	if err := c.require(flagSendFlush, "flush"); err != nil {
		return err
	}
	if err := c.do(cmdFlush, 0, 0, 0, nil, nil); err != nil {
		return fmt.Errorf("nbd flush: %w", err)
	}
	return nil
}

// Close waits for outstanding requests, sends NBD_CMD_DISC and closes the
// connection. Later calls return ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return ErrClosed
	}
	c.closing = true
	c.mu.Unlock()
	c.calls.Wait()

	c.mu.Lock()
	broken := c.err
	if c.err == nil {
		c.err = ErrClosed
	}
	c.mu.Unlock()
	var err error
	if broken == nil {
		var h [requestSize]byte
		be.PutUint32(h[0:], requestMagic)
		be.PutUint16(h[6:], cmdDisc)
		c.wmu.Lock()
		_, err = c.nc.Write(h[:])
		c.wmu.Unlock()
	}
	c.nc.Close()
	<-c.readerDone
	if err != nil {
		return fmt.Errorf("nbd close: send disconnect: %w", err)
	}
	return nil
}
