package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

// What a scale-out process server reports of its machines in its
// heartbeats (api.PSMachineReport), and the commands the configuration
// server sends it in the replies (api.PSCommand). A machine on any
// process server is shown, alerted on and measured the same way:
//
//   - the figures of its built-in process server (procserver.MachineStats:
//     connected, the agent's last status, sequences, backlog) come from
//     the last heartbeat (machineStats), kept in memory like the built-in
//     one's;
//   - the news its process server's callbacks reported (catalog views,
//     points, bytes, agent events, resync progress, connections, refusals,
//     damage, quarantines) go to this server's callbacks of the same names
//     (applyPSNews), which note them for the mirror: the same path as the
//     built-in process server's;
//   - a recovery point asked for (`asr tag`) is a command the process
//     server runs (requestPoint), and the machine's point schedule rides on
//     its assignment (PSAssignment.Policy).

// psMachine is the last report of a machine on a scale-out process
// server.
type psMachine struct {
	ps    string
	stats procserver.MachineStats
}

// psRun is the newest numbered news taken from a process server's run.
type psRun struct {
	run string
	seq uint64
}

// psCmd is a command waiting for its result.
type psCmd struct {
	ps   string
	cmd  api.PSCommand
	done chan api.PSCommandResult
}

// machineStats is procserver.Server.Stats for a machine on any process
// server: the built-in one's, or a scale-out one's last report (not
// connected once its process server has sent no heartbeat for
// PSHeartbeatLost; ok false before its first report since this server
// started).
func (s *Server) machineStats(id string) (procserver.MachineStats, bool) {
	ps := s.assignedTo(id)
	if ps == "" {
		return s.ps.Stats(id)
	}
	s.pss.mu.Lock()
	defer s.pss.mu.Unlock()
	m, ok := s.pss.machines[id]
	if !ok || m.ps != ps {
		return procserver.MachineStats{}, false
	}
	st := m.stats
	if s.now().Sub(s.pss.last[ps].at) > s.cfg.PSHeartbeatLost {
		st.Connected = false
	}
	return st, true
}

// checkReports bounds what a heartbeat reports before anything of it is
// used.
func checkReports(hb *api.ProcessServerHeartbeat) error {
	if len(hb.Reports) > api.MaxPSReportMachines {
		return fmt.Errorf("heartbeat reports %d machines, at most %d", len(hb.Reports), api.MaxPSReportMachines)
	}
	if len(hb.Results) > api.MaxPSCommands {
		return fmt.Errorf("heartbeat carries %d command results, at most %d", len(hb.Results), api.MaxPSCommands)
	}
	for _, r := range hb.Results {
		if err := checkScrubResult(r); err != nil {
			return fmt.Errorf("command %s: %w", r.ID, err)
		}
		if len(r.Damaged) > api.MaxPSImageDamaged {
			return fmt.Errorf("command %s: an image's result listing %d damaged blocks, at most %d", r.ID, len(r.Damaged), api.MaxPSImageDamaged)
		}
		if r.DamagedNotListed < 0 || r.DamagedNotListed > replication.MaxDiskSize/4096 {
			return fmt.Errorf("command %s: an image's result counting %d damaged blocks not listed", r.ID, r.DamagedNotListed)
		}
	}
	for _, r := range hb.Reports {
		if len(r.MachineID) == 0 || len(r.MachineID) > 64 {
			return fmt.Errorf("report of machine %q: not a machine id", r.MachineID)
		}
		if r.Status != nil {
			if err := r.Status.Validate(); err != nil {
				return fmt.Errorf("machine %s: %w", r.MachineID, err)
			}
		}
		n := r.News
		if n == nil {
			continue
		}
		switch {
		case len(n.Points) > api.MaxPSReportPoints:
			return fmt.Errorf("machine %s: %d points in one heartbeat, at most %d", r.MachineID, len(n.Points), api.MaxPSReportPoints)
		case len(n.Events) > api.MaxPSReportEvents || len(n.Damage) > api.MaxPSReportEvents || len(n.Quarantine) > api.MaxPSReportEvents:
			return fmt.Errorf("machine %s: more than %d events, damage or quarantine reports in one heartbeat", r.MachineID, api.MaxPSReportEvents)
		case len(n.Resyncs) > replication.MaxDisks:
			return fmt.Errorf("machine %s: %d resyncs, at most %d", r.MachineID, len(n.Resyncs), replication.MaxDisks)
		case n.Bytes < 0:
			return fmt.Errorf("machine %s: %d bytes received", r.MachineID, n.Bytes)
		case n.State != nil && (n.State.ID != r.MachineID || len(n.State.Disks) > replication.MaxDisks):
			return fmt.Errorf("machine %s: a catalog view of machine %s with %d disks (at most %d)", r.MachineID, n.State.ID, len(n.State.Disks), replication.MaxDisks)
		case len(n.Refused) > 4096:
			return fmt.Errorf("machine %s: a refusal of %d bytes, at most 4096", r.MachineID, len(n.Refused))
		}
		for _, d := range n.Damage {
			if len(d.Blocks) > api.MaxPSDamageBlocks {
				return fmt.Errorf("machine %s: a damage report of %d blocks, at most %d", r.MachineID, len(d.Blocks), api.MaxPSDamageBlocks)
			}
		}
		if n.Connect != nil {
			if err := n.Connect.Validate(); err != nil {
				return fmt.Errorf("machine %s: %w", r.MachineID, err)
			}
		}
	}
	return nil
}

