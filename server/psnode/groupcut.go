package psnode

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

// A replication group's cut that the configuration server coordinates
// across process servers (server/groupcut.go): this process server's part
// for one member (a api.PSCommandGroupCut command). It says the agent is
// connected (PSCutReady) and waits for the decision; told to hold, it
// holds the agent's writes (procserver.HoldCut), says so (PSCutHeld) and
// waits again; told to cut, it tags (the cut's id on the tag) and returns
// the point. Any other answer, or none (the configuration server out of
// reach: each report is bounded by api.MaxPSCutPoll and the command's
// timeout), releases the agent and fails the member, which fails the
// whole cut.

// cutTransport is how a member's state reaches the configuration server
// and its decision comes back (postCut; a fake in tests), and the
// process server's hold (procserver.Server.HoldCut).
type cutTransport struct {
	report func(ctx context.Context, id uint64, r api.PSCutReport) (api.PSCutDecision, error)
	hold   func(ctx context.Context, id uint64, machine string, app bool, wait time.Duration) (heldCut, error)
	ready  func(machine string) error // the agent is connected
}

// heldCut is a member holding its writes (procserver.HeldCut).
type heldCut interface {
	Cut(ctx context.Context) (map[string]replication.Point, error)
	Release()
}

// groupCut runs a PSCommandGroupCut.
func groupCut(ctx context.Context, t cutTransport, cmd api.PSCommand) api.PSCommandResult {
	c := cmd.Cut
	switch {
	case c == nil || c.ID == 0:
		return api.PSCommandResult{Error: "a group cut command without its cut"}
	case c.HoldWait <= 0 || c.HoldWait > api.MaxPSCutHoldWait:
		return api.PSCommandResult{Error: fmt.Sprintf("a group cut's hold wait of %s: want more than 0, at most %s", c.HoldWait, api.MaxPSCutHoldWait)}
	}
	m := cmd.MachineID
	fail := func(err error) api.PSCommandResult {
		// Said at once, so the cut is abandoned now, not at its timeout
		// (the answer does not matter: this member is out).
		rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		t.report(rctx, c.ID, api.PSCutReport{MachineID: m, State: api.PSCutFailed, Error: cutText(err.Error())})
		return api.PSCommandResult{Error: err.Error(), NotConnected: errors.Is(err, procserver.ErrNotConnected)}
	}
	if err := t.ready(m); err != nil {
		return fail(err)
	}
	d, err := t.report(ctx, c.ID, api.PSCutReport{MachineID: m, State: api.PSCutReady})
	if err != nil {
		return fail(fmt.Errorf("cut %d: waiting for the hold: %w", c.ID, err))
	}
	if d.Action != api.PSCutHold {
		return api.PSCommandResult{Error: fmt.Sprintf("cut %d abandoned by the configuration server before the hold: %s", c.ID, d.Reason)}
	}
	h, err := t.hold(ctx, c.ID, m, c.App, c.HoldWait)
	if err != nil {
		return fail(err)
	}
	d, err = t.report(ctx, c.ID, api.PSCutReport{MachineID: m, State: api.PSCutHeld})
	if err != nil || d.Action != api.PSCutCut {
		h.Release()
		if err != nil {
			return fail(fmt.Errorf("cut %d: waiting for the decision, released: %w", c.ID, err))
		}
		return api.PSCommandResult{Error: fmt.Sprintf("cut %d abandoned by the configuration server, released: %s", c.ID, d.Reason)}
	}
	points, err := h.Cut(ctx)
	if err != nil {
		return api.PSCommandResult{Error: err.Error()}
	}
	p, ok := points[m]
	if !ok {
		return api.PSCommandResult{Error: fmt.Sprintf("cut %d made no point of machine %s", c.ID, m)}
	}
	return api.PSCommandResult{Point: &p}
}

// cutText bounds a failure's text to what a report carries.
func cutText(s string) string {
	if len(s) > 4096 {
		return s[:4096]
	}
	return s
}

// cutTransport is the node's: reports over mutual TLS to the
// configuration server, holds by its process server.
func (n *Node) cutTransport() cutTransport {
	return cutTransport{
		report: n.postCut,
		hold: func(ctx context.Context, id uint64, machine string, app bool, wait time.Duration) (heldCut, error) {
			h, err := n.ps.HoldCut(ctx, id, []string{machine}, app, wait)
			if err != nil {
				return nil, err // not a typed nil in the interface
			}
			return h, nil
		},
		ready: func(machine string) error {
			if st, ok := n.ps.Stats(machine); !ok || !st.Connected {
				return fmt.Errorf("machine %s: %w", machine, procserver.ErrNotConnected)
			}
			return nil
		},
	}
}

// postCut reports a member's state in cut id and returns the decision
// (a long poll of at most api.MaxPSCutPoll on the server's side).
func (n *Node) postCut(ctx context.Context, id uint64, r api.PSCutReport) (api.PSCutDecision, error) {
	ctx, cancel := context.WithTimeout(ctx, api.MaxPSCutPoll+10*time.Second)
	defer cancel()
	var d api.PSCutDecision
	err := enroll.DoJSON(ctx, n.client, http.MethodPost, n.enrol.URL+"/api/v1/process-servers/cuts/"+strconv.FormatUint(id, 10), r, &d)
	if err != nil {
		return d, err
	}
	if d.Action != api.PSCutHold && d.Action != api.PSCutCut && d.Action != api.PSCutRelease {
		return d, fmt.Errorf("the configuration server answered cut %d with %q", id, d.Action)
	}
	return d, nil
}
