package procserver

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/asrdr/asr/replication"
)

// Failback's reverse direction (docs/PROTOCOL.md, "Failback"): the server
// writes the failed-over machine's changes into the original disks through
// the original agent, frozen under the planned failover. Each REVERSE
// frame (and each REVERSE_SUM) gets one REVERSE_ACK with its sequence
// number; the callers below wait for it. A connection that ends before
// the answer is ErrNotConnected: the caller sends again (writes are
// idempotent), on the agent's next connection.

// ErrReverseRefused wraps the agent's refusal of a reverse frame (not
// frozen under that failover, an unknown disk, a range outside it, a
// write that failed): nothing was written.
var ErrReverseRefused = errors.New("refused by the agent")

// reverser matches a machine's REVERSE_ACKs with their waiting callers.
type reverser struct {
	mu      sync.Mutex
	waiting map[uint64]chan replication.ReverseAck
}

func (r *reverser) want(seq uint64) chan replication.ReverseAck {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.waiting == nil {
		r.waiting = map[uint64]chan replication.ReverseAck{}
	}
	ch := make(chan replication.ReverseAck, 1)
	r.waiting[seq] = ch
	return ch
}

func (r *reverser) forget(seq uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.waiting, seq)
}

// ack delivers an answer; one nobody waits for (the caller gave up) is
// dropped.
func (r *reverser) ack(a replication.ReverseAck) {
	r.mu.Lock()
	ch := r.waiting[a.Seq]
	delete(r.waiting, a.Seq)
	r.mu.Unlock()
	if ch != nil {
		ch <- a
	}
}

// ReverseWrite writes data at off of disk of machineID's original disk,
// through its agent frozen under planned failover id, and returns once
// the agent reports it durable there. ErrNotConnected: no connection, or
// it ended before the answer (send again); ErrReverseRefused: the agent
// refused it.
func (s *Server) ReverseWrite(ctx context.Context, machineID, id string, disk uint32, off int64, data []byte) error {
	m, err := s.knownMachine(machineID)
	if err != nil {
		return err
	}
	seq := s.reqID.Add(1)
	f, err := replication.ReverseFrame(seq, replication.ReverseData{ID: id, Disk: disk, Off: off, Data: data})
	if err != nil {
		return err
	}
	_, err = m.reverse(ctx, f, seq)
	return err
}

// ReverseSum returns the SHA-256 (hex) and size of machineID's original
// disk as its agent, frozen under planned failover id, reads it whole.
func (s *Server) ReverseSum(ctx context.Context, machineID, id string, disk uint32) (string, int64, error) {
	m, err := s.knownMachine(machineID)
	if err != nil {
		return "", 0, err
	}
	seq := s.reqID.Add(1)
	f, err := replication.JSONFrame(replication.FrameReverseSum, replication.ReverseSum{ID: id, Seq: seq, Disk: disk})
	if err != nil {
		return "", 0, err
	}
	a, err := m.reverse(ctx, f, seq)
	return a.Sum, a.Size, err
}

// ReverseBlockSums returns the block sums (replication.BlockSum) of
// count blocks of block bytes from off of machineID's original disk, as
// its agent, frozen under failover id, reads them (the last one cut at
// the disk's end), and the disk's size. The count of sums is checked
// against that size.
func (s *Server) ReverseBlockSums(ctx context.Context, machineID, id string, disk uint32, off, block int64, count int) ([]replication.Hash, int64, error) {
	return s.reverseHashes(ctx, machineID, replication.ReverseSum{ID: id, Disk: disk, Off: off, Block: block, Count: count})
}

// ReverseLeaves returns the resync's leaf hashes (replication.HashData)
// of count 4 KiB blocks from off of machineID's original disk, as
// ReverseBlockSums does for block sums: a recovered VM's agent's resync
// against the original disks asks them for its WANT.
func (s *Server) ReverseLeaves(ctx context.Context, machineID, id string, disk uint32, off int64, count int) ([]replication.Hash, int64, error) {
	return s.reverseHashes(ctx, machineID, replication.ReverseSum{ID: id, Disk: disk, Off: off, Block: replication.HashBlock, Count: count, Leaves: true})
}

// reverseHashes asks the block hashes req names (its Seq set here).
func (s *Server) reverseHashes(ctx context.Context, machineID string, req replication.ReverseSum) ([]replication.Hash, int64, error) {
	m, err := s.knownMachine(machineID)
	if err != nil {
		return nil, 0, err
	}
	seq := s.reqID.Add(1)
	req.Seq = seq
	if err := req.Validate(); err != nil {
		return nil, 0, err
	}
	f, err := replication.JSONFrame(replication.FrameReverseSum, req)
	if err != nil {
		return nil, 0, err
	}
	a, err := m.reverse(ctx, f, seq)
	if err != nil {
		return nil, 0, err
	}
	n := req.ReverseBlocks(a.Size)
	if len(a.Hashes) == 0 || len(a.Hashes) != n*len(replication.Hash{}) {
		return nil, a.Size, fmt.Errorf("machine %s: %d bytes of block sums for %d blocks of a %d-byte disk (is the agent older than the server?)", m.id, len(a.Hashes), n, a.Size)
	}
	out := make([]replication.Hash, n)
	for i := range out {
		copy(out[i][:], a.Hashes[16*i:])
	}
	return out, a.Size, nil
}

func (m *machine) reverse(ctx context.Context, f replication.Frame, seq uint64) (replication.ReverseAck, error) {
	ch := m.rev.want(seq)
	defer m.rev.forget(seq)
	cc := m.sess.waitConn(ctx, connectGrace)
	if cc == nil {
		if ctx.Err() != nil {
			return replication.ReverseAck{}, ctx.Err()
		}
		return replication.ReverseAck{}, fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	}
	select {
	case cc.out <- f:
	case <-cc.done:
		return replication.ReverseAck{}, fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	case <-ctx.Done():
		return replication.ReverseAck{}, ctx.Err()
	}
	select {
	case a := <-ch:
		if a.Error != "" {
			return a, fmt.Errorf("machine %s: %s: %w", m.id, a.Error, ErrReverseRefused)
		}
		return a, nil
	case <-cc.done:
		return replication.ReverseAck{}, fmt.Errorf("machine %s: the connection ended before the answer: %w", m.id, ErrNotConnected)
	case <-ctx.Done():
		return replication.ReverseAck{}, ctx.Err()
	}
}
