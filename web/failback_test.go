package web

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// A machine in each failback state, and its failover.
var (
	fbMachine = api.Machine{ID: "m-db", Name: "db", Connected: true, State: api.StateResync, Progress: 1,
		LastSeen: testNow, Disks: []api.Disk{{Index: 0, Name: "d0", Size: 32 * mib, State: api.StateResync, Progress: 1}}}
	fbFailover = api.Failover{ID: "fo1", Machine: "db", MachineID: "m-db", Kind: api.FailoverReal, Planned: true, To: api.ToNBD,
		State: "committed", Point: "0000000000000007", Created: testNow.Add(-10 * time.Minute),
		Exports: []api.Export{{Disk: "d0", URI: "nbd://127.0.0.1:10809/db/d0", Size: 32 * mib, Written: 4 * mib}}}
)

func withDirection(d string) api.Machine {
	m := fbMachine
	m.Direction = d
	return m
}

func failoverWith(edit func(*api.Failover)) *api.Failover {
	f := fbFailover
	f.Exports = append([]api.Export(nil), f.Exports...)
	edit(&f)
	return &f
}

// failbackCases are the states a machine's page shows its failback in:
// the button it offers (its data-failback), or the note instead.
var failbackCases = []struct {
	name      string
	machine   api.Machine
	failover  *api.Failover
	job       *api.Job
	action    string // the button, "" for none
	forward   bool
	note      string // in the note, the job's line or the direction
	direction string // directionText shown
}{
	{name: "protected", machine: fbMachine},
	{name: "failed_over", machine: withDirection("failed-over"), failover: failoverWith(func(*api.Failover) {}),
		action: actionReprotect, direction: "Failed over"},
	{name: "failed_over_uncommitted", machine: withDirection("failed-over"), failover: failoverWith(func(f *api.Failover) { f.State = "active" }),
		note: "Commit the failover", direction: "Failed over"},
	{name: "failed_over_unplanned", machine: withDirection("failed-over"), failover: failoverWith(func(f *api.Failover) { f.Planned = false }),
		action: actionReprotect, direction: "Failed over"},
	{name: "failed_over_vsphere", machine: withDirection("failed-over"), failover: failoverWith(func(f *api.Failover) { f.To = api.ToVSphere; f.Exports = nil; f.VM = "vc1/db-recovered" }),
		action: actionReprotect, direction: "Failed over"},
	{name: "reprotected", machine: withDirection("reprotected"),
		failover: failoverWith(func(f *api.Failover) {
			f.Failback = &api.FailbackStatus{State: "reprotected", Sent: 4 * mib, Pending: 2 * mib}
		}),
		action: actionFailback, note: "4 MiB sent back to the original disks · 2 MiB pending", direction: "Reprotected"},
	{name: "reprotect_running", machine: withDirection("failed-over"), failover: failoverWith(func(*api.Failover) {}),
		job: &api.Job{ID: "job-9", Kind: "reprotect", Subject: "db", State: api.JobRunning}, note: "reprotect running", direction: "Failed over"},
	{name: "failback_running", machine: withDirection("reprotected"),
		failover: failoverWith(func(f *api.Failover) { f.Failback = &api.FailbackStatus{State: "reprotected", Sent: 6 * mib} }),
		job:      &api.Job{ID: "job-9", Kind: "failback", Subject: "db", State: api.JobRunning}, note: "failback running", direction: "Reprotected"},
	{name: "failing_back", machine: withDirection("failing-back"),
		failover: failoverWith(func(f *api.Failover) {
			f.Failback = &api.FailbackStatus{State: "failing-back", Sent: 6 * mib, Compared: 32 * mib}
		}),
		note: "The switch is done", direction: "Failing back"},
	{name: "failed_back", machine: withDirection("failed-back"), action: actionReprotect, forward: true, direction: "Failed back"},
	{name: "failed_over_azure", machine: withDirection("failed-over"), failover: failoverWith(func(f *api.Failover) { f.To = api.ToAzure; f.Exports = nil; f.VM = "azure/net-rg/db-recovered" }),
		action: actionReprotect, direction: "Failed over"},
	{name: "reprotected_vsphere", machine: withDirection("reprotected"),
		failover: failoverWith(func(f *api.Failover) {
			f.To, f.Exports, f.VM = api.ToVSphere, nil, "vc1/db-recovered"
			f.Failback = &api.FailbackStatus{State: "reprotected", Sent: 3 * mib}
		}),
		action: actionFailback, note: "3 MiB sent back to the original disks", direction: "Reprotected"},
	{name: "reprotected_azure", machine: withDirection("reprotected"),
		failover: failoverWith(func(f *api.Failover) {
			f.To, f.Exports, f.VM = api.ToAzure, nil, "azure/net-rg/db-recovered"
			f.Failback = &api.FailbackStatus{State: "reprotected", Sent: 3 * mib}
		}),
		action: actionFailback, note: "3 MiB sent back to the original disks", direction: "Reprotected"},
	{name: "failed_over_qemu", machine: withDirection("failed-over"), failover: failoverWith(func(f *api.Failover) { f.To = "qemu"; f.Exports = nil }),
		note: "this one is planned to qemu: not here yet", direction: "Failed over"},
	// A plan's (or group's) job is the machine's own when it names it:
	// its link and what it does now, no button.
	{name: "plan_failback_running", machine: withDirection("reprotected"),
		failover: failoverWith(func(f *api.Failover) { f.Failback = &api.FailbackStatus{State: "reprotected", Sent: 6 * mib} }),
		job: &api.Job{ID: "job-9", Kind: "failback", Subject: "plan app", State: api.JobRunning, Machines: []string{"app1", "db"},
			Steps: []api.JobStep{{Name: "group 2: shut down", State: "done"}, {Name: "db: drain", State: "running"}}},
		note: "of plan app</span> <a href=\"/jobs/job-9\">its job's progress</a> <span class=\"muted failback-job-step\">db: drain</span>", direction: "Reprotected"},
	{name: "plan_failback_waiting", machine: withDirection("failing-back"),
		failover: failoverWith(func(f *api.Failover) { f.Failback = &api.FailbackStatus{State: "failing-back", Sent: 6 * mib} }),
		job: &api.Job{ID: "job-9", Kind: "failback", Subject: "group rg", State: api.JobRunning, Machines: []string{"db"}, Waiting: "check the database",
			Steps: []api.JobStep{{Name: "switch", State: "done"}, {Name: "group 1 post 1", State: "running"}}},
		note: "group 1 post 1: waits for a manual action: check the database", direction: "Failing back"},
	// Another plan's job leaves the machine's button.
	{name: "plan_job_of_others", machine: withDirection("reprotected"),
		failover: failoverWith(func(f *api.Failover) { f.Failback = &api.FailbackStatus{State: "reprotected", Sent: 6 * mib} }),
		job:      &api.Job{ID: "job-9", Kind: "failback", Subject: "plan other", State: api.JobRunning, Machines: []string{"app1"}},
		action:   actionFailback, direction: "Reprotected"},
}

