package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"

	"github.com/asrdr/asr/server/api"
)

// runReprotect reprotects a machine, a recovery plan's or a replication
// group's machines: after a committed failover to the server's NBD
// exports, to vSphere or to Azure, their changes go back to the original
// disks (after an unplanned one or one to a VM, once the original agent
// is frozen and its disks compared); after a failback, protection resumes
// forward with a checksum resync.
func runReprotect(ctx context.Context, e *env, args []string) error {
	return machineJob(ctx, e, args, "asr reprotect", nil,
		func(c *api.Client, m string) (api.Job, error) { return c.Reprotect(ctx, m) },
		func(c *api.Client, p string) (api.Job, error) { return c.ReprotectPlan(ctx, p) },
		func(c *api.Client, g string) (api.Job, error) { return c.ReprotectGroup(ctx, g) })
}

// runFailback fails a reprotected machine, or a reprotected plan's
// machines, back to the original disks; a machine with --alternate to a
// new VM made in a vCenter.
func runFailback(ctx context.Context, e *env, args []string) error {
	var req api.FailbackRequest
	vt := &api.VSphereTarget{}
	register := func(fs *flag.FlagSet) func() error {
		fs.BoolVar(&req.Alternate, "alternate", false, "fail back to a new VM made in a vCenter (a full copy of the failed-over disks), not to the original disks")
		fs.StringVar(&vt.VCenter, "vcenter", "", "--alternate: the registered vCenter that makes the new VM")
		fs.StringVar(&vt.Datastore, "datastore", "", "--alternate: the datastore of the new VM's disks")
		fs.StringVar(&req.VMName, "vm-name", "", "--alternate: the new VM's name (default: the linked VM's or the machine's name, then -failback)")
		fs.StringVar(&vt.Host, "host", "", "--alternate: the ESXi host (default: the first cluster's pool)")
		fs.StringVar(&vt.Pool, "pool", "", "--alternate: the resource pool")
		fs.StringVar(&vt.Folder, "folder", "", "--alternate: the VM folder of the new VM, a name or inventory path (default: the data center's VM folder)")
		fs.StringVar(&vt.Network, "network", "", "--alternate: the network of the new VM's NICs (default: the linked VM's)")
		return func() error {
			switch {
			case !req.Alternate && (*vt != api.VSphereTarget{} || req.VMName != ""):
				return errors.New("asr failback: --vcenter, --datastore, --vm-name, --host, --pool, --folder and --network go with --alternate")
			case req.Alternate && (fs.Lookup("plan").Value.String() != "" || fs.Lookup("group").Value.String() != ""):
				return errors.New("asr failback: --alternate is for one machine (--machine M), not a plan or a group")
			case req.Alternate && (vt.VCenter == "" || vt.Datastore == ""):
				return errors.New("asr failback --alternate: name the vCenter and the datastore of the new VM (--vcenter N --datastore DS)")
			}
			return nil
		}
	}
	return machineJob(ctx, e, args, "asr failback", register,
		func(c *api.Client, m string) (api.Job, error) {
			if !req.Alternate {
				return c.Failback(ctx, m)
			}
			req.VSphere = vt
			return c.FailbackTo(ctx, m, req)
		},
		func(c *api.Client, p string) (api.Job, error) { return c.FailbackPlan(ctx, p) },
		func(c *api.Client, g string) (api.Job, error) { return c.FailbackGroup(ctx, g) })
}

// machineJob starts a job of a machine (--machine), a recovery plan
// (--plan) or a replication group (--group) and follows it; register, if not nil, adds the command's own
// flags and returns the check of their values, run before the server is
// contacted.
func machineJob(ctx context.Context, e *env, args []string, name string, register func(*flag.FlagSet) func() error, machine, plan, group func(*api.Client, string) (api.Job, error)) error {
	fs := e.flags(name)
	o := &opFlags{}
	o.registerConn(fs)
	fs.StringVar(&o.machine, "machine", "", "machine name or id")
	planName := fs.String("plan", "", "recovery plan name: every machine its failover failed over")
	groupName := fs.String("group", "", "replication group name: every member failed over by asr failover --group (or --machine), together")
	noWait := fs.Bool("no-wait", false, "print the job's id and return")
	check := func() error { return nil }
	if register != nil {
		check = register(fs)
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if n := btoi(o.machine != "") + btoi(*planName != "") + btoi(*groupName != ""); n != 1 {
		return errors.New(name + ": name the machine (--machine M), the recovery plan (--plan P) or the replication group (--group G), one of them")
	}
	if err := check(); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	var j api.Job
	switch {
	case *planName != "":
		j, err = plan(c, *planName)
	case *groupName != "":
		j, err = group(c, *groupName)
	default:
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

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
