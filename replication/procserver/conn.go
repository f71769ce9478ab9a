package procserver

import (
	"bufio"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
)

// agentConn is the server side of one agent connection.
type agentConn struct {
	c    net.Conn
	bw   *bufio.Writer
	log  *slog.Logger
	acks chan uint64            // latest durable seq (coalesced)
	out  chan replication.Frame // control frames to send
	done chan struct{}

	replaceOnce sync.Once
	replaced    chan struct{} // closed when the connection is replaced or closed

	stopped chan struct{} // closed once its reader stopped (detach)

	disks map[uint32]int64 // the machine's disk sizes as of the Hello
	epoch uint64           // its epoch as the cache's writer (cache.takeOver)
}

// disk returns a disk's size as the connection's Hello left it.
func (cc *agentConn) disk(index uint32) (int64, bool) {
	size, ok := cc.disks[index]
	return size, ok
}

// replace ends the connection: its reader stops at once, even while waiting
// for cache space, and can append nothing more.
func (cc *agentConn) replace() {
	cc.replaceOnce.Do(func() {
		close(cc.replaced)
		cc.c.Close()
	})
}

func (cc *agentConn) ack(seq uint64) {
	for {
		select {
		case cc.acks <- seq:
			return
		default:
		}
		select {
		case old := <-cc.acks:
			if old > seq {
				seq = old
			}
		default:
		}
	}
}

func (cc *agentConn) writeLoop() {
	defer cc.c.Close()
	for {
		var f replication.Frame
		select {
		case <-cc.done:
			return
		case seq := <-cc.acks:
			f = replication.Frame{Type: replication.FrameAck, Seq: seq}
		case f = <-cc.out:
		}
		cc.c.SetWriteDeadline(time.Now().Add(time.Minute))
		if err := replication.WriteFrame(cc.bw, &f); err != nil {
			return
		}
		if err := cc.bw.Flush(); err != nil {
			return
		}
	}
}
