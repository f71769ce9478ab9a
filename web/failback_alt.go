package web

import (
	"cmp"
	"net/http"
	"net/url"
	"strings"

	"github.com/a-h/templ"

	"github.com/asrdr/asr/server/api"
)

// Failback to an alternate location from the console: instead of the
// original disks, a new VM made through a vCenter with a full, verified
// copy of the failed-over disks (docs/ARCHITECTURE.md, "Failback",
// "Alternate location"). A form page and its POST, which starts the
// server's job (Backend.FailbackTo) and goes to the job's page.

// actionAlternate is the alternate location's page, the last part of its
// path.
const actionAlternate = "failback-alternate"

// alternateOffered reports whether the machine's live failover can fail
// back to a new VM: a committed failover to the server's NBD exports, to
// vSphere or to Azure, no reprotect or failback job running. The server
// decides again at the POST.
func alternateOffered(o failbackOffer) bool {
	f := o.Failover
	return o.Job == nil && f != nil && alternateFrom(f.To) && f.Kind == "failover" && f.State == "committed" &&
		(f.Failback == nil || f.Failback.State != "failing-back")
}

// alternateFrom reports whether a failover to dest is copied to a new VM.
func alternateFrom(dest string) bool {
	return dest == api.ToNBD || dest == api.ToVSphere || dest == api.ToAzure
}

// alternateForm is the form as typed.
type alternateForm struct {
	VCenter, Datastore, VMName, Host, Pool, Folder, Network string
}

// alternateView is the alternate location's page.
type alternateView struct {
	Session  *session
	Machine  api.Machine
	Offer    failbackOffer
	VCenters []api.VCenter
	Form     alternateForm
	Error    string
}

// Applies reports whether the machine can fail back to a new VM now.
func (v alternateView) Applies() bool { return alternateOffered(v.Offer) }

// request is the failback request the form makes.
func (f alternateForm) request() api.FailbackRequest {
	return api.FailbackRequest{Alternate: true, VMName: f.VMName, VSphere: &api.VSphereTarget{VCenter: f.VCenter,
		Datastore: f.Datastore, Host: f.Host, Pool: f.Pool, Folder: f.Folder, Network: f.Network}}
}

// CLI is the same request as an asr command line.
func (v alternateView) CLI() string {
	f := v.Form
	args := []string{"asr failback --machine", v.Machine.Name, "--alternate --vcenter", cmp.Or(f.VCenter, "VC"), "--datastore", cmp.Or(f.Datastore, "DS")}
	for _, o := range []struct{ flag, val string }{{"--vm-name", f.VMName}, {"--host", f.Host}, {"--pool", f.Pool}, {"--folder", f.Folder}, {"--network", f.Network}} {
		if o.val != "" {
			args = append(args, o.flag, o.val)
		}
	}
	return strings.Join(args, " ")
}

func (h *failbackHandler) alternateView(r *http.Request) (alternateView, int, string) {
	fv, status, msg := h.view(r, actionFailback)
	v := alternateView{Session: fv.Session, Machine: fv.Machine, Offer: fv.Offer}
	if status != http.StatusOK {
		return v, status, msg
	}
	vcs, err := h.backend.VCenters(r.Context())
	if err != nil {
		h.log.Error("list vCenters", "err", err)
		return v, http.StatusInternalServerError, "The vCenters could not be listed."
	}
	v.VCenters = vcs
	if len(vcs) == 1 {
		v.Form.VCenter = vcs[0].Name
	}
	return v, http.StatusOK, ""
}

// notApplicable says why the machine cannot fail back to a new VM now.
func (v alternateView) notApplicable() string {
	f := v.Offer.Failover
	switch {
	case v.Offer.Job != nil:
		return runningJobText(*v.Offer.Job, v.Machine.Name)
	case f == nil:
		return v.Machine.Name + " has no live failover: there is nothing to fail back."
	case !alternateFrom(f.To):
		return v.Machine.Name + " runs failed over to " + f.To + ": only a failover to the server's NBD exports, to vSphere or to Azure is copied to a new VM."
	case f.State != "committed":
		return v.Machine.Name + "'s failover is " + f.State + ": commit it first."
	}
	return v.Machine.Name + " is failing back to its original disks."
}

// alternatePage serves the alternate location's form.
func (h *failbackHandler) alternatePage(w http.ResponseWriter, r *http.Request) {
	v, status, msg := h.alternateView(r)
	if status != http.StatusOK {
		httpError(w, r, status, msg)
		return
	}
	if !v.Applies() {
		v.Error = v.notApplicable()
		status = http.StatusConflict
	}
	if len(v.VCenters) == 0 && v.Error == "" {
		v.Error = "No vCenter is registered: add one on the vCenters page first."
	}
	render(w, r, h.log, status, alternatePage(v))
}

// alternateStart starts the failback to a new VM and goes to its job's
// page. A refusal (a datastore, folder or network vCenter does not know,
// a VM of the name, the machine's state) shows on the form with what was
// typed, and nothing starts.
func (h *failbackHandler) alternateStart(w http.ResponseWriter, r *http.Request) {
	v, status, msg := h.alternateView(r)
	if status != http.StatusOK {
		httpError(w, r, status, msg)
		return
	}
	val := func(k string) string { return strings.TrimSpace(r.PostFormValue(k)) }
	v.Form = alternateForm{VCenter: val("vcenter"), Datastore: val("datastore"), VMName: val("vm_name"), Host: val("host"),
		Pool: val("pool"), Folder: val("folder"), Network: val("network")}
	if v.Form.VCenter == "" || v.Form.Datastore == "" {
		v.Error = "Choose the vCenter and name the datastore of the new VM."
		render(w, r, h.log, http.StatusBadRequest, alternatePage(v))
		return
	}
	j, err := h.backend.FailbackTo(r.Context(), v.Machine.Name, v.Form.request())
	if err != nil {
		h.log.Warn("failback to a new VM refused", "machine", v.Machine.Name, "err", err)
		v.Error = "Nothing was started: " + err.Error()
		render(w, r, h.log, errorStatus(err, http.StatusConflict), alternatePage(v))
		return
	}
	h.log.Info("failback to a new VM started from the console", "machine", v.Machine.Name, "vcenter", v.Form.VCenter, "job", j.ID, "remote", r.RemoteAddr)
	redirect(w, r, "/jobs/"+url.PathEscape(j.ID))
}

// alternateURL is a machine's alternate-location failback page.
func alternateURL(machine string) templ.SafeURL {
	return templ.SafeURL("/machines/" + url.PathEscape(machine) + "/" + actionAlternate)
}
