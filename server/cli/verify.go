package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"text/tabwriter"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
)

// errDamage is returned (after the report is printed) when a check found
// damage, so that scripts see it in the exit status.
var errDamage = errors.New("damage found (see above)")

// runVerify checks replicas against their block checksums and, through the
// agent, against the source; or sets the scrub schedule.
func runVerify(ctx context.Context, e *env, args []string) error {
	out := e.out
	fs, o := e.opCommand("asr verify", true)
	point := fs.String("point", "", "check this recovery point (an id or latest) whole, as a recovery would read it")
	noSource := fs.Bool("no-source", false, "only scrub the replica against its checksums; do not compare with the source through the agent")
	wait := fs.Bool("wait", false, "wait until the compare with the source is done and print its result")
	every := fs.String("every", "", "set how often every machine is scrubbed, inside its resync window (e.g. 168h), or off")
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *every != "" {
		c, err := o.client()
		if err != nil {
			return err
		}
		if err := c.Do(ctx, http.MethodPut, "/api/v1/settings/scrub", api.ScrubRequest{Every: *every}, nil); err != nil {
			return err
		}
		fmt.Fprintf(out, "scrub interval set to %s\n", *every)
		return nil
	}
	if o.machine == "" {
		return errors.New("--machine is required")
	}
	if o.target != "" {
		return verifyOffline(ctx, o, *point, out)
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	path := "/api/v1/machines/" + url.PathEscape(o.machine) + "/verify"
	var res api.VerifyJSON
	started := time.Now()
	if err := c.Do(ctx, http.MethodPost, path, api.VerifyRequest{Point: *point, NoSource: *noSource}, &res); err != nil {
		return err
	}
	if err := output(out, *asJSON, res, func(tw *tabwriter.Writer) { printVerify(tw, res) }); err != nil {
		return err
	}
	damaged := res.Damaged
	if *wait && len(res.Jobs) > 0 {
		for {
			var st api.VerifyStatusJSON
			if err := c.Do(ctx, http.MethodGet, path, nil, &st); err != nil {
				return err
			}
			if len(st.Jobs) == 0 {
				break
			}
			for _, j := range st.Jobs {
				if j.State == api.ResyncFailed {
					return fmt.Errorf("the compare of disk %s with the source failed: %s", j.Disk, j.LastError)
				}
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Second):
			}
		}
		var evs []api.EventJSON
		if err := c.Do(ctx, http.MethodGet, "/api/v1/events?machine="+url.QueryEscape(o.machine), nil, &evs); err != nil {
			return err
		}
		for _, e := range evs {
			t, _ := time.Parse(time.RFC3339Nano, e.Time)
			if t.Before(started.Add(-time.Second)) || (e.Kind != "verify-done" && e.Kind != "damage") {
				continue
			}
			fmt.Fprintf(out, "%s: %s\n", e.Kind, e.Message)
			damaged = damaged || e.Kind == "damage"
		}
	}
	if damaged {
		return errDamage
	}
	return nil
}

func printVerify(out io.Writer, res api.VerifyJSON) {
	for _, p := range res.Point {
		fmt.Fprintf(out, "point %s disk %s: %d bytes checked, %d damaged blocks%s\n", p.Point, p.Disk, p.Checked, len(p.Damaged), offsets(p.Damaged))
	}
	if res.Scrub != nil {
		for _, d := range res.Scrub.Disks {
			fmt.Fprintf(out, "disk %s: %d bytes of the replica checked, %d damaged blocks%s\n", d.Disk, d.Checked, len(d.Damaged), offsets(d.Damaged))
		}
		for _, p := range res.Scrub.Points {
			if len(p.Damaged) > 0 {
				fmt.Fprintf(out, "point %s disk %s: %d damaged blocks in the blocks it holds%s\n", p.Point, p.Disk, len(p.Damaged), offsets(p.Damaged))
			}
		}
		if res.Scrub.PointsUnchecked > 0 {
			fmt.Fprintf(out, "%d points not checked (made before block checksums, or the target cannot tell their own blocks: check one with --point)\n", res.Scrub.PointsUnchecked)
		}
	}
	for _, j := range res.Jobs {
		fmt.Fprintf(out, "disk %s: compare with the source %s\n", j.Disk, j.State)
	}
	fmt.Fprintln(out, res.Summary)
}

