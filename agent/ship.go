package agent

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/pki"
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

// shipLoop keeps a session with the process server, reconnecting with
// backoff, until the agent stops or the server refuses it for good.
func (a *Agent) shipLoop() {
	backoff := 500 * time.Millisecond
	for a.ctx.Err() == nil {
		start := time.Now()
		err := a.session()
		a.stats.connected.Store(false)
		if a.ctx.Err() != nil {
			return
		}
		var fe *fatalError
		if errors.As(err, &fe) {
			a.log.Error("the server refuses this agent; the disks stay served and changes are spooled while an operator fixes the cause",
				"reason", fe.msg, "retry_in", refusedRetry)
			select {
			case <-a.ctx.Done():
				return
			case <-time.After(refusedRetry):
			}
			continue
		}
		if time.Since(start) > 30*time.Second {
			backoff = 500 * time.Millisecond
		}
		a.log.Warn("no connection to the process server; the spool keeps every change", "err", err, "retry_in", backoff)
		select {
		case <-a.ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (a *Agent) tlsConfig() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(a.cfg.StateDir, certFile), filepath.Join(a.cfg.StateDir, keyFile))
	if err != nil {
		return nil, fmt.Errorf("agent certificate: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(a.cfg.StateDir, caFile))
	if err != nil {
		return nil, err
	}
	pool, err := pki.PoolFromPEM(caPEM)
	if err != nil {
		return nil, err
	}
	host, _, err := net.SplitHostPort(a.st.DataAddr)
	if err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS13}, nil
}

// session runs one connection: hello, then the sender, receiver and status
// loops until one fails.
func (a *Agent) session() error {
	cfg, err := a.tlsConfig()
	if err != nil {
		return err
	}
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}, Config: cfg}
	dctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
	nc, err := d.DialContext(dctx, "tcp", a.st.DataAddr)
	cancel()
	if err != nil {
		return fmt.Errorf("connect %s: %w", a.st.DataAddr, err)
	}
	defer nc.Close()
	br := bufio.NewReaderSize(nc, 64<<10)
	bw := bufio.NewWriterSize(nc, 256<<10)

	disks := make([]replication.DiskInfo, len(a.disks))
	a.stMu.Lock()
	for i, dk := range a.disks {
		disks[i] = replication.DiskInfo{Index: dk.Index, Name: dk.Name, Size: dk.Size()}
		for _, ds := range a.st.Disks {
			if ds.Index == dk.Index {
				disks[i].Diverged, disks[i].DivergedRanges = ds.Diverged, ds.DivergedRanges
			}
		}
	}
	a.stMu.Unlock()
	hello := replication.Hello{MachineID: a.st.MachineID, AgentVersion: Version, Disks: disks,
		NextSeq: a.spool.Next(), SpoolFirst: a.spool.First(), Recovering: a.recovering, LogID: a.st.LogID}
	hf, _ := replication.JSONFrame(replication.FrameHello, hello)
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	if err := replication.WriteFrame(bw, &hf); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
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
	if w.NewLog {
		// Another log than the server's: never joined by number.
		if err := a.startNewLog(w); err != nil {
			return err
		}
	}
	if w.DurableSeq >= a.spool.Next() {
		if !a.recovering {
			return &fatalError{fmt.Sprintf("the server holds changes up to seq %d, beyond this agent's log (%d): the agent's state is older than the server's", w.DurableSeq, a.spool.Next()-1)}
		}
		// The machine went down: the server holds records the spool lost
		// with the page cache. Go on after them (the extents they touched
		// are being resynced).
		a.log.Warn("the server holds records this agent lost in the forced shutdown; continuing after them", "server_seq", w.DurableSeq, "agent_next", a.spool.Next())
		if err := a.spool.Rebase(w.DurableSeq + 1); err != nil {
			return err
		}
	}
	a.clearDiverged(disks)
	if w.DurableSeq > a.spool.Acked() {
		if err := a.onAck(w.DurableSeq); err != nil {
			return err
		}
	}
	if w.Policy != nil {
		a.setPolicy(*w.Policy)
	}
	rd, err := a.spool.NewReader(w.DurableSeq + 1)
	if err != nil {
		return err
	}
	defer rd.Close()
	a.stats.connected.Store(true)
	a.log.Info("connected to the process server", "addr", a.st.DataAddr, "resume_seq", w.DurableSeq+1)

	s := &shipSession{a: a, nc: nc, bw: bw}
	s.cond = sync.NewCond(&s.mu)
	a.current.Store(s)
	defer a.current.CompareAndSwap(s, nil)
	ctx, cancelS := context.WithCancel(a.ctx)
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

type shipSession struct {
	a   *Agent
	nc  net.Conn
	wmu sync.Mutex // guards bw
	bw  *bufio.Writer

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
	return s.bw.Flush()
}

func (s *shipSession) send(ctx context.Context, rd interface {
	Next(context.Context, []byte, int, time.Duration) ([]byte, uint64, uint32, error)
}) error {
	codec := replication.DefaultCodec()
	var buf, cbuf []byte
	var next time.Time // throttle: earliest time the next frame may go
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
		if cap(cbuf) < len(buf) {
			cbuf = make([]byte, 0, len(buf))
		}
		f := codec.DataFrame(buf, first, count, cbuf)
		last := first + uint64(count) - 1
		if s.a.hasTag(first, last) {
			f.Flags |= replication.FlagTag
		}
		s.mu.Lock()
		s.inflight = append(s.inflight, sent{last, len(buf)})
		s.raw += len(buf)
		s.mu.Unlock()
		if rate := s.a.cfg.MaxRate; rate > 0 {
			if wait := time.Until(next); wait > 0 {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(wait):
				}
			}
			next = time.Now().Add(time.Duration(float64(len(f.Payload)) / float64(rate) * float64(time.Second)))
		}
		if err := s.write(&f); err != nil {
			return err
		}
		st := s.a.stats
		st.bytesSent.Add(int64(len(f.Payload) + replication.FrameHeaderSize))
		st.rawSent.Add(int64(len(buf)))
		st.frames.Add(1)
		st.records.Add(int64(count))
		if cap(buf) > 2*frameRaw+replication.MaxRecordData {
			buf = nil
		}
	}
	return ctx.Err()
}

