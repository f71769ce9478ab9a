package api

import "time"

// HistorySample is one sample of a machine's history (GET
// /api/v1/machines/{m}/history?since=T): its RPO and the bytes received
// from it in the interval before Time (its churn), one a minute, kept 25 h.
type HistorySample struct {
	Time     time.Time     `json:"time"`
	RPO      time.Duration `json:"rpo_ns"` // meaningful only if RPOKnown
	RPOKnown bool          `json:"rpo_known"`
	Bytes    int64         `json:"bytes"` // received from the machine so far
	Churn    int64         `json:"churn"` // received since the previous sample (0 for the first)
}

// RPOAtLeast is the machine's RPO as far as it is known at now: the RPO
// itself (exact true) when the server has the agent's status, else a lower
// bound from when the agent was last seen (or, never seen since, its last
// recovery point): the data-loss window of an agent that is gone keeps
// growing even when the server restarted since. ok is false for a machine
// unprotected, connected with no status reported yet, or with neither
// (never seen, no point).
func (m Machine) RPOAtLeast(now time.Time) (rpo time.Duration, exact, ok bool) {
	switch {
	case m.Unprotected:
		return 0, false, false
	case m.RPOKnown:
		return m.RPO, true, true
	case m.Connected:
		return 0, false, false // its first status is on its way
	case !m.LastSeen.IsZero():
		return max(now.Sub(m.LastSeen), 0), false, true
	case m.LastPoint != nil:
		return max(now.Sub(m.LastPoint.Time), 0), false, true
	}
	return 0, false, false
}
