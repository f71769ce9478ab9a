package web

import (
	"context"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/a-h/templ"
	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// The failback cycle from the console (docs/ARCHITECTURE.md, "Failback"):
// a machine failed over to the server's NBD exports, to vSphere or to
// Azure and committed is reprotected (its changes go back to the original disks),
// failed back (the failed-over machine stopped, its last changes drained,
// the on-premises machine resumed), and reprotected forward (a checksum
// resync). Each is a confirmation page and a POST that starts the
// server's job and goes to the job's page.

// Failback actions, the last part of their paths.
const (
	actionReprotect = "reprotect"
	actionFailback  = "failback"
)

// failbackJobsScanned is how many of the newest jobs are looked through
// for a running reprotect or failback of a machine.
const failbackJobsScanned = 100

// failbackOffer is what a machine's failback direction allows now: the
// button shown (Action), or why there is none (Note), or the job that
// runs (Job).
type failbackOffer struct {
	Action string // actionReprotect, actionFailback or ""
	// Forward: the reprotect resumes forward protection (after a
	// failback); otherwise it sends the changes back (after a failover).
	Forward bool
	Note    string
	Job     *api.Job
	// Failover is the machine's live failover, nil if none (after a
	// failback).
	Failover *api.Failover
}

// failbackOfferFor works out a machine's offer from its direction, its
// live failover (nil if none) and a reprotect or failback job of it that
// is running (nil if none). The server decides again at the POST: this
// only chooses what to show.
func failbackOfferFor(m api.Machine, f *api.Failover, running *api.Job) failbackOffer {
	o := failbackOffer{Failover: f}
	if m.Direction == "" {
		return o
	}
	if running != nil {
		o.Job = running
		return o
	}
	switch m.Direction {
	case "failed-over":
		switch {
		case f == nil:
		case f.To != api.ToNBD && f.To != api.ToVSphere && f.To != api.ToAzure:
			o.Note = "The console fails back failovers to the server's NBD exports, to vSphere or to Azure; this one is " + plannedWord(f.Planned) + " to " + f.To + ": not here yet."
		case f.State != "committed":
			o.Note = "Commit the failover (Failovers page) to reprotect it: until then it can still change its point."
		default:
			o.Action = actionReprotect
		}
	case "reprotected":
		o.Action = actionFailback
	case "failing-back":
		o.Note = "The switch is done: the on-premises machine is being resumed."
	case "failed-back":
		o.Action, o.Forward = actionReprotect, true
	}
	return o
}

// runningJobText says that a reprotect or failback job of a machine runs:
// its own, or its plan's (or replication group's), which it is one
// machine of.
func runningJobText(j api.Job, machine string) string {
	of := machine
	if j.Subject != machine {
		of = j.Subject + ", " + machine + " among its machines,"
	}
	return "A " + j.Kind + " job of " + of + " is running: wait for it to end."
}

// jobStepNow is what a running job does now: the newest step running (or
// the newest step), and the manual action it waits on.
func jobStepNow(j api.Job) string {
	now := ""
	if n := len(j.Steps); n > 0 {
		now = j.Steps[n-1].Name
	}
	for _, st := range j.Steps {
		if st.State == "running" {
			now = st.Name
		}
	}
	if j.Waiting != "" {
		if now != "" {
			now += ": "
		}
		now += "waits for a manual action: " + j.Waiting
	}
	return now
}

func plannedWord(planned bool) string {
	if planned {
		return "planned"
	}
	return "unplanned"
}

// failbackOffers works out the offers of the machines in failback (by
// machine id); none when no machine is in failback, so the polled pages
// of a site without failback look nothing up.
func failbackOffers(ctx context.Context, b Backend, log *slog.Logger, ms []api.Machine) map[string]failbackOffer {
	inFailback := false
	for _, m := range ms {
		inFailback = inFailback || m.Direction != ""
	}
	if !inFailback {
		return nil
	}
	fs, err := b.Failovers(ctx)
	if err != nil {
		log.Warn("list failovers", "err", err)
	}
	js, err := b.Jobs(ctx, failbackJobsScanned)
	if err != nil {
		log.Warn("list jobs", "err", err)
	}
	out := map[string]failbackOffer{}
	for _, m := range ms {
		if m.Direction == "" {
			continue
		}
		var f *api.Failover
		for i := range fs {
			if fs[i].MachineID == m.ID || (fs[i].MachineID == "" && fs[i].Machine == m.Name) {
				f = &fs[i]
			}
		}
		var running *api.Job
		for i := range js {
			j := js[i]
			if (j.Kind == actionReprotect || j.Kind == actionFailback) && (j.Subject == m.Name || slices.Contains(j.Machines, m.Name)) && j.State == api.JobRunning {
				running = &js[i]
				break
			}
		}
		out[m.ID] = failbackOfferFor(m, f, running)
	}
	return out
}

// failbackURL is a machine's page of a failback action (GET: the
// confirmation; POST: start it).
func failbackURL(machine, action string) templ.SafeURL {
	return templ.SafeURL("/machines/" + url.PathEscape(machine) + "/" + action)
}

// failbackHandler serves the confirmation pages of reprotect and
// failback, and starts them.
type failbackHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// failbackView is a confirmation page.
type failbackView struct {
	Session *session
	Machine api.Machine
	Action  string // what the page asks to confirm
	Offer   failbackOffer
	Error   string // the server's refusal, or why the action does not apply
}

// Applies reports whether the page's action is the one the machine's
// direction allows now.
func (v failbackView) Applies() bool { return v.Offer.Action == v.Action }

// RecoveredVM reports whether the machine's live failover made a VM, in
// vSphere or in Azure: its reprotect and failback read the recovered
// VM's disks where they are (server/failback_vsphere.go), and failback
// stops that VM.
func (v failbackView) RecoveredVM() bool {
	return v.Offer.Failover != nil && (v.Offer.Failover.To == api.ToVSphere || v.Offer.Failover.To == api.ToAzure)
}

// Azure reports whether the machine's live failover is to Azure (its VM
// and managed disks reached through Azure Resource Manager).
func (v failbackView) Azure() bool {
	return v.Offer.Failover != nil && v.Offer.Failover.To == api.ToAzure
}

func (h *failbackHandler) view(r *http.Request, action string) (failbackView, int, string) {
	ctx := r.Context()
	name := chi.URLParam(r, "machine")
	v := failbackView{Session: sessionFrom(ctx), Action: action}
	m, code, msg := machineNamed(ctx, h.backend, h.log, name)
	if code != 0 {
		return v, code, msg
	}
	v.Machine = m
	v.Offer = failbackOffers(ctx, h.backend, h.log, []api.Machine{v.Machine})[v.Machine.ID]
	return v, http.StatusOK, ""
}

// notApplicable says why a machine's page of action has no button.
func (v failbackView) notApplicable() string {
	m := v.Machine
	switch {
	case v.Offer.Job != nil:
		return runningJobText(*v.Offer.Job, m.Name)
	case v.Offer.Note != "":
		return v.Offer.Note
	case m.Direction == "":
		return m.Name + " is protected as usual: there is nothing to " + v.Action + "."
	}
	return m.Name + " is " + strings.ReplaceAll(m.Direction, "-", " ") + ": " + v.Action + " does not apply now."
}

// confirmPage serves the confirmation of a reprotect or failback.
func (h *failbackHandler) confirmPage(action string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		v, status, msg := h.view(r, action)
		if status != http.StatusOK {
			httpError(w, r, status, msg)
			return
		}
		if !v.Applies() {
			v.Error = v.notApplicable()
			status = http.StatusConflict
		}
		render(w, r, h.log, status, failbackPage(v))
	}
}

