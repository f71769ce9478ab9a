package cli

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"text/tabwriter"

	"github.com/asrdr/asr/server/api"
)

// runEvents lists recent events (RPO threshold crossed, freezes that
// failed, ...).
func runEvents(ctx context.Context, e *env, args []string) error {
	out := e.out
	fs, o := e.opCommand("asr events", false)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	path := "/api/v1/events"
	if o.machine != "" {
		path += "?machine=" + url.QueryEscape(o.machine)
	}
	var es []api.EventJSON
	if err := c.Do(ctx, http.MethodGet, path, nil, &es); err != nil {
		return err
	}
	return output(out, *asJSON, es, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "TIME\tMACHINE\tSEVERITY\tKIND\tMESSAGE")
		for _, ev := range es {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", ev.Time, ev.Machine, ev.Severity, ev.Kind, ev.Message)
		}
	})
}
