package agent

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/agent/spool"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/replication/pace"
	"github.com/asrdr/asr/replication/retry"
)

const (
	// frameRaw is the target size of a DATA frame before compression.
	frameRaw = 4 << 20
	// window bounds the record bytes sent but not yet acknowledged.
	window = 64 << 20
	// refusedRetry is how often a refused agent tries again.
	refusedRetry = 30 * time.Second
	// linger lets small batches grow a little before a frame is sent.
	linger      = 2 * time.Millisecond
	lingerBelow = 256 << 10
)

// fatalError is a refusal by the server that retrying soon will not fix: an
// operator has to act. The agent keeps serving its disks and retries slowly.
type fatalError struct{ msg string }

func (e *fatalError) Error() string { return e.msg }

// shipHandler is what the process server's messages mean to the rest of
// the agent. The shipper speaks the protocol (handshake, DATA frames, the
// send window, decoding and checking what the server sends); the handler
// acts on it. Methods may be called from the session's goroutines
// concurrently.
type shipHandler interface {
	// hello returns the Hello for a new connection.
	hello() replication.Hello
	// welcome acts on the server's answer to hello, before anything is
	// sent: it may start a new log, move the log's start, or refuse to go
	// on (a *fatalError).
	welcome(hello replication.Hello, w replication.Welcome) error
	// handshakeEnded is called when the session ends, Welcome or not.
	handshakeEnded()
	// acked handles the acknowledgement of every record up to seq.
	acked(seq uint64) error
	// tagRequest makes the point the server asks for, without waiting
	// for it; ctx ends with the session.
	tagRequest(ctx context.Context, tr replication.TagRequest)
	// freeze refuses every guest write from now on (saved first) and
	// starts the failover's final point without waiting for it; an error
	// means the machine could not be frozen.
	freeze(ctx context.Context, fr replication.Freeze) error
	// thaw cancels a planned failover: writes are allowed again.
	thaw(fr replication.Freeze) error
	// hold starts holding the writes for a group cut, without waiting;
	// HELD is sent on w.
	hold(c replication.Cut, w frameWriter)
	// cutDecision delivers the server's CUT or RELEASE of a cut.
	cutDecision(t replication.FrameType, c replication.Cut)
	// resync saves and starts a resync job (checked).
	resync(job replication.ResyncJob) error
	// want delivers the server's answer to a batch of chunk hashes (checked).
	want(w replication.Want)
	// policy applies the machine's policy (checked).
	policy(p replication.AgentPolicy)
	// status returns the status report sent every second.
	status() replication.Status
	// reverseWrite carries out a failback's REVERSE frame (checked) and
	// returns its answer.
	reverseWrite(seq uint64, d replication.ReverseData) replication.ReverseAck
	// reverseSum hashes a whole disk for a failback's REVERSE_SUM.
	reverseSum(r replication.ReverseSum) replication.ReverseAck
}

// shipper ships the spool to the process server: it owns the connection
// (one session at a time, reconnecting with backoff), the send window,
// the throttle and the cumulative send figures.
type shipper struct {
	log      *slog.Logger
	spool    *spool.Spool
	tags     *tagMarks     // records that ship like a tag (FlagTag)
	maxRate  int64         // bytes per second on the wire (0: unlimited)
	codec    shipCodecMode // how the agent compresses (shipCodec)
	dial     func(ctx context.Context) (net.Conn, error)
	h        shipHandler
	counters *sendCounters

	cur atomic.Pointer[shipSession] // the current connection, if any
	rt  *routines                   // the ship loop (whose sessions end before it does)
}

func newShipper(parent context.Context, log *slog.Logger, sp *spool.Spool, tags *tagMarks, maxRate int64, codec shipCodecMode,
	dial func(context.Context) (net.Conn, error), h shipHandler, counters *sendCounters) *shipper {
	return &shipper{log: log, spool: sp, tags: tags, maxRate: maxRate, codec: codec, dial: dial, h: h, counters: counters,
		rt: newRoutines(parent)}
}

