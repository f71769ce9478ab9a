package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// The agent in the recovered VM (docs/ARCHITECTURE.md, "Failback", "The
// agent in a recovered VM"). A failover to vSphere boots a VM from the
// replica, which carries the original agent's installation: identity,
// certificate, server address. That agent connects as the original
// machine, but reports the recovered VM's BIOS UUID. recoveredAgent tells
// it from the original agent by that UUID (the recovered VM's, found in
// the vCenter inventory by the failover's vCenter and VM ref) and serves
// it as the reverse source: its records are written to the original
// disks through the original agent (frozen), in order, and acknowledged
// to it only once durable there; before reprotect's compare is done the
// stream is held (the agent spools). An agent reporting any other UUID
// than the machine's for that identity is refused.

// recoveredAgents holds the agents of recovered VMs, by machine id.
type recoveredAgents struct {
	mu sync.Mutex
	by map[string]*recAgent
}

// recAgent is the reverse source of one failover: the agent of its
// recovered VM. It implements procserver.ReverseSink.
type recAgent struct {
	s                     *Server
	machineID, machine    string
	failoverID, uuid, vm  string
	sent, writes, records atomic.Int64

	mu        sync.Mutex
	conns     int // connections open now
	since     time.Time
	version   string
	status    replication.Status
	statusAt  time.Time
	lastErr   string
	epoch     uint64        // bumped at each Welcome that drops the agent's records
	live      bool          // records are written as they come
	liveCh    chan struct{} // closed when live
	stopped   chan struct{} // closed when the failover ends: connections end
	needsPass string        // why the stream is held until failback's pass

	fp failbackPolicyState // its reverse points (failback_rpo.go)

	gen   uint64     // the newest connection's (under mu)
	acked uint64     // the last record acknowledged to the agent (under mu; kept in the record, saveStream)
	logID string     // the agent's log, as its last Hello named it
	floor uint64     // records up to it are never written (on the recovered disks before the compare)
	wmu   sync.Mutex // one write to the original at a time

	// While held: the last record of the frames dropped since the
	// epoch began (Admit: on the recovered disks before any compare
	// began, so the compare to come reads them), whether a compare
	// began (frames are held from then on), the bytes dropped so, and
	// when the stream went live (a status of the original agent read
	// after it says whether it is still frozen: checkOriginalFrozen).
	noted    uint64
	owed     uint64 // the last record dropped in the epoch: acknowledged once live (Status)
	cmpBegun bool
	dropped  atomic.Int64
	liveAt   time.Time // wall clock, as the process server's StatusAt
	// The compare begun again after the original agent was found
	// thawed (recompareVM): its cancel (the failover ended) and end.
	recmp context.CancelFunc

	// Failback's freeze (freezeRecoveredAgent), under mu: the newest
	// connection's control frames, whether failback wants the agent
	// frozen (FREEZE again at each connection until its tag is written),
	// the final point's request id, whether that tag was written (every
	// record before it is on the original disks), the failover its last
	// status says it is frozen under, and a channel closed (and
	// replaced) at each change a waiter watches.
	out       chan replication.Frame
	freezing  bool
	freezeReq uint64
	tagged    bool
	frozen    string
	writing   int // Writes under way: the connection reads no status meanwhile
	changed   chan struct{}
	kick      chan struct{} // a write since the last save (saveStream)

	cmp recCompare // resyncs and disk sums asked of it (failback_agent_resync.go)
}

// recFreeze is what failback did to the recovered VM's agent
// (switchMember.rec): froze it (a cancel thaws it), and drained its
// stream before the power-off (failback's pass then finds nothing).
type recFreeze struct {
	froze, drained bool
	// sums: a failover to Azure's agent, frozen and drained, showed
	// every disk equal to the original's SHA-256 before the stop
	// (verifyRecoveredAgent): no pass over the stopped VM's disks.
	sums []string
}

// recFreezeAnswer bounds the wait for a status saying the recovered
// agent froze: past it, failback takes the path without the freeze.
const recFreezeAnswer = 30 * time.Second

// recFreezeReq numbers the final points asked of recovered agents.
var recFreezeReq atomic.Uint64

// signal wakes the waiters on a's state (under a.mu).
func (a *recAgent) signal() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// send queues a control frame for the newest connection (under a.mu);
// none connected: nothing (the next connection is asked in start).
func (a *recAgent) send(f replication.Frame) {
	if a.out == nil || a.conns == 0 {
		return
	}
	select {
	case a.out <- f:
	default: // the connection is stuck: its end asks the next one
	}
}

