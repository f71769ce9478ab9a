package cli

import (
	"context"
	"errors"
	"fmt"

	"github.com/asrdr/asr/server/api"
)

// runReprotect reprotects a machine or a recovery plan's machines: after
// a committed planned failover to the server's NBD exports, their changes
// go back to the original disks; after a failback, protection resumes
// forward with a checksum resync.
func runReprotect(ctx context.Context, e *env, args []string) error {
	return machineJob(ctx, e, args, "asr reprotect",
		func(c *api.Client, m string) (api.Job, error) { return c.Reprotect(ctx, m) },
		func(c *api.Client, p string) (api.Job, error) { return c.ReprotectPlan(ctx, p) })
}

// runFailback fails a reprotected machine, or a reprotected plan's
// machines, back to the original disks.
func runFailback(ctx context.Context, e *env, args []string) error {
	return machineJob(ctx, e, args, "asr failback",
		func(c *api.Client, m string) (api.Job, error) { return c.Failback(ctx, m) },
		func(c *api.Client, p string) (api.Job, error) { return c.FailbackPlan(ctx, p) })
}

// machineJob starts a job of a machine (--machine) or of a recovery plan
// (--plan) and follows it.
func machineJob(ctx context.Context, e *env, args []string, name string, machine, plan func(*api.Client, string) (api.Job, error)) error {
	fs := e.flags(name)
	o := &opFlags{}
	o.registerConn(fs)
	fs.StringVar(&o.machine, "machine", "", "machine name or id")
	planName := fs.String("plan", "", "recovery plan name: every machine its failover failed over")
	noWait := fs.Bool("no-wait", false, "print the job's id and return")
	if err := parse(fs, args); err != nil {
		return err
	}
	if (o.machine == "") == (*planName == "") {
		return errors.New(name + ": name the machine (--machine M) or the recovery plan (--plan P), one of them")
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	var j api.Job
	if *planName != "" {
		j, err = plan(c, *planName)
	} else {
		j, err = machine(c, o.machine)
	}
	if err != nil {
		return err
	}
	if *noWait {
		fmt.Fprintln(e.out, j.ID)
		return nil
	}
	return followJob(ctx, e, c, j)
}
