package web

import (
	"fmt"
	"math"
	"time"

	"github.com/asrdr/asr/server/api"
)

// humanDuration writes a data-loss window the way an operator reads it:
// "0.8 s", "12 s", "3 min", "2 h 5 min", "3 d 4 h".
func humanDuration(d time.Duration) string {
	switch {
	case d < 100*time.Millisecond:
		return "< 0.1 s"
	case d < 10*time.Second:
		return fmt.Sprintf("%.1f s", math.Floor(d.Seconds()*10)/10)
	case d < time.Minute:
		return fmt.Sprintf("%d s", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%d min", int(d/time.Minute))
	case d < 24*time.Hour:
		return fmt.Sprintf("%d h %d min", int(d/time.Hour), int(d%time.Hour/time.Minute))
	default:
		return fmt.Sprintf("%d d %d h", int(d/(24*time.Hour)), int(d%(24*time.Hour)/time.Hour))
	}
}

// ago writes how long before now t was: "just now", "40 s ago", "3 min ago",
// "5 h ago", "2 d ago". A t after now (clock skew) counts as just now.
func ago(now, t time.Time) string {
	d := now.Sub(t)
	switch {
	case d < 5*time.Second:
		return "just now"
	case d < time.Minute:
		return fmt.Sprintf("%d s ago", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%d min ago", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%d h ago", int(d/time.Hour))
	default:
		return fmt.Sprintf("%d d ago", int(d/(24*time.Hour)))
	}
}

// humanBytes writes a size in binary units: "512 B", "1.5 KiB", "40 GiB".
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v := float64(n)
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i := -1
	for v >= unit && i < len(units)-1 {
		v /= unit
		i++
	}
	if v >= 100 || v == math.Trunc(v) {
		return fmt.Sprintf("%.0f %s", v, units[i])
	}
	return fmt.Sprintf("%.1f %s", v, units[i])
}

// percent writes a progress fraction as a whole percentage, rounded down so
// that an unfinished copy never shows 100%.
func percent(p float64) string {
	return fmt.Sprintf("%d%%", int(math.Floor(clamp01(p)*100)))
}

func clamp01(p float64) float64 {
	if math.IsNaN(p) || p < 0 {
		return 0
	}
	return min(p, 1)
}

// clockTime writes an absolute time in UTC, the same for every viewer of the
// console whatever the server's time zone.
func clockTime(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05 UTC") }

// isoTime writes t for a <time datetime> attribute.
func isoTime(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// shortID is the first characters of a machine id, enough to tell machines
// with the same name apart.
func shortID(id string) string {
	if len(id) > 8 {
		return id[:8]
	}
	return id
}

// ratio writes a compression ratio, "2.4x"; "-" before anything arrived.
func ratio(r float64) string {
	if r <= 0 || math.IsNaN(r) {
		return "-"
	}
	return fmt.Sprintf("%.1fx", r)
}

// directionText names a machine's failback direction (api.Machine.Direction).
func directionText(d string) string {
	switch d {
	case "failed-over":
		return "Failed over: runs from its failover"
	case "reprotected":
		return "Reprotected: its changes go back to the original disks"
	case "failing-back":
		return "Failing back"
	case "failed-back":
		return "Failed back: forward protection not resumed yet"
	}
	return d
}

// reverseRPOText is a reprotected machine's reverse RPO (how far its
// original disks are behind the failed-over machine).
func reverseRPOText(r *api.ReverseStatus) string {
	if !r.RPOKnown {
		return "not known yet"
	}
	return humanDuration(r.RPO)
}

// reverseOver: the reverse RPO is over its failback policy's threshold.
func reverseOver(r *api.ReverseStatus) bool {
	return r.RPOKnown && r.Threshold > 0 && r.RPO > r.Threshold
}

// reverseDetailText says what the reverse RPO is measured against.
func reverseDetailText(r *api.ReverseStatus) string {
	s := fmt.Sprintf("threshold %s (policy %s); %s not yet on the original disks", r.Threshold, r.Policy, humanBytes(r.Pending))
	if !r.FirstPassDone {
		s += "; first pass under way"
	}
	return s
}

// reverseSourceState is a recovered VM's agent's state in one word
// (data-reverse-source): live, held or disconnected.
func reverseSourceState(s *api.ReverseSource) string {
	switch {
	case !s.Connected:
		return "disconnected"
	case s.Live:
		return "live"
	}
	return "held"
}

// reverseSourceText says what the agent in the recovered VM does with
// the writes it captures.
func reverseSourceText(s *api.ReverseSource) string {
	var t string
	switch {
	case s.Live:
		t = "its writes go to the original disks as they happen"
	case s.Held != "":
		t = "its writes are held in its spool: " + s.Held
	default:
		t = "its writes are held in its spool until reprotect has compared the disks"
	}
	if s.Frozen {
		t = "frozen for failback (its guest's writes are refused); " + t
	}
	if !s.Connected {
		t = "not connected; " + t
	}
	t += fmt.Sprintf("; %s sent, %s in its spool", humanBytes(s.Sent), humanBytes(s.SpoolBytes))
	if s.LastError != "" {
		t += "; last error: " + s.LastError
	}
	return t
}

// directionNext is the command that moves a machine on in its failback.
func directionNext(d string) string {
	switch d {
	case "failed-over", "failed-back":
		return "reprotect"
	case "reprotected":
		return "failback"
	}
	return ""
}
