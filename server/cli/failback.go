package cli

import (
	"context"
	"errors"
	"fmt"

	"github.com/asrdr/asr/server/api"
)

// runReprotect reprotects a machine: after a committed failover to the
// server's NBD exports, its changes go back to the original disks (after
// an unplanned one, once the original agent is frozen and its disks
// compared); after a failback, protection resumes forward with a
// checksum resync.
func runReprotect(ctx context.Context, e *env, args []string) error {
	return machineJob(ctx, e, args, "asr reprotect", func(c *api.Client, m string) (api.Job, error) { return c.Reprotect(ctx, m) })
}

// runFailback fails a reprotected machine back to its original disks.
func runFailback(ctx context.Context, e *env, args []string) error {
	return machineJob(ctx, e, args, "asr failback", func(c *api.Client, m string) (api.Job, error) { return c.Failback(ctx, m) })
}

func machineJob(ctx context.Context, e *env, args []string, name string, start func(*api.Client, string) (api.Job, error)) error {
	fs := e.flags(name)
	o := &opFlags{}
	o.registerConn(fs)
	fs.StringVar(&o.machine, "machine", "", "machine name or id")
	noWait := fs.Bool("no-wait", false, "print the job's id and return")
	if err := parse(fs, args); err != nil {
		return err
	}
	if o.machine == "" {
		return errors.New(name + ": name the machine (--machine M)")
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	j, err := start(c, o.machine)
	if err != nil {
		return err
	}
	if *noWait {
		fmt.Fprintln(e.out, j.ID)
		return nil
	}
	return followJob(ctx, e, c, j)
}
