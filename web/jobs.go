package web

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/a-h/templ"
	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// jobFragment is the id of the part of a job's page that htmx polls while
// the job runs.
const jobFragment = "job"

// jobsFragment is the id of the jobs list, which htmx polls while a job
// runs.
const jobsFragment = "jobs"

// jobsListLimit is how many jobs the jobs page lists.
const jobsListLimit = 100

// jobsHandler serves the jobs (push installs, ...) and their progress.
type jobsHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// jobsView is what the jobs page shows.
type jobsView struct {
	Session *session
	Jobs    []api.Job
	Err     string
	Now     time.Time
}

// Running reports whether a job of the list is running.
func (v jobsView) Running() bool {
	for _, j := range v.Jobs {
		if j.State == api.JobRunning {
			return true
		}
	}
	return false
}

func (h *jobsHandler) listView(r *http.Request) (jobsView, int) {
	v := jobsView{Session: sessionFrom(r.Context()), Now: h.now()}
	js, err := h.backend.Jobs(r.Context(), jobsListLimit)
	if err != nil {
		h.log.Error("list jobs", "err", err)
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	v.Jobs = js
	return v, http.StatusOK
}

// list serves the jobs, newest first.
func (h *jobsHandler) list(w http.ResponseWriter, r *http.Request) {
	v, status := h.listView(r)
	render(w, r, h.log, status, jobsPage(v))
}

// listFragment serves the jobs list alone, for htmx to swap in (200 with
// the error in place if the jobs cannot be loaded; that list stops
// polling, as it knows of no running job).
func (h *jobsHandler) listFragment(w http.ResponseWriter, r *http.Request) {
	v, _ := h.listView(r)
	render(w, r, h.log, http.StatusOK, jobsPage(v), jobsFragment)
}

// jobView is what a job's page shows.
type jobView struct {
	Session *session
	Job     api.Job
	Err     string // the job could not be loaded (the fragment keeps polling)
	// ActionErr is why a confirmation or a cancellation was refused.
	ActionErr string
	Now       time.Time
}

func (h *jobsHandler) view(r *http.Request) (jobView, int) {
	v := jobView{Session: sessionFrom(r.Context()), Now: h.now()}
	id := chi.URLParam(r, "job")
	j, err := h.backend.Job(r.Context(), id)
	switch {
	case errors.Is(err, ErrNotFound):
		return v, http.StatusNotFound
	case err != nil:
		h.log.Error("load job", "job", id, "err", err)
		v.Job = api.Job{ID: id, State: api.JobRunning}
		v.Err = err.Error()
		return v, http.StatusInternalServerError
	}
	v.Job = j
	return v, http.StatusOK
}

// page serves a job's page.
func (h *jobsHandler) page(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	if status == http.StatusNotFound {
		httpError(w, r, status, "There is no job "+chi.URLParam(r, "job")+".")
		return
	}
	render(w, r, h.log, status, jobPage(v))
}

// fragment serves a job's steps alone, for htmx to swap in; once the job
// has ended the fragment no longer asks to be polled. Like the machines'
// fragment, a load error answers 200 with the error in place.
func (h *jobsHandler) fragment(w http.ResponseWriter, r *http.Request) {
	v, status := h.view(r)
	if status == http.StatusNotFound {
		httpError(w, r, status, "There is no job "+chi.URLParam(r, "job")+".")
		return
	}
	render(w, r, h.log, http.StatusOK, jobPage(v), jobFragment)
}

// confirm confirms the manual action the job waits on and goes back to
// the job's page; confirm and cancel show a refusal (the job was confirmed
// or ended meanwhile) on the job's page.
func (h *jobsHandler) confirm(w http.ResponseWriter, r *http.Request) {
	h.control(w, r, "confirm", h.backend.ConfirmJob)
}

// cancel stops a job that may be stopped now.
func (h *jobsHandler) cancel(w http.ResponseWriter, r *http.Request) {
	h.control(w, r, "cancel", h.backend.CancelJob)
}

func (h *jobsHandler) control(w http.ResponseWriter, r *http.Request, what string, fn func(ctx context.Context, id string) error) {
	id := chi.URLParam(r, "job")
	err := fn(r.Context(), id)
	if errors.Is(err, ErrNotFound) {
		httpError(w, r, http.StatusNotFound, "There is no job "+id+".")
		return
	}
	if err != nil {
		h.log.Warn(what+" job", "job", id, "err", err)
		v, status := h.view(r)
		if status == http.StatusOK {
			status = http.StatusConflict
		}
		v.ActionErr = "Could not " + what + " the job: " + err.Error()
		render(w, r, h.log, status, jobPage(v))
		return
	}
	h.log.Info("job "+what+" from the console", "job", id, "remote", r.RemoteAddr)
	redirect(w, r, "/jobs/"+url.PathEscape(id))
}

// jobURL is a job's page.
func jobURL(id string) templ.SafeURL { return templ.SafeURL("/jobs/" + url.PathEscape(id)) }

// jobFragmentURL is the polled fragment of a job's page.
func jobFragmentURL(id string) string { return "/fragments/jobs/" + url.PathEscape(id) }

// jobStateClass is the badge of a job's or a step's state.
func jobStateClass(state string) string {
	switch state {
	case api.JobSucceeded, "done":
		return "badge badge-ok"
	case api.JobFailed:
		return "badge badge-bad"
	case api.JobRunning:
		return "badge badge-initial"
	default:
		return "badge"
	}
}

// jobDuration is how long a job ran, or has been running.
func jobDuration(j api.Job, now time.Time) string {
	end := j.EndedAt
	if end.IsZero() {
		end = now
	}
	return humanDuration(end.Sub(j.StartedAt))
}

// stepBytes is a step's byte progress, e.g. "12 MiB of 48 MiB".
func stepBytes(st api.JobStep) string {
	return humanBytes(st.Done) + " of " + humanBytes(st.Total)
}

func int64s(n int64) string { return strconv.FormatInt(n, 10) }

// jobConfirmURL and jobCancelURL are where the job page's buttons post.
func jobConfirmURL(id string) templ.SafeURL {
	return templ.SafeURL("/jobs/" + url.PathEscape(id) + "/confirm")
}

func jobCancelURL(id string) templ.SafeURL {
	return templ.SafeURL("/jobs/" + url.PathEscape(id) + "/cancel")
}

// rto is a measured recovery time, e.g. "12.4 s".
func rto(seconds float64) string {
	if seconds < 60 {
		return strconv.FormatFloat(seconds, 'f', 1, 64) + " s"
	}
	return humanDuration(time.Duration(seconds * float64(time.Second)))
}
