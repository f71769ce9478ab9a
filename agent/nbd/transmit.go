package nbd

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"syscall"
)

// request is one transmission-phase request and, once handled, its reply.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	off    uint64
	length uint32
	buf    *[]byte // WRITE payload or READ data; nil for length 0 and other commands
}

// parseRequest decodes a request header. It rejects what cannot be answered
// without losing the stream: bad magic and WRITE payloads over MaxPayload.
// Everything else, however invalid, is left to the handler to fail.
func parseRequest(h *[requestSize]byte) (request, error) {
	if m := be.Uint32(h[0:]); m != requestMagic {
		return request{}, protocolErrorf("bad request magic %#x", m)
	}
	r := request{
		flags:  be.Uint16(h[4:]),
		typ:    be.Uint16(h[6:]),
		handle: be.Uint64(h[8:]),
		off:    be.Uint64(h[16:]),
		length: be.Uint32(h[24:]),
	}
	if r.typ == cmdWrite && r.length > MaxPayload {
		return request{}, protocolErrorf("write of %d bytes at %d exceeds the %d-byte payload limit", r.length, r.off, MaxPayload)
	}
	return r, nil
}

// transmit runs the transmission phase: one goroutine reads requests and
// hands each to a handler, at most MaxInFlight at a time; handlers reply in
// completion order. It returns once every handler has replied.
//
// Handlers are goroutines that serve one request after another, started
// as needed up to the connection's limit: a goroutine per request would
// start on a small stack and grow it (a copy) for every write, whose path
// through the backend is deep.
func (c *conn) transmit(exp *export) error {
	sem := make(chan struct{}, c.srv.maxInFlight())
	var wg sync.WaitGroup
	err := c.readRequests(exp, sem, &wg)
	wg.Wait()
	if c.failed.Load() {
		return c.failErr
	}
	if c.ctx.Err() != nil {
		return nil
	}
	return err
}

func (c *conn) readRequests(exp *export, sem chan struct{}, wg *sync.WaitGroup) error {
	var h [requestSize]byte
	jobs := make(chan job)
	defer close(jobs) // the handlers return once their last request is served
	handlers := 0
	for {
		if err := readFull(c.br, h[:], "read request header", true); err != nil {
			if err == io.EOF {
				c.log.Debug("client disconnected without NBD_CMD_DISC")
				return nil
			}
			return err
		}
		req, err := parseRequest(&h)
		if err != nil {
			return err
		}
		if req.typ == cmdDisc {
			c.log.Debug("client sent NBD_CMD_DISC")
			return nil
		}
		sem <- struct{}{}
		// Room for the payload first (WRITE data, or READ data the
		// handler reads), shared by every connection: released once the
		// reply is sent. Nothing that holds room waits for room, so the
		// wait always ends.
		held, err := c.reserve(&req, exp)
		if err != nil {
			<-sem
			return err
		}
		release := func() {
			if held > 0 {
				c.srv.budget.Release(held)
			}
			<-sem
		}
		if req.typ == cmdWrite && req.length > 0 {
			if !exp.inside(req.off, req.length) {
				// Refused (ENOSPC) whatever it holds: skip the payload
				// rather than allocate for it.
				if err := discard(c.br, int64(req.length)); err != nil {
					release()
					return err
				}
			} else {
				req.buf = getBuf(int(req.length))
				if err := readFull(c.br, *req.buf, "read write payload", false); err != nil {
					putBuf(req.buf)
					release()
					return err
				}
			}
		}
		j := job{req: req, release: release}
		select {
		case jobs <- j: // an idle handler
		default:
			if handlers == cap(sem) {
				jobs <- j // every handler is busy or about to be idle
				continue
			}
			handlers++
			c.srv.handlers.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.handle(exp, &j.req, j.release)
				for j := range jobs {
					c.handle(exp, &j.req, j.release)
				}
			}()
		}
	}
}

// job is a request handed to a handler, and what releases its room.
type job struct {
	req     request
	release func()
}

// reserve waits for room in the server's payload budget for req's buffer:
// a WRITE's payload (inside the export: one outside is skipped unread) or
// a READ's data (up to MaxPayload: a larger one is refused unread). A
// request larger than the whole budget takes all of it. It returns the
// bytes held, to release once the reply is sent.
func (c *conn) reserve(req *request, exp *export) (int64, error) {
	var n int64
	switch req.typ {
	case cmdWrite:
		if exp.inside(req.off, req.length) {
			n = int64(req.length)
		}
	case cmdRead:
		if req.length <= MaxPayload && exp.inside(req.off, req.length) {
			n = int64(req.length)
		}
	}
	if n == 0 {
		return 0, nil
	}
	budget, max := c.srv.payloadBudget()
	n = min(n, max)
	if err := budget.Acquire(c.ctx, n); err != nil {
		return 0, err
	}
	return n, nil
}

// inside reports whether [off, off+n) lies within the export.
func (e *export) inside(off uint64, n uint32) bool {
	size := uint64(e.size)
	return off <= size && uint64(n) <= size-off
}

// discard skips n payload bytes of a request that is refused.
func discard(r io.Reader, n int64) error {
	if m, err := io.CopyN(io.Discard, r, n); m < n {
		if err == nil || errors.Is(err, io.EOF) {
			return protocolErrorf("read write payload: truncated message")
		}
		return fmt.Errorf("read write payload: %w", err)
	}
	return nil
}

