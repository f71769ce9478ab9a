package cli

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"text/tabwriter"

	"github.com/asrdr/asr/server/api"
)

const policyUsage = `usage:
  asr policy list [--json]
  asr policy show NAME
  asr policy create NAME [--rpo-threshold D] [--retention D] [--app-frequency D] [--crash-interval D] [--pit-window D]
  asr policy set NAME    [--rpo-threshold D] [--retention D] [--app-frequency D] [--crash-interval D] [--pit-window D]
  asr policy assign --machine M --policy NAME
Durations are Go durations: 15m, 24h, 4h; --app-frequency 0 turns application-consistent points off.
Each policy NAME has a failback policy NAME-failback (ASR's failback defaults: RPO threshold 15m,
retention 24h, app-consistent 1h), set like any policy and never assigned: its RPO threshold alerts
on a reprotected machine's reverse RPO (asr policy show NAME-failback: what applies).`

// runPolicy manages replication policies.
func runPolicy(ctx context.Context, e *env, args []string) error {
	out := e.out
	if len(args) == 0 {
		return errors.New(policyUsage)
	}
	if isHelp(args[0]) {
		fmt.Fprintln(e.out, policyUsage)
		return nil
	}
	verb, rest := args[0], args[1:]
	fs, o := e.opCommand("asr policy "+verb, false)
	var j api.PolicyJSON
	asJSON := fs.Bool("json", false, "print JSON")
	policy := fs.String("policy", "", "policy name (assign)")
	fs.StringVar(&j.RPOThreshold, "rpo-threshold", "", "RPO above which an event is raised")
	fs.StringVar(&j.Retention, "retention", "", "how far back recovery points are kept (at most 72h, or 24h on a premium target)")
	fs.StringVar(&j.AppFrequency, "app-frequency", "", "interval of application-consistent points, 1h to 12h, or 0 for none")
	fs.StringVar(&j.CrashInterval, "crash-interval", "", "interval of crash-consistent points, 5s to 5m")
	fs.StringVar(&j.PITWindow, "pit-window", "", "any-point-in-time window, at most the retention")
	// The policy name comes first for show/create/set.
	if verb == "show" || verb == "create" || verb == "set" {
		if len(rest) > 0 && isHelp(rest[0]) {
			return parse(fs, rest)
		}
		if len(rest) == 0 || rest[0] == "" || rest[0][0] == '-' {
			return fmt.Errorf("asr policy %s: give the policy name first\n%s", verb, policyUsage)
		}
		j.Name, rest = rest[0], rest[1:]
	}
	if err := parse(fs, rest); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	var res any
	switch verb {
	case "list":
		var ps []api.PolicyJSON
		if err := c.Do(ctx, http.MethodGet, "/api/v1/policies", nil, &ps); err != nil {
			return err
		}
		return output(out, *asJSON, ps, func(tw *tabwriter.Writer) {
			fmt.Fprintln(tw, "NAME\tRPO THRESHOLD\tRETENTION\tAPP POINTS\tCRASH POINTS\tANY-POINT WINDOW\tFAILBACK OF")
			for _, p := range ps {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, p.RPOThreshold, p.Retention, p.AppFrequency, p.CrashInterval, p.PITWindow, p.FailbackOf)
			}
		})
	case "show":
		var p api.PolicyJSON
		if err := c.Do(ctx, http.MethodGet, "/api/v1/policies/"+url.PathEscape(j.Name), nil, &p); err != nil {
			return err
		}
		res = p
	case "create":
		var p api.PolicyJSON
		if err := c.Do(ctx, http.MethodPost, "/api/v1/policies", j, &p); err != nil {
			return err
		}
		res = p
	case "set":
		name := j.Name
		j.Name = ""
		var p api.PolicyJSON
		if err := c.Do(ctx, http.MethodPatch, "/api/v1/policies/"+url.PathEscape(name), j, &p); err != nil {
			return err
		}
		res = p
	case "assign":
		if o.machine == "" || *policy == "" {
			return errors.New("asr policy assign: --machine and --policy are required")
		}
		var r api.AssignJSON
		if err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(o.machine)+"/policy", api.AssignRequest{Policy: *policy}, &r); err != nil {
			return err
		}
		fmt.Fprintf(out, "machine %s now replicates under policy %s\n", r.Machine, r.Policy)
		return nil
	default:
		return fmt.Errorf("asr policy: unknown command %q\n%s", verb, policyUsage)
	}
	return output(out, true, res, nil)
}
