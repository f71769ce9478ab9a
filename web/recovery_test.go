package web

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// fakeRecovery is the plans, failovers and points part of fakeBackend.
// Its plans are refused like the server refuses them (a name taken, a
// group without machines, an unknown machine); its failover requests are
// recorded and start a running job.
type fakeRecovery struct {
	plans     []api.Plan
	failovers []api.Failover
	points    map[string][]api.PointJSON // machine -> points, oldest first
	requests  []api.FailoverRequest      // every StartFailover
	alternate []api.FailbackRequest      // every FailbackTo
	actions   []string                   // "cleanup machine/plan", "commit ...", "change-point ..."
	confirmed []string                   // job ids
	cancelled []string
	refuse    error // StartFailover, Cleanup, Commit and ChangePoint fail with it
}

func (b *fakeBackend) ConfirmJob(_ context.Context, id string) error {
	b.vmMu.Lock()
	defer b.vmMu.Unlock()
	for i, j := range b.jobs {
		if j.ID != id {
			continue
		}
		if j.Waiting == "" {
			return errors.New("job " + id + " is not waiting for a confirmation")
		}
		b.jobs[i].Waiting, b.jobs[i].Cancellable = "", false
		b.confirmed = append(b.confirmed, id)
		return nil
	}
	return fmt.Errorf("job %s: %w", id, ErrNotFound)
}

func (b *fakeBackend) CancelJob(_ context.Context, id string) error {
	b.vmMu.Lock()
	defer b.vmMu.Unlock()
	for i, j := range b.jobs {
		if j.ID != id {
			continue
		}
		if !j.Cancellable {
			return errors.New("job " + id + " cannot be cancelled now")
		}
		b.jobs[i].State, b.jobs[i].Error = api.JobFailed, "cancelled"
		b.cancelled = append(b.cancelled, id)
		return nil
	}
	return fmt.Errorf("job %s: %w", id, ErrNotFound)
}

func (b *fakeBackend) Points(_ context.Context, machine string) ([]api.PointJSON, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range b.machines {
		if m.Name == machine {
			return b.points[machine], nil
		}
	}
	return nil, fmt.Errorf("machine %s: %w", machine, ErrNotFound)
}

func (b *fakeBackend) Failovers(context.Context) ([]api.Failover, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.failovers, nil
}

// startJob records a running job of the recovery.
func (b *fakeBackend) startJob(kind, subject string) api.Job {
	b.vmMu.Lock()
	defer b.vmMu.Unlock()
	j := api.Job{ID: fmt.Sprintf("%s%d", fakeJobStart, len(b.jobs)+1), Kind: kind, Subject: subject, State: api.JobRunning, StartedAt: testNow}
	b.jobs = append([]api.Job{j}, b.jobs...)
	return j
}

func (b *fakeBackend) StartFailover(_ context.Context, req api.FailoverRequest) (api.Job, error) {
	b.mu.Lock()
	b.requests = append(b.requests, req)
	err := b.refuse
	b.mu.Unlock()
	if err != nil {
		return api.Job{}, err
	}
	return b.startJob("failover", req.Machine+req.Plan), nil
}

func (b *fakeBackend) action(what string, a api.FailoverAction) (api.Job, error) {
	b.mu.Lock()
	b.actions = append(b.actions, strings.TrimSpace(what+" "+a.Machine+a.Plan+" "+a.Point))
	err := b.refuse
	b.mu.Unlock()
	if err != nil {
		return api.Job{}, err
	}
	return b.startJob(what, a.Machine+a.Plan), nil
}

func (b *fakeBackend) Cleanup(_ context.Context, a api.FailoverAction) (api.Job, error) {
	return b.action("cleanup", a)
}

func (b *fakeBackend) Commit(_ context.Context, a api.FailoverAction) (api.Job, error) {
	return b.action("commit", a)
}

func (b *fakeBackend) ChangePoint(_ context.Context, a api.FailoverAction) (api.Job, error) {
	return b.action("change-point", a)
}

func (b *fakeBackend) Plans(context.Context) ([]api.Plan, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]api.Plan(nil), b.plans...), nil
}