// recConn is one connection of a recovered VM's agent: the sink the
// process server serves it with. Only the newest connection writes: an
// older one still in a write finishes it first (wmu), then is ended, so
// the log's suffix the new one sends again is written in order after
// it, never interleaved with it.
type recConn struct {
	a         *recAgent
	gen       uint64
	out       chan replication.Frame
	thawAsked bool // THAW sent to an agent found frozen while failback wants it not
}

func (c *recConn) Start(h replication.Hello) (uint64, error) {
	c.out = make(chan replication.Frame, 4)
	d, gen, err := c.a.start(h, c.out)
	c.gen = gen
	if err == nil {
		c.a.noteWelcome(d)
	}
	return d, err
}

func (c *recConn) Control() <-chan replication.Frame { return c.out }

func (c *recConn) current() error {
	c.a.mu.Lock()
	defer c.a.mu.Unlock()
	if c.a.gen != c.gen {
		return errors.New("a newer connection of the recovered VM's agent took over")
	}
	return nil
}

func (c *recConn) Status(st replication.Status) {
	if c.current() != nil {
		return
	}
	c.a.noteStatus(st)
	// Frozen under the failover while no failback wants it (one
	// cancelled, a server restarted, its state's copy frozen): thawed,
	// once a connection.
	a := c.a
	a.mu.Lock()
	thaw := st.Failover == a.failoverID && !a.freezing && !c.thawAsked
	if a.live && a.owed > a.acked {
		// The frames dropped while held are on the original (the
		// compare read them): acknowledged, so the agent's spool trims
		// them and its status shows nothing pending. (Only records it
		// shipped: an ACK past them is refused by the agent.)
		select {
		case c.out <- replication.Frame{Type: replication.FrameAck, Seq: a.owed}:
			a.acked = a.owed
		default:
		}
	}
	a.mu.Unlock()
	if thaw {
		c.thawAsked = true
		if f, err := replication.JSONFrame(replication.FrameThaw, replication.Freeze{ID: a.failoverID}); err == nil {
			select {
			case c.out <- f:
			default:
			}
		}
	}
}

// Admit drops a frame while the stream is held and no compare has
// begun: its records were on the recovered disks when it came (the
// agent ships a record once its write completed), so the compare to
// come reads their blocks; the frame's last record is noted, and the
// floor raised to it when that compare is done (goLive): the stream
// never sends them too. Once a compare began, frames wait (Hold): one
// that came after the compare's read of its block must be written.
func (c *recConn) Admit(recs []replication.Record) bool {
	a := c.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.gen != c.gen || a.live || a.cmpBegun || len(recs) == 0 {
		return true // Hold decides
	}
	a.noteDroppedLocked(recs)
	return false
}

// noteDroppedLocked notes a dropped frame's records (under a.mu).
func (a *recAgent) noteDroppedLocked(recs []replication.Record) {
	a.noted = max(a.noted, recs[len(recs)-1].Seq)
	a.owed = max(a.owed, recs[len(recs)-1].Seq)
	var n int64
	for _, r := range recs {
		switch r.Kind {
		case replication.KindWrite, replication.KindBase, replication.KindZero, replication.KindTrim:
			n += int64(r.End() - r.Offset)
		}
	}
	a.dropped.Add(n)
}

func (c *recConn) Hold(ctx context.Context) error {
	if err := c.current(); err != nil {
		return err
	}
	return c.a.hold(ctx)
}

func (c *recConn) Write(ctx context.Context, recs []replication.Record) error {
	c.a.wmu.Lock()
	defer c.a.wmu.Unlock()
	if err := c.current(); err != nil {
		return err
	}
	a := c.a
	a.mu.Lock()
	if !a.live {
		// Held again (the original agent found thawed) since Hold let
		// this frame through.
		begun := a.cmpBegun
		if !begun {
			a.noteDroppedLocked(recs)
		}
		a.mu.Unlock()
		if !begun {
			return fmt.Errorf("records %d to %d: %w", recs[0].Seq, recs[len(recs)-1].Seq, procserver.ErrDropped)
		}
		return errors.New("the stream was held again while this frame waited to be written: the agent sends it again")
	}
	a.writing++
	a.mu.Unlock()
	err := a.write(ctx, recs)
	a.mu.Lock()
	a.writing--
	a.mu.Unlock()
	if err != nil {
		if a.s.thawedAfterRefusal(ctx, a.run(), err) {
			// Refused by an original agent no longer frozen: what its
			// guest wrote meanwhile is anywhere. Held, the original
			// frozen again and the disks compared again (recompareVM),
			// which reads this frame's records on the recovered disks.
			a.mu.Lock()
			a.holdAgainLocked()
			a.noteDroppedLocked(recs)
			a.mu.Unlock()
			a.s.recompareVM(a, err)
			return fmt.Errorf("records %d to %d refused by the original agent, found thawed: %w", recs[0].Seq, recs[len(recs)-1].Seq, procserver.ErrDropped)
		}
		return err
	}
	a.mu.Lock()
	a.acked = max(a.acked, recs[len(recs)-1].Seq)
	if a.freezing && !a.tagged && slices.ContainsFunc(recs, func(r replication.Record) bool {
		return r.Kind == replication.KindTag && r.Offset == a.freezeReq
	}) {
		a.tagged = true // nothing can come after the freeze's tag
	}
	a.signal()
	a.mu.Unlock()
	a.kickSave()
	a.resyncWritten(recs)
	return nil
}

