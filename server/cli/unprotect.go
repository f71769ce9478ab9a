package cli

import (
	"context"
	"errors"
	"fmt"

	"github.com/asrdr/asr/server/api"
)

const unprotectUsage = `usage:
  asr unprotect --vm NAME --ssh USER@HOST[:PORT] --ssh-key FILE [--install-dir DIR] [--delete-replica]
  asr unprotect --machine M [--delete-replica]
With --vm, the agent is stopped and removed from the guest over SSH, then
the machine's protection ends; with --machine, only the protection ends
(its agent is refused from then on; remove it yourself). The replica and its
recovery points are kept for recovery unless --delete-replica.`

// unprotectJob is what `asr unprotect` does, step by step: each way of
// naming what to unprotect resolves to the machine the server knows, then
// the server ends its protection. (A --vm path, which also removes the
// agent from the guest, adds its steps around the server's.)
type unprotectJob struct {
	machine       string // the server's machine (name or id)
	deleteReplica bool
}

// runUnprotect ends the protection of a machine (disables its
// replication): the server refuses its agent from then on and keeps its
// replica and recovery points for recovery, or, with --delete-replica,
// deletes them and every record of the machine.
//
// With --vm, the server first stops and removes the agent on the VM's guest
// over SSH (a job, followed step by step), then ends the protection of the
// machine linked to the VM.
func runUnprotect(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 && isHelp(args[0]) {
		fmt.Fprintln(e.out, unprotectUsage)
		return nil
	}
	fs, o := e.opCommand("asr unprotect", false)
	var sf sshFlags
	sf.register(fs)
	del := fs.Bool("delete-replica", false, "also delete the replica disks, the recovery points and every record of the machine (default: kept for recovery)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if sf.vm != "" {
		if o.machine != "" || o.group != "" {
			return fmt.Errorf("asr unprotect: give --vm or --machine, not both\n%s", unprotectUsage)
		}
		key, known, err := sf.read()
		if err != nil {
			return fmt.Errorf("asr unprotect: %w\n%s", err, unprotectUsage)
		}
		c, err := o.client()
		if err != nil {
			return err
		}
		j, err := c.UnprotectVM(ctx, api.UnprotectVMRequest{VCenter: sf.vcenter, VM: sf.vm, SSH: sf.ssh, Key: key,
			KnownHosts: known, AcceptHostKey: sf.accept, InstallDir: sf.installDir, DeleteReplica: *del})
		if err != nil {
			return hostKeyHint(err)
		}
		return followJob(ctx, e, c, j)
	}
	job, err := newUnprotectJob(o, *del)
	if err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	return job.run(ctx, e, c)
}

// newUnprotectJob checks the flags: one way of naming the machine.
func newUnprotectJob(o *opFlags, deleteReplica bool) (*unprotectJob, error) {
	if o.group != "" {
		return nil, errors.New("unprotect takes --machine, not --group: unprotect the members one by one")
	}
	if o.machine == "" {
		return nil, errors.New("--machine is required (or --vm with --ssh and --ssh-key, to remove the agent from the guest too)")
	}
	return &unprotectJob{machine: o.machine, deleteReplica: deleteReplica}, nil
}

// run asks the server to end the machine's protection and says what
// became of its replica.
func (j *unprotectJob) run(ctx context.Context, e *env, c *api.Client) error {
	if err := c.Unprotect(ctx, j.machine, j.deleteReplica); err != nil {
		return err
	}
	if j.deleteReplica {
		fmt.Fprintf(e.out, "machine %s is unprotected: its agent is refused, and its replica, recovery points and records are deleted\n", j.machine)
		return nil
	}
	fmt.Fprintf(e.out, "machine %s is unprotected: its agent is refused; its replica and recovery points are kept for recovery (asr points, asr recover); asr unprotect --machine %s --delete-replica deletes them\n", j.machine, j.machine)
	return nil
}