// Compression settings of Config.Compression.
const (
	// CompressAuto, the default: base data (the initial copy) in S2,
	// which the process server decodes at once and does not keep as
	// any-point segments before the machine's first point (a disk added
	// later, or a new log's copy, is kept in S2); the guest's changes in zstd with the adaptive
	// skip (a frame that does not compress leaves the next ones untried);
	// a frame of record headers only (tags, progress, trims) plain.
	CompressAuto = "auto"
	CompressZstd = "zstd" // every frame zstd, tried each time
	CompressS2   = "s2"   // every frame S2
)

// shipCodecMode is how a shipper compresses its DATA frames.
type shipCodecMode uint8

const (
	shipPlain shipCodecMode = iota // plain: the process server compresses
	shipAuto
	shipZstd
	shipS2
)

// shipCodec is the shipper's codec mode for cfg.
func shipCodec(cfg Config) shipCodecMode {
	switch {
	case !cfg.Compress:
		return shipPlain
	case cfg.Compression == CompressZstd:
		return shipZstd
	case cfg.Compression == CompressS2:
		return shipS2
	}
	return shipAuto
}

// frameCompressor compresses one session's DATA frames as its mode says.
// Not safe for concurrent use.
type frameCompressor struct {
	mode     shipCodecMode
	s2       bool // the server decodes S2
	adaptive *replication.AdaptiveCompressor
}

// frame builds the DATA frame of the encoded records raw, compressed into
// dst's storage if at all, and returns it with that storage for reuse.
func (c *frameCompressor) frame(raw []byte, first uint64, count uint32, dst []byte) (replication.Frame, []byte) {
	f := replication.PlainDataFrame(raw, first, count)
	if c.mode == shipPlain {
		return f, dst
	}
	s2 := c.s2 && c.mode == shipS2
	if c.mode == shipAuto {
		base, all := replication.BaseShare(raw)
		if all == 0 {
			// Record headers only (a tag, progress, trims): little to
			// gain, and the process server compresses what it caches.
			return f, dst
		}
		s2 = c.s2 && 2*base >= all
	}
	if s2 {
		// Room for the worst case, kept: a frame that does not compress
		// (an encrypted disk's copy) allocates nothing either.
		dst = replication.S2Room(dst, len(raw))
		return replication.S2DataFrame(raw, first, count, dst), dst
	}
	if cap(dst) < len(raw) {
		dst = make([]byte, 0, len(raw))
	}
	if c.mode == shipZstd {
		f = replication.DefaultCodec().DataFrame(raw, first, count, dst)
		return f, dst
	}
	if c.adaptive == nil {
		// Made only when asked for: its encoder's window is memory the
		// agent otherwise does not use.
		c.adaptive = &replication.AdaptiveCompressor{Codec: replication.DefaultCodec()}
	}
	return f, c.adaptive.Compress(&f, dst)
}

// start begins shipping.
func (sh *shipper) start() { sh.rt.Go(sh.loop) }

// Close ends the session and stops shipping.
func (sh *shipper) Close() { sh.rt.Close() }

// current returns the current session, or nil.
func (sh *shipper) current() frameWriter {
	if s := sh.cur.Load(); s != nil {
		return s
	}
	return nil
}

// reconnect ends the current session (if any); the loop starts a new one,
// whose Hello carries the current disk state.
func (sh *shipper) reconnect() {
	if s := sh.cur.Load(); s != nil {
		s.nc.Close()
	}
}

