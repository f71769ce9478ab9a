package web

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// newConsoleBackend is a console with a machine in every state, policies,
// alerts, events, history, points, a live failover and a running job.
func newConsoleBackend() *fakeBackend {
	b := newVMwareBackend()
	sql := protectedMachine
	sql.Policy, sql.Group = "gold", "erp"
	app := disconnectedMachine
	app.Policy, app.Group = "default", "erp"
	files := resyncMachine
	files.Policy = "default"
	web := initialMachine
	web.Policy = "default"
	old := unprotectedMachine
	old.Policy = "default"
	b.machines = []api.Machine{web, sql, files, app, old}
	b.policies[0] = api.PolicyJSON{Name: "default", RPOThreshold: "15m0s", Retention: "72h0m0s", AppFrequency: "0s", CrashInterval: "5m0s", PITWindow: "24h0m0s"}
	b.policies[1] = api.PolicyJSON{Name: "gold", RPOThreshold: "5m0s", Retention: "24h0m0s", AppFrequency: "1h0m0s", CrashInterval: "30s", PITWindow: "4h0m0s"}
	b.policies[2] = api.PolicyJSON{Name: "gold-failback", RPOThreshold: "15m0s", Retention: "24h0m0s", AppFrequency: "1h0m0s", CrashInterval: "5m0s", PITWindow: "1h0m0s",
		FailbackOf: "gold", Notes: "rpo_threshold: applied: the reverse RPO is alerted against it; app_frequency: not applied: no agent inside the failed-over machine"}
	b.alerts = []api.Alert{
		{ID: 7, Kind: "rpo-exceeded", Severity: api.SeverityCritical, State: api.AlertActive, Machine: "files-02",
			Message: "RPO 42m exceeds the threshold of 15m (policy default)", Action: "Check the agent's connection.", Raised: testNow.Add(-40 * time.Minute)},
		{ID: 8, Kind: "cache-warning", Severity: api.SeverityWarning, State: api.AlertActive, Subject: "process-server",
			Message: "the process server's cache disk is 28% free", Raised: testNow.Add(-5 * time.Minute)},
		{ID: 3, Kind: "drill-failed", Severity: api.SeverityCritical, State: api.AlertResolved, Message: "an old drill", Raised: testNow.Add(-30 * time.Hour)},
	}
	b.events = []api.EventJSON{
		{Time: testNow.Add(-time.Minute).Format(time.RFC3339Nano), Machine: "sql-prod", Severity: "info", Kind: "resync-done", Message: "disk sqldata: resync done, 12 MiB sent"},
		{Time: testNow.Add(-20 * time.Minute).Format(time.RFC3339Nano), Machine: "sql-prod", Severity: "warning", Kind: "rpo-exceeded", Message: "RPO 6m exceeds the threshold of 5m"},
		{Time: testNow.Add(-30 * time.Minute).Format(time.RFC3339Nano), Machine: "sql-prod", Severity: "warning", Kind: "resync-needed", Message: "disk sqldata: the disk grew"},
		{Time: testNow.Add(-40 * time.Minute).Format(time.RFC3339Nano), Machine: "files-02", Severity: "warning", Kind: "rpo-exceeded", Message: "RPO of files"},
	}
	b.history = map[string][]api.HistorySample{}
	for i := range 24 * 60 / 10 {
		t := testNow.Add(-24*time.Hour + time.Duration(i+1)*10*time.Minute)
		b.history["sql-prod"] = append(b.history["sql-prod"], api.HistorySample{Time: t, RPO: time.Duration(i%7) * time.Second, RPOKnown: true,
			Bytes: int64(i) * 10 * mib, Churn: 10 * mib})
	}
	b.points = map[string][]api.PointJSON{"sql-prod": {
		{ID: "00000000000000a1", Time: testNow.Add(-3 * time.Hour).Format(time.RFC3339Nano), Kind: api.PointCrash},
		{ID: "00000000000000a2", Time: testNow.Add(-2 * time.Hour).Format(time.RFC3339Nano), Kind: api.PointApp},
		{ID: "000000000000a3f1", Time: testNow.Add(-3*time.Minute - 12*time.Second).Format(time.RFC3339Nano), Kind: api.PointApp},
	}}
	b.failovers = testFailovers[:1]
	b.jobs = []api.Job{{ID: "j-run", Kind: "failover", Subject: "sql-prod", State: api.JobRunning, StartedAt: testNow.Add(-30 * time.Second),
		Steps: []api.JobStep{{Name: "check", State: "done"}, {Name: "export", State: "running", Done: 1 << 20, Total: 4 << 20}}}}
	b.ps.CPU, b.ps.Memory, b.ps.MemoryTotal, b.ps.UploadETA = 0.42, 0.87, 16<<30, 90*time.Second
	return b
}