// psDone is a command's result to hand to its waiter.
type psDone struct {
	c *psCmd
	r api.PSCommandResult
}

// deliver hands each result to its waiter (after the heartbeat's news were
// noted: a waiter that syncs the mirror finds what the command reported).
func deliver(done []psDone) {
	for _, d := range done {
		d.c.done <- d.r // buffered, one result
	}
}

// takeReports keeps the figures of a heartbeat's reports, takes its
// command results out of the table (done, to deliver), and says whether
// its news are new (numbered past the last taken from the same run); it
// returns the commands pending for the process server. Under s.pss.mu.
func (s *Server) takeReports(name string, hb *api.ProcessServerHeartbeat, open map[string]bool) (fresh bool, cmds []api.PSCommand, done []psDone) {
	pss := &s.pss
	if pss.machines == nil {
		pss.machines, pss.runs, pss.cmds = map[string]psMachine{}, map[string]psRun{}, map[string]*psCmd{}
	}
	if hb.ReportSeq != 0 {
		if r := pss.runs[name]; r.run != hb.Run || hb.ReportSeq > r.seq {
			fresh = true
			pss.runs[name] = psRun{run: hb.Run, seq: hb.ReportSeq}
		}
	}
	now := time.Now() // the clock of the built-in process server's figures
	for _, r := range hb.Reports {
		if !open[r.MachineID] {
			continue // news only: it let the machine go since
		}
		st := procserver.MachineStats{Connected: r.Connected, DurableSeq: r.DurableSeq, AppliedSeq: r.AppliedSeq, CacheBytes: r.CacheBytes,
			Segments: r.Segments, ApplyError: r.ApplyError, BacklogBytes: r.BacklogBytes, AppliedBytes: r.AppliedBytes}
		if r.Status != nil {
			st.LastStatus, st.StatusAt = *r.Status, now.Add(-max(r.StatusAge, 0))
		}
		if r.BacklogBytes > 0 {
			st.BacklogSince = now.Add(-max(r.BacklogAge, 0))
		}
		pss.machines[r.MachineID] = psMachine{ps: name, stats: st}
	}
	for id, m := range pss.machines {
		if m.ps == name && !open[id] {
			delete(pss.machines, id)
		}
	}
	for _, r := range hb.Results {
		if c := pss.cmds[r.ID]; c != nil && c.ps == name {
			done = append(done, psDone{c, r}) // the command leaves the table now
			delete(pss.cmds, r.ID)
		}
	}
	for _, c := range pss.cmds {
		if c.ps == name && len(cmds) < api.MaxPSCommands {
			cmds = append(cmds, c.cmd)
		}
	}
	return fresh, cmds, done
}

// applyPSNews hands what a scale-out process server's callbacks reported
// of machine id to this server's callbacks of the same names.
func (s *Server) applyPSNews(id string, n *api.PSNews) {
	if n.Reconcile {
		s.mirror.note(id, &news{reconcile: true})
	}
	if n.State != nil {
		s.onState(*n.State)
	}
	for _, p := range n.Points {
		s.onPoint(id, p)
	}
	if n.Bytes > 0 {
		s.onBytes(id, n.Bytes)
	}
	if n.Connect != nil {
		s.onConnect(id, *n.Connect)
	}
	if n.Refused != "" {
		s.onRefused(id, n.Refused)
	}
	if len(n.Events) > 0 {
		s.onStatus(id, replication.Status{Events: n.Events})
	}
	for _, r := range n.Resyncs {
		s.onStatus(id, replication.Status{Resync: &r})
	}
	for _, d := range n.Damage {
		s.noteDamage(id, d)
	}
	for _, q := range n.Quarantine {
		s.onQuarantine(id, q.Path, q.Reason)
	}
}

