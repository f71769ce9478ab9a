package web

import (
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/asrdr/asr/server/api"
)

// infrastructureFragment is the id of the part of the page htmx polls.
const infrastructureFragment = "infrastructure"

// infrastructureHandler serves the process server's health, the target
// and the vCenters.
type infrastructureHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// infrastructureView is what the page shows.
type infrastructureView struct {
	Session     *session
	Now         time.Time
	PS          *api.ProcessServer
	PSErr       string
	VCenters    []api.VCenter
	VCentersErr string
}

func (h *infrastructureHandler) view(r *http.Request) infrastructureView {
	v := infrastructureView{Session: sessionFrom(r.Context()), Now: h.now()}
	if ps, err := h.backend.ProcessServer(r.Context()); err != nil {
		h.log.Error("process server figures", "err", err)
		v.PSErr = err.Error()
	} else {
		v.PS = &ps
	}
	vcs, err := h.backend.VCenters(r.Context())
	if err != nil {
		h.log.Error("list vCenters", "err", err)
		v.VCentersErr = err.Error()
	}
	v.VCenters = vcs
	return v
}

func (h *infrastructureHandler) page(w http.ResponseWriter, r *http.Request) {
	render(w, r, h.log, http.StatusOK, infrastructurePage(h.view(r)))
}

func (h *infrastructureHandler) fragment(w http.ResponseWriter, r *http.Request) {
	render(w, r, h.log, http.StatusOK, infrastructurePage(h.view(r)), infrastructureFragment)
}

// share writes a 0..1 figure as a percentage, "not measured yet" below 0.
func share(f float64) string {
	if f < 0 {
		return "not measured yet"
	}
	return strconv.FormatFloat(f*100, 'f', 0, 64) + "%"
}

// shareClass flags a host figure as ASR's process-server health does:
// warning over 80%, critical over 95%.
func shareClass(f float64) string {
	switch {
	case f > 0.95:
		return "badge badge-bad"
	case f > 0.80:
		return "badge badge-warn"
	case f < 0:
		return "badge"
	}
	return "badge badge-ok"
}

// uploadETAText writes the estimated cache upload time.
func uploadETAText(ps api.ProcessServer) string {
	switch {
	case ps.UploadETA >= api.UploadStalled:
		return "stalled: a backlog and nothing uploading"
	case ps.UploadETA <= 0:
		return "nothing to upload"
	}
	return humanDuration(ps.UploadETA)
}

// cacheBadge is the badge class of the cache disk's state.
func cacheBadge(state string) string {
	switch state {
	case api.CacheCritical:
		return "badge-bad"
	case api.CacheWarning:
		return "badge-warn"
	case api.CacheOK:
		return "badge-ok"
	}
	return ""
}

func intString(n int) string { return strconv.Itoa(n) }
