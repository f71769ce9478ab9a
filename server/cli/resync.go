package cli

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/asrdr/asr/server/api"
)

// runResync starts a resync now, shows resyncs, or sets the resync window.
func runResync(ctx context.Context, e *env, args []string) error {
	out := e.out
	fs, o := e.opCommand("asr resync", false)
	disk := fs.String("disk", "", "only this disk (default: every disk of the machine)")
	show := fs.Bool("status", false, "show the machine's resyncs instead of starting one")
	wait := fs.Bool("wait", false, "wait until the resync is done")
	window := fs.String("window", "", "set the resync window (HH:MM-HH:MM, server local time, or always) of the vault, or of --policy")
	policy := fs.String("policy", "", "with --window: the policy whose window to set")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if *window != "" {
		body := api.ResyncWindowRequest{Window: *window, Policy: *policy}
		if err := c.Do(ctx, http.MethodPut, "/api/v1/settings/resync-window", body, nil); err != nil {
			return err
		}
		fmt.Fprintf(out, "resync window set to %s\n", *window)
		return nil
	}
	if o.machine == "" {
		return errors.New("--machine is required")
	}
	path := "/api/v1/machines/" + url.PathEscape(o.machine) + "/resync"
	var rows []api.ResyncJSON
	if !*show {
		if err := c.Do(ctx, http.MethodPost, path, api.ResyncRequest{Disk: *disk}, &rows); err != nil {
			return err
		}
	}
	// The compare of the first running disk, one bar at a time (a
	// terminal line holds one).
	var bar *progress
	var barDisk string
	defer func() {
		if bar != nil {
			bar.clear()
		}
	}()
	for {
		if err := c.Do(ctx, http.MethodGet, path, nil, &rows); err != nil {
			return err
		}
		if !*wait || len(rows) == 0 {
			break
		}
		for _, r := range rows {
			if r.State != api.ResyncRunning || r.Total <= 0 {
				continue
			}
			if bar == nil || barDisk != r.Disk {
				if bar != nil {
					bar.clear()
				}
				bar, barDisk = newProgress(e.errOut, "resync "+o.machine+"/"+r.Disk, r.Total), r.Disk
			}
			bar.update(r.Compared)
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	if len(rows) == 0 {
		fmt.Fprintf(out, "machine %s: no resync needed or running\n", o.machine)
		return nil
	}
	for _, r := range rows {
		pct := 0.0
		if r.Total > 0 {
			pct = float64(r.Compared) * 100 / float64(r.Total)
		}
		fmt.Fprintf(out, "disk %s: %s (%s); compared %d of %d bytes (%.0f%%), sent %d", r.Disk, r.State, r.Reason, r.Compared, r.Total, pct, r.Sent)
		if r.Scheduled != "" {
			fmt.Fprintf(out, "; starts %s", r.Scheduled)
		}
		if r.LastError != "" {
			fmt.Fprintf(out, "; last error: %s", r.LastError)
		}
		fmt.Fprintln(out)
	}
	return nil
}