func failbackBackend(c int) *fakeBackend {
	tc := failbackCases[c]
	b := newFakeBackend(tc.machine)
	if tc.failover != nil {
		b.failovers = []api.Failover{*tc.failover}
	}
	if tc.job != nil {
		b.jobs = []api.Job{*tc.job, {ID: "job-1", Kind: "failback", Subject: "other", State: api.JobRunning}}
	}
	return b
}

// The machine's page and the machines list show the failback button
// only in the state it applies to, in place of the next command; the
// goldens hold the machine page's live part in each state.
func TestFailbackButtons(t *testing.T) {
	for i, tc := range failbackCases {
		t.Run(tc.name, func(t *testing.T) {
			b := failbackBackend(i)
			h := newTestHandler(t, b)
			id, _ := mustLogin(t, h, b)
			r := withSession(httptest.NewRequest("GET", "/fragments/machines/db", nil), id)
			r.Header.Set("HX-Request", "true")
			w := serve(h, r)
			if w.Code != http.StatusOK {
				t.Fatalf("status %d", w.Code)
			}
			body := w.Body.String()
			checkGolden(t, "fragment_machine_"+tc.name, body)
			list := get(t, h, id, "/machines", http.StatusOK)
			for where, body := range map[string]string{"machine page": body, "machines list": list} {
				buttons := strings.Count(body, `data-failback="`)
				switch {
				case tc.action == "" && buttons != 0:
					t.Errorf("%s: a failback button where none applies", where)
				case tc.action != "" && (buttons != 1 || !strings.Contains(body, `data-failback="`+tc.action+`" href="/machines/db/`+tc.action+`"`)):
					t.Errorf("%s: want one %s button, have %d", where, tc.action, buttons)
				}
				if tc.forward != strings.Contains(body, "Reprotect forward…") {
					t.Errorf("%s: forward %v, the button says otherwise", where, tc.forward)
				}
				if !strings.Contains(body, tc.note) || !strings.Contains(body, tc.direction) {
					t.Errorf("%s lacks %q or %q", where, tc.note, tc.direction)
				}
				if tc.action != "" && strings.Contains(body, "<code>asr "+tc.action) {
					t.Errorf("%s: the next command is shown with its button", where)
				}
				if tc.job != nil && (tc.action == "") != strings.Contains(body, `href="/jobs/job-9"`) {
					t.Errorf("%s: the running job is linked %v, want %v", where, !(tc.action == ""), tc.action == "")
				}
			}
			if fo := tc.failover; fo != nil && fo.Failback != nil {
				page := get(t, h, id, "/failovers", http.StatusOK)
				if !strings.Contains(page, `<a href="/machines/db">`+fo.Failback.State+`</a>`) || !strings.Contains(page, "sent back to the original disks") {
					t.Error("the failovers page does not show the failback's state and bytes")
				}
			}
		})
	}
}

