package cli

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/asrdr/asr/server/api"
)

// runFailover starts a test failover, a failover or a drill of a machine,
// group or plan, or acts on a live one (cleanup, commit, change of point),
// or lists them.
func runFailover(ctx context.Context, e *env, args []string) error {
	fs, o := e.opCommand("asr failover", false)
	plan := fs.String("plan", "", "recovery plan (instead of --machine or --group)")
	test := fs.Bool("test", false, "test failover: replication goes on, the recovered machines are thrown away at --cleanup")
	planned := fs.Bool("planned", false, "planned failover: shut the source down and take a last point first (no write lost)")
	point := fs.String("point", "", "recovery point: an id, latest (default) or latest-app; with --group, a group point id")
	at := fs.String("time", "", "recover the machine as of this time (RFC 3339), inside the any-point window")
	to := fs.String("to", "", "where the recovered machines run: nbd, qemu (a verified drill), vsphere or azure")
	cleanup := fs.Bool("cleanup", false, "end a test failover: its exports, overlays and VMs go")
	commit := fs.Bool("commit", false, "end a failover: protection of the source stops until reprotect, the other points are released")
	changePoint := fs.String("change-point", "", "recover a failed-over machine again at another point (an id, latest or latest-app), before --commit")
	list := fs.Bool("list", false, "list the live failovers")
	all := fs.Bool("all", false, "with --list: the ended ones too")
	asJSON := fs.Bool("json", false, "print JSON (with --list)")
	noWait := fs.Bool("no-wait", false, "print the job's id and return")
	bootCheck := fs.String("boot-check", "", "--to qemu: a regular expression the serial console must show")
	bootPort := fs.Int("boot-port", 0, "--to qemu: a guest TCP port that must answer")
	bootTimeout := fs.Duration("boot-timeout", 5*time.Minute, "--to qemu: how long the guest has to pass its boot check")
	vcenter := fs.String("vcenter", "", "--to vsphere: the registered vCenter")
	datastore := fs.String("datastore", "", "--to vsphere: the datastore for the recovered disks")
	host := fs.String("host", "", "--to vsphere: the ESXi host (default: the first cluster's pool)")
	pool := fs.String("pool", "", "--to vsphere: the resource pool")
	folder := fs.String("folder", "", "--to vsphere: the VM folder of the new VM, a name or inventory path (default: the data center's VM folder)")
	network := fs.String("network", "", "--to vsphere: the network for the NICs (a test failover uses an isolated one)")
	powerOn := fs.Bool("power-on", false, "--to vsphere --test: power the test VM on")
	sub := fs.String("subscription", "", "--to azure: subscription id")
	rg := fs.String("resource-group", "", "--to azure: resource group")
	loc := fs.String("location", "", "--to azure: region, e.g. westeurope")
	vnet := fs.String("vnet", "", "--to azure: virtual network")
	subnet := fs.String("subnet", "", "--to azure: subnet")
	size := fs.String("size", "", "--to azure: VM size (default: from the source's CPUs and memory)")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if *list {
		fos, err := c.Failovers(ctx, *all)
		if err != nil {
			return err
		}
		return output(e.out, *asJSON, fos, func(tw *tabwriter.Writer) {
			fmt.Fprintln(tw, "MACHINE\tKIND\tTO\tSTATE\tPOINT\tPLAN\tCREATED\tFAILBACK\tWHERE")
			for _, f := range fos {
				where := f.VM
				for _, x := range f.Exports {
					where += " " + x.Disk + "=" + x.URI
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", f.Machine, f.Kind, f.To, f.State, f.Point, f.Plan, f.Created.Local().Format(time.DateTime), failbackText(f.Failback), strings.TrimSpace(where))
			}
		})
	}
	action := api.FailoverAction{Machine: o.machine, Group: o.group, Plan: *plan}
	var t *time.Time
	if *at != "" {
		tt, err := time.Parse(time.RFC3339Nano, *at)
		if err != nil {
			return fmt.Errorf("--time %q: want RFC 3339, e.g. 2026-11-26T09:30:00Z", *at)
		}
		t = &tt
	}
	n := 0
	for _, b := range []bool{*cleanup, *commit, *changePoint != ""} {
		if b {
			n++
		}
	}
	if n > 1 {
		return errors.New("give one of --cleanup, --commit and --change-point")
	}
	var j api.Job
	switch {
	case *cleanup:
		j, err = c.FailoverAction(ctx, "cleanup", action)
	case *commit:
		j, err = c.FailoverAction(ctx, "commit", action)
	case *changePoint != "":
		action.Point, action.Time = *changePoint, t
		j, err = c.FailoverAction(ctx, "change-point", action)
	default:
		req := api.FailoverRequest{Machine: o.machine, Group: o.group, Plan: *plan, Test: *test, Planned: *planned,
			Point: *point, Time: t, To: *to, BootCheck: *bootCheck, BootPort: *bootPort}
		if *to == api.ToQEMU {
			req.BootTimeout = bootTimeout.Seconds()
		}
		if *vcenter != "" || *datastore != "" || *to == api.ToVSphere {
			req.VSphere = &api.VSphereTarget{VCenter: *vcenter, Datastore: *datastore, Host: *host, Pool: *pool, Folder: *folder, Network: *network, PowerOn: *powerOn}
		}
		if *sub != "" || *rg != "" || *to == api.ToAzure {
			req.Azure = &api.AzureTarget{Subscription: *sub, ResourceGroup: *rg, Location: *loc, VNet: *vnet, Subnet: *subnet, Size: *size}
		}
		j, err = c.StartFailover(ctx, req)
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

// failbackText is a failover's failback in the list: its state and its
// bytes sent, pending, compared (and the forward resync's), "-" if none.
func failbackText(fb *api.FailbackStatus) string {
	if fb == nil {
		return "-"
	}
	s := fmt.Sprintf("%s sent=%d pending=%d compared=%d", fb.State, fb.Sent, fb.Pending, fb.Compared)
	if fb.Forward != "" {
		s += fmt.Sprintf(" forward=%s resynced=%d resent=%d", fb.Forward, fb.Resynced, fb.Resent)
	}
	return s
}

// runPlan manages recovery plans.
const planUsage = `asr plan create NAME --group 1=M1,M2 [--group 2=M3 ...] [--pre N=[ON:]script:PATH|[ON:]manual:TEXT] [--post N=...]
                [--drill-every 168h --boot-check REGEX|--boot-port N [--boot-timeout 5m]]
asr plan list [--json]
asr plan show NAME [--json]
asr plan delete NAME

A recovery plan fails over up to 7 groups of machines in order: the machines
of a group in parallel, group N when group N-1 has started. A script action
runs on the server with the JSON context on its standard input; a manual
action pauses the plan until confirmed (console, asr job confirm ID).
An action runs on failover and on failback (asr failback --plan NAME runs
it around the group's power-on, direction recovery-to-primary), or only on
ON: failover or failback (--pre 1=failback:manual:TEXT).
Use it with: asr failover --plan NAME [--test] --to nbd|qemu|vsphere|azure`

func runPlan(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || isHelp(args[0]) {
		fmt.Fprintln(e.out, planUsage)
		if len(args) == 0 {
			return errors.New("plan: want create, list, show or delete")
		}
		return nil
	}
	sub, args := args[0], args[1:]
	var name string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		name, args = args[0], args[1:]
	}
	fs := e.flags("asr plan " + sub)
	o := &opFlags{}
	o.registerConn(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	var groups, pres, posts multiFlag
	fs.Var(&groups, "group", "N=MACHINE,MACHINE...: the machines of group N (1 to 7), repeated per group")
	fs.Var(&pres, "pre", "N=[failover:|failback:]script:PATH or N=[...]manual:TEXT: an action before group N fails over or fails back (repeatable)")
	fs.Var(&posts, "post", "N=[failover:|failback:]script:PATH or N=[...]manual:TEXT: an action after group N has started (repeatable)")
	drillEvery := fs.Duration("drill-every", 0, "run a verified drill of the plan this often (e.g. 168h), reported as an event")
	bootCheck := fs.String("boot-check", "", "the drill's boot check (a regular expression on the serial console)")
	bootPort := fs.Int("boot-port", 0, "the drill's boot check (a guest TCP port that must answer)")
	bootTimeout := fs.Duration("boot-timeout", 5*time.Minute, "how long the drill's guests have to pass the check")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	needName := func() error {
		if name == "" {
			return fmt.Errorf("plan %s: name the plan", sub)
		}
		return nil
	}
	switch sub {
	case "create":
		if err := needName(); err != nil {
			return err
		}
		p := api.Plan{Name: name}
		byNum := map[int]*api.PlanGroup{}
		maxN := 0
		group := func(spec string) (int, string, error) {
			k, v, ok := strings.Cut(spec, "=")
			n, err := strconv.Atoi(k)
			if !ok || err != nil || n < 1 || n > api.MaxPlanGroups {
				return 0, "", fmt.Errorf("%q: want N=... with N from 1 to %d", spec, api.MaxPlanGroups)
			}
			if byNum[n] == nil {
				byNum[n] = &api.PlanGroup{}
			}
			maxN = max(maxN, n)
			return n, v, nil
		}
		for _, g := range groups {
			n, v, err := group(g)
			if err != nil {
				return fmt.Errorf("--group %w", err)
			}
			for _, m := range strings.Split(v, ",") {
				if m = strings.TrimSpace(m); m != "" {
					byNum[n].Machines = append(byNum[n].Machines, m)
				}
			}
		}
		action := func(spec string) (int, api.PlanAction, error) {
			n, v, err := group(spec)
			if err != nil {
				return 0, api.PlanAction{}, err
			}
			kind, arg, _ := strings.Cut(v, ":")
			on := ""
			if kind == api.ActionOnFailover || kind == api.ActionOnFailback {
				on = kind
				kind, arg, _ = strings.Cut(arg, ":")
			}
			switch kind {
			case "script":
				return n, api.PlanAction{Kind: "script", Path: arg, On: on}, nil
			case "manual":
				return n, api.PlanAction{Kind: "manual", Text: arg, On: on}, nil
			}
			return 0, api.PlanAction{}, fmt.Errorf("%q: want N=[failover:|failback:]script:PATH or N=[failover:|failback:]manual:TEXT", spec)
		}
		for _, a := range pres {
			n, act, err := action(a)
			if err != nil {
				return fmt.Errorf("--pre %w", err)
			}
			byNum[n].Pre = append(byNum[n].Pre, act)
		}
		for _, a := range posts {
			n, act, err := action(a)
			if err != nil {
				return fmt.Errorf("--post %w", err)
			}
			byNum[n].Post = append(byNum[n].Post, act)
		}
		for n := 1; n <= maxN; n++ {
			if byNum[n] == nil {
				return fmt.Errorf("group %d is missing: groups are numbered 1, 2, ... in order", n)
			}
			p.Groups = append(p.Groups, *byNum[n])
		}
		if *drillEvery > 0 {
			p.Drill = &api.PlanDrill{EverySeconds: drillEvery.Seconds(), BootCheck: *bootCheck, BootPort: *bootPort, TimeoutSeconds: bootTimeout.Seconds()}
		}
		p, err := c.CreatePlan(ctx, p)
		if err != nil {
			return err
		}
		return printPlan(e, *asJSON, p)
	case "list":
		ps, err := c.Plans(ctx)
		if err != nil {
			return err
		}
		return output(e.out, *asJSON, ps, func(tw *tabwriter.Writer) {
			fmt.Fprintln(tw, "PLAN\tGROUPS\tMACHINES\tDRILL")
			for _, p := range ps {
				n := 0
				for _, g := range p.Groups {
					n += len(g.Machines)
				}
				drill := "-"
				if p.Drill != nil {
					drill = "every " + (time.Duration(p.Drill.EverySeconds) * time.Second).String()
				}
				fmt.Fprintf(tw, "%s\t%d\t%d\t%s\n", p.Name, len(p.Groups), n, drill)
			}
		})
	case "show":
		if err := needName(); err != nil {
			return err
		}
		p, err := c.Plan(ctx, name)
		if err != nil {
			return err
		}
		return printPlan(e, *asJSON, p)
	case "delete":
		if err := needName(); err != nil {
			return err
		}
		if err := c.DeletePlan(ctx, name); err != nil {
			return err
		}
		fmt.Fprintf(e.out, "plan %s deleted\n", name)
		return nil
	}
	return fmt.Errorf("plan %s: want create, list, show or delete", sub)
}

func printPlan(e *env, asJSON bool, p api.Plan) error {
	return output(e.out, asJSON, p, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "plan %s\n", p.Name)
		fmt.Fprintln(tw, "GROUP\tMACHINES\tPRE\tPOST")
		for i, g := range p.Groups {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", i+1, strings.Join(g.Machines, ","), actions(g.Pre), actions(g.Post))
		}
		if p.Drill != nil {
			fmt.Fprintf(tw, "drill every %s (last %s)\n", time.Duration(p.Drill.EverySeconds*float64(time.Second)), p.LastDrill.Local().Format(time.DateTime))
		}
	})
}

func actions(as []api.PlanAction) string {
	if len(as) == 0 {
		return "-"
	}
	var out []string
	for _, a := range as {
		on := ""
		if a.On != "" {
			on = a.On + ":"
		}
		if a.Kind == "script" {
			out = append(out, on+"script:"+a.Path)
		} else {
			out = append(out, on+"manual:"+a.Text)
		}
	}
	return strings.Join(out, "; ")
}

// runJob shows, confirms or cancels one job.
func runJob(ctx context.Context, e *env, args []string) error {
	// Help anywhere (asr job -h, asr job show --help): the verb's flags are
	// those of every operator command.
	if slices.ContainsFunc(args, isHelp) {
		fmt.Fprintln(e.out, "asr job show|confirm|cancel ID [--json]: show a job, confirm the manual action it waits on, or cancel it")
		return nil
	}
	if len(args) < 2 || strings.HasPrefix(args[1], "-") {
		return errors.New("job: want show ID, confirm ID or cancel ID")
	}
	sub, id, rest := args[0], args[1], args[2:]
	fs, o := e.opCommand("asr job "+sub, false)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, rest); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	switch sub {
	case "show":
		return runJobs(ctx, e, append([]string{id}, rest...))
	case "confirm":
		j, err := c.ConfirmJob(ctx, id)
		if err != nil {
			return err
		}
		return output(e.out, *asJSON, j, func(tw *tabwriter.Writer) {
			fmt.Fprintf(tw, "job %s: the manual action is confirmed, the job goes on\n", j.ID)
		})
	case "cancel":
		j, err := c.CancelJob(ctx, id)
		if err != nil {
			return err
		}
		return output(e.out, *asJSON, j, func(tw *tabwriter.Writer) {
			fmt.Fprintf(tw, "job %s: cancelled\n", j.ID)
		})
	}
	return fmt.Errorf("job %s: want show, confirm or cancel", sub)
}

// multiFlag is a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, " ") }
func (m *multiFlag) Set(s string) error { *m = append(*m, s); return nil }
