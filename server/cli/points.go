package cli

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/asrdr/asr/server/api"
)

// runPoints lists a machine's (or a group's) recovery points, through the
// server or straight from the target.
func runPoints(ctx context.Context, e *env, args []string) error {
	out := e.out
	fs, o := e.opCommand("asr points", true)
	asJSON := fs.Bool("json", false, "print JSON: [{id, time, kind, cut}]")
	point := fs.String("point", "", "only this point (an id, or latest), read whole: with the replication-group cut it is part of")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *point != "" && o.group != "" {
		return errors.New("--point goes with --machine, not --group")
	}
	if o.group != "" {
		gps, closeFn, err := groupPoints(ctx, o, o.group)
		if err != nil {
			return err
		}
		defer closeFn()
		return printGroupPoints(out, gps, *asJSON)
	}
	if o.machine == "" {
		return errors.New("--machine (or --group) is required")
	}
	var points []api.PointJSON
	if o.target != "" {
		cat, m, closeFn, err := o.machineOnTarget(ctx)
		if err != nil {
			return err
		}
		defer closeFn()
		if *point != "" {
			p, err := cat.FindPoint(ctx, m.ID, *point)
			if err != nil {
				return err
			}
			points = []api.PointJSON{api.PointOf(p)}
		} else {
			ps, err := cat.Points(ctx, m.ID)
			if err != nil {
				return err
			}
			for _, p := range ps {
				points = append(points, api.PointOf(p))
			}
		}
	} else {
		c, err := o.client()
		if err != nil {
			return err
		}
		path := "/api/v1/machines/" + url.PathEscape(o.machine) + "/points"
		if *point != "" {
			var p api.PointJSON
			if err := c.Do(ctx, http.MethodGet, path+"/"+url.PathEscape(*point), nil, &p); err != nil {
				return err
			}
			points = []api.PointJSON{p}
		} else if err := c.Do(ctx, http.MethodGet, path, nil, &points); err != nil {
			return err
		}
	}
	if points == nil {
		points = []api.PointJSON{}
	}
	return output(out, *asJSON, points, func(tw *tabwriter.Writer) {
		if len(points) == 0 {
			fmt.Fprintln(tw, "no recovery points yet")
			return
		}
		if *point != "" { // read whole: its cut is known
			fmt.Fprintln(tw, "ID\tTIME\tKIND\tCUT")
			for _, p := range points {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.ID, p.Time, p.Kind, cmp.Or(p.Cut, "-"))
			}
			return
		}
		fmt.Fprintln(tw, "ID\tTIME\tKIND")
		for _, p := range points {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", p.ID, p.Time, p.Kind)
		}
	})
}

// groupPoints lists a group's points, through the server or the target.
func groupPoints(ctx context.Context, o *opFlags, group string) ([]api.GroupPointJSON, func(), error) {
	if o.target == "" {
		c, err := o.client()
		if err != nil {
			return nil, nil, err
		}
		var gps []api.GroupPointJSON
		err = c.Do(ctx, http.MethodGet, "/api/v1/groups/"+url.PathEscape(group)+"/points", nil, &gps)
		return gps, func() {}, err
	}
	cat, closeFn, err := o.catalog(ctx)
	if err != nil {
		return nil, nil, err
	}
	gps, err := cat.GroupPoints(ctx, group)
	if err != nil {
		closeFn()
		return nil, nil, err
	}
	ms, err := cat.Machines(ctx)
	if err != nil {
		closeFn()
		return nil, nil, err
	}
	names := map[string]string{}
	for _, m := range ms {
		names[m.ID] = m.Name
	}
	out := make([]api.GroupPointJSON, len(gps))
	for i, gp := range gps {
		out[i] = api.GroupPointOf(gp, func(id string) string { return names[id] })
	}
	return out, closeFn, nil
}

func printGroupPoints(out io.Writer, gps []api.GroupPointJSON, asJSON bool) error {
	if gps == nil {
		gps = []api.GroupPointJSON{}
	}
	return output(out, asJSON, gps, func(tw *tabwriter.Writer) {
		if len(gps) == 0 {
			fmt.Fprintln(tw, "no group points yet")
			return
		}
		for _, gp := range gps {
			names := make([]string, 0, len(gp.Members))
			for n := range gp.Members {
				names = append(names, n)
			}
			sort.Strings(names)
			fmt.Fprintf(tw, "%s  %s  %s ", gp.ID, gp.Time, gp.Kind)
			if gp.Cut != "" {
				fmt.Fprintf(tw, " cut %s", gp.Cut)
			}
			for _, n := range names {
				fmt.Fprintf(tw, " %s:%s", n, gp.Members[n])
			}
			fmt.Fprintln(tw)
		}
	})
}

