package api

import "time"

// MaxPlanGroups is the most groups a recovery plan has (as in ASR).
const MaxPlanGroups = 7

// Plan is a recovery plan: ordered groups of machines that fail over
// together. Members of a group fail over in parallel; group N starts when
// every machine of group N-1 has started. Each group may have actions run
// before (pre) and after (post) its machines fail over.
type Plan struct {
	Name   string      `json:"name"`
	Groups []PlanGroup `json:"groups"`
	// Drill schedules a verified drill of the whole plan (a test failover
	// to QEMU with a boot check, then cleanup), reported as an event.
	Drill     *PlanDrill `json:"drill,omitempty"`
	Created   time.Time  `json:"created,omitzero"`
	LastDrill time.Time  `json:"last_drill,omitzero"`
}

// PlanGroup is one group of a plan; groups are numbered from 1 in order.
type PlanGroup struct {
	Machines []string     `json:"machines"`
	Pre      []PlanAction `json:"pre,omitempty"`
	Post     []PlanAction `json:"post,omitempty"`
}

// PlanAction is a script the server runs (with the JSON context on its
// standard input) or a manual action that pauses the plan until an
// operator confirms it.
//
// As in ASR, an action runs on failover, on failback, or both (On empty):
// a plan's failback runs each group's pre actions before the group's
// original machines power on and its post actions after, with the
// context's Direction "recovery-to-primary" and Type "failback".
type PlanAction struct {
	Kind string `json:"kind"`           // script | manual
	Path string `json:"path,omitempty"` // script: an absolute path on the server
	Text string `json:"text,omitempty"` // manual: what to do
	On   string `json:"on,omitempty"`   // "" (both directions) | failover | failback
}

// Directions an action runs in (PlanAction.On).
const (
	ActionOnFailover = "failover"
	ActionOnFailback = "failback"
)

// RunsOn reports whether the action runs in a plan's failover (failback
// false) or failback.
func (a PlanAction) RunsOn(failback bool) bool {
	if failback {
		return a.On != ActionOnFailover
	}
	return a.On != ActionOnFailback
}

// PlanDrill is a plan's drill schedule.
type PlanDrill struct {
	EverySeconds   float64 `json:"every_seconds"`
	BootCheck      string  `json:"boot_check,omitempty"`
	BootPort       int     `json:"boot_port,omitempty"`
	TimeoutSeconds float64 `json:"boot_timeout_seconds,omitempty"`
}

// ActionContext is the JSON a plan's script reads on its standard input.
type ActionContext struct {
	Plan      string `json:"plan"`
	Type      string `json:"failover_type"` // test | planned | unplanned | failback
	Direction string `json:"direction"`     // primary-to-recovery | recovery-to-primary
	Group     int    `json:"group"`
	Phase     string `json:"phase"` // pre | post
	// Machines maps every machine of the plan that failed over so far to
	// where it now runs.
	Machines map[string]ActionMachine `json:"machines"`
}

// ActionMachine is where a failed-over machine runs.
type ActionMachine struct {
	To      string   `json:"to"`
	Point   string   `json:"point"`
	Exports []Export `json:"exports,omitempty"`
	VM      string   `json:"vm,omitempty"`
}
