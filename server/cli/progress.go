package cli

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// progress reports a long operation's progress on stderr: a bar redrawn in
// place, with the rate and the time left, when stderr is a terminal; a
// plain line now and then otherwise (a log, a pipe), so a script's output
// stays readable. Safe for concurrent use.
type progress struct {
	mu       sync.Mutex
	w        io.Writer
	tty      bool
	label    string
	total    int64 // bytes; 0 if unknown
	base     int64 // done at the first update: the rate counts from there
	based    bool
	start    time.Time
	now      func() time.Time
	last     time.Time // when a line was last written
	every    time.Duration
	drawn    bool // a bar is on the terminal's current line
	finished bool
}

// Redraw and line intervals: a terminal's bar a few times a second, a
// plain line every half minute.
const (
	barEvery  = 200 * time.Millisecond
	lineEvery = 30 * time.Second
)

// newProgress starts reporting an operation of total bytes (0: unknown).
func newProgress(w io.Writer, label string, total int64) *progress {
	p := &progress{w: w, tty: isTerminal(w), label: label, total: total, now: time.Now}
	p.start = p.now()
	p.every = lineEvery
	if p.tty {
		p.every = barEvery
	}
	return p
}

// isTerminal reports whether w is a terminal (a character device; not a
// file, a pipe or a buffer).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0 && fi.Mode()&os.ModeDevice != 0
}

// update reports done bytes (of the total), at most every so often.
func (p *progress) update(done int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.finished {
		return
	}
	now := p.now()
	if !p.based {
		// A wait that joins an operation under way (an initial copy
		// already half done) measures its rate from what it saw first.
		p.base, p.based, p.start = done, true, now
	}
	if !p.last.IsZero() && now.Sub(p.last) < p.every {
		return
	}
	if p.last.IsZero() && !p.tty && now.Sub(p.start) < p.every {
		// A plain report of a short operation would be noise: the
		// first line comes after the interval.
		return
	}
	p.last = now
	p.write(formatProgress(p.label, done, p.total, p.rate(done, now), 30, p.tty))
}

// status reports a line of text in place of a bar (a wait with no byte
// count), at most every so often.
func (p *progress) status(text string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	if p.finished || (!p.last.IsZero() && now.Sub(p.last) < p.every) {
		return
	}
	p.last = now
	p.write(p.label + ": " + text)
}

// write puts a report on the terminal's current line, or on a line of its
// own.
func (p *progress) write(s string) {
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", s)
		p.drawn = true
		return
	}
	fmt.Fprintln(p.w, s)
}

// finish reports the final figure (done bytes) once and ends the bar's
// line; later updates are ignored.
func (p *progress) finish(done int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.finished {
		return
	}
	p.finished = true
	if !p.tty {
		return
	}
	fmt.Fprintf(p.w, "\r\033[K%s\n", formatProgress(p.label, done, p.total, p.rate(done, p.now()), 30, true))
}

// rate is the average rate in bytes per second since the first update.
func (p *progress) rate(done int64, now time.Time) float64 {
	el := now.Sub(p.start).Seconds()
	if el <= 0 || done <= p.base {
		return 0
	}
	return float64(done-p.base) / el
}

// clear removes a bar from the terminal (before other output, or at the
// end of a wait whose result is printed instead).
func (p *progress) clear() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.finished = true
	if p.tty && p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
	}
}

// formatProgress renders one report: the label, a bar of width cells (bar
// only), the percentage, the bytes done of the total, the rate (bytes per
// second) and the time left at that rate.
//
//	recover disk0 [=========>          ]  45%  460.0 MiB / 1.0 GiB  38.2 MiB/s  ETA 0:14
func formatProgress(label string, done, total int64, rate float64, width int, bar bool) string {
	var b strings.Builder
	b.WriteString(label)
	if total > 0 {
		frac := float64(done) / float64(total)
		frac = min(max(frac, 0), 1)
		if bar {
			n := int(frac * float64(width))
			b.WriteString(" [")
			b.WriteString(strings.Repeat("=", n))
			if n < width {
				b.WriteString(">")
				b.WriteString(strings.Repeat(" ", width-n-1))
			}
			b.WriteString("]")
		}
		fmt.Fprintf(&b, " %3d%%  %s / %s", int(frac*100), humanBytes(done), humanBytes(total))
	} else {
		fmt.Fprintf(&b, "  %s", humanBytes(done))
	}
	if rate > 0 {
		fmt.Fprintf(&b, "  %s/s", humanBytes(int64(rate)))
		if total > done {
			fmt.Fprintf(&b, "  ETA %s", clock(time.Duration(float64(total-done)/rate*float64(time.Second))))
		}
	} else if total > done {
		b.WriteString("  ETA --:--")
	}
	return b.String()
}

// humanBytes is n in binary units, one decimal above a KiB.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n)/unit, 0
	for v >= unit && i < 5 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[i])
}

// clock is d as M:SS, or H:MM:SS from an hour.
func clock(d time.Duration) string {
	s := int64(d.Round(time.Second) / time.Second)
	if s >= 3600 {
		return fmt.Sprintf("%d:%02d:%02d", s/3600, s/60%60, s%60)
	}
	return fmt.Sprintf("%d:%02d", s/60, s%60)
}

// diskProgress returns a progress callback for an operation over several
// disks, one after the other (recover: RecoverOptions.Progress): a bar per
// disk, labelled what and the disk's name; done ends the last one.
func diskProgress(w io.Writer, what string) (fn func(disk string, done, size int64), done func()) {
	var mu sync.Mutex
	var cur *progress
	var name string
	var last int64
	fn = func(disk string, n, size int64) {
		mu.Lock()
		defer mu.Unlock()
		if cur == nil || disk != name {
			if cur != nil {
				cur.finish(last)
			}
			cur, name = newProgress(w, what+" "+disk, size), disk
			cur.update(0)
		}
		last = n
		cur.update(n)
	}
	done = func() {
		mu.Lock()
		defer mu.Unlock()
		if cur != nil {
			cur.finish(last)
			cur = nil
		}
	}
	return fn, done
}