// runTag asks for a recovery point of a machine (or a group cut).
func runTag(ctx context.Context, e *env, args []string) error {
	out := e.out
	fs, o := e.opCommand("asr tag", false)
	wait := fs.Bool("wait", false, "wait for the initial replication (progress on stderr), then until the point is durable and recoverable, then print its id")
	app := fs.Bool("app", false, "application-consistent point: the agent runs its freeze scripts and freezes its --freeze mounts first (without either, a flush before the tag)")
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to wait for the point")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if o.group != "" {
		// A group cut is synchronous: it returns once every member's point is durable.
		var gp api.GroupPointJSON
		tctx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		if err := c.Do(tctx, http.MethodPost, "/api/v1/groups/"+url.PathEscape(o.group)+"/points", api.TagRequest{App: *app}, &gp); err != nil {
			return err
		}
		fmt.Fprintf(out, "group point %s (%s) at %s across %d machines\n", gp.ID, gp.Kind, gp.Time, len(gp.Members))
		fmt.Fprintln(out, gp.ID)
		return nil
	}
	if o.machine == "" {
		return errors.New("--machine (or --group) is required")
	}
	if !*wait {
		var resp map[string]string
		if err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(o.machine)+"/points",
			api.TagRequest{App: *app, NoWait: true}, &resp); err != nil {
			return err
		}
		fmt.Fprintln(out, "recovery point requested; it appears in `asr points` once durable")
		return nil
	}
	var p api.PointJSON
	for {
		// A point needs the initial copy done: --wait waits for it first
		// (as long as it takes; Ctrl-C ends the wait).
		if err := waitInitial(ctx, c, o.machine, e.errOut, time.Second); err != nil {
			return err
		}
		p, err = c.Tag(ctx, o.machine, *app, *timeout)
		// The machine's state may say protected a moment before its
		// applier does: still copying means waiting again.
		if err == nil || !strings.Contains(err.Error(), initialNotDone) {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "recovery point %s (%s) at %s\n", p.ID, p.Kind, p.Time)
	fmt.Fprintln(out, p.ID)
	return nil
}

// initialNotDone is how the process server refuses a point before the
// machine's initial replication is complete.
const initialNotDone = "initial replication is not complete"

// waitInitial waits until every disk of machine has its initial copy, so a
// point can be taken, polling its state every poll and showing the copy's
// progress on errOut. It returns at once when the machine is protected,
// and fails when its protection ends or a disk needs a resync (no point is
// possible until the resync runs).
func waitInitial(ctx context.Context, c *api.Client, machine string, errOut io.Writer, poll time.Duration) error {
	var pr *progress
	defer func() {
		if pr != nil {
			pr.clear()
		}
	}()
	for {
		var m api.Machine
		if err := c.Do(ctx, http.MethodGet, "/api/v1/machines/"+url.PathEscape(machine), nil, &m); err != nil {
			return err
		}
		switch {
		case m.Unprotected || m.State == api.StateUnprotected:
			return fmt.Errorf("machine %s is unprotected: no new point can be taken", machine)
		case m.State == api.StateResync:
			return fmt.Errorf("machine %s needs a resync before a point can be taken (%s): see asr resync --machine %s --status", machine, m.Reason, machine)
		case m.State == api.StateProtected:
			if pr != nil {
				pr.finish(diskBytes(m))
			}
			return nil
		}
		if pr == nil {
			fmt.Fprintf(errOut, "machine %s: waiting for the initial replication before the point\n", machine)
			pr = newProgress(errOut, "initial replication "+machine, diskBytes(m))
		}
		if !m.Connected {
			pr.status(fmt.Sprintf("%.0f%%, agent not connected", m.Progress*100))
		} else {
			pr.update(int64(m.Progress * float64(diskBytes(m))))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(poll):
		}
	}
}

// diskBytes is the size of every disk of m.
func diskBytes(m api.Machine) int64 {
	var n int64
	for _, d := range m.Disks {
		n += d.Size
	}
	return n
}
