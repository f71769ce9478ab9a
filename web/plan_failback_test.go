package web

import (
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// A plan's Reprotect and Failback open a confirmation page that says what
// will happen and where each machine is; its form posts (CSRF-checked) to
// the job's page; the server's refusal shows on the plan's card.
func TestPlanFailbackPages(t *testing.T) {
	b := newRecoveryBackend()
	b.plans = []api.Plan{shopPlan}
	db := api.Failover{ID: "f9", Machine: "db", MachineID: "m-db", Kind: api.FailoverReal, To: api.ToNBD, State: "committed", Planned: true,
		Plan: "shop", Created: testNow.Add(-time.Hour), Failback: &api.FailbackStatus{State: "reprotected", Sent: 4 << 20, Pending: 1 << 20}}
	b.failovers = []api.Failover{db}
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)

	body := get(t, h, id, "/plans/shop/failback", http.StatusOK)
	for _, want := range []string{"Fail plan shop back", `id="confirm-plan-failback"`, `action="/plans/shop/failback"`, `name="csrf"`,
		"the plan's last group", "All of them switch back at once", "failover to nbd, committed; Reprotected", "(1 MiB pending)",
		"no live failover", "asr failback --plan shop"} {
		if !strings.Contains(body, want) {
			t.Errorf("plan failback page lacks %q", want)
		}
	}
	checkGolden(t, "page_plan_failback", body)
	body = get(t, h, id, "/plans/shop/reprotect", http.StatusOK)
	for _, want := range []string{"Reprotect plan shop", `id="confirm-plan-reprotect"`, `action="/plans/shop/reprotect"`, "asr reprotect --plan shop"} {
		if !strings.Contains(body, want) {
			t.Errorf("plan reprotect page lacks %q", want)
		}
	}
	checkGolden(t, "page_plan_reprotect", body)
	get(t, h, id, "/plans/nosuch/failback", http.StatusNotFound)

	if w := serve(h, withSession(postForm("/plans/shop/failback", url.Values{}), id)); w.Code != http.StatusForbidden {
		t.Errorf("a plan failback without the CSRF token: status %d", w.Code)
	}
	b.refuse = errors.New("plan shop cannot be failed back (nothing was started):\n  machine app is not reprotected: run asr reprotect --plan shop first")
	jobs := len(b.jobs)
	body = post(t, h, id, "/plans/shop/failback", url.Values{"csrf": {csrf}}, http.StatusUnprocessableEntity).Body.String()
	if !strings.Contains(body, "machine app is not reprotected") || len(b.jobs) != jobs {
		t.Errorf("a refused plan failback: %d jobs, body:\n%s", len(b.jobs)-jobs, body)
	}
	b.refuse = nil
	w := post(t, h, id, "/plans/shop/failback", url.Values{"csrf": {csrf}}, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/jobs/"+b.jobs[0].ID || b.actions[len(b.actions)-1] != "failback shop" {
		t.Errorf("plan failback: to %s, actions %q", loc, b.actions)
	}
}
