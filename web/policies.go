package web

import (
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/a-h/templ"

	"github.com/asrdr/asr/server/api"
)

// policiesHandler serves the replication policies: list, create, edit,
// assign to a machine. The server checks every rule
// (replication.Policy.Validate); what it refuses is shown in the form,
// with what was typed, and changes nothing.
type policiesHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// policyForm is what the create and edit forms hold, as typed.
type policyForm struct {
	Name, RPOThreshold, Retention, AppFrequency, CrashInterval, PITWindow string
}

func policyFormOf(p api.PolicyJSON) policyForm {
	return policyForm{Name: p.Name, RPOThreshold: p.RPOThreshold, Retention: p.Retention, AppFrequency: p.AppFrequency,
		CrashInterval: p.CrashInterval, PITWindow: p.PITWindow}
}

// readPolicyForm reads the form's fields (empty ones are left as they are,
// or the defaults for a new policy).
func readPolicyForm(r *http.Request) policyForm {
	val := func(k string) string { return strings.TrimSpace(r.PostFormValue(k)) }
	return policyForm{Name: val("name"), RPOThreshold: val("rpo_threshold"), Retention: val("retention"),
		AppFrequency: val("app_frequency"), CrashInterval: val("crash_interval"), PITWindow: val("pit_window")}
}

func (f policyForm) json() api.PolicyJSON {
	return api.PolicyJSON{Name: f.Name, RPOThreshold: f.RPOThreshold, Retention: f.Retention, AppFrequency: f.AppFrequency,
		CrashInterval: f.CrashInterval, PITWindow: f.PITWindow}
}

// policiesView is what the policies page shows.
type policiesView struct {
	Session   *session
	Policies  []api.PolicyJSON
	Machines  []api.Machine
	Err       string
	Form      policyForm // the create form
	FormErr   string
	AssignErr string
	Assign    struct{ Machine, Policy string }
	Done      string // what the last action did
}

// Users are the machines a policy is assigned to.
func (v policiesView) Users(policy string) []string {
	var out []string
	for _, m := range v.Machines {
		if m.Policy == policy {
			out = append(out, m.Name)
		}
	}
	return out
}