func (c *recConn) Closed(err error) { c.a.closed(err) }

var _ procserver.ReverseSink = (*recConn)(nil)

// recoveredAgent is procserver.Config.RecoveredAgent: nil for the
// machine's own agent, the failover's recAgent for the agent of the VM a
// committed failover to vSphere or Azure made, an error for any other.
func (s *Server) recoveredAgent(ctx context.Context, machineID string, h replication.Hello) (procserver.ReverseSink, error) {
	if h.BIOSUUID == "" {
		return nil, nil
	}
	m, err := s.db.Machine(ctx, machineID)
	if err != nil {
		return nil, err
	}
	f, err := s.db.LiveFailover(ctx, machineID)
	if err == nil {
		d := decodeDetail(f)
		if vm, ok := s.recoveredByUUID(ctx, f, d, h.BIOSUUID); ok {
			if f.State != store.FailoverCommitted {
				return nil, fmt.Errorf("%w: the agent of VM %s (made by failover %s of machine %s) connected as machine %s; it is the reverse source once the failover is committed (asr failover --commit), until then it is turned away", procserver.ErrTryLater, vm, f.ID, m.Name, m.Name)
			}
			return &recConn{a: s.recAgents.get(s, m, f, d, vm, h.BIOSUUID)}, nil
		}
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, err
	}
	if m.BIOSUUID != "" && m.BIOSUUID != h.BIOSUUID {
		if err == nil && f.Kind == api.FailoverReal && f.Dest == api.ToVSphere {
			// The recovered VM may boot before the inventory has seen it.
			return nil, fmt.Errorf("%w: an agent with the identity of machine %s reports BIOS UUID %s, neither machine %s's (%s) nor, as the vCenter inventory has it so far, that of the VM its failover %s made: refused", procserver.ErrTryLater, m.Name, h.BIOSUUID, m.Name, m.BIOSUUID, f.ID)
		}
		return nil, fmt.Errorf("an agent with the identity of machine %s reports BIOS UUID %s, but machine %s is BIOS UUID %s and no live failover of it made a VM with that UUID: a copy of its agent's state on another guest (a clone?) is refused; register that guest's agent anew", m.Name, h.BIOSUUID, m.Name, m.BIOSUUID)
	}
	return nil, nil
}

// recoveredByUUID says whether live failover f (its detail d) made a VM
// whose BIOS UUID is uuid, and names it: a real failover to vSphere
// (isRecoveredVM) or to Azure (the VM's unique id ARM reported,
// sameVMUUID).
func (s *Server) recoveredByUUID(ctx context.Context, f store.Failover, d failoverDetail, uuid string) (string, bool) {
	if f.Kind != api.FailoverReal {
		return "", false
	}
	switch f.Dest {
	case api.ToVSphere:
		if d.VSphere != nil && d.VSphere.Ref != "" && s.isRecoveredVM(ctx, d.VSphere, uuid) {
			return d.VSphere.Name, true
		}
	case api.ToAzure:
		if res, err := azureResult(d); err == nil && !res.Test && res.VMID != "" && sameVMUUID(res.VMUUID, uuid) {
			return res.VMName, true
		}
	}
	return "", false
}

// sameVMUUID says whether an Azure VM's unique id (vmId, as ARM reports
// it) is the BIOS UUID its guest reads: equal (case aside), or equal with
// the first three fields byte-swapped, as Azure's documentation says
// some VMs' SMBIOS shows them (the guest reads them little-endian).
// Checked only against the fake ARM, which gives a random UUID.
func sameVMUUID(vmID, bios string) bool {
	if vmID == "" {
		return false
	}
	if strings.EqualFold(vmID, bios) {
		return true
	}
	u, err := uuid.Parse(vmID)
	if err != nil {
		return false
	}
	slices.Reverse(u[0:4])
	slices.Reverse(u[4:6])
	slices.Reverse(u[6:8])
	return strings.EqualFold(u.String(), bios)
}

