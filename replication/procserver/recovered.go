package procserver

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
)

// A recovered VM's agent (docs/ARCHITECTURE.md, "Failback", "The agent in
// the recovered VM"): a failover to vSphere boots a VM from the replica,
// which carries the original agent's installation, identity and
// certificate. Its agent connects as the original machine but reports the
// recovered VM's BIOS UUID. Config.RecoveredAgent tells the two apart
// before anything of the machine's session is touched: the recovered
// agent's connection never joins the machine's forward log, its records
// are never cached or applied to the replica; they go to a ReverseSink,
// which writes them to the original disks (through the original agent)
// and only then are they acknowledged.

// ReverseSink receives the log of a recovered VM's agent: the server's
// reverse direction for a failover to a VM.
type ReverseSink interface {
	// Start is asked once the Hello is read: the Welcome's DurableSeq
	// (the records the agent may drop), or a refusal.
	Start(h replication.Hello) (durable uint64, err error)
	// Status receives each status report.
	Status(st replication.Status)
	// Admit is asked for each DATA frame (its records, checked) before
	// Hold: false drops it, neither written nor acknowledged, and the
	// connection reads on. The sink says false only for records it
	// knows a compare yet to begin reads on the recovered disks (the
	// agent ships only records whose disk write completed), which that
	// compare's end acknowledges (an ACK among Control's frames, or a
	// later frame's); memory stays bounded while the stream is held.
	Admit(recs []replication.Record) bool
	// Hold returns once the records may be written (the reverse compare
	// that began after this connection's Welcome is done), or with
	// ctx's error. It is asked before each DATA frame is written;
	// meanwhile the connection acknowledges nothing new.
	Hold(ctx context.Context) error
	// Write makes a DATA frame's records durable on the original disks,
	// in order, and returns nil only then: the frame is acknowledged
	// after it. An error wrapping ErrDropped: the frame was not written,
	// and a compare yet to begin reads its records (as Admit's false):
	// not acknowledged, the connection reads on.
	Write(ctx context.Context, recs []replication.Record) error
	// Closed reports the end of the connection.
	Closed(err error)
	// Control is the frames the server sends the agent besides ACKs
	// (FREEZE and THAW: the recovered agent frozen at failback), read
	// from Start's return until the connection ends; nil for none.
	Control() <-chan replication.Frame
}

// ReverseComparer is what a ReverseSink also implements when it runs
// resync jobs on the recovered VM's agent against the original disks
// (RESYNC sent through Control): the agent's HASHES are answered by
// Hashes, called in order off the reading loop (it may wait for the
// records up to the job's start record to be written, which the loop
// reads), and sent back as WANT; REVERSE_ACK, the answer to a
// REVERSE_SUM sent through Control, goes to ReverseAck. Without it those
// frames end the connection as unexpected.
type ReverseComparer interface {
	Hashes(ctx context.Context, h replication.Hashes) replication.Want
	ReverseAck(a replication.ReverseAck)
}

