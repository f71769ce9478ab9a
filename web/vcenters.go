package web

import (
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/a-h/templ"
	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// vcentersHandler serves the vCenters page: the registered vCenters, adding
// one (with the confirmation of its certificate) and removing one.
type vcentersHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// vcentersView is what the vCenters page shows.
type vcentersView struct {
	Session  *session
	VCenters []api.VCenter
	Err      string // the vCenters could not be loaded
	Now      time.Time
	Added    string // the vCenter just added, for a confirmation
	Removed  string // the vCenter just removed
	Form     vcenterForm
}

// vcenterForm is the "Add vCenter" form as it is shown again: what the
// operator typed but the password, which is never sent back to the browser.
type vcenterForm struct {
	Name, URL, User string
	// Thumbprint is the certificate's thumbprint the server asks the
	// operator to confirm; Changed says the operator had confirmed
	// another one (the certificate changed, or a man in the middle).
	Thumbprint string
	Changed    bool
	Error      string
}

// page serves the vCenters page.
func (h *vcentersHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	q := r.URL.Query()
	v.Added, v.Removed = q.Get("added"), q.Get("removed")
	render(w, r, h.log, status, vcentersPage(v))
}

func (h *vcentersHandler) view(r *http.Request) (vcentersView, int) {
	v := vcentersView{Session: sessionFrom(r.Context()), Now: h.now()}
	vs, err := h.backend.VCenters(r.Context())
	if err != nil {
		h.log.Error("list vCenters", "err", err)
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	v.VCenters = vs
	return v, http.StatusOK
}

// add registers a vCenter, in two steps: without a thumbprint the server
// answers with its certificate's, which the form shows for the operator to
// check and confirm; the confirmation sends it back with the password,
// typed again (it is never put in a page).
func (h *vcentersHandler) add(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	req := api.AddVCenterRequest{
		Name:       strings.TrimSpace(r.PostFormValue("name")),
		URL:        strings.TrimSpace(r.PostFormValue("url")),
		User:       strings.TrimSpace(r.PostFormValue("user")),
		Password:   r.PostFormValue("password"),
		Thumbprint: strings.TrimSpace(r.PostFormValue("thumbprint")),
	}
	f := vcenterForm{Name: req.Name, URL: req.URL, User: req.User}
	fail := func(status int) {
		v, _ := h.view(r)
		v.Form = f
		render(w, r, h.log, status, vcentersPage(v))
	}
	if req.Name == "" || req.URL == "" || req.User == "" || req.Password == "" {
		f.Thumbprint = req.Thumbprint
		f.Error = "Fill in the name, the URL, the user and the password."
		fail(http.StatusUnprocessableEntity)
		return
	}
	vc, tp, err := h.backend.AddVCenter(ctx, req)
	switch {
	case err != nil && tp != "" && req.Thumbprint == "":
		// The first step: nothing is wrong, the certificate is to be
		// confirmed.
		f.Thumbprint = tp
		fail(http.StatusOK)
		return
	case err != nil && tp != "":
		f.Thumbprint, f.Changed, f.Error = tp, true, err.Error()
		fail(http.StatusConflict)
		return
	case err != nil:
		h.log.Warn("add vCenter", "vcenter", req.Name, "err", err)
		f.Thumbprint = req.Thumbprint
		f.Error = "The vCenter was not added: " + err.Error()
		fail(http.StatusUnprocessableEntity)
		return
	}
	h.log.Info("vCenter added from the console", "vcenter", vc.Name, "remote", r.RemoteAddr)
	redirect(w, r, "/vcenters?added="+url.QueryEscape(vc.Name))
}

// vcenterRemoveView is what the removal's confirmation page shows.
type vcenterRemoveView struct {
	Session *session
	VCenter api.VCenter
	Error   string
}

// findVCenter returns the vCenter of the request's {vcenter} path value.
func (h *vcentersHandler) findVCenter(r *http.Request) (api.VCenter, int, string) {
	return findByPath(r, h.log, h.backend.VCenters, "vcenter", "vCenter", "vCenters", func(v api.VCenter) string { return v.Name })
}

// removePage asks the operator to confirm the removal of a vCenter.
func (h *vcentersHandler) removePage(w http.ResponseWriter, r *http.Request) {
	v, status, msg := h.findVCenter(r)
	if status != http.StatusOK {
		httpError(w, r, status, msg)
		return
	}
	render(w, r, h.log, http.StatusOK, vcenterRemovePage(vcenterRemoveView{Session: sessionFrom(r.Context()), VCenter: v}))
}

// remove removes the confirmed vCenter.
func (h *vcentersHandler) remove(w http.ResponseWriter, r *http.Request) {
	name := chi.URLParam(r, "vcenter")
	err := h.backend.RemoveVCenter(r.Context(), name)
	if errors.Is(err, ErrNotFound) {
		httpError(w, r, http.StatusNotFound, "There is no vCenter "+name+".")
		return
	}
	if err != nil {
		h.log.Warn("remove vCenter", "vcenter", name, "err", err)
		v := vcenterRemoveView{Session: sessionFrom(r.Context()), VCenter: api.VCenter{Name: name}, Error: "The vCenter was not removed: " + err.Error()}
		render(w, r, h.log, http.StatusUnprocessableEntity, vcenterRemovePage(v))
		return
	}
	h.log.Info("vCenter removed from the console", "vcenter", name, "remote", r.RemoteAddr)
	redirect(w, r, "/vcenters?removed="+url.QueryEscape(name))
}

// vcenterRemoveURL is the confirmation page of a vCenter's removal; a POST
// to it removes the vCenter.
func vcenterRemoveURL(name string) templ.SafeURL {
	return templ.SafeURL("/vcenters/" + url.PathEscape(name) + "/remove")
}