// The confirmation pages say what will happen; a page whose action does
// not apply says why and offers no button (409).
func TestFailbackConfirmPages(t *testing.T) {
	for _, tc := range []struct {
		golden, path string
		c            int // in failbackCases
		status       int
		want         []string
	}{
		{"reprotect", "/machines/db/reprotect", 1, http.StatusOK,
			[]string{"Reprotect db", "4 MiB so far", "stays frozen", `id="confirm-reprotect"`, "asr reprotect --machine db"}},
		{"failback", "/machines/db/failback", 5, http.StatusOK,
			[]string{"Fail db back", "The failed-over machine is stopped", "last changes are drained", "2 MiB pending now", "compared whole",
				"on-premises machine is resumed", `id="confirm-failback"`}},
		{"reprotect_forward", "/machines/db/reprotect", 9, http.StatusOK,
			[]string{"Reprotect db forward", "compares checksums", "not a new initial replication", `id="confirm-reprotect"`}},
		{"reprotect_vsphere", "/machines/db/reprotect", 4, http.StatusOK,
			[]string{"Reprotect db", "original agent is frozen", "vc1/db-recovered", "only the blocks that differ", `id="confirm-reprotect"`}},
		{"failback_vsphere", "/machines/db/failback", 11, http.StatusOK,
			[]string{"Fail db back", "vc1/db-recovered", "is powered off", "compared whole", `id="confirm-failback"`}},
		{"reprotect_azure", "/machines/db/reprotect", 10, http.StatusOK,
			[]string{"Reprotect db", "original agent is frozen", "azure/net-rg/db-recovered", "managed disks are read", "from a snapshot",
				"only the blocks that differ", "failback deallocates it", "never against real Azure", `id="confirm-reprotect"`}},
		{"failback_azure", "/machines/db/failback", 12, http.StatusOK,
			[]string{"Fail db back", "azure/net-rg/db-recovered", "is deallocated", "read SAS", "compared whole", "stay in Azure, deallocated",
				"started again", "never against real Azure", `id="confirm-failback"`}},
		{"failback_not_reprotected", "/machines/db/failback", 1, http.StatusConflict,
			[]string{"failback does not apply now", "Back to db"}},
		{"reprotect_uncommitted", "/machines/db/reprotect", 2, http.StatusConflict,
			[]string{"Commit the failover"}},
		{"reprotect_running", "/machines/db/reprotect", 6, http.StatusConflict,
			[]string{"A reprotect job of db is running", `id="failback-running-job" class="button button-primary" href="/jobs/job-9"`}},
		{"failback_plan_running", "/machines/db/failback", 14, http.StatusConflict,
			[]string{"A failback job of plan app, db among its machines, is running", `id="failback-running-job" class="button button-primary" href="/jobs/job-9"`}},
	} {
		t.Run(tc.golden, func(t *testing.T) {
			b := failbackBackend(tc.c)
			h := newTestHandler(t, b)
			id, _ := mustLogin(t, h, b)
			body := get(t, h, id, tc.path, tc.status)
			checkGolden(t, "page_"+tc.golden, body)
			for _, w := range tc.want {
				if !strings.Contains(body, w) {
					t.Errorf("the page lacks %q", w)
				}
			}
			if tc.status != http.StatusOK && strings.Contains(body, `id="confirm-`) {
				t.Error("a confirm button where the action does not apply")
			}
		})
	}
	b := newFakeBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	get(t, h, id, "/machines/nosuch/reprotect", http.StatusNotFound)

	// With the recovered VM's agent connected, reprotect of a failover to
	// Azure says it compares through it and streams its writes.
	b = failbackBackend(10)
	b.machines[0].ReverseSource = &api.ReverseSource{Kind: "agent", VM: "db-recovered", Connected: true}
	h = newTestHandler(t, b)
	id, _ = mustLogin(t, h, b)
	body := get(t, h, id, "/machines/db/reprotect", http.StatusOK)
	if !strings.Contains(body, `id="failback-recovered-agent"`) || !strings.Contains(body, "no snapshot, no read SAS") ||
		!strings.Contains(body, "sent to the original disks as they happen") || strings.Contains(body, "not sent as they happen") {
		t.Error("the reprotect page with the recovered agent connected does not say it goes through it")
	}
}