// loop keeps a session with the process server, reconnecting with
// backoff, until the agent stops; a refusal by the server is retried
// slowly.
func (sh *shipper) loop() {
	ctx := sh.rt.ctx
	backoff := retry.New(500*time.Millisecond, 5*time.Second)
	for ctx.Err() == nil {
		start := time.Now()
		err := sh.session()
		sh.counters.connected.Store(false)
		if ctx.Err() != nil {
			return
		}
		var fe *fatalError
		if errors.As(err, &fe) {
			sh.log.Error("the server refuses this agent; the disks stay served and changes are spooled while an operator fixes the cause",
				"reason", fe.msg, "retry_in", refusedRetry)
			if retry.Sleep(ctx, refusedRetry) != nil {
				return
			}
			continue
		}
		if time.Since(start) > 30*time.Second {
			backoff.Reset() // the session lasted: a new outage starts short
		}
		wait := backoff.Next()
		sh.log.Warn("no connection to the process server; the spool keeps every change", "err", err, "retry_in", wait)
		if retry.Sleep(ctx, wait) != nil {
			return
		}
	}
}

// tlsDialer dials the process server at addr over mutual TLS with the
// agent's certificate and pinned CA from its state directory.
func tlsDialer(dir, addr string) func(context.Context) (net.Conn, error) {
	return func(ctx context.Context) (net.Conn, error) {
		cfg, err := tlsConfig(dir, addr)
		if err != nil {
			return nil, err
		}
		d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		nc, err := dialTLS(dctx, d, addr, cfg)
		if err != nil {
			return nil, fmt.Errorf("connect %s: %w", addr, err)
		}
		return nc, nil
	}
}

func tlsConfig(dir, addr string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, certFile), filepath.Join(dir, keyFile))
	if err != nil {
		return nil, fmt.Errorf("agent certificate: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, caFile))
	if err != nil {
		return nil, err
	}
	pool, err := enroll.PoolFromPEM(caPEM)
	if err != nil {
		return nil, err
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS13}, nil
}

// session runs one connection: hello, then the sender, receiver and status
// loops until one fails.
func (sh *shipper) session() error {
	nc, err := sh.dial(sh.rt.ctx)
	if err != nil {
		return err
	}
	defer nc.Close()
	// Close ends the handshake too, not only the session after it: a
	// server that does not answer the Hello would hold Close for the
	// handshake's 30 s deadline.
	stop := context.AfterFunc(sh.rt.ctx, func() { nc.Close() })
	defer stop()
	br := bufio.NewReaderSize(nc, 64<<10)
	bw := bufio.NewWriterSize(nc, 256<<10)

	hello := sh.h.hello()
	defer sh.h.handshakeEnded()
	hf, _ := replication.JSONFrame(replication.FrameHello, hello)
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	if err := replication.WriteFrame(bw, &hf); err != nil {
		return err
	}
	if err := flushSent(bw, nc); err != nil {
		return err
	}
	f, _, err := replication.ReadFrame(br, nil)
	if err != nil {
		return fmt.Errorf("read welcome: %w", err)
	}
	if err := checkError(&f); err != nil {
		return err
	}
	if f.Type != replication.FrameWelcome {
		return fmt.Errorf("expected welcome, got %s", f.Type)
	}
	var w replication.Welcome
	if err := replication.DecodeJSON(&f, &w); err != nil {
		return err
	}
	if err := w.Validate(); err != nil {
		return err
	}
	nc.SetDeadline(time.Time{})
	if err := sh.h.welcome(hello, w); err != nil {
		return err
	}
	rd, err := sh.spool.NewReader(w.DurableSeq + 1)
	if err != nil {
		return err
	}
	defer rd.Close()
	sh.counters.connected.Store(true)
	sh.log.Info("connected to the process server", "addr", nc.RemoteAddr().String(), "resume_seq", w.DurableSeq+1)

	s := &shipSession{sh: sh, nc: nc, bw: bw, s2: w.Decodes(replication.CodecS2)}
	s.cond = sync.NewCond(&s.mu)
	sh.cur.Store(s)
	defer sh.cur.CompareAndSwap(s, nil)
	ctx, cancelS := context.WithCancel(sh.rt.ctx)
	defer cancelS()
	errc := make(chan error, 3)
	go func() { errc <- s.receive(ctx, br) }()
	go func() { errc <- s.status(ctx) }()
	go func() { errc <- s.send(ctx, rd) }()
	err = <-errc
	cancelS()
	nc.Close()
	s.mu.Lock()
	s.dead = true
	s.cond.Broadcast()
	s.mu.Unlock()
	<-errc
	<-errc
	return err
}

func checkError(f *replication.Frame) error {
	if f.Type != replication.FrameError {
		return nil
	}
	var e replication.ErrorMessage
	if err := replication.DecodeJSON(f, &e); err != nil {
		return err
	}
	if e.Fatal {
		return &fatalError{e.Message}
	}
	return errors.New("server: " + e.Message)
}

// shipSession is one connection to the process server.
type shipSession struct {
	sh  *shipper
	nc  net.Conn
	wmu sync.Mutex // guards bw
	bw  *bufio.Writer
	s2  bool // the server decodes S2 (its Welcome)

	mu       sync.Mutex
	cond     *sync.Cond
	inflight []sent
	raw      int
	dead     bool
}

type sent struct {
	last uint64
	raw  int
}

func (s *shipSession) write(f *replication.Frame) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.nc.SetWriteDeadline(time.Now().Add(time.Minute))
	if err := replication.WriteFrame(s.bw, f); err != nil {
		return err
	}
	return flushSent(s.bw, s.nc)
}