// start starts the confirmed reprotect or failback and goes to its job's
// page. The server decides whether it applies: a refusal (the machine's
// state changed, a job already running) shows on the confirmation page
// with the server's reason, and nothing starts.
func (h *failbackHandler) start(action string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		v, status, msg := h.view(r, action)
		if status != http.StatusOK {
			httpError(w, r, status, msg)
			return
		}
		var j api.Job
		var err error
		if action == actionFailback {
			j, err = h.backend.Failback(r.Context(), v.Machine.Name)
		} else {
			j, err = h.backend.Reprotect(r.Context(), v.Machine.Name)
		}
		if err != nil {
			h.log.Warn(action+" refused", "machine", v.Machine.Name, "err", err)
			v.Error = "Nothing was started: " + err.Error()
			render(w, r, h.log, errorStatus(err, http.StatusConflict), failbackPage(v))
			return
		}
		h.log.Info(action+" started from the console", "machine", v.Machine.Name, "job", j.ID, "remote", r.RemoteAddr)
		redirect(w, r, "/jobs/"+url.PathEscape(j.ID))
	}
}

// Forward reports whether the page's reprotect resumes forward
// protection (the machine is failed back).
func (v failbackView) Forward() bool {
	return v.Action == actionReprotect && (v.Offer.Forward || v.Machine.Direction == "failed-back")
}

// Title names the page's action for its machine.
func (v failbackView) Title() string {
	switch {
	case v.Action == actionFailback:
		return "Fail " + v.Machine.Name + " back"
	case v.Forward():
		return "Reprotect " + v.Machine.Name + " forward"
	}
	return "Reprotect " + v.Machine.Name
}

// failbackLabel is the accessible name of a failback button.
func failbackLabel(machine, action string, forward bool) string {
	switch {
	case action == actionFailback:
		return "Fail " + machine + " back to its original disks"
	case forward:
		return "Reprotect " + machine + " forward: resume protection from on premises"
	}
	return "Reprotect " + machine + ": send its changes back to the original disks"
}

// exportsWritten is the bytes written to a failover's exports since the
// failover (0 without one).
func exportsWritten(f *api.Failover) int64 {
	if f == nil {
		return 0
	}
	var n int64
	for _, x := range f.Exports {
		n += x.Written
	}
	return n
}

// PendingNow is " (N pending now)", the bytes written to the exports not
// yet on the original disks, or "" if none.
func (v failbackView) PendingNow() string {
	f := v.Offer.Failover
	if f == nil || f.Failback == nil || f.Failback.Pending <= 0 {
		return ""
	}
	return " (" + humanBytes(f.Failback.Pending) + " pending now)"
}

// stopsIt is how failback stops the recovered VM: "deallocates it"
// (Azure) or "powers it off" (vSphere).
func stopsIt(v failbackView) string {
	if v.Azure() {
		return "deallocates it"
	}
	return "powers it off"
}