// isRecoveredVM says whether the failover's VM has BIOS UUID uuid: as
// the failover recorded it, or (a record made before it was kept) as the
// vCenter inventory has it.
func (s *Server) isRecoveredVM(ctx context.Context, v *vsphereDetail, uuid string) bool {
	if v.UUID != "" {
		return v.UUID == uuid
	}
	rows, err := s.db.VMsWithUUIDs(ctx, []string{uuid})
	if err != nil {
		return false
	}
	for _, r := range rows {
		if r.VCenter == v.VCenter && r.Ref == v.Ref {
			return true
		}
	}
	return false
}

// get returns failover f's reverse source, made at its agent's first
// connection. It starts live when the record says reprotect went through
// the agent (a server restart since: the agent's spool holds exactly
// what was not acknowledged).
func (ra *recoveredAgents) get(s *Server, m store.Machine, f store.Failover, d failoverDetail, vm, uuid string) *recAgent {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	if a := ra.by[m.ID]; a != nil {
		if a.failoverID == f.ID {
			return a
		}
		a.stop() // another failover's, whose end did not forget it
	}
	if ra.by == nil {
		ra.by = map[string]*recAgent{}
	}
	a := &recAgent{s: s, machineID: m.ID, machine: m.Name, failoverID: f.ID, uuid: uuid, vm: vm,
		liveCh: make(chan struct{}), stopped: make(chan struct{}), changed: make(chan struct{}), kick: make(chan struct{}, 1)}
	if v := d.Reverse.vmPass(); v != nil {
		a.sent.Store(v.Streamed)
		if d.Reverse.State == dirReprotected && v.Path == pathAgent {
			a.live, a.floor, a.logID, a.acked, a.liveAt = true, v.From, v.Log, v.Acked, time.Now()
			close(a.liveCh)
		}
	}
	ra.by[m.ID] = a
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.saveStream(a) }()
	return a
}

// of returns machine id's reverse source for failover fid, nil if none.
func (ra *recoveredAgents) of(id, fid string) *recAgent {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	if a := ra.by[id]; a != nil && a.failoverID == fid {
		return a
	}
	return nil
}

// end forgets machine id's reverse source and ends its connections (its
// failover ended).
func (ra *recoveredAgents) end(id string) {
	ra.mu.Lock()
	a := ra.by[id]
	delete(ra.by, id)
	ra.mu.Unlock()
	if a != nil {
		a.stop()
	}
}

// stop ends a's connections and its saver.
func (a *recAgent) stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	select {
	case <-a.stopped:
	default:
		close(a.stopped)
	}
	if a.recmp != nil {
		a.recmp()
	}
}

// start welcomes a connection (its generation: the newest is the only
// one that writes): while live, after the last record the
// agent holds acknowledged (everything before it is on the original
// disks); otherwise after its last record (they are on the recovered
// disks, which a compare begun after this Welcome reads), a new epoch.
// An agent that lost records in a hard stop (Recovering, a disk it
// reports diverged, or another log than before) cannot be continued: the stream is held until
// failback's pass, which compares every block.
func (a *recAgent) start(h replication.Hello, out chan replication.Frame) (uint64, uint64, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	select {
	case <-a.stopped:
		return 0, 0, fmt.Errorf("failover %s of machine %s has ended: the recovered VM's agent is no longer its reverse source", a.failoverID, a.machine)
	default:
	}
	// Another log than the last connection's: the agent's state was
	// lost or replaced; its numbering means nothing to acked.
	newLog := a.logID != "" && h.LogID != a.logID
	if newLog {
		a.acked = 0
	}
	a.logID = h.LogID
	lost := h.Recovering || newLog
	for _, d := range h.Disks {
		lost = lost || d.Diverged != ""
	}
	// Records up to floor were on the recovered disks before the
	// compare that let the stream flow: never written again.
	lost = lost || a.live && max(h.NextSeq, 1)-1 < a.floor
	if a.live && lost {
		a.live, a.liveCh = false, make(chan struct{})
		a.needsPass = "the recovered VM's agent lost records in a hard stop: its writes are held until failback's pass compares every block"
		a.s.wg.Add(1)
		go func() { defer a.s.wg.Done(); a.s.recordHeld(a.machineID, a.failoverID) }()
	}
	a.conns++
	a.gen++
	a.since, a.version = a.s.now(), h.AgentVersion
	a.out = out
	if a.freezing && !a.tagged {
		// A connection ended before the freeze's tag came: asked again
		// (same failover and request: the agent, frozen already, tags again).
		a.send(freezeFrame(a.failoverID, a.freezeReq))
	}
	a.signal()
	if a.live {
		// Records before SpoolFirst were acknowledged; so were those up
		// to acked (the spool keeps acknowledged records until it trims
		// them). After a server restart acked is not known: what the
		// spool still holds is written again, in order (harmless).
		d := max(max(h.SpoolFirst, 1)-1, a.floor)
		if a.acked > d && a.acked < h.NextSeq {
			d = a.acked
		}
		return d, a.gen, nil
	}
	a.epoch++
	a.floor = max(h.NextSeq, 1) - 1
	a.noted, a.owed, a.cmpBegun = a.floor, 0, false
	return a.floor, a.gen, nil
}

