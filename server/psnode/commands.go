package psnode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

// commands runs what the configuration server asks in its heartbeat
// replies (api.PSCommand): each id once, while the replies name it; the
// result is sent in every heartbeat until a reply no longer names the
// command (the configuration server has it). A restarted process server
// runs a command still named again (a point request makes one more
// point).
type commands struct {
	mu      sync.Mutex
	running map[string]bool
	results map[string]api.PSCommandResult
}

// pending are the results to send: in the order of their ids, within
// api.MaxPSCommands and api.MaxPSResultsBytes (one at least); the others
// go in the next heartbeats, once the configuration server has these.
func (c *commands) pending() []api.PSCommandResult {
	c.mu.Lock()
	defer c.mu.Unlock()
	ids := slices.Sorted(maps.Keys(c.results))
	out := make([]api.PSCommandResult, 0, min(len(ids), api.MaxPSCommands))
	size := 0
	for _, id := range ids {
		r := c.results[id]
		b, err := json.Marshal(r)
		if err != nil {
			continue // not sent: no result type fails to marshal
		}
		if size += len(b); len(out) == api.MaxPSCommands || size > api.MaxPSResultsBytes && len(out) > 0 {
			break
		}
		out = append(out, r)
	}
	return out
}

// follow takes a reply's commands: results sent and no longer named are
// forgotten; commands neither running nor done start (run, one goroutine
// each, owned by the node).
func (n *Node) followCommands(sent []api.PSCommandResult, cmds []api.PSCommand) {
	c := &n.cmds
	named := make(map[string]bool, len(cmds))
	for _, cmd := range cmds {
		named[cmd.ID] = true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range sent {
		if !named[r.ID] {
			delete(c.results, r.ID)
		}
	}
	if len(cmds) > api.MaxPSCommands {
		n.log.Error("the configuration server sent too many commands; ignored", "commands", len(cmds), "max", api.MaxPSCommands)
		return
	}
	for _, cmd := range cmds {
		if _, done := c.results[cmd.ID]; done || c.running[cmd.ID] || n.ctx.Err() != nil {
			continue
		}
		c.running[cmd.ID] = true
		n.wg.Go(func() {
			r := n.run(cmd)
			r.ID = cmd.ID
			c.mu.Lock()
			delete(c.running, cmd.ID)
			c.results[cmd.ID] = r
			c.mu.Unlock()
			n.kickBeat() // the result at once, not at the next beat
		})
	}
}

// run runs one command (an image's stream outlives the command's timeout,
// which bounds its start: image.go).
func (n *Node) run(cmd api.PSCommand) api.PSCommandResult {
	if cmd.ID == "" || len(cmd.ID) > 64 {
		return api.PSCommandResult{Error: fmt.Sprintf("command id %q: want 1 to 64 bytes", cmd.ID)}
	}
	if err := n.serves(cmd.MachineID); err != nil {
		return api.PSCommandResult{Error: err.Error()}
	}
	timeout := cmd.Timeout
	if timeout <= 0 || timeout > api.MaxPSCommandTimeout {
		timeout = api.MaxPSCommandTimeout
	}
	ctx, cancel := context.WithTimeout(n.ctx, timeout)
	defer cancel()
	switch cmd.Kind {
	case api.PSCommandPoint:
		n.log.Info("recovery point requested by the configuration server", "machine", cmd.MachineID, "app", cmd.App, "command", cmd.ID)
		p, err := n.ps.RequestPoint(ctx, cmd.MachineID, cmd.App)
		if err != nil {
			return api.PSCommandResult{Error: err.Error(), NotConnected: errors.Is(err, procserver.ErrNotConnected)}
		}
		return api.PSCommandResult{Point: &p}
	case api.PSCommandResync:
		if cmd.Resync == nil {
			return api.PSCommandResult{Error: "a resync command without its job"}
		}
		n.log.Info("resync started by the configuration server", "machine", cmd.MachineID, "disk", cmd.Resync.Disk, "job", cmd.Resync.ID, "command", cmd.ID)
		err := n.ps.StartResync(ctx, cmd.MachineID, *cmd.Resync, cmd.IfMarked)
		if err != nil {
			return api.PSCommandResult{Error: err.Error(), NotConnected: errors.Is(err, procserver.ErrNotConnected), NotNeeded: errors.Is(err, procserver.ErrResyncNotNeeded)}
		}
		return api.PSCommandResult{}
	case api.PSCommandPrune:
		if len(cmd.Keep) > api.MaxPSPruneKeep {
			return api.PSCommandResult{Error: fmt.Sprintf("a prune keeping %d points by name, at most %d", len(cmd.Keep), api.MaxPSPruneKeep)}
		}
		keep := make(map[uint64]bool, len(cmd.Keep))
		for _, k := range cmd.Keep {
			keep[k] = true
		}
		deleted, err := n.ps.PrunePoints(ctx, cmd.MachineID, cmd.Before, keep)
		if len(deleted) > 0 {
			n.log.Info("recovery points pruned", "machine", cmd.MachineID, "count", len(deleted), "before", cmd.Before)
		}
		if err != nil {
			return api.PSCommandResult{Error: err.Error(), Deleted: len(deleted)}
		}
		return api.PSCommandResult{Deleted: len(deleted)}
	case api.PSCommandScrub:
		n.log.Info("scrub asked by the configuration server", "machine", cmd.MachineID, "scheduled", cmd.Scheduled, "command", cmd.ID)
		rep, err := n.ps.Scrub(ctx, cmd.MachineID, cmd.Scheduled)
		if err != nil {
			return api.PSCommandResult{Error: err.Error()}
		}
		notListed := boundScrub(&rep)
		return api.PSCommandResult{Scrub: &rep, ScrubDamagedNotListed: notListed}
	case api.PSCommandCheckPoint:
		if cmd.PointID == "" {
			return api.PSCommandResult{Error: "a point check without its point"}
		}
		n.log.Info("point check asked by the configuration server", "machine", cmd.MachineID, "point", cmd.PointID, "command", cmd.ID)
		pts, err := n.ps.CheckPoint(ctx, cmd.MachineID, cmd.PointID)
		if err != nil {
			return api.PSCommandResult{Error: err.Error()}
		}
		rep := procserver.ScrubReport{Points: pts}
		notListed := boundScrub(&rep)
		return api.PSCommandResult{Scrub: &rep, ScrubDamagedNotListed: notListed}
	case api.PSCommandImage:
		return n.image(ctx, cmd)
	case api.PSCommandGroupCut:
		if cmd.Cut != nil {
			n.log.Info("group cut asked by the configuration server", "machine", cmd.MachineID, "cut", cmd.Cut.ID, "app", cmd.Cut.App, "command", cmd.ID)
		}
		return groupCut(ctx, n.cutTransport(), cmd)
	}
	return api.PSCommandResult{Error: fmt.Sprintf("unknown command %q (this process server is older than the configuration server?)", cmd.Kind)}
}

// kickBeat has the heartbeat loop send a heartbeat now.
func (n *Node) kickBeat() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// waitBeat waits d, or until kickBeat, or ctx ends.
func (n *Node) waitBeat(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
	case <-n.kick:
	}
	return nil
}