// tileCount is the count a dashboard tile shows.
func tileCount(t *testing.T, body, id string) string {
	t.Helper()
	m := regexp.MustCompile(`id="` + id + `"[^>]*>\s*<span class="tile-count">(\d+)</span>`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no tile %s", id)
	}
	return m[1]
}

func TestDashboard(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	body := get(t, h, id, "/", http.StatusOK)

	// Health counts: the disconnected machine is not counted protected,
	// the never-connected initial one... is connected in the fixture.
	for tile, want := range map[string]string{"tile-protected": "1", "tile-initial": "1", "tile-resync": "1", "tile-disconnected": "1",
		"tile-unprotected": "1", "tile-critical": "1", "tile-warning": "1", "tile-failovers": "1", "tile-jobs": "1"} {
		if got := tileCount(t, body, tile); got != want {
			t.Errorf("%s: %s, want %s", tile, got, want)
		}
	}
	for _, want := range []string{
		// Alerts: the active ones only.
		"RPO 42m exceeds the threshold of 15m (policy default)", "the process server&#39;s cache disk is 28% free", "Check the agent&#39;s connection.",
		// The RPO of every machine, against its policy's threshold.
		`data-machine="sql-prod"`, `<span class="rpo">0.8 s</span>`, "5 min <span class=\"sub\">policy gold</span>",
		`<span class="rpo rpo-bad">42 min</span>`, `<span class="rpo rpo-bad">≥ 2 h 10 min</span>`,
		// Running jobs with their progress.
		`<progress value="1" max="2"`, "1 of 2 steps done",
		// Charts: a line for the machine with history, "No data" for those without.
		`id="rpo-chart-sql-prod"`, `id="churn-chart-sql-prod"`, `id="rpo-chart-web-01"`,
		// Polled.
		`hx-get="/fragments/dashboard"`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("dashboard lacks %s", want)
		}
	}
	if strings.Contains(body, "an old drill") {
		t.Error("the dashboard shows a resolved alert")
	}
	chart := func(id string) string {
		i := strings.Index(body, `id="`+id+`"`)
		return body[i : i+strings.Index(body[i:], "</svg>")]
	}
	if c := chart("rpo-chart-sql-prod"); !regexp.MustCompile(`class="chart-line" d="M[0-9.]+,[0-9.]+ L`).MatchString(c) || strings.Contains(c, "No data") {
		t.Errorf("sql-prod's RPO chart has no line:\n%s", c)
	}
	if c := chart("rpo-chart-web-01"); !strings.Contains(c, "No data") || strings.Contains(c, "chart-line") {
		t.Errorf("web-01 has no history but its chart is not empty:\n%s", c)
	}
	if strings.Contains(body, `id="rpo-chart-old-erp"`) {
		t.Error("an unprotected machine has charts")
	}

	frag := get(t, h, id, "/fragments/dashboard", http.StatusOK)
	if !strings.HasPrefix(frag, `<div id="dashboard"`) || !strings.Contains(body, frag) {
		t.Errorf("the fragment is not the dashboard's polled part:\n%.300s", frag)
	}
	if strings.Contains(frag, "<svg class=\"chart") || strings.Contains(frag, `id="rpo-chart-`) {
		t.Error("the 5 s fragment carries the charts")
	}
	charts := get(t, h, id, "/fragments/dashboard/charts", http.StatusOK)
	if !strings.HasPrefix(charts, `<section id="charts"`) || !strings.Contains(body, charts) || !strings.Contains(charts, `id="rpo-chart-sql-prod"`) {
		t.Errorf("the charts fragment is not the dashboard's charts:\n%.300s", charts)
	}
}

