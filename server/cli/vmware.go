package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/asrdr/asr/server/api"
)

const vcenterUsage = `usage:
  asr vcenter add --name NAME --url https://HOST/sdk --user U --password-file F [--thumbprint SHA256]
  asr vcenter list [--json]
  asr vcenter remove NAME
Without --thumbprint, add prints the certificate's SHA-256 thumbprint and
registers nothing: compare it with the vCenter's, then add again with it.`

// runVCenter registers, lists and removes vCenters.
func runVCenter(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return errors.New(vcenterUsage)
	}
	if isHelp(args[0]) {
		fmt.Fprintln(e.out, vcenterUsage)
		return nil
	}
	verb, rest := args[0], args[1:]
	fs, o := e.opCommand("asr vcenter "+verb, false)
	var req api.AddVCenterRequest
	var passFile string
	asJSON := fs.Bool("json", false, "print JSON (list)")
	fs.StringVar(&req.Name, "name", "", "the vCenter's name in asr (add)")
	fs.StringVar(&req.URL, "url", "", "SDK URL, https://HOST/sdk (add)")
	fs.StringVar(&req.User, "user", "", "vCenter user, e.g. administrator@vsphere.local (add)")
	fs.StringVar(&passFile, "password-file", "", "file holding the user's password (add)")
	fs.StringVar(&req.Thumbprint, "thumbprint", "", "SHA-256 thumbprint of the vCenter's certificate, to pin (add)")
	var name string
	if verb == "remove" && len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		name, rest = rest[0], rest[1:]
	}
	if err := parse(fs, rest); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	switch verb {
	case "add":
		if req.Name == "" || req.URL == "" || req.User == "" || passFile == "" {
			return fmt.Errorf("asr vcenter add: --name, --url, --user and --password-file are required\n%s", vcenterUsage)
		}
		pw, err := api.ReadSecretFile(passFile)
		if err != nil {
			return err
		}
		req.Password = string(pw)
		v, err := c.AddVCenter(ctx, req)
		var ae *api.Error
		if errors.As(err, &ae) && ae.Body.Thumbprint != "" && req.Thumbprint == "" {
			return fmt.Errorf("%s\n  to pin it: asr vcenter add --name %s --url %s --user %s --password-file %s --thumbprint %s",
				ae.Body.Error, req.Name, req.URL, req.User, passFile, ae.Body.Thumbprint)
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(e.out, "vCenter %s registered (%s), certificate pinned: %s\n", v.Name, v.URL, v.Thumbprint)
		return nil
	case "list":
		vs, err := c.VCenters(ctx)
		if err != nil {
			return err
		}
		return output(e.out, *asJSON, vs, func(tw *tabwriter.Writer) {
			fmt.Fprintln(tw, "NAME\tURL\tUSER\tSTATE\tVMS\tLAST UPDATE\tTHUMBPRINT")
			for _, v := range vs {
				state := "connected"
				if !v.Connected {
					state = "disconnected"
					if v.LastError != "" {
						state += ": " + v.LastError
					}
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", v.Name, v.URL, v.User, state, v.VMs, ago(v.LastUpdate), v.Thumbprint)
			}
		})
	case "remove":
		if name == "" {
			return fmt.Errorf("asr vcenter remove: give the vCenter's name\n%s", vcenterUsage)
		}
		if err := c.RemoveVCenter(ctx, name); err != nil {
			return err
		}
		fmt.Fprintf(e.out, "vCenter %s removed\n", name)
		return nil
	}
	return fmt.Errorf("asr vcenter: unknown verb %q\n%s", verb, vcenterUsage)
}

// ago formats a time as an age ("-" for never).
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}

// runVMs lists the VM inventory.
func runVMs(ctx context.Context, e *env, args []string) error {
	fs, o := e.opCommand("asr vms", false)
	vcenter := fs.String("vcenter", "", "only this vCenter's VMs")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	vms, err := c.VMs(ctx, *vcenter)
	if err != nil {
		return err
	}
	return output(e.out, *asJSON, vms, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "NAME\tVCENTER\tPOWER\tGUEST OS\tIP\tCPU\tMEMORY\tDISKS\tHOST\tMACHINE\tBIOS UUID")
		for _, vm := range vms {
			var size int64
			for _, d := range vm.Disks {
				size += d.CapacityBytes
			}
			machine := vm.Machine
			switch {
			case vm.Duplicate:
				machine = "(duplicate BIOS UUID)"
			case machine == "":
				machine = "-"
			}
			power := vm.PowerState
			if vm.Stale {
				power += " (stale)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d MiB\t%d (%s)\t%s\t%s\t%s\n", vm.Name, vm.VCenter, power, vm.GuestOS,
				strings.Join(vm.IPs, ","), vm.CPUs, vm.MemoryMiB, len(vm.Disks), gib(size), vm.Host, machine, vm.BIOSUUID)
		}
	})
}