// psCommand has scale-out process server ps run cmd (its id made here)
// and waits for the result, or for ctx (the command is then withdrawn:
// replies name it no more).
func (s *Server) psCommand(ctx context.Context, ps string, cmd api.PSCommand) (api.PSCommandResult, error) {
	c, withdraw, err := s.psSend(ps, cmd, nil)
	if err != nil {
		return api.PSCommandResult{}, err
	}
	defer withdraw()
	return s.psWait(ctx, c)
}

// psSend queues cmd for scale-out process server ps (its id made here;
// img, if not nil, is the image stream it is to POST, taken under the
// same id) until withdraw, which the caller must call.
func (s *Server) psSend(ps string, cmd api.PSCommand, img *psImage) (c *psCmd, withdraw func(), err error) {
	b := make([]byte, 12)
	rand.Read(b)
	cmd.ID = hex.EncodeToString(b)
	c = &psCmd{ps: ps, cmd: cmd, done: make(chan api.PSCommandResult, 1)}
	s.pss.mu.Lock()
	defer s.pss.mu.Unlock()
	if b := s.pss.last[ps]; b.at.IsZero() || s.now().Sub(b.at) > s.cfg.PSHeartbeatLost {
		return nil, nil, errorf(http.StatusConflict, "process server %s, which serves machine %s, sends no heartbeat: nothing was asked of it (asr ps list)", ps, cmd.MachineID)
	}
	if s.pss.cmds == nil {
		s.pss.machines, s.pss.runs, s.pss.cmds = map[string]psMachine{}, map[string]psRun{}, map[string]*psCmd{}
	}
	n := 0
	for _, o := range s.pss.cmds {
		if o.ps == ps {
			n++
		}
	}
	if n >= api.MaxPSCommands {
		return nil, nil, errorf(http.StatusServiceUnavailable, "process server %s has %d commands waiting already; try again", ps, n)
	}
	s.pss.cmds[cmd.ID] = c
	if img != nil {
		if s.pss.images == nil {
			s.pss.images = map[string]*psImage{}
		}
		s.pss.images[cmd.ID] = img
	}
	return c, func() {
		s.pss.mu.Lock()
		delete(s.pss.cmds, cmd.ID)
		if img != nil {
			delete(s.pss.images, cmd.ID)
			close(img.gone)
		}
		s.pss.mu.Unlock()
	}, nil
}

// psWait waits for command c's result, or for ctx.
func (s *Server) psWait(ctx context.Context, c *psCmd) (api.PSCommandResult, error) {
	ps, cmd := c.ps, c.cmd
	select {
	case r := <-c.done:
		return r, nil
	case <-ctx.Done():
		return api.PSCommandResult{}, fmt.Errorf("process server %s did not answer command %s (%s of machine %s): %w", ps, cmd.ID, cmd.Kind, cmd.MachineID, ctx.Err())
	}
}

// requestPoint asks machine id's agent, through the process server that
// serves it, for a recovery point now, and waits until it is on the
// target.
func (s *Server) requestPoint(ctx context.Context, id string, app bool) (replication.Point, error) {
	ps := s.assignedTo(id)
	if ps == "" {
		return s.ps.RequestPoint(ctx, id, app)
	}
	timeout := api.MaxPSCommandTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = min(time.Until(d), timeout)
	}
	r, err := s.psCommand(ctx, ps, api.PSCommand{Kind: api.PSCommandPoint, MachineID: id, App: app, Timeout: timeout})
	switch {
	case err != nil:
		return replication.Point{}, err
	case r.NotConnected:
		return replication.Point{}, fmt.Errorf("machine %s on process server %s: %w", id, ps, procserver.ErrNotConnected)
	case r.Error != "":
		return replication.Point{}, fmt.Errorf("process server %s: %s", ps, r.Error)
	case r.Point == nil:
		return replication.Point{}, errors.New("process server " + ps + " answered the point request without a point")
	}
	return *r.Point, nil
}