func (b *fakeBackend) CreatePlan(_ context.Context, p api.Plan) (api.Plan, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, x := range b.plans {
		if x.Name == p.Name {
			return p, errors.New("a plan named " + p.Name + " exists")
		}
	}
	for i, g := range p.Groups {
		if len(g.Machines) == 0 {
			return p, fmt.Errorf("group %d has no machines", i+1)
		}
		for _, n := range g.Machines {
			found := false
			for _, m := range b.machines {
				found = found || m.Name == n
			}
			if !found {
				return p, fmt.Errorf("group %d: no machine named %q", i+1, n)
			}
		}
	}
	p.Created = testNow
	b.plans = append(b.plans, p)
	return p, nil
}

func (b *fakeBackend) DeletePlan(_ context.Context, name string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, f := range b.failovers {
		if f.Plan == name {
			return errors.New("plan " + name + " has a live test failover (" + f.Machine + "): clean it up or commit it first")
		}
	}
	for i, p := range b.plans {
		if p.Name == name {
			b.plans = append(b.plans[:i], b.plans[i+1:]...)
			return nil
		}
	}
	return fmt.Errorf("plan %s: %w", name, ErrNotFound)
}

// Machines, plans and failovers of the recovery tests.
var (
	dbMachine  = api.Machine{ID: "m-db", Name: "db", State: api.StateProtected, Connected: true, LastSeen: testNow, Disks: []api.Disk{{Name: "disk0", Size: gib, State: api.StateProtected, Progress: 1}}}
	appMachine = api.Machine{ID: "m-app", Name: "app", State: api.StateProtected, Connected: true, LastSeen: testNow, Disks: []api.Disk{{Name: "disk0", Size: gib, State: api.StateProtected, Progress: 1}}}

	shopPlan = api.Plan{Name: "shop", Created: testNow.Add(-48 * time.Hour), LastDrill: testNow.Add(-3 * time.Hour),
		Groups: []api.PlanGroup{
			{Machines: []string{"db"}, Post: []api.PlanAction{{Kind: "manual", Text: "check the database"}}},
			{Machines: []string{"app"}, Pre: []api.PlanAction{{Kind: "script", Path: "/etc/asr/dns-switch.sh"}}},
		},
		Drill: &api.PlanDrill{EverySeconds: 7 * 24 * 3600, BootCheck: "login:", BootPort: 22, TimeoutSeconds: 300}}
	simplePlan = api.Plan{Name: "web", Groups: []api.PlanGroup{{Machines: []string{"app"}}}}

	testFailovers = []api.Failover{
		{ID: "f1", Machine: "db", MachineID: "m-db", Kind: api.FailoverTest, To: api.ToNBD, State: "active", Point: "0000000000000007",
			PointTime: testNow.Add(-10 * time.Minute), Plan: "shop", JobID: "j-plan", Created: testNow.Add(-2 * time.Minute),
			Exports: []api.Export{{Disk: "disk0", URI: "nbd://127.0.0.1:10809/db/disk0", Size: gib}}},
		{ID: "f2", Machine: "app", MachineID: "m-app", Kind: api.FailoverReal, To: api.ToVSphere, State: "active", Point: "0000000000000009",
			Created: testNow.Add(-time.Minute), VM: "app-recovered"},
		{ID: "f3", Machine: "files", MachineID: "m-files", Kind: api.FailoverTest, To: api.ToQEMU, State: "active", Point: "0000000000000003",
			Created: testNow.Add(-time.Hour), Drill: &api.DrillResult{Passed: true, BootTime: 12.5, Accel: "kvm"}},
	}
)

func newRecoveryBackend() *fakeBackend {
	b := newVMwareBackend()
	b.machines = []api.Machine{dbMachine, appMachine}
	b.points = map[string][]api.PointJSON{
		"db":  {{ID: "0000000000000006", Time: "2025-06-01T11:40:00Z", Kind: api.PointCrash}, {ID: "0000000000000007", Time: "2025-06-01T11:50:00Z", Kind: api.PointApp}},
		"app": {{ID: "0000000000000009", Time: "2025-06-01T11:55:00Z", Kind: api.PointCrash}},
	}
	return b
}

