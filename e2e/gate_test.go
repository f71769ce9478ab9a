//go:build e2e

package e2e

import (
	"errors"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
)

// dataGate stands between the agents and the server's data listener and
// lets through, from the agents to the server, only the bytes the test
// allows; the server's replies always pass. A test holds replication with
// it in a state it wants to observe (the initial copy at some point) for as
// long as it looks, instead of racing the data: replication cannot move on
// until the test says so. Agents dial the host of the server's control URL
// at the data listener's port, so the server listens for data on 127.0.0.2
// and the gate on 127.0.0.1 at that port.
type dataGate struct {
	t        *testing.T
	l        net.Listener
	upstream string

	mu     sync.Mutex
	cond   *sync.Cond
	budget int64 // bytes the agents may still send; < 0: no limit
	gen    int   // changes of the budget by the test
	passed int64 // bytes sent to the server so far
	closed bool
	conns  map[net.Conn]bool
}

// gatedCluster starts a cluster whose agents reach the data listener
// through a gate, which holds everything until released or allowed.
func gatedCluster(t *testing.T) (*cluster, *dataGate) {
	c := &cluster{t: t, dir: t.TempDir(), agents: map[string]*agentProc{}}
	c.srvDir = filepath.Join(c.dir, "srv")
	c.listen = "127.0.0.1:" + freePort(t)
	c.dataHost = "127.0.0.2"
	t.Cleanup(c.dumpLogsOnFailure)
	// The gate takes its port first (no other process can take it after),
	// and the server's data listener the same port on 127.0.0.2.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, c.dataPort, _ = net.SplitHostPort(l.Addr().String())
	c.gate = newDataGate(t, l, c.dataHost+":"+c.dataPort)
	c.startServer()
	return c, c.gate
}

func newDataGate(t *testing.T, l net.Listener, upstream string) *dataGate {
	g := &dataGate{t: t, l: l, upstream: upstream, conns: map[net.Conn]bool{}}
	g.cond = sync.NewCond(&g.mu)
	go g.serve()
	t.Cleanup(g.close)
	return g
}

// hold lets nothing more through to the server.
func (g *dataGate) hold() { g.set(0) }

// release lets everything through from now on.
func (g *dataGate) release() { g.set(-1) }

// allow lets n more bytes through, then holds.
func (g *dataGate) allow(n int64) { g.set(n) }

func (g *dataGate) set(budget int64) {
	g.mu.Lock()
	g.budget = budget
	g.gen++
	g.cond.Broadcast()
	g.mu.Unlock()
}

// sent returns how many bytes the agents have sent to the server.
func (g *dataGate) sent() int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.passed
}

func (g *dataGate) close() {
	g.mu.Lock()
	g.closed = true
	for c := range g.conns {
		c.Close()
	}
	g.cond.Broadcast()
	g.mu.Unlock()
	g.l.Close()
}

func (g *dataGate) track(c net.Conn) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		c.Close()
		return false
	}
	g.conns[c] = true
	return true
}

func (g *dataGate) untrack(c net.Conn) {
	g.mu.Lock()
	delete(g.conns, c)
	g.mu.Unlock()
	c.Close()
}

func (g *dataGate) serve() {
	for {
		down, err := g.l.Accept()
		if err != nil {
			return
		}
		go g.pipe(down)
	}
}

// pipe joins an agent's connection to the server; either side closing
// closes both.
func (g *dataGate) pipe(down net.Conn) {
	if !g.track(down) {
		return
	}
	defer g.untrack(down)
	up, err := net.Dial("tcp", g.upstream)
	if err != nil {
		return
	}
	if !g.track(up) {
		return
	}
	defer g.untrack(up)
	done := make(chan struct{}, 2)
	go func() { io.Copy(down, up); done <- struct{}{} }()
	go func() { g.forward(up, down); done <- struct{}{} }()
	<-done
}

// forward copies from the agent to the server as far as the budget allows,
// waiting (without reading from the agent) while it is spent. A read takes
// its share of the budget first, so connections together never exceed it.
func (g *dataGate) forward(up, down net.Conn) error {
	buf := make([]byte, 64<<10)
	for {
		g.mu.Lock()
		for g.budget == 0 && !g.closed {
			g.cond.Wait()
		}
		if g.closed {
			g.mu.Unlock()
			return errors.New("gate closed")
		}
		n, limited, gen := int64(len(buf)), g.budget > 0, g.gen
		if limited {
			n = min(n, g.budget)
			g.budget -= n
		}
		g.mu.Unlock()
		r, err := down.Read(buf[:n])
		g.mu.Lock()
		if limited && g.gen == gen {
			g.budget += n - int64(r) // the unused share
		}
		g.passed += int64(r)
		g.mu.Unlock()
		if r > 0 {
			if _, werr := up.Write(buf[:r]); werr != nil {
				return werr
			}
		}
		if err != nil {
			return err
		}
	}
}
