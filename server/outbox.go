package server

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/asrdr/asr/replication/retry"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/notify"
	"github.com/asrdr/asr/store"
)

// The alerts' outbox. The engine only writes alert rows; the notices are
// sent from the rows: at start and after each engine pass, flush reads
// the alerts with a notice not yet told (store.UnsentAlerts: a raise, an
// escalation to the current severity, a resolve) and gives each to every
// channel that has not sent it yet. Once every channel has sent it (or
// needed not: off, under its minimum severity), the row is marked
// (MarkAlertNotified) and the notice is never sent again, across
// restarts. A channel that failed is given the notice again on a later
// flush, after a backoff (retry.Backoff, per notice). So a notice is sent
// at least once: a crash between a send and its mark, or one channel
// failing while the other sent, can repeat it, never lose it.

// Bounds of the backoff between the sends of a failing notice.
const (
	outboxMinBackoff = 2 * time.Second
	outboxMaxBackoff = 5 * time.Minute
)

// outboxStore is what the outbox needs of the vault database.
type outboxStore interface {
	UnsentAlerts(ctx context.Context) ([]store.Alert, error)
	MarkAlertNotified(ctx context.Context, id int64, change, severity string, at time.Time) error
}

var _ outboxStore = (*store.DB)(nil)

// noticeKey names one notice of one alert.
type noticeKey struct {
	id       int64
	change   string
	severity string
}

// Per channel, where a notice is.
const (
	chTodo = iota
	chBusy // given to the channel, no answer yet
	chDone
)

type pendingNotice struct {
	ch       map[string]int
	backoff  retry.Backoff
	next     time.Time // not before: the backoff after a failure
	unmarked bool      // sent by every channel, but the mark failed
}

// outbox sends the notices of the alert rows.
type outbox struct {
	db         outboxStore
	n          *notify.Notifier
	now        func() time.Time
	log        *slog.Logger
	minBackoff time.Duration
	maxBackoff time.Duration

	flushMu sync.Mutex // one flush at a time: a flush's rows are not older than another's
	mu      sync.Mutex
	// pending holds the notices being sent, and those sent until a flush
	// reads rows that no longer owe them (so a row read before its mark
	// does not send it again).
	pending map[noticeKey]*pendingNotice
}

func newOutbox(db outboxStore, n *notify.Notifier, now func() time.Time, log *slog.Logger) *outbox {
	return &outbox{db: db, n: n, now: now, log: log, minBackoff: outboxMinBackoff, maxBackoff: outboxMaxBackoff,
		pending: map[noticeKey]*pendingNotice{}}
}

// noticeOf says which notice an unsent alert row owes.
func noticeOf(a store.Alert) noticeKey {
	switch {
	case a.State == store.AlertResolved:
		return noticeKey{a.ID, api.AlertChangeResolved, a.Severity}
	case a.Notified.IsZero():
		return noticeKey{a.ID, api.AlertChangeRaised, a.Severity}
	}
	return noticeKey{a.ID, api.AlertChangeEscalate, a.Severity}
}

// flush gives the unsent notices to the channels that have not sent them
// and are not sending them now.
func (o *outbox) flush(ctx context.Context) error {
	o.flushMu.Lock()
	defer o.flushMu.Unlock()
	rows, err := o.db.UnsentAlerts(ctx)
	if err != nil {
		return err
	}
	type send struct {
		ch string
		no notify.Notice
	}
	var sends []send
	var marks []noticeKey
	now := o.now()
	o.mu.Lock()
	owed := map[noticeKey]bool{}
	for _, a := range rows {
		k := noticeOf(a)
		owed[k] = true
		p := o.pending[k]
		if p == nil {
			p = &pendingNotice{ch: map[string]int{}, backoff: retry.New(o.minBackoff, o.maxBackoff)}
			o.pending[k] = p
		}
		if p.unmarked {
			p.unmarked = false
			marks = append(marks, k)
			continue
		}
		if now.Before(p.next) {
			continue
		}
		no := notify.Notice{Change: k.change, Alert: alertJSON(a)}
		if k.change == api.AlertChangeEscalate {
			no.Alert.Message = "escalated to " + k.severity + ": " + a.Message
		}
		for _, ch := range notify.Channels {
			if p.ch[ch] != chTodo {
				continue
			}
			p.ch[ch] = chBusy
			no.Done = func(ch string, err error) { o.done(k, ch, err) }
			sends = append(sends, send{ch, no})
		}
	}
	// Forget what is no longer owed (marked, pruned, superseded by an
	// escalation) unless a channel still has it.
	for k, p := range o.pending {
		if !owed[k] && p.ch[notify.ChannelEmail] != chBusy && p.ch[notify.ChannelWebhook] != chBusy {
			delete(o.pending, k)
		}
	}
	o.mu.Unlock()
	for _, k := range marks {
		o.mark(k)
	}
	for _, s := range sends { // outside the lock: Send may call Done
		o.n.Send(s.ch, s.no)
	}
	return nil
}

// done records a channel's answer; the notice sent by every channel is
// marked in its row.
func (o *outbox) done(k noticeKey, ch string, err error) {
	o.mu.Lock()
	p := o.pending[k]
	if p == nil {
		o.mu.Unlock()
		return
	}
	if err != nil {
		p.ch[ch] = chTodo
		p.next = o.now().Add(p.backoff.Next())
		o.mu.Unlock()
		return
	}
	p.ch[ch] = chDone
	for _, c := range notify.Channels {
		if p.ch[c] != chDone {
			o.mu.Unlock()
			return
		}
	}
	o.mu.Unlock()
	o.mark(k)
}

// mark records in the alert's row that its notice was sent.
func (o *outbox) mark(k noticeKey) {
	change := store.NoticeRaised
	switch k.change {
	case api.AlertChangeEscalate:
		change = store.NoticeEscalate
	case api.AlertChangeResolved:
		change = store.NoticeResolved
	}
	// Not the server's context: a notice sent while closing is marked too.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := o.db.MarkAlertNotified(ctx, k.id, change, k.severity, o.now()); err != nil {
		o.log.Error("alert notice sent but not marked; the mark is tried again", "alert", k.id, "change", k.change, "err", err)
		o.mu.Lock()
		if p := o.pending[k]; p != nil {
			p.unmarked = true
		}
		o.mu.Unlock()
	}
}
