package replication

import (
	"errors"
	"fmt"
	"regexp"
	"time"
)

// Policy is a replication policy, as in ASR: how often recovery points are
// made, how long they are kept, and when the RPO is reported as too high.
type Policy struct {
	Name string `json:"name"`
	// RPOThreshold does not change replication: crossing it raises an event.
	RPOThreshold time.Duration `json:"rpo_threshold"`
	// Retention is how far back recovery points are kept.
	Retention time.Duration `json:"retention"`
	// AppFrequency is the interval of application-consistent points (0: none).
	AppFrequency time.Duration `json:"app_frequency"`
	// CrashInterval is the interval of crash-consistent points.
	CrashInterval time.Duration `json:"crash_interval"`
	// PITWindow is how far back any point in time can be recovered.
	PITWindow time.Duration `json:"pit_window"`
	// FailbackOf names the replication policy this failback policy belongs to
	// (empty for a replication policy).
	FailbackOf string `json:"failback_of,omitempty"`
}

// Storage tiers of the target, which bound retention as in ASR.
const (
	TierPremium  = "premium"
	TierStandard = "standard"
)

// Policy limits.
const (
	MaxRetentionPremium  = 24 * time.Hour
	MaxRetentionStandard = 72 * time.Hour
	MinAppFrequency      = time.Hour
	MaxAppFrequency      = 12 * time.Hour
	MinCrashInterval     = 5 * time.Second
	MaxCrashInterval     = 5 * time.Minute
)

// DefaultPolicy returns the policy every vault starts with (ASR's defaults:
// 24 h retention, application-consistent points every 4 h; crash-consistent
// points every 5 min; an RPO threshold of 15 min; a 1 h any-point window).
func DefaultPolicy() Policy {
	return Policy{Name: "default", RPOThreshold: 15 * time.Minute, Retention: 24 * time.Hour,
		AppFrequency: 4 * time.Hour, CrashInterval: 5 * time.Minute, PITWindow: time.Hour}
}

// PolicyError is an invalid policy value: Rule names the rule broken.
type PolicyError struct {
	Field string
	Rule  string
}

func (e *PolicyError) Error() string { return fmt.Sprintf("invalid %s: %s", e.Field, e.Rule) }

// ErrInvalidPolicy is matched (errors.Is) by every PolicyError.
var ErrInvalidPolicy = errors.New("invalid policy")

// Is makes PolicyError match ErrInvalidPolicy.
func (e *PolicyError) Is(target error) bool { return target == ErrInvalidPolicy }

var policyNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// Validate checks a policy against the rules, for a target of the given tier.
func (p Policy) Validate(tier string) error {
	if !policyNameRE.MatchString(p.Name) {
		return &PolicyError{"name", fmt.Sprintf("%q: 1 to 64 letters, digits, '.', '_' or '-'", p.Name)}
	}
	if p.RPOThreshold <= 0 {
		return &PolicyError{"rpo threshold", fmt.Sprintf("%s: must be positive", p.RPOThreshold)}
	}
	maxRet, tierName := MaxRetentionStandard, "standard"
	if tier == TierPremium {
		maxRet, tierName = MaxRetentionPremium, "premium"
	}
	if p.Retention <= 0 || p.Retention > maxRet {
		return &PolicyError{"retention", fmt.Sprintf("%s: must be more than 0 and at most %s on a %s target", p.Retention, fmtDuration(maxRet), tierName)}
	}
	if p.AppFrequency != 0 {
		if p.AppFrequency < MinAppFrequency || p.AppFrequency > MaxAppFrequency {
			return &PolicyError{"app-consistent frequency", fmt.Sprintf("%s: must be off (0) or from %s to %s", p.AppFrequency, fmtDuration(MinAppFrequency), fmtDuration(MaxAppFrequency))}
		}
		if p.AppFrequency >= p.Retention {
			return &PolicyError{"app-consistent frequency", fmt.Sprintf("%s: must be shorter than the retention (%s)", fmtDuration(p.AppFrequency), fmtDuration(p.Retention))}
		}
	}
	if p.CrashInterval < MinCrashInterval || p.CrashInterval > MaxCrashInterval {
		return &PolicyError{"crash-consistent interval", fmt.Sprintf("%s: must be from %s to %s", p.CrashInterval, MinCrashInterval, fmtDuration(MaxCrashInterval))}
	}
	if p.PITWindow <= 0 || p.PITWindow > p.Retention {
		return &PolicyError{"any-point-in-time window", fmt.Sprintf("%s: must be more than 0 and at most the retention (%s)", fmtDuration(p.PITWindow), fmtDuration(p.Retention))}
	}
	return nil
}

// FailbackName is the name of the failback policy made with policy name.
func FailbackName(name string) string { return name + "-failback" }

// DefaultFailbackPolicy returns the failback policy made with replication
// policy of, with ASR's failback defaults: an RPO threshold of 15 min, 24 h
// retention, application-consistent every 60 min. The crash-consistent
// interval (5 min) and the any-point-in-time window (1 h) are the
// replication policy's defaults. It applies to the reverse direction of
// a reprotected machine (its changes going back to the original disks):
// its RPO threshold raises the reverse RPO alert, its crash-consistent
// interval and retention rule the reverse points (records of the moments
// the original disks were a crash-consistent copy); the
// application-consistent frequency and the window are kept for ASR's
// shape but not applied (FailbackNotes says why).
func DefaultFailbackPolicy(of string) Policy {
	return Policy{Name: FailbackName(of), FailbackOf: of, RPOThreshold: 15 * time.Minute, Retention: 24 * time.Hour,
		AppFrequency: time.Hour, CrashInterval: 5 * time.Minute, PITWindow: time.Hour}
}

// FailbackNotes says, field by field, what a failback policy's settings do
// in the reverse direction, where the original disks are written in place
// through the original agent.
func FailbackNotes() []string {
	return []string{
		"rpo_threshold: applied: the reverse RPO (how far the original disks are behind the failed-over machine) is alerted against it (alert reverse-rpo)",
		"crash_interval: applied: a reverse point (the original disks were a crash-consistent copy of the failed-over machine: nothing left to send) is recorded at most this often",
		"retention: applied: reverse points older than it are pruned; they are records only: the original disks are written in place, so no earlier state of them can be recovered",
		"app_frequency: not applied: an application-consistent point needs an agent inside the failed-over machine, and the NBD exports it runs from have none",
		"pit_window: not applied: the original disks keep no history to recover an earlier time from",
	}
}

// fmtDuration prints whole hours and minutes without trailing zero units.
func fmtDuration(d time.Duration) string {
	s := d.String()
	for _, suf := range []string{"m0s", "h0m"} {
		if len(s) > len(suf) && s[len(s)-len(suf):] == suf {
			s = s[:len(s)-len(suf)+1]
		}
	}
	return s
}
