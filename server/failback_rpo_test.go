package server_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// The failback policy on a real reverse direction: a reprotected
// machine's reverse RPO is 0 once drained; with the original agent gone
// and writes into the exports, it grows past the failback policy's
// threshold and the reverse RPO alert is raised (the forward policy's
// threshold is far above); the agent back, the changes drain, the RPO is
// 0 again and the alert clears; failback then completes as usual.
func TestFailbackReverseRPOAlert(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fr := startFailbackRig(t)
	fr.stop()
	fr.tune = func(c *server.Config) {
		c.NBDListen = "127.0.0.1:0"
		c.PolicyEvery, c.AlertClear = 20*time.Millisecond, 200*time.Millisecond
	}
	fr.restart()
	if err := fr.client.Do(ctx, http.MethodPatch, "/api/v1/policies/default-failback", api.PolicyJSON{RPOThreshold: "1s"}, nil); err != nil {
		t.Fatal(err)
	}
	if m := fr.machine("vm1"); m.Reverse != nil {
		t.Fatalf("a machine not reprotected has a reverse status: %+v", m.Reverse)
	}
	fr.write("d0", 4)
	fr.mustJob(fr.client.Reprotect(ctx, "vm1"))
	m := fr.machine("vm1")
	if r := m.Reverse; r == nil || !r.RPOKnown || !r.FirstPassDone || r.Threshold != time.Second || r.Policy != "default-failback" {
		t.Fatalf("reverse status after reprotect: %+v", m.Reverse)
	}
	waitFor(t, "the reverse RPO 0 once drained", func() bool {
		r := fr.machine("vm1").Reverse
		return r != nil && r.RPOKnown && r.RPO == 0 && r.Pending == 0 && !r.ConsistentAt.IsZero()
	})
	// The original agent is gone: what is written into the exports from
	// now on stays pending.
	fr.ra.close()
	fr.write("d1", 3)
	a := fr.waitAlert(api.AlertReverseRPO, "vm1", "")
	if !strings.Contains(a.Message, "reverse direction") || !strings.Contains(a.Message, "default-failback") || !strings.Contains(a.Action, "asr status --machine vm1") {
		t.Fatalf("reverse RPO alert %+v", a)
	}
	if r := fr.machine("vm1").Reverse; r == nil || r.RPO <= time.Second || r.Pending != 3*65536 {
		t.Fatalf("reverse status with the agent gone: %+v", r)
	}
	as, err := fr.client.Alerts(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range as {
		if x.Kind == api.AlertRPO {
			t.Fatalf("a forward RPO alert while reprotected: %+v", x)
		}
	}
	// Back: the changes drain, the alert clears.
	fr.ra = startAgent(t, fr.cfg)
	fr.waitResolved(a.ID)
	if r := fr.machine("vm1").Reverse; r == nil || r.RPO != 0 || r.Pending != 0 {
		t.Fatalf("reverse status once drained: %+v", r)
	}
	fr.checkFailedBack(fr.sums())
	if m := fr.machine("vm1"); m.Reverse != nil {
		t.Fatalf("a failed-back machine has a reverse status: %+v", m.Reverse)
	}
}
