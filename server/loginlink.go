package server

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"sync"
	"time"

	"github.com/asrdr/asr/web"
)

// loginLinkTTL is how long an unused one-time login link stays good.
const loginLinkTTL = 24 * time.Hour

// loginLinks are the one-time console login tokens handed out by
// LoginLink, in memory only: a restart ends them.
type loginLinks struct {
	mu     sync.Mutex
	tokens map[string]time.Time // token -> expiry
}

// add makes a new token, good until now+loginLinkTTL.
func (l *loginLinks) add(now time.Time) string {
	b := make([]byte, 24)
	rand.Read(b)
	tok := hex.EncodeToString(b)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.tokens == nil {
		l.tokens = map[string]time.Time{}
	}
	for t, exp := range l.tokens {
		if now.After(exp) {
			delete(l.tokens, t)
		}
	}
	l.tokens[tok] = now.Add(loginLinkTTL)
	return tok
}

// take reports whether tok is a live token, and ends it.
func (l *loginLinks) take(tok string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for t, exp := range l.tokens {
		if subtle.ConstantTimeCompare([]byte(t), []byte(tok)) == 1 {
			delete(l.tokens, t)
			return !now.After(exp)
		}
	}
	return false
}

// LoginLink returns a console URL that signs a browser in once (within a
// day, until the server stops): what `asr demo` prints beside the admin
// token.
func (s *Server) LoginLink() string {
	return s.URL() + "/login/link?t=" + s.logins.add(time.Now())
}

var _ web.LoginLinker = consoleBackend{}

func (b consoleBackend) TakeLoginLink(_ context.Context, tok string) bool {
	return b.s.logins.take(tok, time.Now())
}