// serveRecovered serves a recovered VM's agent: Welcome, then each DATA
// frame checked whole, written through the sink and acknowledged, in
// order; STATUS frames to the sink.
func (s *Server) serveRecovered(c net.Conn, br *bufio.Reader, bw *bufio.Writer, h replication.Hello, sink ReverseSink, fail func(fatal bool, format string, args ...any) error) (err error) {
	durable, err := sink.Start(h)
	if err != nil {
		return fail(true, "%v", err)
	}
	defer func() { sink.Closed(err) }()
	sizes := make(map[uint32]int64, len(h.Disks))
	for _, d := range h.Disks {
		sizes[d.Index] = d.Size
	}
	disk := func(i uint32) (int64, bool) { sz, ok := sizes[i]; return sz, ok }
	var wmu sync.Mutex  // the reading loop's ACKs and the sink's control frames
	var wrote time.Time // the last frame sent (under wmu)
	write := func(f replication.Frame) error {
		wmu.Lock()
		defer wmu.Unlock()
		c.SetWriteDeadline(time.Now().Add(time.Minute))
		if err := replication.WriteFrame(bw, &f); err != nil {
			return err
		}
		wrote = time.Now()
		return bw.Flush()
	}
	// silent says whether the agent has heard nothing for holdKeepalive
	// (frames dropped or nothing written: no ACK sent).
	silent := func() bool {
		wmu.Lock()
		defer wmu.Unlock()
		return time.Since(wrote) > holdKeepalive
	}
	wf, _ := replication.JSONFrame(replication.FrameWelcome, replication.Welcome{DurableSeq: durable, Codecs: replication.ServerCodecs})
	if err := write(wf); err != nil {
		return err
	}
	c.SetDeadline(time.Time{})
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	// The connection's end (the agent gone) ends a Write that waits.
	go func() {
		<-ctx.Done()
		c.Close()
	}()
	if ctl := sink.Control(); ctl != nil {
		go func() {
			for {
				select {
				case f := <-ctl:
					if err := write(f); err != nil {
						cancel()
						return
					}
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	cmp, _ := sink.(ReverseComparer)
	// The agent keeps one batch of hashes in flight; a few more queued
	// are refused rather than held (bounded memory).
	hashes := make(chan replication.Hashes, 4)
	if cmp != nil {
		go func() {
			for {
				select {
				case h := <-hashes:
					wf, err := replication.JSONFrame(replication.FrameWant, cmp.Hashes(ctx, h))
					if err == nil {
						err = write(wf)
					}
					if err != nil {
						cancel()
						return
					}
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	acked := durable
	var buf, dbuf []byte
	codec := replication.DefaultCodec()
	for {
		// While frames are dropped the agent still hears from the
		// server (its link's deadline): the last acknowledgement again,
		// which changes nothing on its side.
		if silent() {
			if err := write(replication.Frame{Type: replication.FrameAck, Seq: acked}); err != nil {
				return err
			}
		}
		c.SetReadDeadline(time.Now().Add(2 * time.Minute))
		f, nb, err := replication.ReadFrame(br, buf)
		buf = nb
		if err != nil {
			return err
		}
		switch f.Type {
		case replication.FrameData:
			if dbuf, err = codec.CheckData(&f, dbuf, disk); err != nil {
				return fmt.Errorf("refused a data frame at seq %d (nothing of it was written or acknowledged): %w", f.Seq, err)
			}
			var recs []replication.Record
			if recs, dbuf, err = codec.Records(&f, dbuf); err != nil {
				return err
			}
			if !sink.Admit(recs) {
				continue
			}
			// While the stream is held the agent still hears from the
			// server (its link's deadline): the last acknowledgement
			// again, which changes nothing on its side.
			for {
				hctx, hcancel := context.WithTimeout(ctx, holdKeepalive)
				err := sink.Hold(hctx)
				hcancel()
				if err == nil {
					break
				}
				if ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
					return err
				}
				if err := write(replication.Frame{Type: replication.FrameAck, Seq: acked}); err != nil {
					return err
				}
			}
			if err := sink.Write(ctx, recs); errors.Is(err, ErrDropped) {
				continue
			} else if err != nil {
				return fmt.Errorf("reverse records %d to %d: %w", f.Seq, f.Seq+uint64(f.Count)-1, err)
			}
			if cap(dbuf) > 2*replication.MaxFrameRaw {
				dbuf = nil
			}
			acked = f.Seq + uint64(f.Count) - 1
			if err := write(replication.Frame{Type: replication.FrameAck, Seq: acked}); err != nil {
				return err
			}
			s.rawBytes.Add(int64(f.RawLen))
			s.wireBytes.Add(int64(len(f.Payload) + replication.FrameHeaderSize))
		case replication.FrameStatus:
			var st replication.Status
			if err := replication.DecodeJSON(&f, &st); err != nil {
				return err
			}
			if err := st.Validate(); err != nil {
				return err
			}
			sink.Status(st)
		case replication.FrameHashes:
			if cmp == nil {
				return &replication.ProtocolError{Reason: "unexpected hashes frame from a recovered VM's agent: no resync was asked"}
			}
			var h replication.Hashes
			if err := replication.DecodeJSON(&f, &h); err != nil {
				return err
			}
			if err := h.Validate(); err != nil {
				return err
			}
			select {
			case hashes <- h:
			default:
				return &replication.ProtocolError{Reason: "a recovered VM's agent sent more batches of hashes than it may have in flight"}
			}
		case replication.FrameReverseAck:
			if cmp == nil {
				return &replication.ProtocolError{Reason: "unexpected reverse-ack frame from a recovered VM's agent"}
			}
			var a replication.ReverseAck
			if err := replication.DecodeJSON(&f, &a); err != nil {
				return err
			}
			cmp.ReverseAck(a)
		case replication.FrameError:
			var e replication.ErrorMessage
			replication.DecodeJSON(&f, &e)
			return fmt.Errorf("agent reports: %s", e.Message)
		default:
			// HASHES, HELD, REVERSE_ACK answer requests never made on
			// this connection.
			return &replication.ProtocolError{Reason: fmt.Sprintf("unexpected %s frame from a recovered VM's agent", f.Type)}
		}
	}
}

// ErrTryLater, wrapped in RecoveredAgent's error, turns the agent away
// for now: it tries again (not a fatal refusal).
var ErrTryLater = errors.New("try again later")

// ErrDropped, wrapped in a ReverseSink's Write error, says the frame was
// not written and is not to be acknowledged: a compare yet to begin
// reads its records on the recovered disks. The connection reads on.
var ErrDropped = errors.New("dropped: a compare to come reads these records")

// holdKeepalive is how often a held connection repeats its last
// acknowledgement (the agent drops a link silent for a minute).
const holdKeepalive = 20 * time.Second
