package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"sort"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
)

// runGroup puts machines in replication groups.
func runGroup(ctx context.Context, args []string, out io.Writer) error {
	if len(args) == 0 || (args[0] != "set" && args[0] != "clear") {
		return errors.New("usage: asr group set --machine M --group G | asr group clear --machine M")
	}
	var o opFlags
	fs := flag.NewFlagSet("asr group "+args[0], flag.ContinueOnError)
	o.register(fs, false)
	group := &o.group
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if o.machine == "" || (args[0] == "set" && *group == "") {
		return errors.New("--machine (and, for set, --group) are required")
	}
	if args[0] == "clear" {
		*group = ""
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(o.machine)+"/group", api.GroupRequest{Group: *group}, nil); err != nil {
		return err
	}
	if *group == "" {
		fmt.Fprintf(out, "machine %s is in no replication group\n", o.machine)
	} else {
		fmt.Fprintf(out, "machine %s is in replication group %s: its points are now the group's\n", o.machine, *group)
	}
	return nil
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
		out[i] = api.GroupPointJSON{ID: gp.ID, Time: gp.Time.UTC().Format(time.RFC3339Nano), Kind: gp.Kind, Members: map[string]string{}}
		for id, pid := range gp.Members {
			out[i].Members[names[id]] = pid
		}
	}
	return out, closeFn, nil
}

func printGroupPoints(out io.Writer, gps []api.GroupPointJSON, asJSON bool) error {
	if asJSON {
		if gps == nil {
			gps = []api.GroupPointJSON{}
		}
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(gps)
	}
	if len(gps) == 0 {
		fmt.Fprintln(out, "no group points yet")
		return nil
	}
	for _, gp := range gps {
		names := make([]string, 0, len(gp.Members))
		for n := range gp.Members {
			names = append(names, n)
		}
		sort.Strings(names)
		fmt.Fprintf(out, "%s  %s  %s ", gp.ID, gp.Time, gp.Kind)
		for _, n := range names {
			fmt.Fprintf(out, " %s:%s", n, gp.Members[n])
		}
		fmt.Fprintln(out)
	}
	return nil
}

// recoverGroup writes every member's disks at a group point to
// DIR/<machine>/<disk>.img.
func recoverGroup(ctx context.Context, o *opFlags, group, point, dir string, opts replication.RecoverOptions, out io.Writer) error {
	start := time.Now()
	if o.target != "" {
		cat, closeFn, err := o.catalog(ctx)
		if err != nil {
			return err
		}
		defer closeFn()
		gp, err := cat.FindGroupPoint(ctx, group, point)
		if err != nil {
			return err
		}
		for id, pid := range gp.Members {
			m, err := cat.FindMachine(ctx, id)
			if err != nil {
				return err
			}
			p, err := cat.FindPoint(ctx, m.ID, pid)
			if err != nil {
				return err
			}
			mdir := filepath.Join(dir, m.Name)
			if _, err := replication.RecoverPoint(ctx, cat, m, p, mdir, opts); err != nil {
				return fmt.Errorf("machine %s: %w", m.Name, err)
			}
			fmt.Fprintf(out, "machine %s: point %s in %s\n", m.Name, pid, mdir)
		}
		fmt.Fprintf(out, "recovered group %s at point %s (%s, %s) in %s\n", group, gp.ID, gp.Kind, gp.Time.Format(time.RFC3339Nano), time.Since(start).Round(time.Millisecond))
		fmt.Fprintln(out, gp.ID)
		return nil
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	var gps []api.GroupPointJSON
	if err := c.Do(ctx, http.MethodGet, "/api/v1/groups/"+url.PathEscape(group)+"/points", nil, &gps); err != nil {
		return err
	}
	var gp *api.GroupPointJSON
	for i := range gps {
		if gps[i].ID == point || ((point == "" || point == "latest") && i == len(gps)-1) {
			gp = &gps[i]
		}
	}
	if gp == nil {
		return fmt.Errorf("group %s has no point %q (see asr points --group %s)", group, point, group)
	}
	for name, pid := range gp.Members {
		mdir := filepath.Join(dir, name)
		if _, err := c.RecoverPoint(ctx, name, pid, mdir, opts); err != nil {
			return fmt.Errorf("machine %s: %w", name, err)
		}
		fmt.Fprintf(out, "machine %s: point %s in %s\n", name, pid, mdir)
	}
	fmt.Fprintf(out, "recovered group %s at point %s (%s, %s) in %s\n", group, gp.ID, gp.Kind, gp.Time, time.Since(start).Round(time.Millisecond))
	fmt.Fprintln(out, gp.ID)
	return nil
}
