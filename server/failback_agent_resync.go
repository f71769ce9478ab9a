package server

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Reading a recovered VM's disks through its agent (docs/ARCHITECTURE.md,
// "Failback", "The agent in a recovered Azure VM"). For a failover to
// Azure whose recovered VM's agent is connected, reprotect does not read
// the managed disks through snapshots and read SASes: it runs the
// forward resync's algorithm with the original disks as the replica. The
// stream goes live first (the agent's records after its Welcome are
// written to the original disks in order), then each disk gets a RESYNC on
// the agent's connection: the agent logs its start record, reads its disk
// and sends HASHES (1 MiB chunk hashes); the server waits until the
// stream has written every record up to that start record, asks the
// original agent for the same chunks' hashes (REVERSE_SUM, 1 MiB blocks:
// replication.BlockSum of a chunk is the resync's chunk hash) and, for
// the chunks that differ, their 4 KiB leaf hashes (REVERSE_SUM with
// Leaves), and answers WANT; the agent logs the differing blocks as
// writes, among the guest's own, and the stream writes them to the
// original; its resync-done record, once written, ends the disk's
// compare. Only hashes and the differing blocks cross the network: no
// egress of whole disks, no snapshot, no SAS, and nothing sent twice. At
// failback the agent is frozen and drained (failback_agent.go), and each
// disk's SHA-256 is asked of it (REVERSE_SUM on its connection: it is
// frozen under the failover) and of the original agent before the VM is
// deallocated: equal, no pass over the stopped VM's disks is needed. Any
// other case (no agent connected, its stream held, a sum that differs)
// takes the SAS path (failback_azure.go).

// recCompare is the resync jobs and disk sums asked of a recovered VM's
// agent (recAgent.cmp).
type recCompare struct {
	mu       sync.Mutex
	jobs     map[uint64]*recResync
	sums     map[uint64]chan replication.ReverseAck // by REVERSE_SUM seq
	welcomed uint64                                 // the last live Welcome's durable record
}

// recResync is one resync job run by the recovered agent.
type recResync struct {
	disk             uint32
	compared, differ atomic.Int64
	errMu            sync.Mutex
	err              string // the last batch the server could not answer
	done             chan struct{}
}

// recJobID numbers the resync jobs asked of recovered agents (distinct
// from the forward resyncs' ids, which count from 1 in the vault).
var recJobID atomic.Uint64

func init() { recJobID.Store(1 << 62) }

func (c *recConn) Hashes(ctx context.Context, h replication.Hashes) replication.Want {
	return c.a.hashes(ctx, h)
}

func (c *recConn) ReverseAck(ack replication.ReverseAck) {
	cm := &c.a.cmp
	cm.mu.Lock()
	ch := cm.sums[ack.Seq]
	cm.mu.Unlock()
	if ch != nil {
		select {
		case ch <- ack:
		default:
		}
	}
}

// noteWelcome notes a Welcome's durable record while the stream is live:
// the records up to it are on the original disks (or, before the floor,
// on the recovered ones, which a resync begun after reads).
func (a *recAgent) noteWelcome(d uint64) {
	a.mu.Lock()
	live := a.live
	a.mu.Unlock()
	if live {
		a.cmp.mu.Lock()
		a.cmp.welcomed = max(a.cmp.welcomed, d)
		a.cmp.mu.Unlock()
	}
}

// resyncWritten closes the jobs whose done record recs carried (written
// to the original disks: every difference is there).
func (a *recAgent) resyncWritten(recs []replication.Record) {
	a.cmp.mu.Lock()
	defer a.cmp.mu.Unlock()
	for _, r := range recs {
		if r.Kind != replication.KindResync || r.Flags&replication.FlagDone == 0 {
			continue
		}
		if j := a.cmp.jobs[r.Offset]; j != nil {
			select {
			case <-j.done:
			default:
				close(j.done)
			}
		}
	}
}

