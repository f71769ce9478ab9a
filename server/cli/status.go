package cli

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/asrdr/asr/server/api"
)

// runStatus shows the protected machines, or the process server's figures.
func runStatus(ctx context.Context, e *env, args []string) error {
	out := e.out
	fs, o := e.opCommand("asr status", false)
	asJSON := fs.Bool("json", false, "print JSON")
	psOnly := fs.Bool("process-server", false, "print the process server's figures instead: backlog, upload rate, compression, cache disk")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if *psOnly {
		var ps api.ProcessServer
		if err := c.Do(ctx, http.MethodGet, "/api/v1/process-server", nil, &ps); err != nil {
			return err
		}
		return output(out, *asJSON, ps, func(tw *tabwriter.Writer) {
			cache := fmt.Sprintf("%.0f%% free (%d bytes), %s", ps.CacheFree*100, ps.CacheFreeB, ps.CacheState)
			if ps.CacheError != "" {
				cache = "unknown: " + ps.CacheError
			}
			fmt.Fprintf(tw, "target:       %s\nbacklog:      %d bytes, oldest %s\nupload rate:  %.0f bytes/s\ncompression:  %.2fx\ncache disk:   %s\ncache bound:  %d bytes (--cache-max)\n",
				ps.Target, ps.BacklogBytes, ps.BacklogAge.Round(time.Millisecond), ps.UploadRate, ps.Compression, cache, ps.CacheMaxB)
		})
	}
	var ms []api.Machine
	if o.machine != "" {
		var m api.Machine
		if err := c.Do(ctx, http.MethodGet, "/api/v1/machines/"+url.PathEscape(o.machine), nil, &m); err != nil {
			return err
		}
		ms = []api.Machine{m}
	} else if err := c.Do(ctx, http.MethodGet, "/api/v1/machines", nil, &ms); err != nil {
		return err
	}
	return output(out, *asJSON, ms, func(tw *tabwriter.Writer) {
		machineTable(tw, ms)
	})
}

// machineTable writes a line per machine: agent, state, RPO, last point, disks.
func machineTable(tw *tabwriter.Writer, ms []api.Machine) {
	fmt.Fprintln(tw, "MACHINE\tAGENT\tSTATE\tRPO\tLAST POINT\tDISKS")
	for _, m := range ms {
		agentState := "disconnected"
		if m.Connected {
			agentState = "connected"
		}
		if m.Unprotected {
			agentState = "refused"
		}
		if m.ProcessServer != "" && m.ProcessServer != api.BuiltinProcessServer {
			agentState += " (ps " + m.ProcessServer + ")"
		}
		state := m.State
		switch m.State {
		case api.StateInitial:
			state = fmt.Sprintf("initial replication %.0f%%", m.Progress*100)
		case api.StateResync:
			state = "needs resync: " + m.Reason
		}
		// An agent gone since the server started has no RPO reported: at
		// least the time since it was last seen, as the console shows it.
		rpo := "-"
		if d, exact, ok := m.RPOAtLeast(time.Now()); ok {
			rpo = d.Round(100 * time.Millisecond).String()
			if !exact {
				rpo = ">=" + d.Round(time.Second).String()
			}
		}
		if r := m.Reverse; r != nil {
			// Reprotected: the RPO that matters is the reverse one (the
			// forward one waits for the resync after failback).
			rpo = "reverse ?"
			if r.RPOKnown {
				rpo = "reverse " + r.RPO.Round(100*time.Millisecond).String()
			}
			if r.RPOKnown && r.Threshold > 0 && r.RPO > r.Threshold {
				rpo += " (over " + r.Threshold.String() + ")"
			}
		}
		last := "-"
		if m.LastPoint != nil {
			last = m.LastPoint.ID + " (" + m.LastPoint.Time.Format(time.RFC3339) + ")"
		}
		var disks []string
		for _, d := range m.Disks {
			disks = append(disks, fmt.Sprintf("%s:%s", d.Name, d.State))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, agentState, state, rpo, last, strings.Join(disks, ","))
	}
}
