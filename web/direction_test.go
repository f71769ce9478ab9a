package web

import (
	"net/http"
	"strings"
	"testing"

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
