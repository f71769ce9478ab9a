package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// Application-consistent points, Linux style (ASR's Mobility service does
// the same with VSS on Windows): a pre-freeze script lets applications flush
// and quiesce, the given file systems are frozen (FIFREEZE), the stream is
// tagged, everything is thawed and a post-thaw script runs. The freeze is
// time-boxed: whatever happens, the file systems are thawed when the box
// closes, and a point that could not be made consistent in time becomes a
// crash-consistent one.

// scriptTimeout bounds each freeze script.
const scriptTimeout = 60 * time.Second

// freezer freezes and thaws file systems; replaced in tests.
type freezer interface {
	Freeze(mount string) error
	Thaw(mount string) error
}

// appPoint makes an application-consistent point, or a crash-consistent one
// (with the reason) when the freeze fails or times out. reqID is the
// operator request (0 for a scheduled point). The caller holds the point
// lock.
func (p *points) appPoint(reqID uint64) error {
	reason := p.quiesce(func() error { return p.tag(reqID, true) })
	if reason == "" {
		return nil
	}
	p.log.Warn("application-consistent point failed; taking a crash-consistent one", "reason", reason)
	p.events.add("freeze-failed", "application-consistent point failed, a crash-consistent point was taken instead: "+reason)
	return p.tag(reqID, false)
}

// quiesce runs the freeze sequence around tagFn and returns "" if the point
// is application-consistent, else why not (tagFn was then not called).
func (p *points) quiesce(tagFn func() error) string {
	fc := p.freeze
	if fc.preFreeze != "" {
		if err := runScript(p.rt.ctx, fc.preFreeze, "freeze"); err != nil {
			p.runPostThaw()
			return fmt.Sprintf("pre-freeze script: %v", err)
		}
	}
	timeout := fc.timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	// The time box: frozen file systems are thawed when it closes, even if
	// this goroutine is stuck (a freeze can block for a long time).
	var mu sync.Mutex
	var frozen []string
	thawAll := func() {
		mu.Lock()
		defer mu.Unlock()
		for i := len(frozen) - 1; i >= 0; i-- {
			if err := p.freezer.Thaw(frozen[i]); err != nil {
				p.log.Error("thaw failed", "mount", frozen[i], "err", err)
			}
		}
		frozen = nil
	}
	expired := make(chan struct{})
	box := time.AfterFunc(timeout, func() {
		close(expired)
		thawAll()
	})
	failed := ""
	for _, mnt := range fc.mounts {
		err := p.freezer.Freeze(mnt)
		select {
		case <-expired:
			// Too late: the box closed while this freeze was running;
			// undo it (the thaw above ran before it finished).
			if err == nil {
				p.freezer.Thaw(mnt)
			}
			failed = fmt.Sprintf("freeze of %s did not finish within %s", mnt, timeout)
		default:
		}
		if failed != "" {
			break
		}
		if err != nil {
			failed = fmt.Sprintf("freeze of %s: %v", mnt, err)
			break
		}
		mu.Lock()
		frozen = append(frozen, mnt)
		mu.Unlock()
	}
	if failed == "" && p.whileFrozen != nil {
		// Scan-mode disks are read whole while frozen, which makes them
		// consistent with the rest.
		if err := p.whileFrozen(); err != nil {
			failed = err.Error()
		}
	}
	if failed == "" {
		// The file systems have written everything through the splitter;
		// make it durable, then tag, inside the box.
		for _, d := range p.disks {
			if err := d.Flush(); err != nil {
				failed = fmt.Sprintf("flush of disk %s: %v", d.Name, err)
				break
			}
		}
	}
	if failed == "" {
		select {
		case <-expired:
			failed = fmt.Sprintf("the freeze window of %s closed before the point was tagged", timeout)
		default:
			if err := tagFn(); err != nil {
				failed = fmt.Sprintf("tag: %v", err)
			}
		}
	}
	box.Stop()
	thawAll()
	p.runPostThaw()
	return failed
}

func (p *points) runPostThaw() {
	script := p.freeze.postThaw
	if script == "" {
		return
	}
	if err := runScript(p.rt.ctx, script, "thaw"); err != nil {
		p.log.Error("post-thaw script failed", "script", script, "err", err)
		p.events.add("thaw-script-failed", fmt.Sprintf("post-thaw script %s failed: %v", script, err))
	}
}

// runScript runs a freeze script with one argument ("freeze" or "thaw"),
// time-boxed, and returns its error with the end of its output.
func runScript(ctx context.Context, path, arg string) error {
	ctx, cancel := context.WithTimeout(ctx, scriptTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, arg)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("did not finish within %s", scriptTimeout)
	}
	if err != nil {
		msg := strings.TrimSpace(out.String())
		if len(msg) > 300 {
			msg = msg[len(msg)-300:]
		}
		if msg != "" {
			return fmt.Errorf("%v: %s", err, msg)
		}
		return err
	}
	return nil
}

// osFreezer freezes with the FIFREEZE/FITHAW ioctls.
type osFreezer struct{}

func (osFreezer) Freeze(mount string) error { return fsIoctl(mount, true) }
func (osFreezer) Thaw(mount string) error   { return fsIoctl(mount, false) }

func fsIoctl(mount string, freeze bool) error {
	f, err := os.Open(mount)
	if err != nil {
		return err
	}
	defer f.Close()
	return ioctlFreeze(f, freeze)
}