func gib(b int64) string { return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30)) }

const protectUsage = `usage:
  asr protect --vm NAME --ssh USER@HOST[:PORT] --ssh-key FILE --disk NAME=DEVICE... [--known-hosts FILE]
              [--accept-host-key SHA256:...] [--policy P] [--install-dir DIR] [--nbd ADDR] [--mode nbd|scan]
              [--skip-uuid-check] [--vcenter NAME] [--agent-url URL]
Pushes the agent to the VM's guest over SSH, starts it, and waits until
initial replication has begun. A guest whose host key is not known yet is
refused with its fingerprint: compare it with the guest's own and run again
with --accept-host-key.`

// diskMaps is the repeatable --disk NAME=DEVICE flag.
type diskMaps []api.ProtectDisk

func (d *diskMaps) String() string { return "" }
func (d *diskMaps) Set(v string) error {
	name, dev, ok := strings.Cut(v, "=")
	if !ok || name == "" || dev == "" {
		return fmt.Errorf("want NAME=DEVICE, got %q", v)
	}
	*d = append(*d, api.ProtectDisk{Name: name, Device: dev})
	return nil
}

// sshFlags are the SSH flags protect and unprotect share.
type sshFlags struct {
	ssh, keyFile, knownHosts, accept, installDir, vcenter, vm string
}

func (s *sshFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&s.vm, "vm", "", "VM name (or id, vm-42) in the inventory")
	fs.StringVar(&s.vcenter, "vcenter", "", "the VM's vCenter (when the name is not unique)")
	fs.StringVar(&s.ssh, "ssh", "", "the guest's SSH login, USER@HOST[:PORT] (root, or a user with passwordless sudo)")
	fs.StringVar(&s.keyFile, "ssh-key", "", "private key file for the SSH login (sent to the server for this job only)")
	fs.StringVar(&s.knownHosts, "known-hosts", "", "known_hosts file the guest's host key must be in")
	fs.StringVar(&s.accept, "accept-host-key", "", "the guest's host key fingerprint (SHA256:...) you checked, to trust it and record it")
	fs.StringVar(&s.installDir, "install-dir", "", "where the agent is installed on the guest (default /opt/asr)")
}

// read loads the key and known_hosts files.
func (s *sshFlags) read() (key, known string, err error) {
	if s.vm == "" || s.ssh == "" || s.keyFile == "" {
		return "", "", errors.New("--vm, --ssh and --ssh-key are required")
	}
	k, err := os.ReadFile(s.keyFile)
	if err != nil {
		return "", "", fmt.Errorf("--ssh-key: %w", err)
	}
	if s.knownHosts != "" {
		b, err := os.ReadFile(s.knownHosts)
		if err != nil {
			return "", "", fmt.Errorf("--known-hosts: %w", err)
		}
		known = string(b)
	}
	return string(k), known, nil
}

// hostKeyHint turns an unknown host key answer into what to run.
func hostKeyHint(err error) error {
	var ae *api.Error
	if errors.As(err, &ae) && ae.Body.HostKey != "" {
		return fmt.Errorf("%s\n  if it is the guest's key, run again with --accept-host-key %s", ae.Body.Error, ae.Body.HostKey)
	}
	return err
}