// flushSent sends what bw holds, and what the connection gathered of it
// (a sendBuffer under TLS).
func flushSent(bw *bufio.Writer, nc net.Conn) error {
	if err := bw.Flush(); err != nil {
		return err
	}
	if f, ok := nc.(flusher); ok {
		return f.Flush()
	}
	return nil
}

func (s *shipSession) send(ctx context.Context, rd interface {
	Next(context.Context, []byte, int, time.Duration) ([]byte, uint64, uint32, error)
}) error {
	fr := frameCompressor{mode: s.sh.codec, s2: s.s2}
	var buf, cbuf []byte
	pacer := pace.New(s.sh.maxRate) // --max-rate, per session: a new one starts at once
	for ctx.Err() == nil {
		s.mu.Lock()
		for s.raw > window && !s.dead {
			s.cond.Wait()
		}
		dead := s.dead
		s.mu.Unlock()
		if dead {
			return errors.New("session closed")
		}
		var first uint64
		var count uint32
		var err error
		buf, first, count, err = rd.Next(ctx, buf[:0], frameRaw, time.Second)
		if err != nil {
			return err
		}
		if count == 0 {
			continue
		}
		if len(buf) < lingerBelow {
			time.Sleep(linger)
			var n uint32
			buf, _, n, err = rd.Next(ctx, buf, frameRaw, 0)
			if err != nil {
				return err
			}
			count += n
		}
		var f replication.Frame
		f, cbuf = fr.frame(buf, first, count, cbuf)
		last := first + uint64(count) - 1
		if s.sh.tags.has(first, last) {
			f.Flags |= replication.FlagTag
		}
		s.mu.Lock()
		s.inflight = append(s.inflight, sent{last, len(buf)})
		s.raw += len(buf)
		s.mu.Unlock()
		if err := pacer.Wait(ctx, int64(len(f.Payload))); err != nil {
			return err
		}
		if err := s.write(&f); err != nil {
			return err
		}
		c := s.sh.counters
		c.bytesSent.Add(int64(len(f.Payload) + replication.FrameHeaderSize))
		c.rawSent.Add(int64(len(buf)))
		c.frames.Add(1)
		switch {
		case f.Flags&replication.FlagZstd != 0:
			c.framesZstd.Add(1)
		case f.Flags&replication.FlagS2 != 0:
			c.framesS2.Add(1)
		}
		c.records.Add(int64(count))
		if cap(buf) > 2*frameRaw+replication.MaxRecordData {
			buf = nil
		}
	}
	return ctx.Err()
}

