package procserver

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// logBuffer is a goroutine-safe buffer for a logger's output.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// An agent that closes its connection between frames (a stop, a restart)
// is a normal event, logged at INFO: a WARN is for a connection that broke.
func TestCleanCloseIsNotAWarning(t *testing.T) {
	var logs logBuffer
	r := mustTLSRigWith(t, func(c *Config) {
		c.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	ta, _, err := r.hello(t, logA, 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	ta.c.Close()
	waitFor(t, "the closed connection logged", func() bool { return strings.Contains(logs.String(), "data connection closed") })
	for _, line := range strings.Split(logs.String(), "\n") {
		// The cache disk's state is the host's (its free space), not the
		// connection's: a nearly full disk under the test is no failure.
		if strings.Contains(line, `msg="process server cache disk"`) {
			continue
		}
		if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
			t.Errorf("a clean close logged %q", line)
		}
	}
	// A connection cut inside a frame is still a warning.
	ta, _, err = r.hello(t, logA, 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	ta.c.Write(helloHeader(100)[:10])
	ta.c.Close()
	waitFor(t, "the broken connection logged", func() bool { return strings.Contains(logs.String(), "level=WARN msg=\"data connection closed\"") })
}