// noteStatus notes a status report; one that shows nothing unacknowledged
// on a live stream may be a reverse point.
func (a *recAgent) noteStatus(st replication.Status) {
	a.mu.Lock()
	a.status, a.statusAt = st, a.s.now()
	a.frozen = st.Failover
	a.signal()
	live := a.live
	a.mu.Unlock()
	a.fp.ready.Store(true)
	if live && st.OldestPending == 0 {
		a.s.reversePoint(a.s.ctx, a.machineID, &a.fp, func(time.Time) bool { return a.lag(time.Time{}).consistent }, a.sent.Load)
	}
}

// lag is the reverse RPO of the agent's stream at now, from its last
// status: every write before the status's time (or, with writes
// pending, before the oldest of them) was acknowledged, so is on the
// original disks. Never less than the true one; more by at most the
// agent's status interval (a second) while statuses are read; a stream
// waiting for the original agent reads none, so its RPO grows. The times
// are the recovered guest's clock. A held stream is not known (the
// alert is kept).
func (a *recAgent) lag(now time.Time) reverseLag {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.live || a.statusAt.IsZero() {
		return reverseLag{}
	}
	l := reverseLag{known: true, synced: true}
	safe := time.Unix(0, a.status.Time)
	if a.status.OldestPending > 0 {
		safe, l.pending = time.Unix(0, a.status.OldestPending), a.status.SpoolBytes
	} else {
		l.consistent = true
	}
	if !now.IsZero() {
		l.rpo = max(0, now.Sub(safe))
	}
	return l
}

// liveOf returns machine id's reverse source if its stream is live.
func (ra *recoveredAgents) liveOf(id string) *recAgent {
	ra.mu.Lock()
	a := ra.by[id]
	ra.mu.Unlock()
	if a == nil {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.live {
		return nil
	}
	return a
}

// closed notes the end of a connection.
func (a *recAgent) closed(err error) {
	a.mu.Lock()
	a.conns--
	if err != nil {
		a.lastErr = err.Error()
	}
	a.signal()
	a.mu.Unlock()
}

// hold waits until the stream is live.
func (a *recAgent) hold(ctx context.Context) error {
	a.mu.Lock()
	ch := a.liveCh
	a.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-a.stopped:
		return errors.New("the failover ended")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// write writes the records' data to the original disks, in order, each
// acknowledged once durable by the original agent; an original agent
// away is waited for, a refusal ends the connection (the agent sends
// again later).
func (a *recAgent) write(ctx context.Context, recs []replication.Record) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-a.stopped:
			cancel()
		case <-ctx.Done():
		}
	}()
	var zeros []byte
	for _, r := range recs {
		var data []byte
		switch r.Kind {
		case replication.KindWrite, replication.KindBase:
			data = r.Data
		case replication.KindZero, replication.KindTrim:
			if zeros == nil {
				zeros = make([]byte, replication.MaxReverseData)
			}
		default:
			continue // tags, progress, resync marks: nothing to write
		}
		for off, end := int64(r.Offset), int64(r.End()); off < end; {
			n := min(end-off, replication.MaxReverseData)
			chunk := zeros[:min(n, int64(len(zeros)))]
			if data != nil {
				chunk = data[off-int64(r.Offset) : off-int64(r.Offset)+n]
			}
			err := a.s.retryOriginal(ctx, store.Machine{ID: a.machineID, Name: a.machine}, func(string) {}, func() error {
				return a.s.ps.ReverseWrite(ctx, a.machineID, a.failoverID, r.Disk, off, chunk)
			})
			if err != nil {
				return err
			}
			a.sent.Add(n)
			off += n
		}
		a.writes.Add(1)
	}
	a.records.Add(int64(len(recs)))
	return nil
}