func (s *shipSession) receive(ctx context.Context, br *bufio.Reader) error {
	h := s.sh.h
	var buf []byte
	for {
		// The server acknowledges at least every few seconds while data
		// flows; a silent link is detected by this deadline.
		s.nc.SetReadDeadline(time.Now().Add(time.Minute))
		f, nb, err := replication.ReadFrame(br, buf)
		buf = nb
		if err != nil {
			return err
		}
		switch f.Type {
		case replication.FrameAck:
			if err := h.acked(f.Seq); err != nil {
				return err
			}
			s.mu.Lock()
			for len(s.inflight) > 0 && s.inflight[0].last <= f.Seq {
				s.raw -= s.inflight[0].raw
				s.inflight = s.inflight[1:]
			}
			s.cond.Broadcast()
			s.mu.Unlock()
		case replication.FrameTagReq:
			var tr replication.TagRequest
			if err := replication.DecodeJSON(&f, &tr); err != nil {
				return err
			}
			h.tagRequest(ctx, tr)
		case replication.FrameHold, replication.FrameCut, replication.FrameRelease:
			var c replication.Cut
			if err := replication.DecodeJSON(&f, &c); err != nil {
				return err
			}
			if f.Type == replication.FrameHold {
				h.hold(c, s)
			} else {
				h.cutDecision(f.Type, c)
			}
		case replication.FrameFreeze, replication.FrameThaw:
			var fr replication.Freeze
			if err := replication.DecodeJSON(&f, &fr); err != nil {
				return err
			}
			if err := fr.Validate(); err != nil {
				return err
			}
			if f.Type == replication.FrameFreeze {
				err = h.freeze(ctx, fr)
			} else {
				err = h.thaw(fr)
			}
			if err != nil {
				// Not the connection's fault: the server sees the state in
				// the next status, and may ask again.
				s.sh.log.Error("planned failover", "frame", f.Type, "failover", fr.ID, "err", err)
			}
		case replication.FrameResync:
			var job replication.ResyncJob
			if err := replication.DecodeJSON(&f, &job); err != nil {
				return err
			}
			if err := job.Validate(); err != nil {
				return err
			}
			if err := h.resync(job); err != nil {
				return err
			}
		case replication.FrameWant:
			var w replication.Want
			if err := replication.DecodeJSON(&f, &w); err != nil {
				return err
			}
			if err := w.Validate(); err != nil {
				return err
			}
			h.want(w)
		case replication.FramePolicy:
			var p replication.AgentPolicy
			if err := replication.DecodeJSON(&f, &p); err != nil {
				return err
			}
			if err := p.Validate(); err != nil {
				return err
			}
			h.policy(p)
		case replication.FrameReverse:
			d, err := replication.DecodeReverse(&f)
			if err != nil {
				return err
			}
			// Written and synced before the next frame is read: the
			// server keeps one frame in flight per caller.
			if err := s.writeJSON(replication.FrameReverseAck, h.reverseWrite(f.Seq, d)); err != nil {
				return err
			}
		case replication.FrameReverseSum:
			var r replication.ReverseSum
			if err := replication.DecodeJSON(&f, &r); err != nil {
				return err
			}
			if err := r.Validate(); err != nil {
				return err
			}
			// A whole disk is read: not on the receiver, which must go
			// on reading acknowledgements.
			s.sh.rt.Go(func() {
				if err := s.writeJSON(replication.FrameReverseAck, h.reverseSum(r)); err != nil {
					s.sh.log.Error("failback: answer a disk sum", "err", err)
				}
			})
		case replication.FrameError:
			return checkError(&f)
		default:
			return &replication.ProtocolError{Reason: fmt.Sprintf("unexpected %s frame from server", f.Type)}
		}
	}
}

// writeJSON sends a control frame carrying v.
func (s *shipSession) writeJSON(t replication.FrameType, v any) error {
	f, err := replication.JSONFrame(t, v)
	if err != nil {
		return err
	}
	return s.write(&f)
}

func (s *shipSession) status(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		f, err := replication.JSONFrame(replication.FrameStatus, s.sh.h.status())
		if err != nil {
			return err
		}
		if err := s.write(&f); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