// boundScrub cuts a scrub report to what a command result carries
// (api.MaxPSScrubEntries disks and points, api.MaxPSScrubDamaged damaged
// blocks listed each) and returns the damaged blocks left out (their
// damage also reached the configuration server as reports' news).
func boundScrub(rep *procserver.ScrubReport) int64 {
	var left int64
	if len(rep.Disks) > api.MaxPSScrubEntries {
		for _, d := range rep.Disks[api.MaxPSScrubEntries:] {
			left += int64(len(d.Damaged))
		}
		rep.Disks = rep.Disks[:api.MaxPSScrubEntries]
	}
	if len(rep.Points) > api.MaxPSScrubEntries {
		for _, p := range rep.Points[api.MaxPSScrubEntries:] {
			left += int64(len(p.Damaged))
		}
		rep.Points = rep.Points[:api.MaxPSScrubEntries]
	}
	for i := range rep.Disks {
		if d := &rep.Disks[i]; len(d.Damaged) > api.MaxPSScrubDamaged {
			left += int64(len(d.Damaged) - api.MaxPSScrubDamaged)
			d.Damaged = d.Damaged[:api.MaxPSScrubDamaged]
		}
	}
	for i := range rep.Points {
		if p := &rep.Points[i]; len(p.Damaged) > api.MaxPSScrubDamaged {
			left += int64(len(p.Damaged) - api.MaxPSScrubDamaged)
			p.Damaged = p.Damaged[:api.MaxPSScrubDamaged]
		}
	}
	// The whole report's lists: the disks' first, then the points'.
	room := api.MaxPSScrubDamagedTotal
	cut := func(l []int64) []int64 {
		if len(l) > room {
			left += int64(len(l) - room)
			l = l[:room]
		}
		room -= len(l)
		return l
	}
	for i := range rep.Disks {
		rep.Disks[i].Damaged = cut(rep.Disks[i].Damaged)
	}
	for i := range rep.Points {
		rep.Points[i].Damaged = cut(rep.Points[i].Damaged)
	}
	return left
}