func TestNavigationRecovery(t *testing.T) {
	b := newRecoveryBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for path, current := range map[string]string{"/plans": "Plans", "/failovers": "Failovers", "/failovers/new?machine=db": "Failovers"} {
		body := get(t, h, id, path, http.StatusOK)
		for _, want := range []string{`href="/plans"`, `href="/failovers"`} {
			if !strings.Contains(body, want) {
				t.Errorf("%s: nav lacks %s", path, want)
			}
		}
		if !strings.Contains(body, `aria-current="page">`+current+`</a>`) {
			t.Errorf("%s: %s is not the current page in the nav", path, current)
		}
	}
	if body := get(t, h, id, "/machines", http.StatusOK); !strings.Contains(body, `href="/failovers/new?machine=db"`) {
		t.Error("the machines page has no failover button for db")
	}
}

func TestPlansPage(t *testing.T) {
	b := newRecoveryBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	body := get(t, h, id, "/plans", http.StatusOK)
	if !strings.Contains(body, `id="no-plans"`) {
		t.Error("an empty plans page does not say so")
	}
	checkGolden(t, "page_plans_empty", body)

	b.plans = []api.Plan{shopPlan, simplePlan}
	b.failovers = testFailovers
	body = get(t, h, id, "/plans", http.StatusOK)
	for _, want := range []string{`id="plan-shop"`, "Group 1:</strong> db", "post: manual: check the database", "pre: script /etc/asr/dns-switch.sh",
		"every 7 d 0 h, boot check: console shows /login:/ and port 22 answers within 5 min", "3 h ago", "No scheduled drill.",
		"db (test failover to nbd, active)", `action="/plans/shop/test"`, `action="/plans/shop/failover"`, `action="/plans/shop/cleanup"`,
		`action="/plans/shop/commit"`, `href="/plans/shop/reprotect"`, `href="/plans/shop/failback"`, `action="/plans/web/delete"`, `<option value="db">db</option>`} {
		if !strings.Contains(body, want) {
			t.Errorf("plans page lacks %q", want)
		}
	}
	checkGolden(t, "page_plans", body)
}

func TestCreatePlan(t *testing.T) {
	b := newRecoveryBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	form := url.Values{"csrf": {csrf}, "name": {"shop"},
		"g1_machines": {"db"}, "g1_post": {"check the database\n\nfailback: check the replication\n"},
		"g2_machines": {"app"}, "g2_pre": {"/etc/asr/dns-switch.sh\r\nwarn the users\nfailover:/etc/asr/fence.sh"},
		"drill": {"1"}, "drill_every": {"24"}, "drill_check": {"login:"}, "drill_port": {"22"}, "drill_timeout": {"120"}}
	w := post(t, h, id, "/plans", form, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/plans?created=shop#plan-shop" {
		t.Errorf("created: to %s", loc)
	}
	want := api.Plan{Name: "shop", Created: testNow, Groups: []api.PlanGroup{
		{Machines: []string{"db"}, Post: []api.PlanAction{{Kind: "manual", Text: "check the database"}, {Kind: "manual", Text: "check the replication", On: api.ActionOnFailback}}},
		{Machines: []string{"app"}, Pre: []api.PlanAction{{Kind: "script", Path: "/etc/asr/dns-switch.sh"}, {Kind: "manual", Text: "warn the users"},
			{Kind: "script", Path: "/etc/asr/fence.sh", On: api.ActionOnFailover}}},
	}, Drill: &api.PlanDrill{EverySeconds: 24 * 3600, BootCheck: "login:", BootPort: 22, TimeoutSeconds: 120}}
	if len(b.plans) != 1 || !reflect.DeepEqual(b.plans[0], want) {
		t.Fatalf("plan stored:\n%+v\nwant\n%+v", b.plans, want)
	}

	// Refused by the server (the name is taken), or by the console: the
	// form comes back with the reason and what was typed; nothing changes.
	for _, tt := range []struct {
		name string
		edit func(url.Values)
		want string
	}{
		{"taken", func(url.Values) {}, "a plan named shop exists"},
		{"gap", func(f url.Values) { f.Set("name", "gap"); f.Del("g2_machines"); f.Set("g3_machines", "app") }, "group 2 has no machines"},
		{"unknown", func(f url.Values) { f.Set("name", "x"); f.Set("g1_machines", "nope") }, "no machine named &#34;nope&#34;"},
		{"no name", func(f url.Values) { f.Set("name", " ") }, "name the plan"},
		{"drill", func(f url.Values) { f.Set("name", "d"); f.Set("drill_every", "weekly") }, "drill schedule"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := url.Values{}
			for k, v := range form {
				f[k] = append([]string(nil), v...)
			}
			tt.edit(f)
			body := post(t, h, id, "/plans", f, http.StatusUnprocessableEntity).Body.String()
			if !strings.Contains(body, `id="plan-form-error"`) || !strings.Contains(body, tt.want) {
				t.Errorf("the refusal does not show %q:\n%s", tt.want, body)
			}
			for _, kept := range []string{"check the database", "/etc/asr/dns-switch.sh", `value="login:"`} {
				if !strings.Contains(body, kept) {
					t.Errorf("the form shown again lost %q", kept)
				}
			}
			if len(b.plans) != 1 {
				t.Errorf("a refused plan was stored: %+v", b.plans)
			}
		})
	}
	w = post(t, h, id, "/plans", form, http.StatusUnprocessableEntity)
	checkGolden(t, "page_plans_refused", w.Body.String())
}

