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

// Alert kinds.
const (
	AlertRPO            = "rpo"             // a machine's RPO over its policy's threshold
	AlertReverseRPO     = "reverse-rpo"     // a reprotected machine's reverse RPO over its failback policy's threshold
	AlertHeartbeat      = "agent-heartbeat" // a machine's agent not connected
	AlertPSCPU          = "ps-cpu"          // the process server's CPU
	AlertPSMemory       = "ps-memory"       // the process server's memory
	AlertPSCacheFree    = "ps-cache-free"   // free space on the cache disk
	AlertPSUpload       = "ps-upload"       // estimated cache upload time
	AlertPSHeartbeat    = "ps-heartbeat"    // a scale-out process server sends no heartbeat
	AlertResyncFailed   = "resync-failed"   // a disk's resync failed
	AlertScrubDamage    = "scrub-damage"    // a scrub found damaged blocks
	AlertScrubFailed    = "scrub-failed"    // a scrub could not run to its end
	AlertJobFailed      = "job-failed"      // a job failed
	AlertVCenter        = "vcenter-unreachable"
	AlertTarget         = "target-unreachable" // the applier cannot write to the target
	AlertCertificate    = "certificate-expiry" // the server's certificate or the CA expires soon
	AlertTest           = "test"               // a test notification (POST /api/v1/alerts/test)
	AlertChangeRaised   = "raised"
	AlertChangeEscalate = "escalated"
	AlertChangeResolved = "resolved"
)

// SeverityRank orders severities: info 0, warning 1, critical 2; an
// unknown name ranks -1.
func SeverityRank(s string) int {
	switch s {
	case SeverityInfo:
		return 0
	case SeverityWarning:
		return 1
	case SeverityCritical:
		return 2
	}
	return -1
}

// EmailSettings is how alerts are sent by e-mail (PUT
// /api/v1/settings/notifications/email; DELETE turns e-mail off).
// Password is write-only: GET shows PasswordSet instead. A PUT without a
// password keeps the one stored for the same user.
type EmailSettings struct {
	SMTP        string   `json:"smtp"` // HOST:PORT of the SMTP server
	From        string   `json:"from"`
	To          []string `json:"to"`
	StartTLS    bool     `json:"starttls"` // refuse to send unless the server offers STARTTLS
	User        string   `json:"user,omitempty"`
	Password    string   `json:"password,omitempty"`
	PasswordSet bool     `json:"password_set,omitempty"`
	MinSeverity string   `json:"min_severity,omitempty"` // warning (default) or critical
	Digest      string   `json:"digest,omitempty"`       // batching interval, e.g. 5m (default); 0 sends every notice at once
	// CAPEM is the CA (PEM certificates) the SMTP server's STARTTLS
	// certificate is checked against instead of the system's roots. Empty
	// keeps the stored one while the SMTP server is the same; NoCA drops it.
	CAPEM string `json:"ca_pem,omitempty"`
	NoCA  bool   `json:"no_ca,omitempty"`
}

// WebhookSettings is where alerts are POSTed as JSON (PUT
// /api/v1/settings/notifications/webhook; DELETE turns it off). The body
// is a WebhookBody.
type WebhookSettings struct {
	URL         string `json:"url"`
	MinSeverity string `json:"min_severity,omitempty"`
}

// NotificationSettings is GET /api/v1/settings/notifications: nil where a
// channel is off.
type NotificationSettings struct {
	Email   *EmailSettings   `json:"email,omitempty"`
	Webhook *WebhookSettings `json:"webhook,omitempty"`
}

// WebhookBody is what a webhook receives for each notice: Change is
// "raised", "escalated", "resolved" or "test"; Alert the alert as GET
// /api/v1/alerts shows it. Version is 1; fields may be added, never
// renamed.
type WebhookBody struct {
	Version int       `json:"version"`
	Change  string    `json:"change"`
	Alert   Alert     `json:"alert"`
	Sent    time.Time `json:"sent"`
}

// TestNotificationResult is POST /api/v1/alerts/test's answer: what each
// configured channel did ("" where it sent, the error otherwise).
type TestNotificationResult struct {
	Email   string   `json:"email,omitempty"`
	Webhook string   `json:"webhook,omitempty"`
	Sent    []string `json:"sent"` // the channels that sent: "email", "webhook"
}