func (s *shipSession) receive(ctx context.Context, br *bufio.Reader) error {
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
			if err := s.a.onAck(f.Seq); err != nil {
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
			s.a.reqs.Go(func() {
				if err := s.a.point(tr.ID, tr.App); err != nil && ctx.Err() == nil {
					s.a.log.Error("requested tag failed", "err", err)
				}
			})
		case replication.FrameHold, replication.FrameCut, replication.FrameRelease:
			var c replication.Cut
			if err := replication.DecodeJSON(&f, &c); err != nil {
				return err
			}
			if f.Type == replication.FrameHold {
				s.a.reqs.Go(func() { s.a.groupCut(c, s) })
			} else {
				s.a.cutDecision(f.Type, c)
			}
		case replication.FrameResync:
			var job replication.ResyncJob
			if err := replication.DecodeJSON(&f, &job); err != nil {
				return err
			}
			if err := job.Validate(); err != nil {
				return err
			}
			if err := s.a.resync.start(job); err != nil {
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
			s.a.resync.want(w)
		case replication.FramePolicy:
			var p replication.AgentPolicy
			if err := replication.DecodeJSON(&f, &p); err != nil {
				return err
			}
			if err := p.Validate(); err != nil {
				return err
			}
			s.a.setPolicy(p)
		case replication.FrameError:
			return checkError(&f)
		default:
			return &replication.ProtocolError{Reason: fmt.Sprintf("unexpected %s frame from server", f.Type)}
		}
	}
}

func (s *shipSession) status(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		st := replication.Status{Time: time.Now().UnixNano(), SpoolBytes: s.a.spool.Pending(),
			OldestPending: s.a.spool.OldestPending(), LastSeq: s.a.spool.Next() - 1, Disks: s.a.Progress(),
			Events: s.a.takeEvents(), Resync: s.a.resync.status()}
		f, err := replication.JSONFrame(replication.FrameStatus, st)
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
