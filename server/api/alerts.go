package api

import "time"

// Alert severities, from least to most urgent.
const (
	SeverityInfo     = "info"
	SeverityWarning  = "warning"
	SeverityCritical = "critical"
)

// Alert states: an alert is raised while its condition holds and cleared
// (resolved) when it no longer does; acknowledging it does not clear it.
const (
	AlertActive   = "active"
	AlertResolved = "resolved"
)

// Alert is one alert: a condition (Kind) on one subject (a machine, one of
// its disks, the process server, a vCenter, the target), raised with a
// severity, perhaps raised further (warning to critical) and cleared with
// hysteresis. Each raise and clear is also an event.
type Alert struct {
	ID       int64     `json:"id"`
	Kind     string    `json:"kind"`              // e.g. "rpo", "agent-heartbeat", "ps-cpu"
	Severity string    `json:"severity"`          // SeverityWarning or SeverityCritical
	State    string    `json:"state"`             // AlertActive or AlertResolved
	Machine  string    `json:"machine,omitempty"` // the machine's name, "" if not about one
	Disk     string    `json:"disk,omitempty"`    // the disk's name, "" if not about one
	Subject  string    `json:"subject,omitempty"` // what else it is about: "process-server", a vCenter's name, the target
	Message  string    `json:"message"`           // what is wrong, with figures
	Action   string    `json:"action"`            // what to do about it
	Raised   time.Time `json:"raised"`            // when it was raised
	Updated  time.Time `json:"updated"`           // when its severity or message last changed
	Resolved time.Time `json:"resolved,omitzero"`
	Acked    time.Time `json:"acked,omitzero"` // zero: not acknowledged
}