// TestDisconnectedIsNotProtected: a machine whose agent is gone shows
// "Disconnected" with a growing RPO everywhere, never "Protected".
func TestDisconnectedIsNotProtected(t *testing.T) {
	m := disconnectedMachine // protected disks, no status since the server started
	b := newFakeBackend(m)
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	// The machine's status, on each page (its disks keep their states).
	status := map[string][2]string{"/": {`id="rpo-table"`, "</table>"}, "/machines": {`class="machine-row"`, `class="detail-row"`},
		"/machines/app-03": {`class="machine-head"`, "</p>"}}
	for path, part := range status {
		body := get(t, h, id, path, http.StatusOK)
		s := body[strings.Index(body, part[0]):]
		s = s[:strings.Index(s, part[1])]
		if !strings.Contains(s, `<span class="badge badge-bad status-disconnected">Disconnected</span>`) {
			t.Errorf("%s: no Disconnected status", path)
		}
		if strings.Contains(s, "Protected</span>") {
			t.Errorf("%s: a disconnected machine shows Protected", path)
		}
		if !strings.Contains(body, "≥ 2 h 10 min") {
			t.Errorf("%s: no RPO lower bound from the last time the agent was seen", path)
		}
	}
	// The bound grows with the clock.
	h2 := New(b, Options{Now: func() time.Time { return testNow.Add(time.Hour) }})
	h2.auth.loginDelay = 0
	id2, _ := mustLogin(t, h2, b)
	if body := get(t, h2, id2, "/machines", http.StatusOK); !strings.Contains(body, "≥ 3 h 10 min") {
		t.Error("the RPO of a disconnected machine does not grow")
	}
	// A connected one with a known RPO shows it as it is.
	got, exact, ok := protectedMachine.RPOAtLeast(testNow)
	if !ok || !exact || got != protectedMachine.RPO {
		t.Errorf("RPOAtLeast of a reporting machine: %v %v %v", got, exact, ok)
	}
	if _, _, ok := neverSeenMachine.RPOAtLeast(testNow); ok {
		t.Error("a machine never seen, with no point, has an RPO")
	}
}

func TestMachinePage(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/machines/sql-prod", http.StatusOK)
	for _, want := range []string{
		"<h1 id=\"machine-title\">sql-prod</h1>", `<span class="badge badge-ok">Protected</span>`,
		// Disks.
		`data-disk="os"`, `data-disk="sqldata"`, `data-disk="sqllog"`, "500 GiB",
		// Points: the timeline (a dot per point in the policy's 24 h
		// retention), the any-point window (gold: 4 h, limited by the
		// oldest point 3 h ago), the newest points with their recovery.
		`id="points-timeline"`, `class="pt pt-app"`, `class="pt pt-crash"`,
		"<strong>Any point in time</strong> from <time datetime=\"2025-06-01T09:00:00Z\">",
		"asr recover --machine sql-prod --point 000000000000a3f1 --out DIR",
		`href="/failovers/new?machine=sql-prod&amp;point=000000000000a3f1"`,
		// Events and the resync history.
		"RPO 6m exceeds the threshold of 5m", "disk sqldata: resync done, 12 MiB sent",
		// Charts.
		`id="machine-rpo-chart"`, `id="machine-churn-chart"`,
		// Actions.
		`action="/machines/sql-prod/tag"`, `<input type="hidden" name="csrf" value="` + csrf + `">`, `id="tag-crash"`, `id="tag-app"`,
		`href="/machines/a1b2c3d4-0000-4000-8000-000000000001/resync"`,
		`id="machine-test-failover" class="button" href="/failovers/new?machine=sql-prod"`,
		`href="/failovers/new?machine=sql-prod&amp;kind=planned"`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("machine page lacks %s", want)
		}
	}
	if n := strings.Count(body, "<circle"); n != 3 {
		t.Errorf("%d points on the timeline, want 3", n)
	}
	resyncs := body[strings.Index(body, `id="machine-resyncs"`):]
	resyncs = resyncs[:strings.Index(resyncs, "</section>")]
	if !strings.Contains(resyncs, "resync done") || !strings.Contains(resyncs, "the disk grew") || strings.Contains(resyncs, "RPO 6m") {
		t.Errorf("resync history:\n%s", resyncs)
	}

	// The failover form is prefilled from the machine's page.
	form := get(t, h, id, "/failovers/new?machine=sql-prod&kind=planned&point=000000000000a3f1", http.StatusOK)
	if !strings.Contains(form, `value="planned" checked`) {
		t.Error("the failover form does not preselect the planned failover")
	}

	// An unknown machine is a styled 404.
	w := serve(h, withSession(httptest.NewRequest("GET", "/machines/nope", nil), id))
	if w.Code != http.StatusNotFound || !strings.Contains(w.Body.String(), `id="error-page"`) || !strings.Contains(w.Body.String(), "There is no machine nope.") {
		t.Errorf("unknown machine: status %d:\n%s", w.Code, w.Body)
	}
}

