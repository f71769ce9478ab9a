// Package procserver is asr's process server: it accepts agents' data
// connections (mutual TLS, framed protocol), writes every DATA frame to a
// durable per-machine cache and acknowledges it only after fsync, seals the
// cache into immutable segments, and applies the segments in order to the
// replica disks on the target (replication.Applier), making recovery points.
//
// It runs in-process in `asr server`; the types here do not depend on the
// configuration server, which plugs in through Config callbacks.
package procserver

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asrdr/asr/replication"
)

// Config configures a process server.
type Config struct {
	// CacheDir holds one directory per machine with its unsealed cache file
	// and sealed segments waiting to be applied.
	CacheDir string
	Catalog  *replication.Catalog
	// Authorize checks a client certificate (the machine id is its common
	// name) and returns the machine's name.
	Authorize func(ctx context.Context, machineID, certSerial string) (string, error)
	// The callbacks run on the replication path (an agent connection's
	// reader; the applier, under its lock): each must return at once,
	// never waiting on a database or the network. The server notes what
	// they report and writes it elsewhere.
	//
	// OnStatus receives each agent status report; OnState each catalog
	// update (and each machine's entry as it is when the machine is
	// opened); OnPoint each new recovery point; OnBytes payload bytes
	// received.
	OnStatus func(machineID string, st replication.Status)
	OnState  func(m replication.MachineCatalog)
	OnPoint  func(machineID string, p replication.Point)
	OnBytes  func(machineID string, n int64)
	// OnDamage reports replica blocks found not to match their checksums;
	// OnQuarantine a cached segment that failed verification, moved aside
	// (path) and never applied.
	OnDamage     func(machineID string, d Damage)
	OnQuarantine func(machineID, path, reason string)
	// PolicyFor gives the point schedule sent to an agent when it connects
	// (nil: the agent's own flags).
	PolicyFor func(machineID string) *replication.AgentPolicy
	// OnConnect and OnDisconnect report agent connections; OnRefused a
	// registered machine's agent turned away (the reason is for the console).
	// Authorize and PolicyFor are asked when an agent connects, before its
	// Welcome.
	OnConnect func(machineID string, h replication.Hello)
	// RecoveredAgent is asked after Authorize, before the machine's
	// session is touched: nil, nil for the machine's own agent; a sink
	// for the agent of a VM a failover made of the machine (its Hello
	// reports that VM's BIOS UUID: recovered.go), whose connection is
	// served apart; an error refuses the connection with it. nil: every
	// agent is the machine's own.
	RecoveredAgent func(ctx context.Context, machineID string, h replication.Hello) (ReverseSink, error)
	OnRefused      func(machineID, reason string)
	OnDisconnect   func(machineID string, err error)
	// SegmentBytes seals a cache file at this size (compressed bytes or raw
	// record bytes, whichever is reached first). Default 32 MiB.
	SegmentBytes int64
	// SealAfter seals a non-empty cache file this long after its first frame.
	// Default 1s.
	SealAfter time.Duration
	// CacheMaxBytes stops reading from agents while the cache holds more
	// (back-pressure: agents spool). Default 8 GiB.
	CacheMaxBytes int64
	// HandoffBytes bounds the memory of the DATA frames the connections'
	// readers decoded and checked, held for the appliers so that they do
	// not decode them again from the cache (handoff.go), across all
	// machines. Default 64 MiB (two segments of 32 MiB: the one being
	// applied, the one filling); negative: none, every frame is decoded
	// again from its segment.
	HandoffBytes int64
	// HandoffWait is the longest a frame past HandoffBytes waits for the
	// applier to give bytes back before it is refused (handoff.putWait).
	// Default 2 s.
	HandoffWait time.Duration
	// DiskFree reports the free and total bytes of the file system holding
	// dir (default: statfs). OnCacheState reports the cache disk entering
	// another state (CacheOK, CacheWarning, CacheCritical).
	DiskFree     func(dir string) (free, total uint64, err error)
	OnCacheState func(state string, free, total uint64)
	Logger       *slog.Logger
	// Removed names the machines whose protection ended (the server's
	// unprotected machines): New does not open them, and nothing opens
	// them later; Remove finishes what is left of them.
	Removed []string
	// Serves says whether this process server serves a machine now (nil:
	// every machine): a machine it does not serve is not opened (its
	// agent is refused with the error, and so are requests that would
	// open it). The configuration server assigns machines to process
	// servers; Release hands one over.
	Serves func(machineID string) error
	// Name labels this process server where the target keeps a machine's
	// lease (replication.MachineLeaser), so another process server refused
	// the machine learns who holds it. Default "asr server".
	Name string

	// createCacheFile makes a machine's open cache file (tests inject
	// failures; default: an *os.File).
	createCacheFile func(path string) (cacheFile, error)
}