// beginCompare returns the epoch a compare starts in, and whether an
// agent is connected. Frames are no longer dropped (Admit): they wait.
func (a *recAgent) beginCompare() (uint64, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.cmpBegun = true
	return a.epoch, a.conns > 0
}

// goLive lets the stream flow once a compare begun in epoch e is done,
// with the floor and log to record (a restart continues from them), and
// says false if the agent was welcomed again since (records it
// dropped may be newer than what the compare read): compare again.
func (a *recAgent) goLive(e uint64) (floor uint64, logID string, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.epoch != e {
		return 0, "", false
	}
	if !a.live {
		// The frames dropped before the compare began are on the
		// original now: never written (and acknowledged at the next
		// status, Status).
		a.floor = max(a.floor, a.noted)
		a.live, a.needsPass, a.liveAt = true, "", time.Now()
		close(a.liveCh)
	}
	return a.floor, a.logID, true
}

// drained reports whether the agent's last status (after since) shows
// nothing unacknowledged, and whether one is connected.
func (a *recAgent) drained(since time.Time) (done, connected bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	// A held stream has nothing to drain: failback's pass sends it all.
	return !a.live || a.statusAt.After(since) && a.status.OldestPending == 0, a.conns > 0
}

// view is the reverse source for the API.
func (a *recAgent) view() *api.ReverseSource {
	a.mu.Lock()
	defer a.mu.Unlock()
	v := &api.ReverseSource{Kind: pathAgent, VM: a.vm, BIOSUUID: a.uuid, Connected: a.conns > 0, Version: a.version,
		Live: a.live, Held: a.needsPass, Frozen: a.conns > 0 && a.frozen != "", Sent: a.sent.Load(), Dropped: a.dropped.Load(), LastError: a.lastErr}
	if a.conns > 0 {
		v.Since = a.since
	}
	if a.live && a.status.OldestPending > 0 {
		v.OldestPending = time.Unix(0, a.status.OldestPending)
	}
	v.SpoolBytes = a.status.SpoolBytes
	return v
}

// Reverse paths of a failover to vSphere (vmReverse.Path).
const (
	pathAgent   = "agent"   // the recovered VM's agent ships its writes as they happen
	pathVCenter = "vcenter" // the recovered VM's flat files read through vCenter by each pass
)

// reverseSource is the recovered VM's agent of machine id's live
// failover for the API (nil if none connected since the server started).
func (s *Server) reverseSource(ctx context.Context, id string) *api.ReverseSource {
	s.recAgents.mu.Lock()
	a := s.recAgents.by[id]
	s.recAgents.mu.Unlock()
	if a == nil {
		return nil
	}
	return a.view()
}

