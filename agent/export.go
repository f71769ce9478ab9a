package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"github.com/asrdr/asr/agent/nbd"
)

// nbdBudget bounds the payload bytes of the guest's NBD requests in
// flight, on every connection together (nbd.Server.MaxBytes): what the
// agent's memory holds for them. 16 MiB keeps fio's 1 MiB writes at
// iodepth 8 (8 MiB) unthrottled; a larger request still runs, alone.
const nbdBudget = 16 << 20

// exporter serves the protected disks over NBD (export name = disk name),
// scan-mode disks excepted: the guest uses those directly. It owns the
// listener and the server's goroutine (which waits for its connections).
type exporter struct {
	srv *nbd.Server
	l   net.Listener
	rt  *routines
}

// listenNBD listens on addr (unix:/path.sock or HOST:PORT) for the disks.
func listenNBD(parent context.Context, addr string, disks diskSet, log *slog.Logger) (*exporter, error) {
	srv := &nbd.Server{
		Lookup: func(name string) (nbd.Backend, bool) {
			for _, d := range disks {
				if d.Name == name && d.scan == nil {
					return d, true
				}
			}
			return nil, false
		},
		List: func() []string {
			var names []string
			for _, d := range disks {
				if d.scan == nil {
					names = append(names, d.Name)
				}
			}
			return names
		},
		Logger:   log,
		MaxBytes: nbdBudget,
	}
	l, err := nbd.Listen(addr)
	if err != nil {
		return nil, fmt.Errorf("NBD listen on %s: %w", addr, err)
	}
	return &exporter{srv: srv, l: l, rt: newRoutines(parent)}, nil
}

// addr is the address the server listens on.
func (e *exporter) addr() net.Addr { return e.l.Addr() }

// start serves the disks.
func (e *exporter) start() {
	e.rt.Go(func() { e.srv.Serve(e.rt.ctx, e.l) })
}

// Close stops serving, closes the listener and waits for the connections
// (their requests in flight finish).
func (e *exporter) Close() {
	e.l.Close()
	e.rt.Close()
}