func TestMachineTag(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)

	// Without the CSRF token nothing is asked.
	post(t, h, id, "/machines/sql-prod/tag", url.Values{"kind": {"crash"}}, http.StatusForbidden)
	// A kind that does not exist is refused.
	w := post(t, h, id, "/machines/sql-prod/tag", url.Values{"kind": {"weekly"}, "csrf": {csrf}}, http.StatusUnprocessableEntity)
	if !strings.Contains(w.Body.String(), "Unknown kind of point weekly") {
		t.Errorf("bad kind: no error shown:\n%s", w.Body)
	}
	// The backend's refusal shows on the page.
	b.tagErr = errors.New("machine sql-prod: agent not connected")
	w = post(t, h, id, "/machines/sql-prod/tag", url.Values{"kind": {"crash"}, "csrf": {csrf}}, http.StatusUnprocessableEntity)
	if !strings.Contains(w.Body.String(), "No recovery point was made: machine sql-prod: agent not connected") {
		t.Errorf("refused tag: no error shown:\n%s", w.Body)
	}
	if len(b.tags) != 0 {
		t.Fatalf("refused tags made points: %v", b.tags)
	}
	b.tagErr = nil

	w = post(t, h, id, "/machines/sql-prod/tag", url.Values{"kind": {"app"}, "csrf": {csrf}}, http.StatusSeeOther)
	loc := w.Header().Get("Location")
	if !strings.HasPrefix(loc, "/machines/sql-prod?tagged=") || !slices.Equal(b.tags, []string{"sql-prod app"}) {
		t.Fatalf("tag: Location %q, tags %v", loc, b.tags)
	}
	point := strings.TrimPrefix(loc, "/machines/sql-prod?tagged=")
	body := get(t, h, id, loc, http.StatusOK)
	if !strings.Contains(body, `id="tagged"`) || !strings.Contains(body, `data-point="`+point+`"`) {
		t.Errorf("the new point %s is not on the page", point)
	}
	post(t, h, id, "/machines/nope/tag", url.Values{"kind": {"crash"}, "csrf": {csrf}}, http.StatusNotFound)
}