// drainRecoveredAgent, in failback once the recovered VM is stopped,
// waits until its agent's stream is drained: its status, sent after the
// stop, shows nothing unacknowledged. An agent gone with the VM (its
// spool is on the recovered disks) is not waited for: failback's pass
// that follows compares every block and sends what it did not.
func (s *Server) drainRecoveredAgent(ctx context.Context, j *job, m store.Machine, f store.Failover) error {
	a := s.recAgents.of(m.ID, f.ID)
	if a == nil {
		return nil
	}
	name := m.Name + ": drain the reverse stream"
	j.update(api.JobStep{Name: name, State: "running", Detail: fmt.Sprintf("the agent in VM %s sends its last writes", a.vm)})
	since := s.now()
	for {
		done, connected := a.drained(since)
		switch {
		case done:
			j.update(api.JobStep{Name: name, State: "done", Detail: fmt.Sprintf("drained: %d bytes sent by the agent in VM %s since reprotect", a.sent.Load(), a.vm)})
			return nil
		case !connected:
			j.update(api.JobStep{Name: name, State: "done", Detail: fmt.Sprintf("the agent in VM %s is gone with it: what it did not send is found by the pass", a.vm)})
			return nil
		}
		select {
		case <-ctx.Done():
			j.update(api.JobStep{Name: name, State: "failed", Detail: ctx.Err().Error()})
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// recordHeld records that failover fid's stream from the recovered VM's
// agent is held for good (the agent lost records): its reverse path is
// the flat files' (failback's pass), so a restarted server does not take
// the stream as live again.
func (s *Server) recordHeld(machineID, fid string) {
	ctx := s.ctx
	s.rv.recMu.Lock()
	defer s.rv.recMu.Unlock()
	f, err := s.db.LiveFailover(ctx, machineID)
	if err != nil || f.ID != fid {
		return
	}
	d := decodeDetail(f)
	v := d.Reverse.vmPass()
	if v == nil || v.Path != pathAgent {
		return
	}
	v.Path = pathVCenter
	f.Detail = encodeDetail(d)
	if err := s.db.UpdateFailover(ctx, f); err != nil {
		s.log.Error("record the recovered agent's stream held", "machine", machineID, "failover", fid, "err", err)
	}
}

// freezeFrame is the FREEZE of failover fid's recovered agent, its final
// point asked as request req.
func freezeFrame(fid string, req uint64) replication.Frame {
	f, _ := replication.JSONFrame(replication.FrameFreeze, replication.Freeze{ID: fid, Req: req})
	return f
}

// freezeRecoveredAgent, in failback before the recovered VM's power-off,
// does to the recovered VM's agent what a planned failover does to a
// source agent: FREEZE under the failover (guest writes refused from
// then on, across its restarts), whose final point's tag record comes
// after every write the guest saw complete; once the stream has written
// that tag to the original disks, nothing is pending and nothing can
// come, so the pass after the power-off finds nothing to send. An agent
// not connected, whose stream is held, that does not report the freeze
// within recFreezeAnswer or goes away before its tag is written, is left
// to the path without the freeze (power off, drain what comes, the pass
// finds the rest), and the step says so. Cancellable: the caller's undo
// thaws it (thawRecoveredAgent).
func (s *Server) freezeRecoveredAgent(ctx context.Context, j *job, sm *switchMember) error {
	a := s.recAgents.of(sm.m.ID, sm.f.ID)
	if a == nil {
		return nil
	}
	name := sm.m.Name + ": freeze and drain the recovered agent"
	without := "; the VM is powered off, what its agent still sends is drained, and the pass reads its disks whole and sends the rest"
	a.mu.Lock()
	why := ""
	switch {
	case a.conns == 0:
		why = "the agent in VM " + a.vm + " is not connected"
	case !a.live:
		why = "the agent in VM " + a.vm + "'s stream is held"
		if a.needsPass != "" {
			why += " (" + a.needsPass + ")"
		}
	}
	if why == "" {
		a.freezing, a.tagged, a.freezeReq = true, false, recFreezeReq.Add(1)
		a.send(freezeFrame(a.failoverID, a.freezeReq))
		sm.rec.froze = true
	}
	a.mu.Unlock()
	if why != "" {
		j.update(api.JobStep{Name: name, State: "done", Detail: "not frozen: " + why + without})
		return nil
	}
	start := a.sent.Load()
	j.update(api.JobStep{Name: name, State: "running", Detail: fmt.Sprintf("FREEZE sent to the agent in VM %s: its guest writes are refused, its last writes go to the original disks", a.vm)})
	answer := time.NewTimer(recFreezeAnswer)
	defer answer.Stop()
	answered := false
	for {
		a.mu.Lock()
		tagged, frozen, connected, live, ch := a.tagged, a.frozen == a.failoverID, a.conns > 0, a.live, a.changed
		writing := a.writing > 0
		pending := a.status.SpoolBytes
		a.mu.Unlock()
		why := ""
		switch {
		case tagged:
			sm.rec.drained = true
			j.update(api.JobStep{Name: name, State: "done", Detail: fmt.Sprintf("frozen (guest writes refused) and drained: %d bytes sent by the agent in VM %s since the freeze, nothing pending", a.sent.Load()-start, a.vm)})
			return nil
		case !connected:
			why = "the agent in VM " + a.vm + " went away before its last writes were sent"
		case !live:
			why = "the agent in VM " + a.vm + "'s stream is held"
		}
		if why != "" {
			j.update(api.JobStep{Name: name, State: "done", Detail: "not drained: " + why + without})
			return nil
		}
		if frozen && !answered {
			answered = true
			j.update(api.JobStep{Name: name, State: "running", Detail: fmt.Sprintf("the agent in VM %s is frozen (guest writes refused); its last writes go to the original disks (%d bytes in its spool)", a.vm, pending)})
		}
		var timeout <-chan time.Time
		if !answered {
			timeout = answer.C
		}
		select {
		case <-ch:
		case <-timeout:
			if writing {
				// Its answer is behind a write to the original disks
				// (an original agent away is waited for): not read yet.
				answer.Reset(recFreezeAnswer)
				continue
			}
			j.update(api.JobStep{Name: name, State: "done", Detail: fmt.Sprintf("not frozen: the agent in VM %s did not report the freeze within %s%s", a.vm, recFreezeAnswer, without)})
			return nil
		case <-ctx.Done():
			j.update(api.JobStep{Name: name, State: "failed", Detail: ctx.Err().Error()})
			return ctx.Err()
		}
	}
}

// thawRecoveredAgent, after a failback that did not switch, lets the
// recovered VM's agent take guest writes again: THAW now if it is
// connected, else at its next connection (Status thaws an agent frozen
// under the failover that no failback wants frozen).
func (s *Server) thawRecoveredAgent(j *job, sm *switchMember) {
	if !sm.rec.froze {
		return
	}
	sm.rec = recFreeze{}
	a := s.recAgents.of(sm.m.ID, sm.f.ID)
	if a == nil {
		return
	}
	a.mu.Lock()
	a.freezing, a.tagged = false, false
	connected := a.conns > 0
	if f, err := replication.JSONFrame(replication.FrameThaw, replication.Freeze{ID: a.failoverID}); err == nil {
		a.send(f)
	}
	a.signal()
	a.mu.Unlock()
	detail := "THAW sent: its guest writes are accepted again"
	if !connected {
		detail = "not connected: thawed when it connects again"
	}
	j.update(api.JobStep{Name: sm.m.Name + ": thaw the recovered agent", State: "done", Detail: detail})
}

// streamedOf is the bytes the recovered VM's agent's stream wrote to
// failover f's original disks: its recAgent's count (which starts from
// the record's), else the record's (no connection since a restart).
func (s *Server) streamedOf(f store.Failover) int64 {
	if a := s.recAgents.of(f.MachineID, f.ID); a != nil {
		return a.sent.Load()
	}
	if v := decodeDetail(f).Reverse.vmPass(); v != nil {
		return v.Streamed
	}
	return 0
}

// kickSave asks saveStream to record a's figures.
func (a *recAgent) kickSave() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// saveStream keeps a's bytes sent and last record acknowledged in the
// failover's record: after its writes, at most every second (as the NBD
// shipper's maps), and once more at the server's stop (saveStreams). A kill -9 may
// leave them a second behind: the count short, the agent told to send
// again an ordered suffix it had sent (harmless).
func (s *Server) saveStream(a *recAgent) {
	var last time.Time
	for {
		select {
		case <-a.kick:
		case <-a.stopped:
			return
		case <-s.ctx.Done():
			return // Close saves them (saveStreams)
		}
		if wait := time.Second - time.Since(last); wait > 0 {
			select {
			case <-time.After(wait):
			case <-a.stopped:
				return
			case <-s.ctx.Done():
				return
			}
		}
		s.recordStream(s.ctx, a)
		last = time.Now()
	}
}

// recordStream writes a's figures into its failover's record (while it
// is reprotected; the acknowledged record only while its path is the
// agent's, in the same log).
func (s *Server) recordStream(ctx context.Context, a *recAgent) {
	a.mu.Lock()
	acked, logID := a.acked, a.logID
	a.mu.Unlock()
	sent := a.sent.Load()
	s.rv.recMu.Lock()
	defer s.rv.recMu.Unlock()
	f, err := s.db.LiveFailover(ctx, a.machineID)
	if err != nil || f.ID != a.failoverID {
		return
	}
	d := decodeDetail(f)
	r := d.Reverse
	if r == nil || r.State != dirReprotected || r.vmPass() == nil {
		return
	}
	old := r.vmPass()
	v := *old
	v.Streamed = sent
	if v.Path == pathAgent && v.Log == logID {
		v.Acked = max(v.Acked, acked)
	}
	if v == *old {
		return
	}
	*old = v
	f.Detail = encodeDetail(d)
	if err := s.db.UpdateFailover(ctx, f); err != nil {
		s.log.Error("failback: record the recovered agent's stream", "machine", a.machineID, "failover", a.failoverID, "err", err)
	}
}

// saveStreams records every recovered agent's figures (at the server's
// stop, once no connection writes any more).
func (s *Server) saveStreams() {
	s.recAgents.mu.Lock()
	as := make([]*recAgent, 0, len(s.recAgents.by))
	for _, a := range s.recAgents.by {
		as = append(as, a)
	}
	s.recAgents.mu.Unlock()
	for _, a := range as {
		s.recordStream(context.Background(), a)
	}
}