// runProtect enables replication of a VM from the inventory (push install).
func runProtect(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 && isHelp(args[0]) {
		fmt.Fprintln(e.out, protectUsage)
		return nil
	}
	fs, o := e.opCommand("asr protect", false)
	var sf sshFlags
	sf.register(fs)
	var disks diskMaps
	fs.Var(&disks, "disk", "disk to protect, NAME=DEVICE (repeat for each disk), e.g. os=/dev/sda")
	var req api.ProtectRequest
	fs.StringVar(&req.Policy, "policy", "", "replication policy (default: the default policy)")
	fs.StringVar(&req.NBD, "nbd", "", "the agent's NBD listen address on the guest (default unix:INSTALLDIR/nbd.sock)")
	fs.StringVar(&req.Mode, "mode", "nbd", "nbd: the guest's workload uses the agent's NBD exports (seconds of RPO); scan: the agent copies changes by periodic scans of disks the workload uses directly")
	fs.BoolVar(&req.SkipUUIDCheck, "skip-uuid-check", false, "protect even though the guest's BIOS UUID is unreadable or not the VM's (the agent then reports the VM's)")
	fs.StringVar(&req.ServerURL, "agent-url", "", "control URL the guest's agent registers with (default: the server's advertised URL)")
	if err := parse(fs, args); err != nil {
		return err
	}
	key, known, err := sf.read()
	if err != nil {
		return fmt.Errorf("asr protect: %w\n%s", err, protectUsage)
	}
	req.VCenter, req.VM, req.SSH, req.Key, req.KnownHosts, req.AcceptHostKey, req.InstallDir, req.Disks =
		sf.vcenter, sf.vm, sf.ssh, key, known, sf.accept, sf.installDir, disks
	c, err := o.client()
	if err != nil {
		return err
	}
	j, err := c.Protect(ctx, req)
	if err != nil {
		return hostKeyHint(err)
	}
	return followJob(ctx, e, c, j)
}

// followJob prints a job's steps as they change until it ends.
func followJob(ctx context.Context, e *env, c *api.Client, j api.Job) error {
	fmt.Fprintf(e.out, "job %s: %s %s\n", j.ID, j.Kind, j.Subject)
	printed := map[string]string{}
	bars := map[string]*progress{} // the running steps that count bytes (an upload, a copy)
	defer func() {
		for _, b := range bars {
			b.clear()
		}
	}()
	j, err := c.WaitJob(ctx, j.ID, func(j api.Job) {
		for _, st := range j.Steps {
			line := st.State
			if st.Detail != "" {
				line += ": " + st.Detail
			}
			if st.Total > 0 && st.State == "running" {
				// Byte progress: a bar on stderr; the step's end says the rest.
				b := bars[st.Name]
				if b == nil {
					b = newProgress(e.errOut, "  "+st.Name, st.Total)
					bars[st.Name] = b
				}
				b.update(st.Done)
				continue
			}
			if b := bars[st.Name]; b != nil {
				b.clear()
				delete(bars, st.Name)
			}
			if j.Waiting != "" && printed["\x00waiting"] != j.Waiting {
				printed["\x00waiting"] = j.Waiting
				fmt.Fprintf(e.out, "  waiting for a manual action: %s\n  confirm it in the console or with: asr job confirm %s\n", j.Waiting, j.ID)
			}
			if printed[st.Name] != line {
				printed[st.Name] = line
				fmt.Fprintf(e.out, "  %-20s %s\n", st.Name, line)
			}
		}
	})
	if err != nil {
		return err
	}
	if j.State != api.JobSucceeded {
		for _, l := range j.Output {
			fmt.Fprintln(e.out, l)
		}
		return hostKeyHint(fmt.Errorf("job %s %s: %s", j.ID, j.State, j.Error))
	}
	fmt.Fprintf(e.out, "job %s succeeded", j.ID)
	if j.RTO > 0 {
		fmt.Fprintf(e.out, " (RTO %.1fs)", j.RTO)
	}
	fmt.Fprintln(e.out)
	// The result lines come last, so a script takes them with tail.
	for _, l := range j.Output {
		fmt.Fprintln(e.out, l)
	}
	return nil
}

// runJobs lists jobs, or shows one with its steps.
func runJobs(ctx context.Context, e *env, args []string) error {
	fs, o := e.opCommand("asr jobs", false)
	asJSON := fs.Bool("json", false, "print JSON")
	var id string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		id, args = args[0], args[1:]
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if id != "" {
		j, err := c.Job(ctx, id)
		if err != nil {
			return err
		}
		return output(e.out, *asJSON, j, func(tw *tabwriter.Writer) {
			fmt.Fprintf(tw, "job %s: %s %s, %s\n", j.ID, j.Kind, j.Subject, j.State)
			if j.Error != "" {
				fmt.Fprintf(tw, "error: %s\n", j.Error)
			}
			fmt.Fprintln(tw, "STEP\tSTATE\tDETAIL")
			for _, st := range j.Steps {
				fmt.Fprintf(tw, "%s\t%s\t%s\n", st.Name, st.State, st.Detail)
			}
		})
	}
	js, err := c.Jobs(ctx)
	if err != nil {
		return err
	}
	return output(e.out, *asJSON, js, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "ID\tKIND\tSUBJECT\tSTATE\tSTARTED\tERROR")
		for _, j := range js {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", j.ID, j.Kind, j.Subject, j.State, j.StartedAt.Format(time.DateTime), j.Error)
		}
	})
}