func (h *policiesHandler) view(r *http.Request) (policiesView, int) {
	v := policiesView{Session: sessionFrom(r.Context())}
	var err error
	if v.Policies, err = h.backend.Policies(r.Context()); err != nil {
		h.log.Error("list policies", "err", err)
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	if v.Machines, err = h.backend.Machines(r.Context()); err != nil {
		h.log.Error("list machines", "err", err)
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	return v, http.StatusOK
}

// page lists the policies with the create and assign forms (?done=...
// says what the last action did).
func (h *policiesHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	v.Done = r.URL.Query().Get("done")
	render(w, r, h.log, status, policiesPage(v))
}

// create stores a new policy from the form.
func (h *policiesHandler) create(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	if status != http.StatusOK {
		render(w, r, h.log, status, policiesPage(v))
		return
	}
	v.Form = readPolicyForm(r)
	if v.Form.Name == "" {
		v.FormErr = "Give the policy a name."
		render(w, r, h.log, http.StatusUnprocessableEntity, policiesPage(v))
		return
	}
	p, err := h.backend.CreatePolicy(r.Context(), v.Form.json())
	if err != nil {
		h.log.Warn("create policy", "policy", v.Form.Name, "err", err)
		v.FormErr = "The policy was not created: " + err.Error()
		render(w, r, h.log, http.StatusUnprocessableEntity, policiesPage(v))
		return
	}
	h.log.Info("policy created from the console", "policy", p.Name, "remote", r.RemoteAddr)
	redirect(w, r, "/policies?done="+url.QueryEscape("Policy "+p.Name+" created."))
}

// assign gives a machine a policy.
func (h *policiesHandler) assign(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	if status != http.StatusOK {
		render(w, r, h.log, status, policiesPage(v))
		return
	}
	v.Assign.Machine, v.Assign.Policy = r.PostFormValue("machine"), r.PostFormValue("policy")
	if v.Assign.Machine == "" || v.Assign.Policy == "" {
		v.AssignErr = "Choose a machine and a policy."
		render(w, r, h.log, http.StatusUnprocessableEntity, policiesPage(v))
		return
	}
	if err := h.backend.AssignPolicy(r.Context(), v.Assign.Machine, v.Assign.Policy); err != nil {
		h.log.Warn("assign policy", "machine", v.Assign.Machine, "policy", v.Assign.Policy, "err", err)
		v.AssignErr = "The policy was not assigned: " + err.Error()
		render(w, r, h.log, errorStatus(err, http.StatusUnprocessableEntity), policiesPage(v))
		return
	}
	h.log.Info("policy assigned from the console", "machine", v.Assign.Machine, "policy", v.Assign.Policy, "remote", r.RemoteAddr)
	redirect(w, r, "/policies?done="+url.QueryEscape("Machine "+v.Assign.Machine+" now has policy "+v.Assign.Policy+"."))
}

// policyEditView is what a policy's edit page shows.
type policyEditView struct {
	Session *session
	Policy  api.PolicyJSON
	Form    policyForm
	Err     string
}

// findPolicy returns the policy of the request's {policy}.
func (h *policiesHandler) findPolicy(r *http.Request) (api.PolicyJSON, int, string) {
	return findByPath(r, h.log, h.backend.Policies, "policy", "policy", "policies", func(p api.PolicyJSON) string { return p.Name })
}

// editPage shows a policy's form.
func (h *policiesHandler) editPage(w http.ResponseWriter, r *http.Request) {
	p, status, msg := h.findPolicy(r)
	if status != http.StatusOK {
		httpError(w, r, status, msg)
		return
	}
	render(w, r, h.log, http.StatusOK, policyEditPage(policyEditView{Session: sessionFrom(r.Context()), Policy: p, Form: policyFormOf(p)}))
}

// update changes a policy from its form.
func (h *policiesHandler) update(w http.ResponseWriter, r *http.Request) {
	p, status, msg := h.findPolicy(r)
	if status != http.StatusOK {
		httpError(w, r, status, msg)
		return
	}
	v := policyEditView{Session: sessionFrom(r.Context()), Policy: p, Form: readPolicyForm(r)}
	v.Form.Name = p.Name
	if _, err := h.backend.UpdatePolicy(r.Context(), p.Name, v.Form.json()); err != nil {
		h.log.Warn("update policy", "policy", p.Name, "err", err)
		v.Err = "The policy was not changed: " + err.Error()
		render(w, r, h.log, errorStatus(err, http.StatusUnprocessableEntity), policyEditPage(v))
		return
	}
	h.log.Info("policy changed from the console", "policy", p.Name, "remote", r.RemoteAddr)
	redirect(w, r, "/policies?done="+url.QueryEscape("Policy "+p.Name+" changed."))
}

// policyNotes are a failback policy's notes, one per setting.
func policyNotes(p api.PolicyJSON) []string {
	if p.Notes == "" {
		return nil
	}
	return strings.Split(p.Notes, "; ")
}

// policyEditURL is a policy's edit page (and where its form posts).
func policyEditURL(name string) templ.SafeURL {
	return templ.SafeURL("/policies/" + url.PathEscape(name) + "/edit")
}

// invalidPolicyField names the field of the policy form a refusal is
// about ("name", "rpo", "retention", "app", "crash", "pit"; "" for none
// known), from the server's message: its rules and duration errors name
// the field (replication.PolicyError, "crash_interval \"x\": not a
// duration"). The field named first in the message wins: "the
// app-consistent frequency must be shorter than the retention" is about
// the frequency.
func invalidPolicyField(msg string) string {
	if msg == "" {
		return ""
	}
	m := strings.ToLower(msg)
	best, at := "", len(m)
	for _, f := range []struct{ key, label string }{
		{"pit", "pit_window"}, {"pit", "any-point-in-time window"},
		{"crash", "crash_interval"}, {"crash", "crash-consistent interval"},
		{"app", "app_frequency"}, {"app", "app-consistent frequency"},
		{"rpo", "rpo_threshold"}, {"rpo", "rpo threshold"},
		{"retention", "retention"},
		{"name", "name"}, {"name", "already exists"},
	} {
		if i := strings.Index(m, f.label); i >= 0 && i < at {
			best, at = f.key, i
		}
	}
	return best
}