func TestPolicies(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/policies", http.StatusOK)
	for _, want := range []string{`data-policy="gold"`, `href="/policies/gold/edit"`, "failback of gold", "sql-prod", `action="/policies"`, `action="/policies/assign"`} {
		if !strings.Contains(body, want) {
			t.Errorf("policies page lacks %s", want)
		}
	}
	before := slices.Clone(b.policies)
	create := func(form url.Values, status int) string {
		t.Helper()
		form.Set("csrf", csrf)
		return post(t, h, id, "/policies", form, status).Body.String()
	}
	// Refused input shows in the form, as typed, and creates nothing.
	invalid := regexp.MustCompile(`<input id="([a-z-]+)"[^>]*aria-invalid="true"`)
	for _, tt := range []struct {
		form    url.Values
		want    string
		invalid string // the field marked invalid
	}{
		{url.Values{"name": {"silver"}, "crash_interval": {"1s"}}, "must be from 5s to 5m", "new-crash"},
		{url.Values{"name": {"silver"}, "retention": {"soon"}}, `retention &#34;soon&#34;: not a duration`, "new-retention"},
		{url.Values{"name": {""}}, "Give the policy a name.", "policy-name"},
		{url.Values{"name": {"gold"}}, "already exists", "policy-name"},
	} {
		body := create(tt.form, http.StatusUnprocessableEntity)
		if !strings.Contains(body, `id="policy-error"`) || !strings.Contains(body, tt.want) {
			t.Errorf("%v: no error %q in the form", tt.form, tt.want)
		}
		if !strings.Contains(body, `value="`+tt.form.Get("name")+`"`) {
			t.Errorf("%v: the form lost what was typed", tt.form)
		}
		var marked []string
		for _, m := range invalid.FindAllStringSubmatch(body, -1) {
			marked = append(marked, m[1])
		}
		if !slices.Equal(marked, []string{tt.invalid}) {
			t.Errorf("%v: fields marked invalid %v, want %s", tt.form, marked, tt.invalid)
		}
	}
	if !slices.Equal(b.policies, before) {
		t.Fatalf("refused policies changed the list: %v", b.policies)
	}
	w := post(t, h, id, "/policies", url.Values{"csrf": {csrf}, "name": {"silver"}, "crash_interval": {"1m"}, "rpo_threshold": {"10m"}}, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); !strings.HasPrefix(loc, "/policies?done=") {
		t.Fatalf("create: Location %q", loc)
	}
	if body := get(t, h, id, w.Header().Get("Location"), http.StatusOK); !strings.Contains(body, "Policy silver created.") || !strings.Contains(body, `data-policy="silver"`) {
		t.Error("the created policy is not listed")
	}

	// Edit: the form holds the values; a refused change changes nothing.
	body = get(t, h, id, "/policies/silver/edit", http.StatusOK)
	if !strings.Contains(body, `name="crash_interval" type="text" value="1m0s"`) {
		t.Error("the edit form does not hold the policy's values")
	}
	body = post(t, h, id, "/policies/silver/edit", url.Values{"csrf": {csrf}, "crash_interval": {"10m"}}, http.StatusUnprocessableEntity).Body.String()
	if !strings.Contains(body, "The policy was not changed") || !strings.Contains(body, `value="10m"`) {
		t.Errorf("refused edit:\n%s", body)
	}
	post(t, h, id, "/policies/silver/edit", url.Values{"csrf": {csrf}, "crash_interval": {"2m"}}, http.StatusSeeOther)
	if i := slices.IndexFunc(b.policies, func(p api.PolicyJSON) bool { return p.Name == "silver" }); b.policies[i].CrashInterval != "2m0s" {
		t.Errorf("edit: crash interval %s, want 2m0s", b.policies[i].CrashInterval)
	}
	get(t, h, id, "/policies/nope/edit", http.StatusNotFound)
	post(t, h, id, "/policies/silver/edit", url.Values{"crash_interval": {"3m"}}, http.StatusForbidden)

	// Assign: a failback policy is refused, a policy is assigned.
	body = post(t, h, id, "/policies/assign", url.Values{"csrf": {csrf}, "machine": {"web-01"}, "policy": {"gold-failback"}}, http.StatusUnprocessableEntity).Body.String()
	if !strings.Contains(body, `id="assign-error"`) || len(b.assigned) != 0 {
		t.Errorf("assigning a failback policy: assigned %v", b.assigned)
	}
	post(t, h, id, "/policies/assign", url.Values{"csrf": {csrf}, "machine": {"web-01"}, "policy": {"silver"}}, http.StatusSeeOther)
	if !slices.Equal(b.assigned, []string{"web-01=silver"}) {
		t.Errorf("assigned %v", b.assigned)
	}
}

