package psnode

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

// What a scale-out process server reports of its machines to the
// configuration server, in its heartbeats (api.PSMachineReport): the
// process server's callbacks (procserver.Config) note their news here, on
// its replication path, and return at once; each heartbeat carries the
// news of at most maxMachines machines (at most maxPoints points and
// maxEvents events each; the rest waits for the next heartbeat). A
// heartbeat's news are numbered and sent again, unchanged, until a
// heartbeat is answered (the configuration server takes each number
// once), so nothing is lost or counted twice when a reply is lost.

// Bounds of what waits for the configuration server while it cannot be
// reached: past them the oldest events go (logged), and points go with a
// note that has the configuration server reread the machine's points
// from the catalog (their truth).
const (
	maxPendingPoints = 10000
	maxPendingEvents = 10000
)

// outbox holds the news not yet sent (pending) and the numbered report
// being sent (inflight) until a heartbeat carrying it is answered.
type outbox struct {
	log                               *slog.Logger
	maxMachines, maxPoints, maxEvents int
	run                               string // this run's id

	mu       sync.Mutex
	pending  map[string]*api.PSNews
	opened   map[string]bool // machines whose first catalog view this run was noted
	next     string          // the machine to start the next report at (round robin past the bound)
	seq      uint64
	inflight []api.PSMachineReport // news only (by machine), numbered seq
	sent     bool                  // inflight was sent (and not answered yet)
}

func newOutbox(log *slog.Logger, maxMachines int) *outbox {
	if maxMachines <= 0 || maxMachines > api.MaxPSReportMachines {
		maxMachines = api.MaxPSReportMachines
	}
	b := make([]byte, 8)
	rand.Read(b)
	return &outbox{log: log, maxMachines: maxMachines, maxPoints: api.MaxPSReportPoints, maxEvents: api.MaxPSReportEvents,
		run: hex.EncodeToString(b), pending: map[string]*api.PSNews{}, opened: map[string]bool{}}
}

// note merges news n2 into machine id's pending news.
func (o *outbox) note(id string, f func(n *api.PSNews)) {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := o.pending[id]
	if n == nil {
		n = &api.PSNews{}
		o.pending[id] = n
	}
	f(n)
	if over := len(n.Points) - maxPendingPoints; over > 0 {
		n.Points, n.Reconcile = n.Points[over:], true
		o.log.Warn("recovery points waiting for the configuration server dropped; it rereads them from the catalog", "machine", id, "points", over)
	}
	if over := len(n.Events) - maxPendingEvents; over > 0 {
		n.Events = n.Events[over:]
		o.log.Error("the configuration server could not take events for a long time; the oldest were dropped", "machine", id, "events", over)
	}
	if over := len(n.Damage) + len(n.Quarantine) - maxPendingEvents; over > 0 {
		n.Damage = n.Damage[min(over, len(n.Damage)):]
	}
}

// callbacks are the process server's callbacks that note news.
func (o *outbox) callbacks(cfg *procserver.Config) {
	cfg.OnState = func(m replication.MachineCatalog) {
		o.note(m.ID, func(n *api.PSNews) {
			n.State = &m
			if !o.opened[m.ID] {
				// Opened by this run (reported first as it opens): the
				// points an earlier run, or another process server, made
				// and did not report are reread from the catalog.
				o.opened[m.ID], n.Reconcile = true, true
			}
		})
	}
	cfg.OnPoint = func(id string, p replication.Point) {
		o.note(id, func(n *api.PSNews) { n.Points = append(n.Points, p) })
	}
	cfg.OnBytes = func(id string, b int64) {
		o.note(id, func(n *api.PSNews) { n.Bytes += b })
	}
	cfg.OnStatus = func(id string, st replication.Status) {
		if len(st.Events) == 0 && st.Resync == nil {
			return
		}
		o.note(id, func(n *api.PSNews) {
			n.Events = append(n.Events, st.Events...)
			if r := st.Resync; r != nil {
				n.Resyncs = slices.DeleteFunc(n.Resyncs, func(x replication.ResyncStatus) bool { return x.Disk == r.Disk })
				n.Resyncs = append(n.Resyncs, *r)
			}
		})
	}
	cfg.OnConnect = func(id string, h replication.Hello) {
		o.note(id, func(n *api.PSNews) { n.Connect, n.Refused = &h, "" })
	}
	cfg.OnRefused = func(id, reason string) {
		o.note(id, func(n *api.PSNews) { n.Refused = reason })
	}
	cfg.OnDamage = func(id string, d procserver.Damage) {
		if len(d.Blocks) > api.MaxPSDamageBlocks {
			d.Blocks = d.Blocks[:api.MaxPSDamageBlocks]
		}
		o.note(id, func(n *api.PSNews) { n.Damage = append(n.Damage, d) })
	}
	cfg.OnQuarantine = func(id, path, reason string) {
		o.note(id, func(n *api.PSNews) { n.Quarantine = append(n.Quarantine, api.PSQuarantine{Path: path, Reason: reason}) })
	}
}