// Server is a process server.
type Server struct {
	cfg Config
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	handshakes chan struct{}  // slots for TLS handshakes under way
	hellos     chan struct{}  // slots for authenticated connections whose Hello is not read yet
	helloing   map[string]int // the same, per machine (under mu)

	mu       sync.Mutex
	closed   bool // Close has begun: no more machines are opened
	machines map[string]*machine
	failed   map[string]error // machines whose last open failed, and why
	removed  map[string]bool  // machines whose protection ended (Remove): never opened again
	handing  map[string]bool  // machines being handed over (Release): not opened meanwhile
	conns    map[net.Conn]struct{}

	cacheBytes atomic.Int64
	handoff    handoffBudget // the decoded frames the readers hand the appliers (handoff.go)
	reqID      atomic.Uint64
	newLogWait atomic.Int64 // see newLogWait

	// Figures (figures.go).
	space                                      cacheSpace
	uploads                                    meter
	uploaded, rawBytes, wireBytes, cachedBytes atomic.Int64
}

// New creates a process server and recovers its cache: unsealed files are
// cut at their last complete frame and sealed; sealed segments already
// applied are removed; the rest are queued for the applier.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.SegmentBytes <= 0 {
		cfg.SegmentBytes = 32 << 20
	}
	if cfg.SealAfter <= 0 {
		cfg.SealAfter = time.Second
	}
	if cfg.CacheMaxBytes <= 0 {
		cfg.CacheMaxBytes = 8 << 30
	}
	if cfg.HandoffBytes == 0 {
		cfg.HandoffBytes = 64 << 20
	}
	if cfg.HandoffWait <= 0 {
		cfg.HandoffWait = handoffWait
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.DiskFree == nil {
		cfg.DiskFree = diskFree
	}
	if cfg.Name == "" {
		cfg.Name = "asr server"
	}
	s := &Server{cfg: cfg, log: cfg.Logger, machines: map[string]*machine{}, failed: map[string]error{}, removed: map[string]bool{}, handing: map[string]bool{}, conns: map[net.Conn]struct{}{},
		handshakes: make(chan struct{}, maxHandshakes), hellos: make(chan struct{}, maxHellos), helloing: map[string]int{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.handoff.max = max(cfg.HandoffBytes, 0)
	s.reqID.Store(uint64(time.Now().UnixNano()))
	s.newLogWait.Store(int64(newLogWait))
	for _, id := range cfg.Removed {
		s.removed[id] = true
	}
	if err := os.MkdirAll(cfg.CacheDir, 0o700); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(cfg.CacheDir)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		if !e.IsDir() || s.removed[e.Name()] {
			continue // a removed machine's cache: Remove finishes it
		}
		if _, err := s.machine(ctx, e.Name(), ""); err != nil {
			// One machine that cannot be opened (its replica unreadable, a
			// target error) does not keep the others from replicating: it
			// is reported, its agent refused with the reason, and it is
			// tried again when the agent next connects.
			s.log.Error("machine cannot be opened; its replication is stopped until this is fixed", "machine", e.Name(), "err", err)
		}
	}
	s.sampleCache()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-s.ctx.Done():
				return
			case <-t.C:
				s.sampleCache()
			}
		}
	}()
	return s, nil
}

// Bounds on connections that have not finished their start: a Hello names
// at most 64 disks, far less than maxHello; an agent has one connection at
// a time (two while one replaces the other).
const (
	maxHello            = 1 << 20
	maxHandshakes       = 128
	maxHellos           = 32
	maxHellosPerMachine = 2
)