func TestPlanActions(t *testing.T) {
	b := newRecoveryBackend()
	b.plans = []api.Plan{shopPlan}
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)

	for _, tt := range []struct {
		action string
		form   url.Values
		req    *api.FailoverRequest
		what   string
	}{
		{"test", url.Values{"to": {"nbd"}, "boot_check": {"ignored"}}, &api.FailoverRequest{Plan: "shop", Test: true, To: api.ToNBD}, ""},
		{"test", url.Values{"to": {"qemu"}, "boot_check": {"login:"}, "boot_port": {"22"}, "boot_timeout": {"90"}},
			&api.FailoverRequest{Plan: "shop", Test: true, To: api.ToQEMU, BootCheck: "login:", BootPort: 22, BootTimeout: 90}, ""},
		{"failover", url.Values{"planned": {"1"}}, &api.FailoverRequest{Plan: "shop", Planned: true, To: api.ToNBD}, ""},
		{"failover", url.Values{"planned": {"0"}}, &api.FailoverRequest{Plan: "shop", To: api.ToNBD}, ""},
		{"cleanup", nil, nil, "cleanup shop"},
		{"commit", nil, nil, "commit shop"},
		{"reprotect", nil, nil, "reprotect shop"},
		{"failback", nil, nil, "failback shop"},
	} {
		b.requests, b.actions = nil, nil
		f := url.Values{"csrf": {csrf}}
		for k, v := range tt.form {
			f[k] = v
		}
		w := post(t, h, id, "/plans/shop/"+tt.action, f, http.StatusSeeOther)
		if loc := w.Header().Get("Location"); loc != "/jobs/"+b.jobs[0].ID {
			t.Errorf("%s: to %s, not the job's page", tt.action, loc)
		}
		if tt.req != nil && (len(b.requests) != 1 || !reflect.DeepEqual(b.requests[0], *tt.req)) {
			t.Errorf("%s: requests %+v, want %+v", tt.action, b.requests, *tt.req)
		}
		if tt.what != "" && (len(b.actions) != 1 || b.actions[0] != tt.what) {
			t.Errorf("%s: actions %q", tt.action, b.actions)
		}
	}

	// Refused: the reason shows on the plan's card, no job starts.
	b.refuse = errors.New("machine db has a test failover (f1, active): clean it up or commit it first")
	jobs := len(b.jobs)
	body := post(t, h, id, "/plans/shop/test", url.Values{"csrf": {csrf}, "to": {"nbd"}}, http.StatusUnprocessableEntity).Body.String()
	if !strings.Contains(body, `class="flash flash-error plan-error"`) || !strings.Contains(body, "clean it up or commit it first") {
		t.Errorf("the refusal is not shown:\n%s", body)
	}
	if len(b.jobs) != jobs {
		t.Error("a refused action started a job")
	}
	post(t, h, id, "/plans/shop/frobnicate", url.Values{"csrf": {csrf}}, http.StatusNotFound)
	if w := serve(h, withSession(postForm("/plans/shop/test", url.Values{"to": {"nbd"}}), id)); w.Code != http.StatusForbidden {
		t.Errorf("a plan action without the CSRF token: status %d", w.Code)
	}

	// Delete: refused while the plan has a live failover, then done.
	b.failovers = testFailovers
	body = post(t, h, id, "/plans/shop/delete", url.Values{"csrf": {csrf}}, http.StatusUnprocessableEntity).Body.String()
	if !strings.Contains(body, "The plan was not deleted: plan shop has a live test failover") || len(b.plans) != 1 {
		t.Errorf("deleting a plan with a live failover:\n%s", body)
	}
	b.failovers = nil
	if loc := post(t, h, id, "/plans/shop/delete", url.Values{"csrf": {csrf}}, http.StatusSeeOther).Header().Get("Location"); loc != "/plans?deleted=shop" || len(b.plans) != 0 {
		t.Errorf("deleted: to %s, plans %+v", loc, b.plans)
	}
	post(t, h, id, "/plans/shop/delete", url.Values{"csrf": {csrf}}, http.StatusNotFound)
}