// handle executes one request and queues its reply; release frees the
// request's place in flight and its payload budget once the reply is
// written.
func (c *conn) handle(exp *export, req *request, release func()) {
	queued := false
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("nbd backend panicked", "op", cmdName(req.typ), "offset", req.off,
				"length", req.length, "panic", r, "stack", string(debug.Stack()))
			c.fail(fmt.Errorf("backend panic in %s: %v", cmdName(req.typ), r))
		}
		if !queued {
			putBuf(req.buf)
			release()
		}
	}()
	errno := c.execute(exp, req)
	it := replyItem{buf: req.buf, release: release}
	be.PutUint32(it.h[0:], simpleReplyMagic)
	be.PutUint32(it.h[4:], uint32(errno))
	be.PutUint64(it.h[8:], req.handle)
	if errno == 0 && req.typ == cmdRead && req.buf != nil {
		it.data = *req.buf
	} else {
		putBuf(req.buf) // a WRITE's payload, or a failed READ's buffer
		it.buf = nil
	}
	queued = true
	c.reply(it)
}

// validFlags are the command flags each command accepts. FUA is allowed
// everywhere because NBD_FLAG_SEND_FUA is advertised.
func validFlags(typ uint16) uint16 {
	if typ == cmdWriteZeroes {
		return cmdFlagFUA | cmdFlagNoHole
	}
	return cmdFlagFUA
}

// execute validates req and runs it against the backend, returning the
// error value for the reply. For a successful READ it leaves the data in
// req.buf.
func (c *conn) execute(exp *export, req *request) Errno {
	switch req.typ {
	case cmdRead, cmdWrite, cmdFlush, cmdTrim, cmdWriteZeroes:
	default:
		c.log.Debug("unknown command", "cmd", req.typ)
		return EINVAL
	}
	if req.flags&^validFlags(req.typ) != 0 {
		c.log.Debug("invalid command flags", "op", cmdName(req.typ), "flags", req.flags)
		return EINVAL
	}
	if req.typ == cmdFlush {
		return c.backendErr(req, exp.backend.Flush())
	}

	if !exp.inside(req.off, req.length) {
		if req.typ == cmdWrite || req.typ == cmdWriteZeroes {
			return ENOSPC
		}
		return EINVAL
	}
	if req.typ == cmdRead && req.length > MaxPayload {
		return EINVAL
	}
	if req.length == 0 {
		return 0
	}
	off, n := int64(req.off), int64(req.length)
	fua := req.flags&cmdFlagFUA != 0
	b := exp.backend
	switch req.typ {
	case cmdRead:
		req.buf = getBuf(int(n))
		return c.backendErr(req, b.ReadAt(*req.buf, off))
	case cmdWrite:
		return c.backendErr(req, b.WriteAt(*req.buf, off, fua))
	case cmdTrim:
		return c.backendErr(req, b.Trim(off, n, fua))
	default: // cmdWriteZeroes
		return c.backendErr(req, b.WriteZeroes(off, n, fua))
	}
}

// backendErr maps a backend error to the reply's error value and logs it.
func (c *conn) backendErr(req *request, err error) Errno {
	if err == nil {
		return 0
	}
	errno := errnoFor(err)
	c.log.Warn("nbd request failed", "op", cmdName(req.typ), "offset", req.off,
		"length", req.length, "errno", uint32(errno), "err", err)
	return errno
}

func errnoFor(err error) Errno {
	var e Errno
	if errors.As(err, &e) && e != 0 {
		return e
	}
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return ENOSPC
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS), errors.Is(err, os.ErrPermission):
		return EPERM
	}
	return EIO
}

// replyItem is a simple reply waiting to be written: its header, the data
// of a successful READ (aliasing buf, which goes back to the pool once
// written) and the request's release.
type replyItem struct {
	h       [simpleReplySize]byte
	data    []byte
	buf     *[]byte
	release func()
}

// reply queues it and returns once it is written, or queued behind the
// handler that writes replies now. Replies are written in batches: the
// handler that finds no writer becomes it, first lets the other runnable
// handlers queue their replies (runtime.Gosched: on a guest's one CPU a
// queue depth's handlers run one after another), then writes every queued
// reply with one writev, until none is left. No reply waits for a request
// still being handled: only for the writer's next pass. The writer is a
// handler, counted by transmit's wait group, so no reply is left behind
// when the session ends. A reply queued after the connection failed is
// dropped (fail has the reason) and its request released.
func (c *conn) reply(it replyItem) {
	c.srv.queued.Add(1)
	c.rmu.Lock()
	c.replies = append(c.replies, it)
	if c.writing {
		c.rmu.Unlock()
		return
	}
	c.writing = true
	c.rmu.Unlock()
	runtime.Gosched()
	for {
		c.rmu.Lock()
		if len(c.replies) == 0 {
			c.writing = false
			c.rmu.Unlock()
			return
		}
		// The queue's array and the spare one take turns.
		batch := c.replies
		c.replies, c.spare = c.spare[:0], nil
		c.rmu.Unlock()
		c.writeReplies(batch)
		clear(batch)
		c.rmu.Lock()
		c.spare = batch[:0]
		c.rmu.Unlock()
	}
}

// writeReplies writes batch with one writev and releases its requests.
// Only the writer (reply) calls it.
func (c *conn) writeReplies(batch []replyItem) {
	var err error
	if !c.failed.Load() {
		iov := c.iov[:0]
		for i := range batch {
			iov = append(iov, batch[i].h[:])
			if len(batch[i].data) > 0 {
				iov = append(iov, batch[i].data)
			}
		}
		c.iov = iov
		c.srv.batches.Add(1)
		bufs := iov // WriteTo consumes its copy of the slice
		_, err = bufs.WriteTo(c.nc)
		clear(iov)
	}
	for i := range batch {
		putBuf(batch[i].buf)
		batch[i].release()
	}
	if err != nil {
		c.fail(fmt.Errorf("send %d replies: %w", len(batch), err))
	}
}
