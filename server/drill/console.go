package drill

import (
	"bytes"
	"io"
	"regexp"
	"strings"
	"sync"
)

// maxLine bounds a console line; longer output is split, so a guest that
// never prints a newline cannot grow memory.
const maxLine = 4096

// maxPrompt bounds the unfinished line matched against the check: a prompt
// is short, and matching a long line again on every read would cost
// quadratic time when a guest writes a byte at a time.
const maxPrompt = 256

// console scans serial output line by line for a boot check and keeps the
// last lines for the verdict.
type console struct {
	check *regexp.Regexp
	keep  int

	mu      sync.Mutex
	lines   []string // the last keep complete lines
	partial []byte   // the unfinished line
	matched bool
}

func newConsole(check *regexp.Regexp, keep int) *console {
	return &console{check: check, keep: keep}
}

// scan reads r until EOF or an error, copying everything to log (if not
// nil), and calls onMatch once, when the check matches a complete line or
// the unfinished last one while it is short (a "login: " prompt has no
// newline).
func (c *console) scan(r io.Reader, log io.Writer, onMatch func()) {
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if log != nil {
				// A console log that cannot be written must not fail
				// the drill; the verdict still holds the tail.
				_, _ = log.Write(buf[:n])
			}
			if c.feed(buf[:n]) {
				onMatch()
			}
		}
		if err != nil {
			return
		}
	}
}

// feed adds output and reports whether the check matched for the first time.
func (c *console) feed(p []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	newMatch := false
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			room := maxLine - len(c.partial)
			if len(p) < room {
				c.partial = append(c.partial, p...)
				break
			}
			c.partial = append(c.partial, p[:room]...)
			p = p[room:]
		} else {
			c.partial = append(c.partial, p[:i]...)
			p = p[i+1:]
		}
		if c.matchLine(c.partial) {
			newMatch = true
		}
		c.lines = append(c.lines, cleanLine(c.partial))
		if len(c.lines) > c.keep {
			c.lines = c.lines[len(c.lines)-c.keep:]
		}
		c.partial = c.partial[:0]
	}
	if len(c.partial) > 0 && len(c.partial) <= maxPrompt && c.matchLine(c.partial) {
		newMatch = true
	}
	return newMatch
}

func (c *console) matchLine(line []byte) bool {
	if c.matched || c.check == nil {
		return false
	}
	if c.check.MatchString(cleanLine(line)) {
		c.matched = true
		return true
	}
	return false
}

// cleanLine drops the carriage returns of a serial console and control
// characters other than tabs (terminal escapes would garble a Reason).
func cleanLine(b []byte) string {
	return strings.Map(func(r rune) rune {
		if r == '\t' || r >= 0x20 && r != 0x7f {
			return r
		}
		return -1
	}, string(b))
}

// tail returns the last lines, the unfinished one included.
func (c *console) tail() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	lines := c.lines
	if len(c.partial) > 0 {
		lines = append(lines[:len(lines):len(lines)], cleanLine(c.partial))
		if len(lines) > c.keep {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}