func offsets(offs []int64) string {
	if len(offs) == 0 {
		return ""
	}
	s := " at"
	for i, off := range offs {
		if i == 8 {
			return s + fmt.Sprintf(" and %d more", len(offs)-8)
		}
		s += fmt.Sprintf(" %d", off)
	}
	return s
}

// verifyOffline checks points straight on the target (the site is gone or
// the server is down): one point whole, or every point's own blocks and
// the replicas' current contents. It changes nothing.
func verifyOffline(ctx context.Context, o *opFlags, point string, out io.Writer) error {
	cat, m, closeFn, err := o.machineOnTarget(ctx)
	if err != nil {
		return err
	}
	defer closeFn()
	damaged := false
	var points []replication.Point
	if point != "" {
		p, err := cat.FindPoint(ctx, m.ID, point)
		if err != nil {
			return err
		}
		points = []replication.Point{p}
	} else {
		listed, err := cat.Points(ctx, m.ID)
		if err != nil {
			return err
		}
		for _, lp := range listed {
			p, err := cat.FindPoint(ctx, m.ID, lp.ID)
			if err != nil {
				return err
			}
			points = append(points, p)
		}
	}
	for _, d := range m.Disks {
		rd, err := cat.T.OpenDisk(ctx, replication.DiskKey(m.ID, d.Index), 0)
		if err != nil {
			return fmt.Errorf("open replica of disk %s: %w", d.Name, err)
		}
		sd, err := cat.T.OpenDisk(ctx, replication.SumKey(m.ID, d.Index), 0)
		if err != nil {
			rd.Close()
			return fmt.Errorf("open the block checksums of disk %s: %w", d.Name, err)
		}
		err = func() error {
			defer rd.Close()
			defer sd.Close()
			if point == "" {
				sums := replication.NewSums(sd, rd.Size())
				chunks, err := replication.ScrubChunks(ctx, rd, sums)
				if err != nil {
					return err
				}
				buf := make([]byte, replication.HashChunk)
				var bad []int64
				var checked int64
				for _, c := range chunks {
					b, err := replication.CheckChunk(rd, sums, c, buf)
					if err != nil {
						return err
					}
					bad = append(bad, b...)
					checked += min(int64(replication.HashChunk), rd.Size()-c*replication.HashChunk)
				}
				fmt.Fprintf(out, "disk %s: %d bytes of the replica checked, %d damaged blocks%s\n", d.Name, checked, len(bad), offsets(bad))
				damaged = damaged || len(bad) > 0
			}
			for _, p := range points {
				var ranges []replication.Range
				if se, ok := rd.(replication.SnapshotExtenter); ok && point == "" {
					if ranges, err = se.SnapshotExtents(ctx, replication.SnapshotName(p.Seq)); err != nil {
						return err
					}
					if ranges == nil {
						ranges = []replication.Range{}
					}
				}
				bad, n, checked, err := replication.CheckPoint(ctx, m, p, d.Index, rd, sd, ranges)
				if err != nil {
					return err
				}
				if !checked {
					fmt.Fprintf(out, "point %s disk %s: not checked (made before block checksums)\n", p.ID, d.Name)
					continue
				}
				fmt.Fprintf(out, "point %s disk %s: %d bytes checked, %d damaged blocks%s\n", p.ID, d.Name, n, len(bad), offsets(bad))
				damaged = damaged || len(bad) > 0
			}
			return nil
		}()
		if err != nil {
			return err
		}
	}
	if damaged {
		return errDamage
	}
	fmt.Fprintln(out, "no damage found")
	return nil
}
