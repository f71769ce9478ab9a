package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
	"github.com/asrdr/asr/vmware/push"
)

// Enabling replication from the inventory: a job pushes the agent to the
// VM's guest over SSH (vmware/push: checks, copy, configuration, service),
// then waits until the agent has registered and initial replication has
// begun. The SSH key the request carries is used for the job only: it is
// neither stored nor logged.

// KnownHostsFile is the server's known_hosts (in the data directory): the
// guests' host keys the operator confirmed, looked up at each push.
const KnownHostsFile = "known_hosts"

// Bounds of a protect job's waits for the pushed agent.
var (
	registerWait = 5 * time.Minute  // until the agent has registered and connected
	initialWait  = 10 * time.Minute // then until initial replication has begun
)

// sshTarget parses USER@HOST[:PORT] (port 22 by default).
func sshTarget(s string) (user, addr string, err error) {
	user, host, ok := strings.Cut(s, "@")
	if !ok || user == "" || host == "" {
		return "", "", fmt.Errorf("--ssh %q: want USER@HOST[:PORT]", s)
	}
	if h, p, err := net.SplitHostPort(host); err == nil {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return "", "", fmt.Errorf("--ssh %q: bad port %q", s, p)
		}
		return user, net.JoinHostPort(h, p), nil
	}
	return user, net.JoinHostPort(strings.Trim(host, "[]"), "22"), nil
}

// machineNameFor makes a machine name from a VM's name: the characters a
// machine name may not hold become '-'.
func machineNameFor(vm string) string {
	b := []byte(vm)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			b[i] = '-'
		}
	}
	n := strings.TrimLeft(string(b), ".-_")
	if len(n) > 64 {
		n = n[:64]
	}
	return n
}

// agentURL is the control URL a pushed agent registers with, and the
// addresses the guest must reach (control and data listeners).
func (s *Server) agentURL(override string) (string, []string, error) {
	u := override
	if u == "" {
		u = s.cfg.AdvertiseURL
	}
	if u == "" {
		u = s.URL()
	}
	pu, err := url.Parse(u)
	if err != nil || pu.Scheme != "https" || pu.Host == "" {
		return "", nil, fmt.Errorf("server URL %q for the agent: want https://HOST:PORT", u)
	}
	host, port := pu.Hostname(), pu.Port()
	if port == "" {
		port = "443"
	}
	_, dport, _ := net.SplitHostPort(s.dataL.Addr().String())
	return strings.TrimSuffix(u, "/"), []string{net.JoinHostPort(host, port), net.JoinHostPort(host, dport)}, nil
}

// pushTarget is the SSH side of a request.
func (s *Server) pushTarget(sshSpec, key, knownHosts, accept string) (push.Target, error) {
	user, addr, err := sshTarget(sshSpec)
	if err != nil {
		return push.Target{}, errorf(http.StatusBadRequest, "%v", err)
	}
	if key == "" {
		return push.Target{}, errorf(http.StatusBadRequest, "an SSH private key is needed (--ssh-key FILE)")
	}
	return push.Target{Addr: addr, User: user, Key: []byte(key), KnownHosts: []byte(knownHosts),
		AcceptHostKey: accept, RecordFile: filepath.Join(s.cfg.DataDir, KnownHostsFile)}, nil
}

