package procserver

import (
	"context"
	"fmt"
	"sync"

	"github.com/asrdr/asr/replication"
)

type pointResult struct {
	p   replication.Point
	err error
}

// points are a machine's requests waiting for a recovery point (by the
// request id the agent's tag record carries) and group cuts waiting for
// the agent to hold its writes.
type points struct {
	mu      sync.Mutex
	waiters map[uint64]chan pointResult
	helds   map[uint64]chan struct{}
}

func newPoints() *points {
	return &points{waiters: map[uint64]chan pointResult{}, helds: map[uint64]chan struct{}{}}
}

// want registers request id; its point (or why none was made) comes on
// the channel.
func (ps *points) want(id uint64) <-chan pointResult {
	ch := make(chan pointResult, 1)
	ps.mu.Lock()
	ps.waiters[id] = ch
	ps.mu.Unlock()
	return ch
}

// wantCut registers group cut id: the agent's HELD, then its point, come
// on the channels. ok is false, and nothing is registered, when id is
// already waited on.
func (ps *points) wantCut(id uint64) (held <-chan struct{}, point <-chan pointResult, ok bool) {
	hc, pc := make(chan struct{}, 1), make(chan pointResult, 1)
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if _, busy := ps.waiters[id]; busy {
		return nil, nil, false
	}
	if _, busy := ps.helds[id]; busy {
		return nil, nil, false
	}
	ps.helds[id], ps.waiters[id] = hc, pc
	return hc, pc, true
}

// forget drops request id (answered, or given up).
func (ps *points) forget(id uint64) {
	ps.mu.Lock()
	delete(ps.waiters, id)
	delete(ps.helds, id)
	ps.mu.Unlock()
}

// resolve answers request id, if someone waits for it (0: a scheduled
// point, which no one does). It never blocks: the applier calls it.
func (ps *points) resolve(id uint64, r pointResult) {
	if id == 0 {
		return
	}
	ps.mu.Lock()
	ch, ok := ps.waiters[id]
	delete(ps.waiters, id)
	ps.mu.Unlock()
	if ok {
		ch <- r // buffered, and only one answer per registration
	}
}

// fail answers every request waiting for a point with err (the machine's
// protection ended).
func (ps *points) fail(err error) {
	ps.mu.Lock()
	ws := ps.waiters
	ps.waiters = map[uint64]chan pointResult{}
	ps.mu.Unlock()
	for _, ch := range ws {
		ch <- pointResult{err: err} // buffered, one answer per registration
	}
}

// held notes the agent's HELD for group cut id.
func (ps *points) held(id uint64) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ch, ok := ps.helds[id]; ok {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// requestPoint asks the agent for a recovery point now (request id) and
// waits until it is durable on the target.
func (m *machine) requestPoint(ctx context.Context, id uint64, app bool) (replication.Point, error) {
	f, err := replication.JSONFrame(replication.FrameTagReq, replication.TagRequest{ID: id, App: app})
	if err != nil {
		return replication.Point{}, err
	}
	cc := m.sess.waitConn(ctx, connectGrace)
	if cc == nil {
		return replication.Point{}, fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	}
	ch := m.points.want(id)
	defer m.points.forget(id)
	select {
	case cc.out <- f:
	case <-cc.done:
		return replication.Point{}, fmt.Errorf("machine %s: %w", m.id, ErrNotConnected)
	case <-ctx.Done():
		return replication.Point{}, ctx.Err()
	}
	select {
	case r := <-ch:
		return r.p, r.err
	case <-ctx.Done():
		return replication.Point{}, fmt.Errorf("waiting for the point: %w", ctx.Err())
	}
}