func TestGroups(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/groups", http.StatusOK)
	for _, want := range []string{`data-group="erp"`, `href="/machines/sql-prod"`, `href="/machines/app-03"`, "No group point yet.", `action="/groups/erp/points"`} {
		if !strings.Contains(body, want) {
			t.Errorf("groups page lacks %s", want)
		}
	}
	body = post(t, h, id, "/groups/members", url.Values{"csrf": {csrf}, "machine": {"web-01"}, "group": {"bad name"}}, http.StatusUnprocessableEntity).Body.String()
	if !strings.Contains(body, "The group was not changed") || len(b.groupsSet) != 0 {
		t.Errorf("a bad group name: set %v", b.groupsSet)
	}
	post(t, h, id, "/groups/members", url.Values{"csrf": {csrf}, "machine": {"web-01"}, "group": {"shop"}}, http.StatusSeeOther)
	post(t, h, id, "/groups/erp/points", url.Values{"csrf": {csrf}, "kind": {"crash"}}, http.StatusSeeOther)
	body = get(t, h, id, "/groups", http.StatusOK)
	if !strings.Contains(body, `data-group="shop"`) || !strings.Contains(body, "app-03: p0, sql-prod: p0") {
		t.Errorf("groups page after the changes:\n%s", body)
	}
	post(t, h, id, "/groups/nope/points", url.Values{"csrf": {csrf}}, http.StatusNotFound)
	post(t, h, id, "/groups/members", url.Values{"machine": {"web-01"}, "group": {"x"}}, http.StatusForbidden)
}

func TestInfrastructure(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	body := get(t, h, id, "/infrastructure", http.StatusOK)
	for _, want := range []string{
		`<dd id="ps-cpu"><span class="badge badge-ok">42%</span>`, `<span class="badge badge-warn">87%</span>`, "of 16 GiB",
		`<dd id="ps-eta">1 min</dd>`, "file:///var/lib/asr/target", `data-vcenter="vc1"`, "Connected", "Unreachable", "connection refused",
		`hx-get="/fragments/infrastructure"`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("infrastructure page lacks %s", want)
		}
	}
	b.ps.UploadETA = api.UploadStalled
	if body := get(t, h, id, "/fragments/infrastructure", http.StatusOK); !strings.Contains(body, "stalled") || !strings.HasPrefix(body, `<div id="infrastructure"`) {
		t.Errorf("fragment:\n%.300s", body)
	}
}

func TestErrorPages(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for _, tt := range []struct {
		r      *http.Request
		status int
		want   string
	}{
		{withSession(httptest.NewRequest("GET", "/no/such/page", nil), id), http.StatusNotFound, "There is no page /no/such/page."},
		{httptest.NewRequest("GET", "/static/nope.css", nil), http.StatusNotFound, ""},
		{withSession(postForm("/policies", url.Values{"name": {"x"}}), id), http.StatusForbidden, "Invalid or missing CSRF token"},
	} {
		w := serve(h, tt.r)
		if w.Code != tt.status {
			t.Errorf("%s %s: status %d, want %d", tt.r.Method, tt.r.URL, w.Code, tt.status)
		}
		if tt.want != "" && (!strings.Contains(w.Body.String(), `id="error-page"`) || !strings.Contains(w.Body.String(), tt.want) ||
			!strings.Contains(w.Body.String(), `href="/static/asr.css`)) {
			t.Errorf("%s %s: not a styled error page with %q:\n%s", tt.r.Method, tt.r.URL, tt.want, w.Body)
		}
	}
}

// TestRenderConsolePages compares the new pages with their golden files.
func TestRenderConsolePages(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	for name, path := range map[string]string{
		"dashboard": "/", "machine": "/machines/sql-prod", "machine_disconnected": "/machines/app-03", "policies": "/policies",
		"policy_edit": "/policies/gold/edit", "policy_edit_failback": "/policies/gold-failback/edit", "groups": "/groups", "infrastructure": "/infrastructure",
	} {
		checkGolden(t, "page_"+name, get(t, h, id, path, http.StatusOK))
	}
	checkGolden(t, "page_policies_refused", post(t, h, id, "/policies", url.Values{"csrf": {csrf}, "name": {"silver"}, "crash_interval": {"1s"}}, http.StatusUnprocessableEntity).Body.String())
	w := serve(h, withSession(httptest.NewRequest("GET", "/no/such/page", nil), id))
	checkGolden(t, "page_error_404", w.Body.String())
}

// TestInvalidPolicyField: the server's refusals name the field to mark.
func TestInvalidPolicyField(t *testing.T) {
	for msg, want := range map[string]string{
		"invalid app-consistent frequency: 2h: must be shorter than the retention (1h); nothing was created":              "app",
		"invalid any-point-in-time window: 48h: must be more than 0 and at most the retention (24h); nothing was changed": "pit",
		"invalid retention: 100h: must be more than 0 and at most 72h on a standard target; nothing was created":          "retention",
		`invalid name: "a b": 1 to 64 letters, digits, '.', '_' or '-'; nothing was created`:                              "name",
		"invalid rpo threshold: 0s: must be positive; nothing was changed":                                                "rpo",
		`crash_interval "soon": not a duration (e.g. 15m, 4h, 0 for off)`:                                                 "crash",
		"policy silver: already exists": "name",
		"database is locked":            "",
	} {
		if got := invalidPolicyField(msg); got != want {
			t.Errorf("%q: %q, want %q", msg, got, want)
		}
	}
}