// report is the next heartbeat's reports: the figures of the machines
// open (ps nil: none yet) and the numbered news, the same as the last
// heartbeat's if that one was not answered.
func (o *outbox) report(ps *procserver.Server, open []string) ([]api.PSMachineReport, uint64) {
	out, seq := o.reports(open)
	if ps != nil {
		// Not under o.mu: the applier reports (o.note) under its own
		// lock, which the figures take.
		now := time.Now()
		for i := range out {
			figures(&out[i], ps, now)
		}
	}
	return out, seq
}

// reports is report's list, without the figures.
func (o *outbox) reports(open []string) ([]api.PSMachineReport, uint64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.sent || len(o.inflight) == 0 {
		o.take()
	}
	o.sent = true
	// The figures of the machines with news first, then the others, up
	// to the bound, starting past the last report's first machine.
	out := make([]api.PSMachineReport, 0, min(len(open)+len(o.inflight), o.maxMachines))
	have := map[string]bool{}
	for _, r := range o.inflight {
		have[r.MachineID] = true
		out = append(out, r)
	}
	rest := slices.DeleteFunc(slices.Clone(open), func(id string) bool { return have[id] })
	i, _ := slices.BinarySearch(rest, o.next)
	rest = append(rest[i:], rest[:i]...)
	for _, id := range rest {
		if len(out) >= o.maxMachines {
			o.next = id
			break
		}
		out = append(out, api.PSMachineReport{MachineID: id})
	}
	if len(out) < o.maxMachines {
		o.next = ""
	}
	seq := o.seq
	if len(o.inflight) == 0 {
		seq = 0
	}
	return out, seq
}

// take moves pending news into a new numbered inflight report: at most
// maxMachines machines, maxPoints points and maxEvents events each.
func (o *outbox) take() {
	o.inflight = o.inflight[:0]
	ids := make([]string, 0, len(o.pending))
	for id := range o.pending {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	size := 0
	for _, id := range ids {
		if len(o.inflight) >= o.maxMachines {
			break
		}
		n := o.pending[id]
		sent := &api.PSNews{State: n.State, Bytes: n.Bytes, Resyncs: n.Resyncs, Connect: n.Connect, Refused: n.Refused, Reconcile: n.Reconcile}
		kp, ke, kd, kq := min(len(n.Points), o.maxPoints), min(len(n.Events), o.maxEvents), min(len(n.Damage), o.maxEvents), min(len(n.Quarantine), o.maxEvents)
		sent.Points, sent.Events, sent.Damage, sent.Quarantine = n.Points[:kp:kp], n.Events[:ke:ke], n.Damage[:kd:kd], n.Quarantine[:kq:kq]
		// The heartbeat's size is bounded too (the configuration server
		// reads at most api.MaxPSHeartbeatBytes): past the news budget
		// the other machines wait for the next heartbeat.
		b, _ := json.Marshal(sent)
		if size += len(b); size > api.MaxPSNewsBytes && len(o.inflight) > 0 {
			break
		}
		n.Points, n.Events, n.Damage, n.Quarantine = n.Points[kp:], n.Events[ke:], n.Damage[kd:], n.Quarantine[kq:]
		if len(n.Points)+len(n.Events)+len(n.Damage)+len(n.Quarantine) == 0 {
			delete(o.pending, id)
		} else {
			*n = api.PSNews{Points: n.Points, Events: n.Events, Damage: n.Damage, Quarantine: n.Quarantine}
		}
		o.inflight = append(o.inflight, api.PSMachineReport{MachineID: id, News: sent})
	}
	if len(o.inflight) > 0 {
		o.seq++
	}
}

// answered says a heartbeat carrying news number seq was answered: the
// configuration server has them.
func (o *outbox) answered(seq uint64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if seq != 0 && seq == o.seq && o.sent {
		o.inflight, o.sent = nil, false
	}
}

// figures fills a machine's report with the process server's figures.
func figures(r *api.PSMachineReport, ps *procserver.Server, now time.Time) {
	st, ok := ps.Stats(r.MachineID)
	if !ok {
		return
	}
	r.Connected, r.DurableSeq, r.AppliedSeq, r.CacheBytes, r.Segments = st.Connected, st.DurableSeq, st.AppliedSeq, st.CacheBytes, st.Segments
	r.ApplyError, r.BacklogBytes, r.AppliedBytes = st.ApplyError, st.BacklogBytes, st.AppliedBytes
	if !st.BacklogSince.IsZero() {
		r.BacklogAge = max(now.Sub(st.BacklogSince), 0)
	}
	if !st.StatusAt.IsZero() {
		s := st.LastStatus
		s.Events = nil
		r.Status, r.StatusAge = &s, max(now.Sub(st.StatusAt), 0)
	}
}