func TestFailoversPage(t *testing.T) {
	b := newRecoveryBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/failovers", http.StatusOK)
	if !strings.Contains(body, `id="no-failovers"`) {
		t.Error("an empty failovers page does not say so")
	}
	checkGolden(t, "page_failovers_empty", body)

	b.failovers = testFailovers
	body = get(t, h, id, "/failovers", http.StatusOK)
	for _, want := range []string{`data-machine="db"`, "nbd://127.0.0.1:10809/db/disk0", "VM app-recovered", "drill passed", "12.5 s", "(kvm)",
		`href="/plans#plan-shop"`, `href="/jobs/j-plan"`, `aria-label="Clean up the test failover of db"`, `aria-label="Commit the failover of app"`,
		`<option value="0000000000000006">`} {
		if !strings.Contains(body, want) {
			t.Errorf("failovers page lacks %q", want)
		}
	}
	if strings.Contains(body, `aria-label="Commit the failover of db"`) || strings.Contains(body, `aria-label="Clean up the test failover of app"`) {
		t.Error("a test failover offers commit, or a failover cleanup")
	}
	checkGolden(t, "page_failovers", body)

	for path, want := range map[string]string{"/failovers/cleanup": "cleanup db", "/failovers/commit": "commit db", "/failovers/change-point": "change-point db 0000000000000006"} {
		b.actions = nil
		w := post(t, h, id, path, url.Values{"csrf": {csrf}, "machine": {"db"}, "point": {"0000000000000006"}}, http.StatusSeeOther)
		if loc := w.Header().Get("Location"); loc != "/jobs/"+b.jobs[0].ID || len(b.actions) != 1 || b.actions[0] != want {
			t.Errorf("%s: to %s, actions %q", path, loc, b.actions)
		}
	}
	b.refuse = errors.New("machine db has a test failover: clean it up, tests are not committed")
	body = post(t, h, id, "/failovers/commit", url.Values{"csrf": {csrf}, "machine": {"db"}}, http.StatusUnprocessableEntity).Body.String()
	if !strings.Contains(body, `id="failover-error"`) || !strings.Contains(body, "tests are not committed") {
		t.Errorf("the refusal is not shown:\n%s", body)
	}
}