// TestRPOAtLeast: the RPO the console shows of each kind of machine.
func TestRPOAtLeast(t *testing.T) {
	for _, tt := range []struct {
		name      string
		m         api.Machine
		rpo       time.Duration
		exact, ok bool
	}{
		{"reporting", protectedMachine, protectedMachine.RPO, true, true},
		{"gone, seen 2 h 10 min ago", disconnectedMachine, 2*time.Hour + 10*time.Minute, false, true},
		{"connected, no status yet", initialMachine, 0, false, false},
		{"never seen, no point", neverSeenMachine, 0, false, false},
		{"gone, never seen since, a point", api.Machine{LastPoint: &api.Point{Time: testNow.Add(-time.Hour)}}, time.Hour, false, true},
		{"unprotected", unprotectedMachine, 0, false, false},
	} {
		rpo, exact, ok := tt.m.RPOAtLeast(testNow)
		if rpo != tt.rpo || exact != tt.exact || ok != tt.ok {
			t.Errorf("%s: %v %v %v, want %v %v %v", tt.name, rpo, exact, ok, tt.rpo, tt.exact, tt.ok)
		}
	}
}

// TestJobProgress: a running job shows its steps' progress on its page and
// in the list, both polled while it runs.
func TestJobProgress(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	page := get(t, h, id, "/jobs/j-run", http.StatusOK)
	for _, want := range []string{`id="job-progress"`, `<progress value="1" max="2"`, "1 of 2 steps done", `hx-trigger="every 1s"`,
		`<progress value="1048576" max="4194304"`} {
		if !strings.Contains(page, want) {
			t.Errorf("job page lacks %s", want)
		}
	}
	list := get(t, h, id, "/jobs", http.StatusOK)
	for _, want := range []string{`data-job="j-run" data-state="running"`, "1 of 2 steps done", `hx-get="/fragments/jobs"`} {
		if !strings.Contains(list, want) {
			t.Errorf("jobs list lacks %s", want)
		}
	}
	// Ended, it shows every step done and polls no more.
	b.vmMu.Lock()
	b.jobs[0].State, b.jobs[0].Steps[1].State = api.JobSucceeded, "done"
	b.vmMu.Unlock()
	page = get(t, h, id, "/fragments/jobs/j-run", http.StatusOK)
	if !strings.Contains(page, "2 of 2 steps done") || strings.Contains(page, "hx-trigger") {
		t.Errorf("ended job:\n%s", page)
	}
}

// TestMachinePagePolling: a machine's status, figures and disks refresh in
// place; a machine gone says so in their place.
func TestMachinePagePolling(t *testing.T) {
	b := newConsoleBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	page := get(t, h, id, "/machines/app-03", http.StatusOK)
	frag := get(t, h, id, "/fragments/machines/app-03", http.StatusOK)
	if !strings.HasPrefix(frag, `<div id="machine-live" hx-get="/fragments/machines/app-03" hx-trigger="every 5s"`) || !strings.Contains(page, frag) {
		t.Fatalf("the fragment is not the page's polled part:\n%.400s", frag)
	}
	for _, want := range []string{"Disconnected", "≥ 2 h 10 min", `data-disk="disk0"`} {
		if !strings.Contains(frag, want) {
			t.Errorf("fragment lacks %s", want)
		}
	}
	b.mu.Lock()
	b.machines = b.machines[:1]
	b.mu.Unlock()
	frag = get(t, h, id, "/fragments/machines/app-03", http.StatusOK)
	if !strings.Contains(frag, "There is no machine app-03.") || !strings.Contains(frag, `hx-get="/fragments/machines/app-03"`) {
		t.Errorf("a machine gone:\n%s", frag)
	}
}