// through waits until every record up to seq is on the original disks
// (the stream live, acknowledged past it).
func (a *recAgent) through(ctx context.Context, seq uint64) error {
	for {
		a.mu.Lock()
		acked, ch := a.acked, a.changed
		a.mu.Unlock()
		a.cmp.mu.Lock()
		w := a.cmp.welcomed
		a.cmp.mu.Unlock()
		if max(acked, w) >= seq {
			return nil
		}
		select {
		case <-ch:
		case <-a.stopped:
			return errors.New("the failover ended")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// hashes answers a batch of the recovered agent's resync: the original
// disk's hashes of the chunks that differ, compared once the log up to
// the job's start record is on the original.
func (a *recAgent) hashes(ctx context.Context, h replication.Hashes) replication.Want {
	w := replication.Want{Job: h.Job, Batch: h.Batch}
	a.cmp.mu.Lock()
	j := a.cmp.jobs[h.Job]
	a.cmp.mu.Unlock()
	chunks, compared, differ, err := a.compareChunks(ctx, h)
	if err != nil {
		w.Error = err.Error()
		if j != nil {
			j.errMu.Lock()
			j.err = w.Error
			j.errMu.Unlock()
		}
		return w
	}
	w.Chunks = chunks
	if j != nil {
		j.compared.Add(compared)
		j.differ.Add(differ)
		j.errMu.Lock()
		j.err = ""
		j.errMu.Unlock()
	}
	return w
}

// compareChunks compares a batch's chunk hashes with the original disk's
// and returns the differing chunks with the original's leaf hashes, the
// bytes compared and the bytes of the chunks that differ.
func (a *recAgent) compareChunks(ctx context.Context, h replication.Hashes) ([]replication.WantChunk, int64, int64, error) {
	if err := a.through(ctx, h.After); err != nil {
		return nil, 0, 0, err
	}
	s, m := a.s, store.Machine{ID: a.machineID, Name: a.machine}
	nop := func(string) {}
	var out []replication.WantChunk
	var compared, differ int64
	for i := 0; i < len(h.Offs); {
		// A run of contiguous chunks, asked in one REVERSE_SUM.
		n := 1
		for i+n < len(h.Offs) && n < replication.MaxReverseHashes && h.Offs[i+n] == h.Offs[i]+int64(n)*replication.HashChunk {
			n++
		}
		var sums []replication.Hash
		var size int64
		err := s.retryOriginal(ctx, m, nop, func() error {
			var err error
			sums, size, err = s.ps.ReverseBlockSums(ctx, a.machineID, a.failoverID, h.Disk, h.Offs[i], replication.HashChunk, n)
			return err
		})
		if err != nil {
			return nil, 0, 0, fmt.Errorf("chunk hashes of the original disk %d at %d: %w", h.Disk, h.Offs[i], err)
		}
		if len(sums) != n {
			return nil, 0, 0, fmt.Errorf("the original disk %d (%d bytes) ends before the recovered agent's chunk at %d", h.Disk, size, h.Offs[i+len(sums)])
		}
		for k := range n {
			off := h.Offs[i+k]
			clen := min(replication.HashChunk, size-off)
			compared += clen
			if string(sums[k][:]) == string(h.Hashes[16*(i+k):16*(i+k+1)]) {
				continue
			}
			differ += clen
			count := int((clen + replication.HashBlock - 1) / replication.HashBlock)
			var leaves []replication.Hash
			err := s.retryOriginal(ctx, m, nop, func() error {
				var err error
				leaves, _, err = s.ps.ReverseLeaves(ctx, a.machineID, a.failoverID, h.Disk, off, count)
				return err
			})
			if err != nil {
				return nil, 0, 0, fmt.Errorf("block hashes of the original disk %d at %d: %w", h.Disk, off, err)
			}
			wc := replication.WantChunk{Off: off, Leaves: make([]byte, 0, 16*len(leaves))}
			for _, l := range leaves {
				wc.Leaves = append(wc.Leaves, l[:]...)
			}
			out = append(out, wc)
		}
		i += n
	}
	return out, compared, differ, nil
}

// errAgentPathLost says the recovered agent's resync cannot finish
// through its stream (held: it lost records): the SAS path is taken.
var errAgentPathLost = errors.New("the recovered VM's agent's stream is held")

// resyncThroughAgent is reprotect's compare of a failover to Azure whose
// recovered VM's agent is connected (ra): the stream made live, then
// one resync job per disk run by the agent against the original disks,
// as job j's step. It returns the pass (path agent), or
// errAgentPathLost (or ok false: the agent was welcomed again before the
// stream went live) for the caller to take the SAS path.
func (s *Server) resyncThroughAgent(ctx context.Context, j *job, m store.Machine, f store.Failover, ra *recAgent) (vmPass, bool, error) {
	epoch, connected := ra.beginCompare()
	if !connected {
		return vmPass{}, false, nil
	}
	floor, logID, ok := ra.goLive(epoch)
	if !ok {
		return vmPass{}, false, nil
	}
	name := m.Name + ": compare through the recovered agent"
	detail := fmt.Sprintf("the agent in VM %s compares its disks with the original ones (chunk hashes) and sends the blocks that differ through its stream", ra.vm)
	sent0 := ra.sent.Load()
	var total int64
	for _, md := range m.Disks {
		total += md.Size
	}
	p := vmPass{path: pathAgent, from: floor, log: logID, agent: ra.uuid}
	var compared, differ int64
	for _, md := range machineDisks(m) {
		id := recJobID.Add(1)
		rj := &recResync{disk: md.Index, done: make(chan struct{})}
		ra.cmp.mu.Lock()
		if ra.cmp.jobs == nil {
			ra.cmp.jobs = map[uint64]*recResync{}
		}
		ra.cmp.jobs[id] = rj
		ra.cmp.mu.Unlock()
		frame, err := replication.JSONFrame(replication.FrameResync, replication.ResyncJob{ID: id, Disk: md.Index,
			Reason: fmt.Sprintf("reprotect of failover %s: compare with the original disk", f.ID)})
		if err != nil {
			return p, false, err
		}
		var sentGen uint64
	wait:
		for {
			ra.mu.Lock()
			gen, conns, live, ch := ra.gen, ra.conns, ra.live, ra.changed
			if conns > 0 && gen != sentGen {
				// Asked again on each new connection (the same job: the
				// agent, running it already, goes on).
				select {
				case ra.out <- frame:
					sentGen = gen
				default:
				}
			}
			ra.mu.Unlock()
			if !live {
				return p, false, errAgentPathLost
			}
			rj.errMu.Lock()
			why := rj.err
			rj.errMu.Unlock()
			if conns == 0 {
				why = "waiting for the agent in VM " + ra.vm + " to connect"
			}
			st := api.JobStep{Name: name, State: "running", Total: total, Done: compared + rj.compared.Load(),
				Detail: fmt.Sprintf("%s (%d bytes in chunks that differ, %d bytes sent)", detail, differ+rj.differ.Load(), ra.sent.Load()-sent0)}
			if why != "" {
				st.Detail += " (" + why + ")"
			}
			j.update(st)
			select {
			case <-rj.done:
				break wait
			case <-ch:
			case <-ra.stopped:
				return p, false, errors.New("the failover ended")
			case <-ctx.Done():
				j.update(api.JobStep{Name: name, State: "failed", Detail: ctx.Err().Error()})
				return p, false, ctx.Err()
			}
		}
		compared += rj.compared.Load()
		differ += rj.differ.Load()
		ra.cmp.mu.Lock()
		delete(ra.cmp.jobs, id)
		ra.cmp.mu.Unlock()
	}
	p.compared, p.differ, p.sent = compared, differ, ra.sent.Load()-sent0
	j.update(api.JobStep{Name: name, State: "done", Total: total, Done: compared,
		Detail: fmt.Sprintf("%d bytes compared through the agent in VM %s, %d bytes in chunks that differ, %d bytes sent by its stream", compared, ra.vm, differ, p.sent)})
	return p, true, nil
}

// diskSum asks the recovered agent, frozen under its failover, for the
// SHA-256 of its whole disk idx (REVERSE_SUM on its connection); an
// error if it is not connected, refuses or goes away first.
func (a *recAgent) diskSum(ctx context.Context, idx uint32) (string, int64, error) {
	seq := recFreezeReq.Add(1)
	f, err := replication.JSONFrame(replication.FrameReverseSum, replication.ReverseSum{ID: a.failoverID, Seq: seq, Disk: idx})
	if err != nil {
		return "", 0, err
	}
	ch := make(chan replication.ReverseAck, 1)
	a.cmp.mu.Lock()
	if a.cmp.sums == nil {
		a.cmp.sums = map[uint64]chan replication.ReverseAck{}
	}
	a.cmp.sums[seq] = ch
	a.cmp.mu.Unlock()
	defer func() {
		a.cmp.mu.Lock()
		delete(a.cmp.sums, seq)
		a.cmp.mu.Unlock()
	}()
	a.mu.Lock()
	gen, conns := a.gen, a.conns
	queued := false
	if conns > 0 {
		select {
		case a.out <- f:
			queued = true
		default:
		}
	}
	a.mu.Unlock()
	if !queued {
		return "", 0, errors.New("not connected")
	}
	for {
		a.mu.Lock()
		same, changed := a.gen == gen && a.conns > 0, a.changed
		a.mu.Unlock()
		if !same {
			return "", 0, errors.New("its connection ended before it answered")
		}
		select {
		case ack := <-ch:
			if ack.Error != "" {
				return "", 0, errors.New(ack.Error)
			}
			return ack.Sum, ack.Size, nil
		case <-changed:
		case <-ctx.Done():
			return "", 0, ctx.Err()
		}
	}
}

// verifyRecoveredAgent, in failback once a failover to Azure's recovered
// agent is frozen and drained (before the deallocation), compares each
// of its disks with the original by SHA-256, both read where they are.
// All equal: sm.rec.sums holds them and failback needs no pass over the
// stopped VM's disks. Otherwise (a difference, an agent gone or
// refusing) the step says why and the SAS pass runs after the
// deallocation as before.
func (s *Server) verifyRecoveredAgent(ctx context.Context, j *job, sm *switchMember) error {
	if sm.f.Dest != api.ToAzure || !sm.rec.drained {
		return nil
	}
	a := s.recAgents.of(sm.m.ID, sm.f.ID)
	if a == nil {
		return nil
	}
	name := sm.m.Name + ": verify through the recovered agent"
	var total, done int64
	for _, md := range sm.m.Disks {
		total += md.Size
	}
	j.update(api.JobStep{Name: name, State: "running", Total: total, Detail: fmt.Sprintf("SHA-256 of each disk of the frozen agent in VM %s against the original's", a.vm)})
	var sums []string
	for _, md := range machineDisks(sm.m) {
		rsum, rsize, err := a.diskSum(ctx, md.Index)
		if ctx.Err() != nil {
			j.update(api.JobStep{Name: name, State: "failed", Detail: ctx.Err().Error()})
			return ctx.Err()
		}
		why := ""
		if err != nil {
			why = fmt.Sprintf("the agent in VM %s did not give disk %s's sum: %v", a.vm, md.Name, err)
		} else {
			var osum string
			var osize int64
			err = s.retryOriginal(ctx, sm.m, func(string) {}, func() error {
				var err error
				osum, osize, err = s.ps.ReverseSum(ctx, sm.m.ID, sm.f.ID, md.Index)
				return err
			})
			switch {
			case ctx.Err() != nil:
				j.update(api.JobStep{Name: name, State: "failed", Detail: ctx.Err().Error()})
				return ctx.Err()
			case err != nil:
				why = fmt.Sprintf("the original disk %s's sum: %v", md.Name, err)
			case osum != rsum || osize != rsize || rsize != md.Size:
				why = fmt.Sprintf("disk %s differs: the recovered agent's sha256 %s (%d bytes), the original's %s (%d bytes)", md.Name, rsum, rsize, osum, osize)
			}
		}
		if why != "" {
			j.update(api.JobStep{Name: name, State: "done", Total: total, Done: done,
				Detail: "not verified: " + why + "; the VM's disks are read through read SASes after its deallocation, and what differs sent"})
			return nil
		}
		sums = append(sums, rsum)
		done += rsize
		j.update(api.JobStep{Name: name, State: "running", Total: total, Done: done, Detail: fmt.Sprintf("SHA-256 of each disk of the frozen agent in VM %s against the original's", a.vm)})
	}
	sm.rec.sums = sums
	j.update(api.JobStep{Name: name, State: "done", Total: total, Done: done,
		Detail: fmt.Sprintf("%d bytes: every disk of the frozen agent in VM %s equals the original (SHA-256): no pass over its disks after the deallocation", done, a.vm)})
	return nil
}

// passByAgent is drainMember for a member verified through its recovered
// agent (sm.rec.sums): the VM's disks listed (their sizes), no read of
// them; verifyMember then checks the original disks against those sums.
func (s *Server) passByAgent(ctx context.Context, j *job, sm *switchMember) error {
	disks, err := s.recoveredDisks(ctx, j, sm.vm, sm.m)
	if err != nil {
		return err
	}
	var compared int64
	for _, d := range disks {
		compared += d.size
	}
	sm.disks, sm.pass = disks, vmPass{compared: compared, sums: sm.rec.sums}
	return nil
}

// resyncHeldAgent, in failback before the freeze, makes the held stream
// of a failover to Azure's recovered agent (it lost records in a hard
// stop, or a server restart found its record held) live again by the
// compare through it: the forward direction's answer to lost records, a
// resync, rather than a pass over the stopped VM's disks through SAS.
// Not connected, or its stream lost again meanwhile: nothing done, the
// path without the agent follows.
func (s *Server) resyncHeldAgent(ctx context.Context, j *job, sm *switchMember) error {
	if sm.f.Dest != api.ToAzure {
		return nil
	}
	a := s.recAgents.of(sm.m.ID, sm.f.ID)
	if a == nil {
		return nil
	}
	a.mu.Lock()
	held, connected := !a.live, a.conns > 0
	a.mu.Unlock()
	if !held || !connected {
		return nil
	}
	_, _, err := s.resyncThroughAgent(ctx, j, sm.m, sm.f, a)
	if errors.Is(err, errAgentPathLost) {
		return nil
	}
	return err
}