// helloSlot takes a slot for reading a machine's Hello, or says why not;
// release gives it back.
func (s *Server) helloSlot(id string) (release func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.helloing[id] >= maxHellosPerMachine {
		return nil, fmt.Errorf("machine %s has %d connections waiting for their hello already; try again", id, maxHellosPerMachine)
	}
	select {
	case s.hellos <- struct{}{}:
	default:
		return nil, fmt.Errorf("%d connections are waiting for their hello already; try again", maxHellos)
	}
	s.helloing[id]++
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.helloing[id]--; s.helloing[id] == 0 {
			delete(s.helloing, id)
		}
		<-s.hellos
	}, nil
}

// Serve accepts data connections on l until ctx is done or Close is called.
// l must be a TLS listener that requires client certificates.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	stopS := context.AfterFunc(s.ctx, func() { l.Close() }) // Close stops Serve too
	defer stopS()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || s.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			return err
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			err := s.serveConn(c)
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.Close()
			switch {
			case err == nil || s.ctx.Err() != nil:
			case errors.Is(err, io.EOF):
				// Closed by the agent between frames: it stopped or
				// reconnects; nothing was lost.
				s.log.Info("data connection closed", "remote", c.RemoteAddr().String(), "reason", err)
			default:
				s.log.Warn("data connection closed", "remote", c.RemoteAddr().String(), "reason", err)
			}
		}()
	}
}

