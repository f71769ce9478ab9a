package web

import (
	"net/http"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// The confirmation pages of a recovery plan's Reprotect and Failback
// (docs/ARCHITECTURE.md, "Failback", recovery plans): what will happen
// and where each machine of the plan is now; the form POSTs to the plans
// handler's act, which starts the server's job (or shows its refusal on
// the plan's card).

// planFailbackView is a plan's reprotect or failback confirmation page.
type planFailbackView struct {
	Session *session
	Plan    api.Plan
	Action  string // actionReprotect or actionFailback
	// Live maps a machine's name to its live failover, if it has one.
	Live map[string]api.Failover
}

// Title names the page's action for its plan.
func (v planFailbackView) Title() string {
	if v.Action == actionFailback {
		return "Fail plan " + v.Plan.Name + " back"
	}
	return "Reprotect plan " + v.Plan.Name
}

// MachineNow says where a machine of the plan is now.
func (v planFailbackView) MachineNow(name string) string {
	f, ok := v.Live[name]
	if !ok {
		return "no live failover"
	}
	s := failoverKind(f.Kind) + " to " + f.To + ", " + f.State
	if f.Plan != "" && f.Plan != v.Plan.Name {
		s += ", made by plan " + f.Plan
	}
	if f.Failback != nil {
		s += "; " + directionText(f.Failback.State)
		if f.Failback.Pending > 0 {
			s += " (" + humanBytes(f.Failback.Pending) + " pending)"
		}
	}
	return s
}

// confirm serves the confirmation page of a plan's reprotect or failback.
func (h *plansHandler) confirm(action string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		name := chi.URLParam(r, "plan")
		ps, err := h.backend.Plans(ctx)
		if err != nil {
			h.log.Error("list plans", "err", err)
			httpError(w, r, http.StatusInternalServerError, "Could not load the plans: "+err.Error())
			return
		}
		v := planFailbackView{Session: sessionFrom(ctx), Action: action, Live: map[string]api.Failover{}}
		found := false
		for _, p := range ps {
			if p.Name == name {
				v.Plan, found = p, true
			}
		}
		if !found {
			httpError(w, r, http.StatusNotFound, "There is no plan "+name+".")
			return
		}
		fs, err := h.backend.Failovers(ctx)
		if err != nil {
			h.log.Warn("list failovers", "err", err)
		}
		for _, f := range fs {
			v.Live[f.Machine] = f
		}
		render(w, r, h.log, http.StatusOK, planFailbackPage(v))
	}
}