func TestNewFailover(t *testing.T) {
	b := newRecoveryBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/failovers/new?machine=db", http.StatusOK)
	for _, want := range []string{`name="machine" value="db"`, `<option value="0000000000000007">`, `<option value="vc1">`, `id="kind-test" name="kind" value="test" checked`} {
		if !strings.Contains(body, want) {
			t.Errorf("failover form lacks %q", want)
		}
	}
	// Newest point first.
	if strings.Index(body, "0000000000000007") > strings.Index(body, "0000000000000006") {
		t.Error("the points are not newest first")
	}
	checkGolden(t, "page_failover_new", body)
	get(t, h, id, "/failovers/new?machine=nope", http.StatusNotFound)
	get(t, h, id, "/failovers/new", http.StatusBadRequest)

	base := url.Values{"csrf": {csrf}, "machine": {"db"}, "vcenter": {"vc1"}}
	for _, tt := range []struct {
		name string
		form url.Values
		want api.FailoverRequest
	}{
		{"test nbd", url.Values{"kind": {"test"}, "point": {"0000000000000006"}, "to": {"nbd"}},
			api.FailoverRequest{Machine: "db", Test: true, Point: "0000000000000006", To: api.ToNBD}},
		{"drill", url.Values{"kind": {"test"}, "point": {"latest-app"}, "to": {"qemu"}, "boot_check": {"login:"}, "boot_timeout": {"60"}},
			api.FailoverRequest{Machine: "db", Test: true, Point: "latest-app", To: api.ToQEMU, BootCheck: "login:", BootTimeout: 60}},
		{"planned vsphere", url.Values{"kind": {"planned"}, "point": {"latest"}, "to": {"vsphere"}, "datastore": {"ds1"}, "folder": {"/DC0/vm/DR"}, "network": {"VM Network"}},
			api.FailoverRequest{Machine: "db", Planned: true, To: api.ToVSphere, VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: "ds1", Folder: "/DC0/vm/DR", Network: "VM Network"}}},
		{"unplanned azure", url.Values{"kind": {"unplanned"}, "point": {"latest"}, "to": {"azure"}, "subscription": {"sub"}, "resource_group": {"rg"},
			"location": {"westeurope"}, "vnet": {"vnet1"}, "subnet": {"default"}, "size": {"Standard_D2s_v5"}},
			api.FailoverRequest{Machine: "db", Point: "latest", To: api.ToAzure, Azure: &api.AzureTarget{Subscription: "sub", ResourceGroup: "rg",
				Location: "westeurope", VNet: "vnet1", Subnet: "default", Size: "Standard_D2s_v5"}}},
	} {
		b.requests = nil
		f := url.Values{}
		for k, v := range base {
			f[k] = v
		}
		for k, v := range tt.form {
			f[k] = v
		}
		w := post(t, h, id, "/failovers", f, http.StatusSeeOther)
		if loc := w.Header().Get("Location"); loc != "/jobs/"+b.jobs[0].ID {
			t.Errorf("%s: to %s", tt.name, loc)
		}
		if len(b.requests) != 1 || !reflect.DeepEqual(b.requests[0], tt.want) {
			t.Errorf("%s: requests %+v, want %+v", tt.name, b.requests, tt.want)
		}
	}
	b.refuse = errors.New("a QEMU drill is a test failover: add --test")
	body = post(t, h, id, "/failovers", url.Values{"csrf": {csrf}, "machine": {"db"}, "kind": {"unplanned"}, "point": {"0000000000000006"},
		"to": {"qemu"}, "boot_check": {"login:"}}, http.StatusUnprocessableEntity).Body.String()
	for _, want := range []string{`id="failover-form-error"`, "a QEMU drill is a test failover", `id="kind-unplanned" name="kind" value="unplanned" checked`,
		`<option value="0000000000000006" selected>`, `id="to-qemu" name="to" value="qemu" checked`, `value="login:"`} {
		if !strings.Contains(body, want) {
			t.Errorf("the refused form lacks %q", want)
		}
	}
}

