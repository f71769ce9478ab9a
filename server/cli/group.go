package cli

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"

	"github.com/asrdr/asr/server/api"
)

const groupUsage = "usage: asr group set --machine M --group G | asr group clear --machine M"

// runGroup puts machines in replication groups.
func runGroup(ctx context.Context, e *env, args []string) error {
	out := e.out
	if len(args) > 0 && isHelp(args[0]) {
		fmt.Fprintln(e.out, groupUsage)
		return nil
	}
	if len(args) == 0 || (args[0] != "set" && args[0] != "clear") {
		return errors.New(groupUsage)
	}
	fs, o := e.opCommand("asr group "+args[0], false)
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