// Protect starts the job that pushes the agent to a VM's guest and
// protects the given disks. What can be checked at once is (a bad request
// starts no job); the rest is the job's steps.
func (s *Server) Protect(ctx context.Context, req api.ProtectRequest) (api.Job, error) {
	vm, err := s.findVM(ctx, req.VCenter, req.VM)
	if err != nil {
		return api.Job{}, err
	}
	if vm.Template {
		return api.Job{}, errorf(http.StatusBadRequest, "%s is a template, not a VM", vm.Name)
	}
	if vm.Duplicate {
		return api.Job{}, errorf(http.StatusConflict, "VM %s shares its BIOS UUID %s with another VM (a clone?): give it its own UUID first; nothing was done", vm.Name, vm.BIOSUUID)
	}
	name := machineNameFor(vm.Name)
	if !replication.ValidMachineName(name) {
		return api.Job{}, errorf(http.StatusBadRequest, "VM name %q does not make a machine name (%s)", vm.Name, replication.MachineNameRule)
	}
	if m, err := s.db.MachineByName(ctx, name); err == nil && m.BIOSUUID != "" && m.BIOSUUID != vm.BIOSUUID {
		return api.Job{}, errorf(http.StatusConflict, "machine %s exists already and is another guest (BIOS UUID %s, the VM's is %s); nothing was done", name, m.BIOSUUID, vm.BIOSUUID)
	}
	if len(req.Disks) == 0 {
		return api.Job{}, errorf(http.StatusBadRequest, "name the disks to protect: --disk NAME=DEVICE")
	}
	if len(req.Disks) > replication.MaxDisks {
		return api.Job{}, errorf(http.StatusBadRequest, "%d disks, at most %d", len(req.Disks), replication.MaxDisks)
	}
	var scan bool
	switch req.Mode {
	case "", "nbd":
	case "scan":
		scan = true
	default:
		return api.Job{}, errorf(http.StatusBadRequest, "mode %q: want nbd or scan", req.Mode)
	}
	disks := make([]push.Disk, 0, len(req.Disks))
	seen := map[string]bool{}
	for _, d := range req.Disks {
		if !replication.ValidDiskName(d.Name) || d.Device == "" || seen[d.Name] {
			return api.Job{}, errorf(http.StatusBadRequest, "disk %q=%q: want a distinct NAME (letters, digits, '.', '_', '-') and a device", d.Name, d.Device)
		}
		seen[d.Name] = true
		disks = append(disks, push.Disk{Name: d.Name, Device: d.Device, Scan: scan})
	}
	if req.Policy != "" {
		p, err := s.db.Policy(ctx, req.Policy)
		if err != nil {
			return api.Job{}, errorf(http.StatusBadRequest, "no policy named %q; nothing was done", req.Policy)
		}
		if p.FailbackOf != "" {
			return api.Job{}, errorf(http.StatusBadRequest, "%q is a failback policy; use %q", p.Name, p.FailbackOf)
		}
	}
	t, err := s.pushTarget(req.SSH, req.Key, req.KnownHosts, req.AcceptHostKey)
	if err != nil {
		return api.Job{}, err
	}
	serverURL, reach, err := s.agentURL(req.ServerURL)
	if err != nil {
		return api.Job{}, errorf(http.StatusBadRequest, "%v", err)
	}
	if err := checkGuest(ctx, t); err != nil {
		return api.Job{}, err
	}
	bin, err := os.Executable()
	if err != nil {
		return api.Job{}, fmt.Errorf("the server's own binary (the agent): %w", err)
	}
	o := push.Options{Target: t, InstallDir: req.InstallDir, Binary: bin, Name: name, ServerURL: serverURL,
		Reach: reach, Passphrase: s.pass, Disks: disks, NBD: req.NBD, ExpectUUID: vm.BIOSUUID,
		SkipUUIDCheck: req.SkipUUIDCheck}
	return s.startJob(ctx, "protect", vm.VCenter+"/"+vm.Name, func(ctx context.Context, j *job) error {
		return s.runProtect(ctx, j, o, vm, req.Policy)
	})
}

func (s *Server) runProtect(ctx context.Context, j *job, o push.Options, vm api.VM, policy string) error {
	started := s.now()
	err := push.Install(ctx, o, func(st push.Step) {
		j.update(api.JobStep{Name: st.Name, State: st.State, Detail: st.Detail, Done: st.Done, Total: st.Total})
	})
	if err != nil {
		return err
	}
	end := j.step("registration", "waiting for the agent to register as "+o.Name)
	m, err := s.waitMachine(ctx, registerWait, func(m store.Machine) (bool, error) {
		if m.Name != o.Name || m.LastSeen.Before(started) {
			return false, nil
		}
		if m.BIOSUUID != "" && m.BIOSUUID != vm.BIOSUUID {
			return false, fmt.Errorf("machine %s reports BIOS UUID %s, but VM %s has %s: it is not linked to the VM (check the guest, or protect with --skip-uuid-check)", m.Name, m.BIOSUUID, vm.Name, vm.BIOSUUID)
		}
		return true, nil
	})
	end(fmt.Sprintf("machine %s (id %s) registered and connected", m.Name, m.ID), err)
	if err != nil {
		return err
	}
	if policy != "" {
		end := j.step("policy", "assigning policy "+policy)
		err := s.assignPolicy(ctx, m, policy)
		end("policy "+policy, err)
		if err != nil {
			return err
		}
	}
	end = j.step("initial replication", "waiting for initial replication to begin")
	m, err = s.waitMachine(ctx, initialWait, func(m store.Machine) (bool, error) {
		if m.Name != o.Name || len(m.Disks) < len(o.Disks) {
			return false, nil
		}
		for _, d := range m.Disks {
			if d.State == replication.StateInitial && d.Cursor == 0 {
				return false, nil
			}
		}
		return true, nil
	})
	var copied, total int64
	for _, d := range m.Disks {
		total += d.Size
		if d.State == replication.StateProtected {
			copied += d.Size
		} else {
			copied += min(d.Cursor, d.Size)
		}
	}
	end(fmt.Sprintf("begun: %d of %d bytes copied; follow it with asr status --machine %s", copied, total, o.Name), err)
	return err
}