func TestJobManualAction(t *testing.T) {
	b := newRecoveryBackend()
	b.jobs = []api.Job{
		{ID: "j-plan", Kind: "plan-test-failover", Subject: "plan shop", State: api.JobRunning, StartedAt: testNow.Add(-40 * time.Second),
			Waiting: "check the database", Cancellable: true, Output: []string{"db/disk0 nbd://127.0.0.1:10809/db/disk0"},
			Steps: []api.JobStep{{Name: "group 1", State: "done", Detail: "1 machines started"}, {Name: "group 1 post 1", State: "running", Detail: "manual: check the database"}}},
		{ID: "j-done", Kind: "plan-test-failover", Subject: "plan shop", State: api.JobSucceeded, StartedAt: testNow.Add(-time.Hour), EndedAt: testNow.Add(-time.Hour + 90*time.Second),
			RTO: 42.25, Output: []string{"app/disk0 nbd://127.0.0.1:10809/app/disk0", "db/disk0 nbd://127.0.0.1:10809/db/disk0"},
			Steps: []api.JobStep{{Name: "group 1", State: "done"}, {Name: "group 2", State: "done"}}},
	}
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)

	page := get(t, h, id, "/jobs/j-plan", http.StatusOK)
	for _, want := range []string{`id="job-waiting"`, "Manual action:", "check the database", `action="/jobs/j-plan/confirm"`, `id="job-confirm"`,
		`action="/jobs/j-plan/cancel"`, `id="job-cancel"`, "db/disk0 nbd://127.0.0.1:10809/db/disk0", `hx-trigger="every 1s"`} {
		if !strings.Contains(page, want) {
			t.Errorf("waiting job page lacks %q", want)
		}
	}
	checkGolden(t, "page_job_waiting", page)
	if frag := get(t, h, id, "/fragments/jobs/j-plan", http.StatusOK); !strings.Contains(frag, `id="job-confirm"`) {
		t.Error("the polled fragment has no Confirm button")
	}
	if list := get(t, h, id, "/jobs", http.StatusOK); !strings.Contains(list, "waiting for a manual action") {
		t.Error("the jobs list does not show the job waits")
	}
	done := get(t, h, id, "/jobs/j-done", http.StatusOK)
	for _, want := range []string{`id="job-rto"`, "42.2 s", `<li class="mono">app/disk0 nbd://127.0.0.1:10809/app/disk0</li>`} {
		if !strings.Contains(done, want) {
			t.Errorf("ended job page lacks %q", want)
		}
	}
	if strings.Contains(done, `id="job-confirm"`) || strings.Contains(done, `id="job-cancel"`) {
		t.Error("an ended job offers confirm or cancel")
	}
	checkGolden(t, "page_job_output", done)

	if w := serve(h, withSession(postForm("/jobs/j-plan/confirm", url.Values{}), id)); w.Code != http.StatusForbidden {
		t.Errorf("confirm without the CSRF token: status %d", w.Code)
	}
	w := post(t, h, id, "/jobs/j-plan/confirm", url.Values{"csrf": {csrf}}, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/jobs/j-plan" || len(b.confirmed) != 1 {
		t.Errorf("confirm: to %s, confirmed %q", loc, b.confirmed)
	}
	// Confirmed again (two browsers): refused plainly on the job's page.
	body := post(t, h, id, "/jobs/j-plan/confirm", url.Values{"csrf": {csrf}}, http.StatusConflict).Body.String()
	if !strings.Contains(body, `id="job-action-error"`) || !strings.Contains(body, "not waiting for a confirmation") {
		t.Errorf("a second confirmation:\n%s", body)
	}
	post(t, h, id, "/jobs/j-plan/cancel", url.Values{"csrf": {csrf}}, http.StatusConflict)
	b.jobs[0].Cancellable = true
	post(t, h, id, "/jobs/j-plan/cancel", url.Values{"csrf": {csrf}}, http.StatusSeeOther)
	if len(b.cancelled) != 1 {
		t.Errorf("cancelled %q", b.cancelled)
	}
	post(t, h, id, "/jobs/nope/confirm", url.Values{"csrf": {csrf}}, http.StatusNotFound)
}

func TestRecoveryPagesNoInlineCode(t *testing.T) {
	b := newRecoveryBackend()
	b.plans, b.failovers = []api.Plan{shopPlan}, testFailovers
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for _, path := range []string{"/plans", "/failovers", "/failovers/new?machine=db"} {
		body := get(t, h, id, path, http.StatusOK)
		for _, bad := range []string{" style=", " onclick=", " onsubmit=", "hx-on", "<style", "javascript:", "<script>"} {
			if strings.Contains(body, bad) {
				t.Errorf("%s: page contains %q", path, bad)
			}
		}
	}
}

func (b *fakeBackend) Reprotect(_ context.Context, machine string) (api.Job, error) {
	return b.action("reprotect", api.FailoverAction{Machine: machine})
}

func (b *fakeBackend) Failback(_ context.Context, machine string) (api.Job, error) {
	return b.action("failback", api.FailoverAction{Machine: machine})
}

func (b *fakeBackend) FailbackTo(_ context.Context, machine string, req api.FailbackRequest) (api.Job, error) {
	b.mu.Lock()
	b.alternate = append(b.alternate, req)
	b.mu.Unlock()
	return b.action("failback-alternate", api.FailoverAction{Machine: machine})
}

func (b *fakeBackend) ReprotectPlan(_ context.Context, plan string) (api.Job, error) {
	return b.action("reprotect", api.FailoverAction{Plan: plan})
}

func (b *fakeBackend) FailbackPlan(_ context.Context, plan string) (api.Job, error) {
	return b.action("failback", api.FailoverAction{Plan: plan})
}