// The confirmed POSTs start the server's jobs and go to them; without the
// CSRF token they are refused; a refusal of the server shows its message
// on the confirmation page and starts nothing.
func TestFailbackStart(t *testing.T) {
	for _, c := range []int{1, 10} { // failed over to NBD, to Azure
		t.Run(failbackCases[c].name, func(t *testing.T) { testFailbackStart(t, c) })
	}
}

func testFailbackStart(t *testing.T, c int) {
	b := failbackBackend(c)
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	post(t, h, id, "/machines/db/reprotect", url.Values{}, http.StatusForbidden)
	if len(b.actions) != 0 {
		t.Fatalf("started without the CSRF token: %v", b.actions)
	}
	w := post(t, h, id, "/machines/db/reprotect", url.Values{"csrf": {csrf}}, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/jobs/job-1" {
		t.Fatalf("went to %q, want the job's page", loc)
	}
	w = post(t, h, id, "/machines/db/failback", url.Values{"csrf": {csrf}}, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/jobs/job-2" {
		t.Fatalf("went to %q, want the job's page", loc)
	}
	if got := strings.Join(b.actions, ","); got != "reprotect db,failback db" {
		t.Fatalf("actions %q", got)
	}
	// The machine page now links the running job instead of a button.
	body := get(t, h, id, "/machines/db", http.StatusOK)
	if strings.Contains(body, `data-failback="`) || !strings.Contains(body, `href="/jobs/job-2"`) {
		t.Error("the machine page offers a button while a job runs")
	}

	b.refuse = errors.New("machine db is reprotected already")
	body = post(t, h, id, "/machines/db/reprotect", url.Values{"csrf": {csrf}}, http.StatusConflict).Body.String()
	if !strings.Contains(body, "Nothing was started: machine db is reprotected already") || !strings.Contains(body, `role="alert"`) {
		t.Fatalf("the refusal is not shown:\n%s", body)
	}
	if c == 1 {
		checkGolden(t, "page_reprotect_refused", body)
	}
	if len(b.actions) != 3 || len(b.jobs) != 2 {
		t.Fatalf("a refused reprotect started a job: %v, %d jobs", b.actions, len(b.jobs))
	}
	post(t, h, id, "/machines/nosuch/failback", url.Values{"csrf": {csrf}}, http.StatusNotFound)
}

