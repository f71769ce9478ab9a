package agent

import (
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
)

// maxQueuedEvents bounds the events waiting for a status report.
const maxQueuedEvents = 100

// eventQueue holds the events for the server until the next status report
// takes them. It is bounded: past maxQueuedEvents, new events are dropped
// (the log has them all).
type eventQueue struct {
	mu     sync.Mutex
	events []replication.AgentEvent
}

// add queues an event.
func (q *eventQueue) add(kind, msg string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.events) < maxQueuedEvents {
		q.events = append(q.events, replication.AgentEvent{Time: time.Now().UnixNano(), Kind: kind, Message: msg})
	}
}

// take returns and clears the queued events.
func (q *eventQueue) take() []replication.AgentEvent {
	q.mu.Lock()
	defer q.mu.Unlock()
	ev := q.events
	q.events = nil
	return ev
}