// psCommandWait bounds how long the resync loop waits for a scale-out
// process server to take a command (its next heartbeat).
const psCommandWait = 30 * time.Second

// startResync is procserver.Server.StartResync for a machine on any
// process server.
func (s *Server) startResync(ctx context.Context, id string, job replication.ResyncJob, ifMarked bool) error {
	ps := s.assignedTo(id)
	if ps == "" {
		return s.ps.StartResync(ctx, id, job, ifMarked)
	}
	ctx, cancel := context.WithTimeout(ctx, psCommandWait)
	defer cancel()
	r, err := s.psCommand(ctx, ps, api.PSCommand{Kind: api.PSCommandResync, MachineID: id, Resync: &job, IfMarked: ifMarked, Timeout: psCommandWait})
	switch {
	case err != nil:
		return err
	case r.NotNeeded:
		return procserver.ErrResyncNotNeeded
	case r.NotConnected:
		return fmt.Errorf("machine %s on process server %s: %w", id, ps, procserver.ErrNotConnected)
	case r.Error != "":
		return fmt.Errorf("process server %s: %s", ps, r.Error)
	}
	return nil
}

// prunePoints is procserver.Server.PrunePoints for a machine on any
// process server; deleted are the seqs of the points deleted (nil for a
// scale-out one's: the mirror rereads the machine's points from the
// catalog instead) and n how many.
func (s *Server) prunePoints(ctx context.Context, id string, before time.Time, keep map[uint64]bool) (deleted []uint64, n int, err error) {
	ps := s.assignedTo(id)
	if ps == "" {
		pts, err := s.ps.PrunePoints(ctx, id, before, keep)
		for _, p := range pts {
			deleted = append(deleted, p.Seq)
		}
		return deleted, len(pts), err
	}
	if len(keep) > api.MaxPSPruneKeep {
		return nil, 0, fmt.Errorf("machine %s holds %d points for failovers, more than a prune command names (%d)", id, len(keep), api.MaxPSPruneKeep)
	}
	cmd := api.PSCommand{Kind: api.PSCommandPrune, MachineID: id, Before: before, Timeout: psCommandWait}
	for k := range keep {
		cmd.Keep = append(cmd.Keep, k)
	}
	ctx, cancel := context.WithTimeout(ctx, psCommandWait)
	defer cancel()
	r, err := s.psCommand(ctx, ps, cmd)
	if err != nil {
		return nil, 0, err
	}
	if r.Deleted > 0 {
		s.mirror.note(id, &news{reconcile: true})
	}
	if r.Error != "" {
		return nil, r.Deleted, fmt.Errorf("process server %s: %s", ps, r.Error)
	}
	return nil, r.Deleted, nil
}

// checkScrubResult bounds a scrub's report in a command result.
func checkScrubResult(r api.PSCommandResult) error {
	rep := r.Scrub
	if rep == nil {
		return nil
	}
	if len(rep.Disks) > api.MaxPSScrubEntries || len(rep.Points) > api.MaxPSScrubEntries {
		return fmt.Errorf("a scrub report of %d disks and %d points, at most %d each", len(rep.Disks), len(rep.Points), api.MaxPSScrubEntries)
	}
	for _, d := range rep.Disks {
		if len(d.Damaged) > api.MaxPSScrubDamaged || d.Checked < 0 {
			return fmt.Errorf("a scrub of disk %s listing %d damaged blocks (at most %d), %d checked", d.Disk, len(d.Damaged), api.MaxPSScrubDamaged, d.Checked)
		}
	}
	for _, p := range rep.Points {
		if len(p.Damaged) > api.MaxPSScrubDamaged || p.Checked < 0 {
			return fmt.Errorf("a scrub of point %s listing %d damaged blocks (at most %d), %d checked", p.Point, len(p.Damaged), api.MaxPSScrubDamaged, p.Checked)
		}
	}
	listed := 0
	for _, d := range rep.Disks {
		listed += len(d.Damaged)
	}
	for _, p := range rep.Points {
		listed += len(p.Damaged)
	}
	if listed > api.MaxPSScrubDamagedTotal {
		return fmt.Errorf("a scrub report listing %d damaged blocks, at most %d", listed, api.MaxPSScrubDamagedTotal)
	}
	if r.ScrubDamagedNotListed < 0 {
		return fmt.Errorf("a scrub report with %d damaged blocks not listed", r.ScrubDamagedNotListed)
	}
	return nil
}