// waitMachine waits until ok accepts the machine it is shown (each
// machine, at each look), ok fails, or wait passes.
func (s *Server) waitMachine(ctx context.Context, wait time.Duration, ok func(store.Machine) (bool, error)) (store.Machine, error) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		ms, err := s.db.Machines(ctx)
		if err == nil {
			for _, m := range ms {
				done, err := ok(m)
				if err != nil {
					return m, err
				}
				if done {
					return m, nil
				}
			}
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return store.Machine{}, fmt.Errorf("not within %s: see the agent's log on the guest (agent.log in its install directory, or journalctl -u asr-agent)", wait)
			}
			return store.Machine{}, ctx.Err()
		case <-tick.C:
		}
	}
}

// checkGuest logs in to the guest before a job starts, and maps what it
// refused to an answer the operator can act on (an unknown host key asks
// for confirmation; nothing was done).
func checkGuest(ctx context.Context, t push.Target) error {
	err := push.Check(ctx, t)
	var uk *push.UnknownHostKeyError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &uk):
		return &apiError{status: http.StatusPreconditionRequired, msg: err.Error() + "; nothing was done", hostKey: uk.Fingerprint}
	case errors.Is(err, push.ErrHostKeyMismatch):
		return errorf(http.StatusConflict, "%v; nothing was done", err)
	case errors.Is(err, push.ErrAuth):
		return errorf(http.StatusBadRequest, "%v; nothing was done", err)
	case errors.Is(err, push.ErrConnect):
		return errorf(http.StatusBadGateway, "%v; nothing was done", err)
	}
	return errorf(http.StatusBadRequest, "%v; nothing was done", err)
}

// UnprotectVM starts the job that removes the agent from a VM's guest and
// ends the protection of its machine.
func (s *Server) UnprotectVM(ctx context.Context, req api.UnprotectVMRequest) (api.Job, error) {
	vm, err := s.findVM(ctx, req.VCenter, req.VM)
	if err != nil {
		return api.Job{}, err
	}
	if vm.Machine == "" {
		return api.Job{}, errorf(http.StatusConflict, "VM %s is not linked to a protected machine; nothing was done", vm.Name)
	}
	t, err := s.pushTarget(req.SSH, req.Key, req.KnownHosts, req.AcceptHostKey)
	if err != nil {
		return api.Job{}, err
	}
	if err := checkGuest(ctx, t); err != nil {
		return api.Job{}, err
	}
	machine := vm.Machine
	return s.startJob(ctx, "unprotect", vm.VCenter+"/"+vm.Name, func(ctx context.Context, j *job) error {
		err := push.Uninstall(ctx, t, req.InstallDir, func(st push.Step) {
			j.update(api.JobStep{Name: st.Name, State: st.State, Detail: st.Detail})
		})
		if err != nil {
			return err
		}
		end := j.step("end protection", "machine "+machine)
		err = s.Unprotect(ctx, machine, req.DeleteReplica)
		end("", err)
		return err
	})
}

func (s *Server) handleProtect(w http.ResponseWriter, r *http.Request) error {
	var req api.ProtectRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	j, err := s.Protect(r.Context(), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}

func (s *Server) handleUnprotectVM(w http.ResponseWriter, r *http.Request) error {
	var req api.UnprotectVMRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	j, err := s.UnprotectVM(r.Context(), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, j)
	return nil
}
