package web

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// A machine in failback shows its direction and the button of its next
// step on the machines page.
func TestDirectionShown(t *testing.T) {
	b := newFakeBackend(api.Machine{ID: "m1", Name: "db", State: api.StateResync, Direction: "reprotected",
		Disks: []api.Disk{{Index: 0, Name: "d0", Size: 1 << 20, State: api.StateResync}}})
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	body := get(t, h, id, "/machines", http.StatusOK)
	if !strings.Contains(body, "Reprotected: its changes go back to the original disks") || !strings.Contains(body, `href="/machines/db/failback"`) {
		t.Error("the machines page does not show the failback direction")
	}
}

// A reprotected machine shows its reverse RPO against its failback
// policy, flagged when over the threshold, on the machines page and its
// own page; unknown and first-pass states are said so.
func TestReverseRPOShown(t *testing.T) {
	b := newFakeBackend(api.Machine{ID: "m1", Name: "db", State: api.StateResync, Direction: "reprotected",
		Reverse: &api.ReverseStatus{RPO: 95 * time.Second, RPOKnown: true, Threshold: time.Minute, Policy: "default-failback",
			Pending: 3 << 20, FirstPassDone: true},
		Disks: []api.Disk{{Index: 0, Name: "d0", Size: 1 << 20, State: api.StateResync}}})
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for _, page := range []string{"/machines", "/machines/db"} {
		body := get(t, h, id, page, http.StatusOK)
		if !strings.Contains(body, `class="reverse-rpo rpo-over"`) || !strings.Contains(body, "Reverse RPO</strong> 1 min") ||
			!strings.Contains(body, "threshold 1m0s (policy default-failback)") || !strings.Contains(body, "3 MiB not yet on the original disks") {
			t.Errorf("%s does not show the reverse RPO over its threshold:\n%s", page, body)
		}
	}
	r := &api.ReverseStatus{Threshold: time.Minute, Policy: "p-failback"}
	if reverseRPOText(r) != "not known yet" || reverseOver(r) || !strings.Contains(reverseDetailText(r), "first pass under way") {
		t.Errorf("unknown reverse RPO: %q %v %q", reverseRPOText(r), reverseOver(r), reverseDetailText(r))
	}
}

// A machine failed over to vSphere whose recovered VM's agent connected
// shows that agent as its reverse source, live or held, on the machines
// page and its own page.
func TestReverseSourceShown(t *testing.T) {
	src := &api.ReverseSource{Kind: "agent", VM: "web-recovered", Connected: true, Live: true, Sent: 5 << 20, SpoolBytes: 1 << 20}
	b := newFakeBackend(api.Machine{ID: "m1", Name: "web", State: api.StateResync, Direction: "reprotected", ReverseSource: src,
		Disks: []api.Disk{{Index: 0, Name: "d0", Size: 1 << 20, State: api.StateResync}}})
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for _, page := range []string{"/machines", "/machines/web"} {
		body := get(t, h, id, page, http.StatusOK)
		if !strings.Contains(body, `data-reverse-source="live"`) || !strings.Contains(body, "the asr agent in VM web-recovered") ||
			!strings.Contains(body, "its writes go to the original disks as they happen; 5 MiB sent, 1 MiB in its spool") {
			t.Errorf("%s does not show the recovered VM's agent:\n%s", page, body)
		}
	}
	for _, tc := range []struct {
		s     api.ReverseSource
		state string
		text  string
	}{
		{api.ReverseSource{Connected: true}, "held", "held in its spool until reprotect has compared the disks"},
		{api.ReverseSource{Connected: true, Held: "its log was lost"}, "held", "held in its spool: its log was lost"},
		{api.ReverseSource{Connected: true, Live: true, Frozen: true}, "live", "frozen for failback (its guest's writes are refused); its writes go to the original disks"},
		{api.ReverseSource{Live: true, LastError: "original agent gone"}, "disconnected", "not connected; its writes go to the original disks as they happen; 0 B sent, 0 B in its spool; last error: original agent gone"},
	} {
		if st, tx := reverseSourceState(&tc.s), reverseSourceText(&tc.s); st != tc.state || !strings.Contains(tx, tc.text) {
			t.Errorf("%+v: %q %q, want %q and %q", tc.s, st, tx, tc.state, tc.text)
		}
	}
}
