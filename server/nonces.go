package server

import (
	"container/list"
	"crypto/rand"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Registration challenges. Anyone may ask for one, so the table of nonces
// handed out and not yet used is bounded twice: each source holds at most
// perSource nonces and the whole table at most max, and past either bound
// the oldest nonce goes rather than the new one being refused. A flood from
// one source then only evicts its own nonces; a flood from many sources can
// evict others', which costs their agents a retry, never a refusal.
const (
	nonceTTL        = 5 * time.Minute
	noncesPerSource = 8
	maxNonces       = 10000
	nonceLen        = 32 // bytes
)

// nonceTable holds the registration nonces handed out and not yet used.
type nonceTable struct {
	perSource, max int
	ttl            time.Duration
	now            func() time.Time

	mu       sync.Mutex
	order    *list.List // of *issuedNonce, oldest first
	byNonce  map[string]*list.Element
	bySource map[string][]*list.Element // oldest first, at most perSource
}

type issuedNonce struct {
	nonce, source string
	at            time.Time
}

func newNonceTable(perSource, max int, ttl time.Duration, now func() time.Time) *nonceTable {
	return &nonceTable{perSource: perSource, max: max, ttl: ttl, now: now,
		order: list.New(), byNonce: map[string]*list.Element{}, bySource: map[string][]*list.Element{}}
}

// issue makes a new nonce for source, evicting that source's oldest nonce
// and then the table's oldest as the bounds require.
func (t *nonceTable) issue(source string) []byte {
	nonce := make([]byte, nonceLen)
	rand.Read(nonce)
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	// Nonces are in issue order, so the expired ones are at the front.
	for e := t.order.Front(); e != nil && now.Sub(e.Value.(*issuedNonce).at) > t.ttl; e = t.order.Front() {
		t.remove(e)
	}
	if els := t.bySource[source]; len(els) >= t.perSource {
		t.remove(els[0])
	}
	if t.order.Len() >= t.max {
		t.remove(t.order.Front())
	}
	e := t.order.PushBack(&issuedNonce{nonce: string(nonce), source: source, at: now})
	t.byNonce[string(nonce)] = e
	t.bySource[source] = append(t.bySource[source], e)
	return nonce
}

// take uses up a nonce: it reports whether the nonce was handed out, is
// still outstanding and has not expired. A nonce is taken at most once.
func (t *nonceTable) take(nonce []byte) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byNonce[string(nonce)]
	if !ok {
		return false
	}
	t.remove(e)
	return t.now().Sub(e.Value.(*issuedNonce).at) <= t.ttl
}

// count is the number of outstanding nonces.
func (t *nonceTable) count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.order.Len()
}

func (t *nonceTable) remove(e *list.Element) {
	n := t.order.Remove(e).(*issuedNonce)
	delete(t.byNonce, n.nonce)
	els := t.bySource[n.source]
	for i, x := range els {
		if x == e {
			els = append(els[:i], els[i+1:]...)
			break
		}
	}
	if len(els) == 0 {
		delete(t.bySource, n.source)
	} else {
		t.bySource[n.source] = els
	}
}

// nonceSource names the source a request's nonces are counted against: its
// IPv4 address, or its IPv6 /64, since one host is commonly given a whole
// /64 and can use any address in it.
func nonceSource(remoteAddr string) string {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return host
	}
	addr = addr.Unmap()
	if addr.Is4() {
		return addr.String()
	}
	p, err := addr.WithZone("").Prefix(64)
	if err != nil {
		return host
	}
	return p.String()
}
