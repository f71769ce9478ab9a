package psnode

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

// fakeCut is a fake transport and hold: it answers each report from a
// script (by the state reported) and records what happened.
type fakeCut struct {
	answers  map[string]api.PSCutDecision // by state reported
	errs     map[string]error             // by state reported
	notReady bool
	holdErr  error
	cutErr   error
	events   []string
}

func (f *fakeCut) transport() cutTransport {
	return cutTransport{
		report: func(ctx context.Context, id uint64, r api.PSCutReport) (api.PSCutDecision, error) {
			f.events = append(f.events, fmt.Sprintf("report %d %s %s", id, r.MachineID, r.State))
			return f.answers[r.State], f.errs[r.State]
		},
		hold: func(ctx context.Context, id uint64, machine string, app bool, wait time.Duration) (heldCut, error) {
			f.events = append(f.events, fmt.Sprintf("hold %d %s app=%v %s", id, machine, app, wait))
			if f.holdErr != nil {
				return nil, f.holdErr
			}
			return fakeHeld{f, machine, id}, nil
		},
		ready: func(machine string) error {
			if f.notReady {
				return fmt.Errorf("machine %s: %w", machine, procserver.ErrNotConnected)
			}
			return nil
		},
	}
}

type fakeHeld struct {
	f       *fakeCut
	machine string
	id      uint64
}

func (h fakeHeld) Cut(ctx context.Context) (map[string]replication.Point, error) {
	h.f.events = append(h.f.events, "cut")
	if h.f.cutErr != nil {
		return nil, h.f.cutErr
	}
	return map[string]replication.Point{h.machine: {ID: "42", Cut: h.id}}, nil
}

func (h fakeHeld) Release() { h.f.events = append(h.f.events, "release") }

// A scale-out member's part in a cut: ready, hold when told, held, tag
// when told; any other answer or a lost answer releases the agent and
// fails the member (said to the configuration server, so the whole cut is
// abandoned at once); a bad command is refused before anything.
func TestGroupCutMember(t *testing.T) {
	hold := api.PSCutDecision{Action: api.PSCutHold}
	cut := api.PSCutDecision{Action: api.PSCutCut}
	release := api.PSCutDecision{Action: api.PSCutRelease, Reason: "vm9 did not hold"}
	cmd := api.PSCommand{Kind: api.PSCommandGroupCut, MachineID: "m1", Cut: &api.PSCut{ID: 7, HoldWait: 3 * time.Second}}
	for _, tc := range []struct {
		name    string
		f       fakeCut
		cmd     *api.PSCommand
		events  []string
		err     string
		notConn bool
	}{
		{"the cut", fakeCut{answers: map[string]api.PSCutDecision{api.PSCutReady: hold, api.PSCutHeld: cut}}, nil,
			[]string{"report 7 m1 ready", "hold 7 m1 app=false 3s", "report 7 m1 held", "cut"}, "", false},
		{"released before the hold", fakeCut{answers: map[string]api.PSCutDecision{api.PSCutReady: release}}, nil,
			[]string{"report 7 m1 ready"}, "before the hold: vm9 did not hold", false},
		{"released while held", fakeCut{answers: map[string]api.PSCutDecision{api.PSCutReady: hold, api.PSCutHeld: release}}, nil,
			[]string{"report 7 m1 ready", "hold 7 m1 app=false 3s", "report 7 m1 held", "release"}, "released: vm9 did not hold", false},
		{"the decision lost while held", fakeCut{answers: map[string]api.PSCutDecision{api.PSCutReady: hold}, errs: map[string]error{api.PSCutHeld: errors.New("connection reset")}}, nil,
			[]string{"report 7 m1 ready", "hold 7 m1 app=false 3s", "report 7 m1 held", "release", "report 7 m1 failed"}, "connection reset", false},
		{"the agent does not hold", fakeCut{answers: map[string]api.PSCutDecision{api.PSCutReady: hold}, holdErr: errors.New("machine m1 did not hold its writes within 3s")}, nil,
			[]string{"report 7 m1 ready", "hold 7 m1 app=false 3s", "report 7 m1 failed"}, "did not hold", false},
		{"not connected", fakeCut{notReady: true}, nil,
			[]string{"report 7 m1 failed"}, "not connected", true},
		{"no point", fakeCut{answers: map[string]api.PSCutDecision{api.PSCutReady: hold, api.PSCutHeld: cut}, cutErr: errors.New("no recovery point: disk d0 needs a resync")}, nil,
			[]string{"report 7 m1 ready", "hold 7 m1 app=false 3s", "report 7 m1 held", "cut"}, "needs a resync", false},
		{"no cut", fakeCut{}, &api.PSCommand{Kind: api.PSCommandGroupCut, MachineID: "m1"}, nil, "without its cut", false},
		{"a hold wait too long", fakeCut{}, &api.PSCommand{Kind: api.PSCommandGroupCut, MachineID: "m1", Cut: &api.PSCut{ID: 7, HoldWait: time.Hour}}, nil, "hold wait", false},
	} {
		c := cmd
		if tc.cmd != nil {
			c = *tc.cmd
		}
		f := tc.f
		r := groupCut(context.Background(), f.transport(), c)
		if !slices.Equal(f.events, tc.events) {
			t.Errorf("%s: %q, want %q", tc.name, f.events, tc.events)
		}
		if tc.err == "" {
			if r.Error != "" || r.Point == nil || r.Point.Cut != 7 {
				t.Errorf("%s: %+v, want the point of cut 7", tc.name, r)
			}
			continue
		}
		if !strings.Contains(r.Error, tc.err) || r.Point != nil || r.NotConnected != tc.notConn {
			t.Errorf("%s: %+v, want the error %q (not connected: %v)", tc.name, r, tc.err, tc.notConn)
		}
	}
}