// Close stops accepting, closes connections, stops the appliers and waits.
func (s *Server) Close() error {
	s.cancel()
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	ms := make([]*machine, 0, len(s.machines))
	for _, m := range s.machines {
		ms = append(ms, m)
	}
	s.mu.Unlock()
	s.wg.Wait()
	var first error
	for _, m := range ms {
		if err := m.close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// machine returns the state of a machine, creating and recovering it on
// first use and starting its goroutines.
func (s *Server) machine(ctx context.Context, id, name string) (*machine, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.removedErr(id); err != nil {
		return nil, err
	}
	if m, ok := s.machines[id]; ok {
		return m, nil
	}
	if s.handing[id] {
		return nil, fmt.Errorf("machine %s is being handed over to another process server", id)
	}
	if s.cfg.Serves != nil {
		if err := s.cfg.Serves(id); err != nil {
			return nil, err
		}
	}
	if s.closed {
		return nil, errors.New("process server closing")
	}
	if !validID(id) {
		return nil, fmt.Errorf("invalid machine id %q", id)
	}
	m, err := openMachine(ctx, s, id, name)
	if err != nil {
		err = fmt.Errorf("open machine %s: %w", id, err)
		s.failed[id] = err
		return nil, err
	}
	delete(s.failed, id)
	s.machines[id] = m
	return m, nil
}

func validID(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// serveConn runs one agent connection.
func (s *Server) serveConn(c net.Conn) error {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return errors.New("not a TLS connection")
	}
	// Unfinished handshakes are bounded, so that connections that never
	// finish one (or never send their Hello) cannot pile up: past a bound a
	// new one is closed at once, and its agent tries again.
	select {
	case s.handshakes <- struct{}{}:
	default:
		return fmt.Errorf("%d TLS handshakes under way already: connection closed", cap(s.handshakes))
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	err := tc.HandshakeContext(s.ctx)
	<-s.handshakes
	if err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	certs := tc.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return errors.New("no client certificate")
	}
	id, serial := certs[0].Subject.CommonName, certs[0].SerialNumber.Text(16)
	log := s.log.With("machine", id, "remote", c.RemoteAddr().String())
	br := bufio.NewReaderSize(c, 1<<20)
	bw := bufio.NewWriter(c)
	fail := func(fatal bool, format string, args ...any) error {
		msg := fmt.Sprintf(format, args...)
		if f, err := replication.JSONFrame(replication.FrameError, replication.ErrorMessage{Message: msg, Fatal: fatal}); err == nil {
			replication.WriteFrame(bw, &f)
			bw.Flush()
		}
		return errors.New(msg)
	}
	name, err := s.cfg.Authorize(s.ctx, id, serial)
	if err != nil {
		return fail(true, "machine %s not authorized: %v", id, err)
	}
	refuse := func(format string, args ...any) error {
		err := fail(true, format, args...)
		if s.cfg.OnRefused != nil {
			s.cfg.OnRefused(id, err.Error())
		}
		return err
	}
	release, err := s.helloSlot(id)
	if err != nil {
		return fail(false, "%v", err)
	}
	f, _, err := replication.ReadFrameMax(br, nil, maxHello)
	release()
	if err != nil {
		return fmt.Errorf("read hello: %w", err)
	}
	if f.Type != replication.FrameHello {
		return fail(false, "expected hello, got %s", f.Type)
	}
	var h replication.Hello
	if err := replication.DecodeJSON(&f, &h); err != nil {
		return fail(false, "%v", err)
	}
	if h.MachineID != id {
		return refuse("hello names machine %s but the certificate is for %s", h.MachineID, id)
	}
	if err := h.Validate(); err != nil {
		return refuse("%v", err)
	}
	if s.cfg.RecoveredAgent != nil {
		sink, err := s.cfg.RecoveredAgent(s.ctx, id, h)
		if errors.Is(err, ErrTryLater) {
			if s.cfg.OnRefused != nil {
				s.cfg.OnRefused(id, err.Error())
			}
			return fail(false, "%v", err)
		} else if err != nil {
			return refuse("%v", err)
		}
		if sink != nil {
			log.Info("a recovered VM's agent connected", "name", name, "bios_uuid", h.BIOSUUID)
			return s.serveRecovered(c, br, bw, h, sink, fail)
		}
	}
	m, err := s.machine(s.ctx, id, name)
	if errors.Is(err, ErrRemoved) {
		return refuse("%v: this agent is no longer protected by this server", err)
	} else if err != nil {
		return fail(false, "%v", err)
	}
	cc := &agentConn{c: c, bw: bw, log: log, acks: make(chan uint64, 1), out: make(chan replication.Frame, 16),
		done: make(chan struct{}), replaced: make(chan struct{}), stopped: make(chan struct{})}
	welcome, err := m.sess.attach(s.ctx, cc, &h)
	var again *tryAgainError
	if errors.As(err, &again) {
		return fail(false, "%v", err)
	} else if err != nil {
		return refuse("%v", err)
	}
	defer m.sess.detach(cc)
	if s.cfg.OnConnect != nil {
		s.cfg.OnConnect(id, h)
	}
	welcome.Codecs = replication.ServerCodecs
	wf, _ := replication.JSONFrame(replication.FrameWelcome, welcome)
	if err := replication.WriteFrame(bw, &wf); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	c.SetDeadline(time.Time{})
	log.Info("agent connected", "name", name, "durable_seq", welcome.DurableSeq, "agent_next_seq", h.NextSeq)

	s.wg.Add(1)
	go func() { defer s.wg.Done(); cc.writeLoop() }()
	defer close(cc.done)
	err = s.readLoop(m, cc, br)
	if s.cfg.OnDisconnect != nil {
		s.cfg.OnDisconnect(id, err)
	}
	return err
}

// readLoop appends the agent's DATA frames to the cache. The cache
// writes run in their own goroutine (cacheWriter), so that reading,
// decrypting and checking the next frame overlaps the write of this one;
// every other frame waits until the DATA frames before it are written,
// so the order the agent sent them in holds for everything they do.
func (s *Server) readLoop(m *machine, cc *agentConn, br *bufio.Reader) (err error) {
	codec := replication.ServerCodec()
	comp := replication.AdaptiveCompressor{Codec: codec}
	w := newCacheWriter(s, m, cc)
	defer func() {
		if werr := w.close(); werr != nil {
			err = werr // the cache's failure, not the closed connection it caused
		}
	}()
	for {
		// An agent sends a status at least every few seconds.
		cc.c.SetReadDeadline(time.Now().Add(2 * time.Minute))
		fb := w.buffers()
		if fb.read == nil && fb.readCap > 0 {
			// Its buffer went to the hand-off with the records it held:
			// as large again as that frame, which did arrive (an applied
			// one's, pooled, if there is one).
			fb.read = s.handoff.buffer(fb.readCap)
		}
		f, nb, err := replication.ReadFrame(br, fb.read)
		fb.read = nb
		if err != nil {
			return err
		}
		if f.Type != replication.FrameData {
			w.release(fb)
			if err := w.barrier(); err != nil {
				return err
			}
		}
		switch f.Type {
		case replication.FrameData:
			for s.cacheFull() {
				select {
				case <-s.ctx.Done():
					return s.ctx.Err()
				case <-cc.replaced:
					return errors.New("connection replaced while waiting for cache space")
				case <-time.After(20 * time.Millisecond):
				}
			}
			// Checked whole before it is written: nothing malformed or
			// damaged is ever acknowledged (the agent keeps it and sends
			// it again on the next connection).
			if fb.dec == nil && f.Compressed() && f.RawLen <= replication.MaxFrameRaw {
				// The last one went to the hand-off with its records:
				// an applied frame's, pooled, if there is one.
				fb.dec = s.handoff.pool.get(int(f.RawLen))
			}
			recs, dec, err := codec.CheckRecords(&f, fb.dec, cc.disk)
			fb.dec = dec
			if err != nil {
				w.release(fb)
				err = fmt.Errorf("refused a data frame at seq %d (nothing of it was kept or acknowledged): %w", f.Seq, err)
				if s.cfg.OnRefused != nil {
					s.cfg.OnRefused(m.id, err.Error())
				}
				return err
			}
			wire := int64(len(f.Payload) + replication.FrameHeaderSize)
			// An agent sends plain frames unless told to compress (its
			// CPU is the guest's): compressed here, before the cache, so
			// the cache and the target hold compressed segments, unless
			// the stream does not compress (then tried only now and then).
			plain, flags := !f.Compressed(), f.Flags
			fb.comp = comp.Compress(&f, fb.comp[:0])
			fb.recs, fb.plain = nil, plain
			if f.Flags == flags {
				// The cache writes the bytes the records were decoded
				// from: they go to the applier (handoff.go). A frame
				// compressed here is not handed off, so the applier
				// decodes what the cache holds of it.
				fb.recs = recs
			}
			if err := w.append(f, wire, fb); err != nil {
				return err
			}
		case replication.FrameStatus:
			var st replication.Status
			if err := replication.DecodeJSON(&f, &st); err != nil {
				return err
			}
			if err := st.Validate(); err != nil {
				return err
			}
			m.sess.setStatus(st)
			if s.cfg.OnStatus != nil {
				s.cfg.OnStatus(m.id, st)
			}
		case replication.FrameHashes:
			var h replication.Hashes
			if err := replication.DecodeJSON(&f, &h); err != nil {
				return err
			}
			if err := h.Validate(); err != nil {
				return err
			}
			if err := m.cmp.submit(s.ctx, cc, h); err != nil {
				return err
			}
		case replication.FrameReverseAck:
			var a replication.ReverseAck
			if err := replication.DecodeJSON(&f, &a); err != nil {
				return err
			}
			if err := a.Validate(); err != nil {
				return err
			}
			m.rev.ack(a)
		case replication.FrameHeld:
			var c replication.Cut
			if err := replication.DecodeJSON(&f, &c); err != nil {
				return err
			}
			m.points.held(c.ID)
		case replication.FrameError:
			var e replication.ErrorMessage
			replication.DecodeJSON(&f, &e)
			return fmt.Errorf("agent reports: %s", e.Message)
		default:
			return &replication.ProtocolError{Reason: fmt.Sprintf("unexpected %s frame from agent", f.Type)}
		}
	}
}

// cacheWriterDepth is how many DATA frames of a connection are read and
// checked ahead of the one being written to the cache: the memory this
// costs is that many frames' buffers (as read, decompressed and
// compressed here: a frame is at most replication.MaxFrameRaw
// decompressed, 4 MiB from an asr agent).
const cacheWriterDepth = 2

// frameBuffers hold one DATA frame as read (read), decompressed to check
// it (dec) and as compressed here (comp); a frame's payload is in read or
// comp until it is written. recs are its records as checked, which alias
// read (plain) or dec: the cacheWriter hands them, with the buffer they
// alias, to the applier as it writes the frame (the set then gets a new
// buffer: readCap is the size of the read buffer that went).
type frameBuffers struct {
	read, dec, comp []byte
	recs            []replication.Record
	plain           bool
	readCap         int
}

// cacheWriter writes a connection's DATA frames to the machine's cache in
// its own goroutine, in the order it is given them, so that the reader
// does not wait for a write (the cache's write(2), slowed by the kernel's
// dirty-page throttling on a busy disk, and its lock, held while a
// segment is sealed with its fsyncs) before it reads the next frame.
// Buffer sets circulate between the reader and the writer: at most
// cacheWriterDepth+1 frames are held, the one being read included.
// After the first failed write nothing more is written; the connection is
// closed, and close returns that error.
type cacheWriter struct {
	s    *Server
	m    *machine
	cc   *agentConn
	work chan queuedFrame
	free chan *frameBuffers
	wg   sync.WaitGroup // frames given and not yet written (or dropped)
	done chan struct{}

	mu  sync.Mutex
	err error
}

type queuedFrame struct {
	f    replication.Frame
	wire int64
	fb   *frameBuffers
}

func newCacheWriter(s *Server, m *machine, cc *agentConn) *cacheWriter {
	w := &cacheWriter{s: s, m: m, cc: cc, work: make(chan queuedFrame, cacheWriterDepth),
		free: make(chan *frameBuffers, cacheWriterDepth+1), done: make(chan struct{})}
	for range cacheWriterDepth + 1 {
		w.free <- &frameBuffers{}
	}
	go w.loop()
	return w
}

// buffers waits for a free buffer set for the next frame.
func (w *cacheWriter) buffers() *frameBuffers { return <-w.free }

// release gives back a buffer set whose frame is not written (not DATA).
func (w *cacheWriter) release(fb *frameBuffers) {
	if cap(fb.read) > 2*replication.MaxFrameRaw {
		fb.read = nil
	}
	if cap(fb.comp) > 2*replication.MaxFrameRaw {
		fb.comp = nil
	}
	if cap(fb.dec) > 2*replication.MaxFrameRaw {
		fb.dec = nil
	}
	fb.recs = nil
	w.free <- fb
}

// append queues a checked DATA frame whose payload is in fb. It returns
// the error of an earlier write, if one failed.
func (w *cacheWriter) append(f replication.Frame, wire int64, fb *frameBuffers) error {
	if err := w.failed(); err != nil {
		w.release(fb)
		return err
	}
	w.wg.Add(1)
	w.work <- queuedFrame{f: f, wire: wire, fb: fb}
	return nil
}

// barrier waits until every frame given so far is written, and returns
// the error of a failed write.
func (w *cacheWriter) barrier() error {
	w.wg.Wait()
	return w.failed()
}

func (w *cacheWriter) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// close waits for the frames given so far, stops the writer and returns
// the error of a failed write.
func (w *cacheWriter) close() error {
	close(w.work)
	<-w.done
	return w.failed()
}

func (w *cacheWriter) loop() {
	defer close(w.done)
	s := w.s
	for q := range w.work {
		if w.failed() == nil {
			// The header (and its payload checksum) is encoded here,
			// outside the cache's lock, and the records handed off
			// before the write: the sync loop may seal the frame, and
			// the applier take it, as soon as it is written. An entry
			// is only ever taken for a sealed frame with its key, so
			// one whose write fails is merely dropped.
			var h [replication.FrameHeaderSize]byte
			key := replication.EncodeFrameHeader(&h, &q.f)
			handed := w.handOff(key, q.fb)
			if err := w.m.appendEncoded(w.cc, &q.f, &h, key); err != nil {
				if handed {
					w.m.rep.handoff.drop(key)
				}
				w.mu.Lock()
				w.err = err
				w.mu.Unlock()
				// The reader may be waiting for the agent's next frame.
				w.cc.c.Close()
			} else {
				s.rawBytes.Add(int64(q.f.RawLen))
				s.wireBytes.Add(q.wire)
				s.cachedBytes.Add(int64(len(q.f.Payload) + replication.FrameHeaderSize))
				if s.cfg.OnBytes != nil {
					s.cfg.OnBytes(w.m.id, q.wire)
				}
			}
		}
		w.release(q.fb)
		w.wg.Done()
	}
}

// handOff leaves the checked records of a frame the cache is about to
// write as key, with the buffer they alias, to the machine's applier
// (handoff.go), if the budget allows; it reports whether it did. A frame
// of base data only (the initial copy's) waits for the budget while the
// applier applies (handoff.putWait): such data can always be read from
// the source again, and the replica cannot be further along than the
// applier anyway. A frame holding the guest's changes never waits: a
// backlog of those belongs in the cache, not in the agent's spool.
func (w *cacheWriter) handOff(key replication.FrameKey, fb *frameBuffers) bool {
	recs := fb.recs
	fb.recs = nil
	// Base data (the initial copy's) before the machine's first point:
	// it waits for the budget, so the applier takes its segments whole
	// from here (preparedFromHandoff), and its writes are hashed here,
	// on this goroutine, off the applier's path. The applier hashes any
	// other frame's, on every CPU (a guest's changes: a frame refused
	// the budget would make its segment's hashed ones be hashed again).
	var wait time.Duration
	var be []replication.BlockEntries
	if baseOnly(recs) {
		wait = w.s.cfg.HandoffWait
		if !w.m.rep.pointMade.Load() {
			be = replication.RecordEntries(recs)
		}
	}
	switch {
	case recs == nil:
		return false
	case fb.plain:
		// The payload the cache writes is this buffer too: it is only
		// read from now on.
		if !w.m.rep.handoff.putWait(key, recs, be, fb.read, wait, w.cc.replaced) {
			return false
		}
		fb.readCap, fb.read = cap(fb.read), nil
	default:
		if !w.m.rep.handoff.putWait(key, recs, be, fb.dec, wait, w.cc.replaced) {
			return false
		}
		fb.dec = nil
	}
	return true
}

// baseOnly reports whether recs hold base data (KindBase) and nothing
// else but the copy's progress.
func baseOnly(recs []replication.Record) bool {
	base := false
	for i := range recs {
		switch recs[i].Kind {
		case replication.KindBase:
			base = true
		case replication.KindProgress:
		default:
			return false
		}
	}
	return base
}

// RequestPoint asks a machine's agent for a recovery point now and waits
// until it is durable on the target.
func (s *Server) RequestPoint(ctx context.Context, machineID string, app bool) (replication.Point, error) {
	s.mu.Lock()
	m, ok := s.machines[machineID]
	s.mu.Unlock()
	if !ok {
		return replication.Point{}, fmt.Errorf("machine %s has never connected: %w", machineID, ErrNotConnected)
	}
	return m.requestPoint(ctx, s.reqID.Add(1), app)
}

// Disconnect ends a machine's agent connection at once, if it has one, and
// waits until its reader stopped: from then on nothing the agent sends on it
// is appended or used. reason is logged. The agent may connect again (see
// Supersede for an agent that must not).
func (s *Server) Disconnect(ctx context.Context, machineID, reason string) error {
	s.mu.Lock()
	m, ok := s.machines[machineID]
	s.mu.Unlock()
	if !ok {
		return nil
	}
	return m.sess.disconnect(ctx, reason)
}

// Supersede ends the log of a machine's agent, which was replaced (the
// machine was re-registered; the caller has already revoked the old agent's
// certificate, so it cannot connect again): its connection is closed at
// once (Disconnect), and the catalog records that the log ended, so that
// the next agent's log is taken as a new one whatever its id: never joined
// to the old one by sequence number, and its disks resynced. A machine
// without a catalog entry never replicated anything: it has no log to end.
func (s *Server) Supersede(ctx context.Context, machineID, reason string) error {
	if err := s.Disconnect(ctx, machineID, reason); err != nil {
		return err
	}
	if _, err := s.cfg.Catalog.Machine(ctx, machineID); errors.Is(err, replication.ErrNotFound) {
		return nil
	} else if err != nil {
		return fmt.Errorf("read the catalog of machine %s: %w", machineID, err)
	}
	m, err := s.machine(ctx, machineID, "")
	if err != nil {
		return err
	}
	if err := m.sess.endLog(ctx, reason); err != nil {
		return fmt.Errorf("record the end of machine %s's log: %w", machineID, err)
	}
	return nil
}

// ErrNotConnected is returned when an operation needs the machine's agent
// and it is not connected.
var ErrNotConnected = errors.New("agent not connected")

// ErrResyncNotNeeded is StartResync's answer, with ifMarked, when the
// catalog no longer marks the disk for a resync: its done record was
// applied after the resync was scheduled.
var ErrResyncNotNeeded = errors.New("the disk is no longer marked for a resync")

// MachineStats are the process server's figures for one machine.
type MachineStats struct {
	Connected    bool
	LastStatus   replication.Status
	StatusAt     time.Time // server time of the last status
	DurableSeq   uint64
	AppliedSeq   uint64
	CacheBytes   int64 // sealed + unsealed bytes waiting to be applied
	Segments     int
	ApplyError   string
	OldestSealed time.Time
	// BacklogBytes are the cache bytes received and not yet applied
	// (sealed segments and an open file holding frames), BacklogSince
	// when the oldest of them arrived (zero: no backlog).
	BacklogBytes int64
	BacklogSince time.Time
	// AppliedBytes are the cache bytes of the segments applied to the
	// target since the machine was opened (a counter; it starts again
	// from zero when the server restarts).
	AppliedBytes int64
}

// Stats returns a machine's figures; ok is false if the machine is unknown.
func (s *Server) Stats(machineID string) (MachineStats, bool) {
	s.mu.Lock()
	m, ok := s.machines[machineID]
	ferr := s.failed[machineID]
	s.mu.Unlock()
	if ferr != nil && !ok {
		return MachineStats{ApplyError: ferr.Error()}, true
	}
	if !ok {
		return MachineStats{}, false
	}
	return m.stats(), true
}

// Applier runs fn with a machine's applier held, so fn sees replica disks
// that the applier does not change meanwhile (for reading snapshots through
// the running server). Unknown machines get an applier opened for the call.
func (s *Server) WithApplier(ctx context.Context, machineID string, fn func(a *replication.Applier) error) error {
	m, err := s.machine(ctx, machineID, "")
	if err != nil {
		return err
	}
	return m.rep.with(fn)
}

// MachineIDs lists the machines the process server knows.
func (s *Server) MachineIDs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]string, 0, len(s.machines))
	for id := range s.machines {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// SendPolicy pushes a machine's point schedule to its agent, if connected.
func (s *Server) SendPolicy(machineID string, p replication.AgentPolicy) error {
	s.mu.Lock()
	m, ok := s.machines[machineID]
	s.mu.Unlock()
	if !ok {
		return nil
	}
	f, err := replication.JSONFrame(replication.FramePolicy, p)
	if err != nil {
		return err
	}
	cc := m.sess.current()
	if cc == nil {
		return nil // sent in the Welcome of the next connection
	}
	select {
	case cc.out <- f:
		return nil
	case <-cc.replaced:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("machine %s: the agent connection is not taking frames", machineID)
	}
}

// PrunePoints deletes a machine's recovery points older than before, always
// keeping the newest and those whose sequence number keep holds (the points
// of live failovers), and returns the deleted points.
func (s *Server) PrunePoints(ctx context.Context, machineID string, before time.Time, keep map[uint64]bool) ([]replication.Point, error) {
	return s.deletePoints(ctx, machineID, func(i, n int, p replication.Point) (del, stop bool) {
		if i == n-1 || !p.Time.Before(before) {
			return false, true
		}
		return !keep[p.Seq], false
	})
}

// DeletePointsExcept deletes every recovery point of a machine but keep
// (a committed failover's point), the newest included, and returns them.
func (s *Server) DeletePointsExcept(ctx context.Context, machineID string, keep uint64) ([]replication.Point, error) {
	return s.deletePoints(ctx, machineID, func(_, _ int, p replication.Point) (del, stop bool) { return p.Seq != keep, false })
}

// deletePoints deletes, oldest first, the points pick says to (the i-th
// of n), until it says stop.
func (s *Server) deletePoints(ctx context.Context, machineID string, pick func(i, n int, p replication.Point) (del, stop bool)) ([]replication.Point, error) {
	var deleted []replication.Point
	err := s.WithApplier(ctx, machineID, func(a *replication.Applier) error {
		ps, err := s.cfg.Catalog.Points(ctx, machineID)
		if err != nil {
			return err
		}
		for i, p := range ps {
			del, stop := pick(i, len(ps), p)
			if stop {
				break
			}
			if !del {
				continue
			}
			if err := a.DeletePoint(ctx, p); err != nil {
				return err
			}
			deleted = append(deleted, p)
		}
		return nil
	})
	return deleted, err
}

// StartResync asks a machine's agent to resync a disk (see agent/resync.go).
func (s *Server) StartResync(ctx context.Context, machineID string, job replication.ResyncJob, ifMarked bool) error {
	s.mu.Lock()
	m, ok := s.machines[machineID]
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("machine %s: %w", machineID, ErrNotConnected)
	}
	return m.startResync(ctx, job, ifMarked)
}