// The alternate location's page: offered (on the machine's page and as a
// form) only for a committed failover to NBD, to vSphere or to Azure
// with no job running (not one to QEMU); its
// POST starts FailbackTo with the form's fields and goes to the job; a
// refusal of the server shows on the form with what was typed; no
// vCenter, no CSRF token or an empty datastore start nothing.
func TestFailbackAlternate(t *testing.T) {
	for c, tc := range failbackCases {
		b := failbackBackend(c)
		b.vcenters = []api.VCenter{{Name: "vc1"}}
		h := newTestHandler(t, b)
		id, _ := mustLogin(t, h, b)
		ownJob := tc.job != nil && (tc.job.Subject == "db" || slices.Contains(tc.job.Machines, "db"))
		want := tc.failover != nil && alternateFrom(tc.failover.To) && tc.failover.State == "committed" && !ownJob &&
			(tc.failover.Failback == nil || tc.failover.Failback.State != "failing-back")
		body := get(t, h, id, "/machines/db", http.StatusOK)
		if got := strings.Contains(body, `href="/machines/db/failback-alternate"`); got != want {
			t.Errorf("%s: the machine page offers the alternate location: %v, want %v", tc.name, got, want)
		}
		status := http.StatusOK
		if !want {
			status = http.StatusConflict
		}
		body = get(t, h, id, "/machines/db/failback-alternate", status)
		if got := strings.Contains(body, `id="alternate-form"`); got != want {
			t.Errorf("%s: the form is shown: %v, want %v", tc.name, got, want)
		}
		if tc.name == "failed_over" || tc.name == "failed_over_vsphere" || tc.name == "failed_over_azure" {
			checkGolden(t, "page_failback_alternate_"+tc.name, body)
		}
	}

	b := failbackBackend(5) // reprotected, to NBD
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/machines/db/failback-alternate", http.StatusOK)
	if !strings.Contains(body, "No vCenter is registered") || strings.Contains(body, `id="alternate-form"`) {
		t.Errorf("without a vCenter the form is offered:\n%s", body)
	}
	b.vcenters = []api.VCenter{{Name: "vc1"}, {Name: "vc2"}}
	form := url.Values{"vcenter": {"vc2"}, "datastore": {"ds2"}, "vm_name": {"db-new"}, "folder": {"/DC0/vm/DR"}, "network": {"LAN"}}
	post(t, h, id, "/machines/db/failback-alternate", form, http.StatusForbidden)
	form.Set("csrf", csrf)
	noDS := url.Values{"csrf": {csrf}, "vcenter": {"vc1"}}
	if body := post(t, h, id, "/machines/db/failback-alternate", noDS, http.StatusBadRequest).Body.String(); !strings.Contains(body, "name the datastore") {
		t.Errorf("an empty datastore:\n%s", body)
	}
	if len(b.alternate) != 0 {
		t.Fatalf("started without the CSRF token or a datastore: %+v", b.alternate)
	}
	w := post(t, h, id, "/machines/db/failback-alternate", form, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/jobs/job-1" {
		t.Fatalf("went to %q, want the job's page", loc)
	}
	wantReq := api.FailbackRequest{Alternate: true, VMName: "db-new", VSphere: &api.VSphereTarget{VCenter: "vc2", Datastore: "ds2", Folder: "/DC0/vm/DR", Network: "LAN"}}
	if len(b.alternate) != 1 || b.alternate[0].VMName != wantReq.VMName || *b.alternate[0].VSphere != *wantReq.VSphere || !b.alternate[0].Alternate {
		t.Fatalf("FailbackTo got %+v, want %+v", b.alternate, wantReq)
	}
	b.jobs = nil
	b.refuse = errors.New(`datastore "ds9": not found`)
	form.Set("datastore", "ds9")
	body = post(t, h, id, "/machines/db/failback-alternate", form, http.StatusConflict).Body.String()
	if !strings.Contains(body, "Nothing was started: datastore &#34;ds9&#34;: not found") || !strings.Contains(body, `value="ds9"`) ||
		!strings.Contains(body, `value="/DC0/vm/DR"`) || !strings.Contains(body, `<option value="vc2" selected>`) {
		t.Fatalf("the refusal is not shown with the form as typed:\n%s", body)
	}
	if !strings.Contains(body, "asr failback --machine db --alternate --vcenter vc2 --datastore ds9 --vm-name db-new --folder /DC0/vm/DR --network LAN") {
		t.Errorf("the page lacks the same request's command line:\n%s", body)
	}
	post(t, h, id, "/machines/nosuch/failback-alternate", form, http.StatusNotFound)
}
