package web

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// fakePSs is the process-server part of fakeBackend: its list, and the
// switches asked (a switch to "ps-dead" is refused as the server refuses
// one to a process server without a heartbeat).
type fakePSs struct {
	psMu     sync.Mutex
	pss      []api.ProcessServerInfo
	switches []string // "machine>to", "all:from>to"
	moveStop int      // SwitchAll stops after this many machines (0: never)
}

var errNoHeartbeat = errors.New("process server ps-dead sends no heartbeat (none for 2m0s): start it again, or choose another")

func (f *fakePSs) ProcessServers(context.Context) ([]api.ProcessServerInfo, error) {
	f.psMu.Lock()
	defer f.psMu.Unlock()
	return append([]api.ProcessServerInfo(nil), f.pss...), nil
}

func (f *fakePSs) SwitchProcessServer(_ context.Context, machine, to string) (string, error) {
	f.psMu.Lock()
	defer f.psMu.Unlock()
	if to == "ps-dead" {
		return "", errNoHeartbeat
	}
	if to == api.AutoProcessServer {
		to = "ps1"
	}
	f.switches = append(f.switches, machine+">"+to)
	return to, nil
}

func (f *fakePSs) SwitchAll(_ context.Context, from, to string) ([]string, error) {
	f.psMu.Lock()
	defer f.psMu.Unlock()
	moved := []string{"db", "web"}
	if f.moveStop > 0 {
		f.switches = append(f.switches, "all:"+from+">"+to+" stopped")
		return moved[:f.moveStop], errNoHeartbeat
	}
	f.switches = append(f.switches, "all:"+from+">"+to)
	return moved, nil
}

func psBackend() *fakeBackend {
	b := newFakeBackend(api.Machine{ID: "m1", Name: "db"}, api.Machine{ID: "m2", Name: "web"}, api.Machine{ID: "m3", Name: "old", Unprotected: true})
	b.pss = []api.ProcessServerInfo{
		{Name: api.BuiltinProcessServer, Builtin: true, DataAddr: "10.0.0.1:8444", State: api.PSHealthy, Machines: 1,
			Figures: api.ProcessServer{UploadRate: 20 << 20, BacklogBytes: 1 << 20, CPU: 0.31, Memory: 0.42}},
		{Name: "ps1", DataAddr: "10.0.0.2:8444", State: api.PSHealthy, LastHeartbeat: testNow.Add(-40 * time.Second), Machines: 1,
			Figures: api.ProcessServer{UploadRate: 5 << 20, CPU: 0.12, Memory: 0.2}},
		{Name: "ps-dead", DataAddr: "10.0.0.3:8444", State: api.PSNoHeartbeat, Machines: 0, Figures: api.ProcessServer{CPU: -1, Memory: -1}},
	}
	return b
}

// The process servers' page: every process server with its state and
// figures (a "Move all" form only where there are machines), the switch
// form with the protected machines and every destination; the POSTs
// switch and go back with what moved; a refusal shows with the form as
// typed; no CSRF token moves nothing.
func TestProcessServersPage(t *testing.T) {
	b := psBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/process-servers", http.StatusOK)
	checkGolden(t, "page_process_servers", body)
	for _, want := range []string{`data-ps="builtin"`, `data-ps="ps1"`, `data-ps="ps-dead"`, "no-heartbeat", "40 s ago", "in this server",
		`action="/process-servers/builtin/move"`, `action="/process-servers/ps1/move"`, `<option value="db">`, `<option value="auto">`} {
		if !strings.Contains(body, want) {
			t.Errorf("the page lacks %q", want)
		}
	}
	if strings.Contains(body, `action="/process-servers/ps-dead/move"`) || strings.Contains(body, `<option value="old"`) {
		t.Error("a move form for a process server without machines, or an unprotected machine offered")
	}
	if body := get(t, h, id, "/infrastructure", http.StatusOK); !strings.Contains(body, `href="/process-servers"`) {
		t.Error("the infrastructure page does not link the process servers")
	}

	post(t, h, id, "/process-servers/switch", url.Values{"machine": {"db"}, "to": {"ps1"}}, http.StatusForbidden)
	w := post(t, h, id, "/process-servers/switch", url.Values{"csrf": {csrf}, "machine": {"db"}, "to": {"auto"}}, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); !strings.Contains(loc, "done=") || !strings.Contains(loc, "ps1") {
		t.Fatalf("after the switch: to %s", loc)
	}
	if body := get(t, h, id, w.Header().Get("Location"), http.StatusOK); !strings.Contains(body, "Machine db is served by process server ps1 now.") {
		t.Error("the page does not say what the switch did")
	}
	body = post(t, h, id, "/process-servers/switch", url.Values{"csrf": {csrf}, "machine": {"web"}, "to": {"ps-dead"}}, http.StatusConflict).Body.String()
	if !strings.Contains(body, "Nothing was moved: process server ps-dead sends no heartbeat") || !strings.Contains(body, `<option value="web" selected>`) ||
		!strings.Contains(body, `<option value="ps-dead" selected>`) {
		t.Fatalf("the refusal is not shown with the form as typed:\n%s", body)
	}
	w = post(t, h, id, "/process-servers/builtin/move", url.Values{"csrf": {csrf}, "to": {"ps1"}}, http.StatusSeeOther)
	if body := get(t, h, id, w.Header().Get("Location"), http.StatusOK); !strings.Contains(body, "2 machines moved from process server builtin: db, web.") {
		t.Error("the page does not say what the move did")
	}
	b.moveStop = 1
	body = post(t, h, id, "/process-servers/ps1/move", url.Values{"csrf": {csrf}, "to": {"ps-dead"}}, http.StatusConflict).Body.String()
	if !strings.Contains(body, "The move stopped after db had moved: process server ps-dead sends no heartbeat") {
		t.Fatalf("a move that stopped half-way:\n%s", body)
	}
	if got := strings.Join(b.switches, ","); got != "db>ps1,all:builtin>ps1,all:ps1>ps-dead stopped" {
		t.Fatalf("switches %q", got)
	}
}
