package web

import (
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/asrdr/asr/server/api"
)

// inventoryHandler serves the inventory (the VMs of every vCenter, with
// filters) and the form that enables replication of the selected VMs.
type inventoryHandler struct {
	backend Backend
	log     *slog.Logger
	now     func() time.Time
}

// maxProtectVMs bounds the VMs of one "Enable replication" form: each is a
// job with its own SSH connection.
const maxProtectVMs = 50

// vmFilter is the inventory's filters, from the query (?q=&vcenter=&power=&protection=).
type vmFilter struct {
	Q          string // in the name, host, cluster, IPs, guest OS or guest host name
	VCenter    string
	Power      string // poweredOn, poweredOff, suspended
	Protection string // "protected", "unprotected"
}

func filterFrom(q url.Values) vmFilter {
	return vmFilter{Q: strings.TrimSpace(q.Get("q")), VCenter: q.Get("vcenter"), Power: q.Get("power"), Protection: q.Get("protection")}
}

// match reports whether vm passes the filters.
func (f vmFilter) match(vm api.VM) bool {
	if f.VCenter != "" && vm.VCenter != f.VCenter {
		return false
	}
	if f.Power != "" && vm.PowerState != f.Power {
		return false
	}
	switch f.Protection {
	case "protected":
		if vm.Machine == "" {
			return false
		}
	case "unprotected":
		if vm.Machine != "" {
			return false
		}
	}
	if f.Q == "" {
		return true
	}
	q := strings.ToLower(f.Q)
	for _, s := range append([]string{vm.Name, vm.Host, vm.Cluster, vm.GuestOS, vm.GuestHostName}, vm.IPs...) {
		if strings.Contains(strings.ToLower(s), q) {
			return true
		}
	}
	return false
}

// Active reports whether any filter is set.
func (f vmFilter) Active() bool { return f != vmFilter{} }

// inventoryView is what the inventory page shows.
type inventoryView struct {
	Session  *session
	Filter   vmFilter
	VCenters []string // for the filter's select
	VMs      []api.VM // those passing the filters
	Total    int      // all VMs
	Err      string
	Now      time.Time
}

// page serves the inventory, filtered on the server so that it works
// without scripts.
func (h *inventoryHandler) page(w http.ResponseWriter, r *http.Request) {
	v := inventoryView{Session: sessionFrom(r.Context()), Filter: filterFrom(r.URL.Query()), Now: h.now()}
	status := http.StatusOK
	vms, err := h.backend.VMs(r.Context())
	if err != nil {
		h.log.Error("list VMs", "err", err)
		v.Err = err.Error()
		status = http.StatusInternalServerError
	}
	vcs, err := h.backend.VCenters(r.Context())
	if err != nil {
		h.log.Error("list vCenters", "err", err)
	}
	for _, vc := range vcs {
		v.VCenters = append(v.VCenters, vc.Name)
	}
	v.Total = len(vms)
	for _, vm := range vms {
		if v.Filter.match(vm) {
			v.VMs = append(v.VMs, vm)
		}
		if !slices.Contains(v.VCenters, vm.VCenter) {
			v.VCenters = append(v.VCenters, vm.VCenter)
		}
	}
	render(w, r, h.log, status, inventoryPage(v))
}

// vmKey names a VM in forms: its vCenter and its managed object id.
func vmKey(vm api.VM) string { return vm.VCenter + "/" + vm.Ref }

// protectTarget is a selected VM in the "Enable replication" form.
type protectTarget struct {
	VM     api.VM
	SSH    string // USER@HOST[:PORT]
	Accept string // the host key fingerprint the operator accepts
	// HostKey is the fingerprint the server asks the operator to confirm
	// (the guest's host key is not known); Error why the VM's job did not
	// start.
	HostKey string
	Error   string
}

// protectView is what the "Enable replication" form shows. The private key
// is never part of it: a form shown again asks for it again.
type protectView struct {
	Session    *session
	Targets    []protectTarget
	KnownHosts string
	Disks      string // NAME=DEVICE lines
	Mode       string
	Policy     string
	// InstallDir and SkipUUIDCheck are the advanced options.
	InstallDir    string
	SkipUUIDCheck bool
	Policies      []api.PolicyJSON
	PS            *api.ProcessServer
	Error         string
	Started       []api.Job // jobs started by the last submission
}

// protectPage shows the "Enable replication" form for the VMs selected in
// the inventory (GET /protect?vm=VCENTER/REF&vm=...).
func (h *inventoryHandler) protectPage(w http.ResponseWriter, r *http.Request) {
	v, status := h.protectView(r, r.URL.Query()["vm"])
	if status == http.StatusOK {
		v.Mode = "nbd"
	}
	render(w, r, h.log, status, protectPage(v))
}

// protectView resolves the selected VMs and loads the form's choices.
func (h *inventoryHandler) protectView(r *http.Request, keys []string) (protectView, int) {
	v := protectView{Session: sessionFrom(r.Context())}
	if ps, err := h.backend.ProcessServer(r.Context()); err == nil {
		v.PS = &ps
	}
	if ps, err := h.backend.Policies(r.Context()); err != nil {
		h.log.Error("list policies", "err", err)
	} else {
		for _, p := range ps {
			if p.FailbackOf == "" {
				v.Policies = append(v.Policies, p)
			}
		}
	}
	if len(keys) == 0 {
		v.Error = "No VM is selected: select the VMs to protect in the inventory."
		return v, http.StatusBadRequest
	}
	if len(keys) > maxProtectVMs {
		v.Error = fmt.Sprintf("%d VMs are selected; select at most %d at a time.", len(keys), maxProtectVMs)
		return v, http.StatusBadRequest
	}
	vms, err := h.backend.VMs(r.Context())
	if err != nil {
		h.log.Error("list VMs", "err", err)
		v.Error = "Could not load the inventory: " + err.Error()
		return v, http.StatusInternalServerError
	}
	byKey := make(map[string]api.VM, len(vms))
	for _, vm := range vms {
		byKey[vmKey(vm)] = vm
	}
	var missing []string
	for _, k := range keys {
		vm, ok := byKey[k]
		if !ok {
			missing = append(missing, k)
			continue
		}
		if slices.ContainsFunc(v.Targets, func(t protectTarget) bool { return vmKey(t.VM) == k }) {
			continue
		}
		v.Targets = append(v.Targets, protectTarget{VM: vm})
	}
	if len(missing) > 0 {
		v.Error = "Not in the inventory (any more): " + strings.Join(missing, ", ") + "."
		return v, http.StatusBadRequest
	}
	return v, http.StatusOK
}

// parseDisks parses NAME=DEVICE lines.
func parseDisks(s string) ([]api.ProtectDisk, error) {
	var out []api.ProtectDisk
	for i, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		name, dev, ok := strings.Cut(line, "=")
		name, dev = strings.TrimSpace(name), strings.TrimSpace(dev)
		if !ok || name == "" || dev == "" {
			return nil, fmt.Errorf("disks, line %d: %q: want NAME=DEVICE, e.g. data=/dev/sdb", i+1, line)
		}
		out = append(out, api.ProtectDisk{Name: name, Device: dev})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("name the disks to protect, one NAME=DEVICE a line, e.g. data=/dev/sdb")
	}
	return out, nil
}

// validSSH checks the shape of USER@HOST[:PORT]; the server checks the rest.
func validSSH(s string) bool {
	user, host, ok := strings.Cut(s, "@")
	return ok && user != "" && host != "" && !strings.ContainsAny(s, " \t")
}

// protect starts a protect job per selected VM: to the job's page for one,
// to the jobs for several. A VM whose job did not start (its host key to
// confirm, an error) is shown again in the form, with the jobs that did
// start; the private key is asked again.
func (h *inventoryHandler) protect(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	keys := r.PostForm["vm"]
	v, status := h.protectView(r, keys)
	v.KnownHosts = r.PostFormValue("known_hosts")
	v.Disks = r.PostFormValue("disks")
	v.Mode = r.PostFormValue("mode")
	v.Policy = r.PostFormValue("policy")
	v.InstallDir = strings.TrimSpace(r.PostFormValue("install_dir"))
	v.SkipUUIDCheck = r.PostFormValue("skip_uuid_check") != ""
	if status != http.StatusOK {
		render(w, r, h.log, status, protectPage(v))
		return
	}
	// The fields of a VM are named by its position in the form.
	idx := map[string]int{}
	for i, k := range keys {
		if _, ok := idx[k]; !ok {
			idx[k] = i
		}
	}
	var problems []string
	for i := range v.Targets {
		t := &v.Targets[i]
		n := strconv.Itoa(idx[vmKey(t.VM)])
		t.SSH = strings.TrimSpace(r.PostFormValue("ssh-" + n))
		t.Accept = strings.TrimSpace(r.PostFormValue("accept-" + n))
		if !validSSH(t.SSH) {
			t.Error = "SSH target: want USER@HOST or USER@HOST:PORT"
			problems = append(problems, t.VM.Name+": "+t.Error)
		}
	}
	key := r.PostFormValue("key")
	if strings.TrimSpace(key) == "" {
		problems = append(problems, "paste the SSH private key")
	}
	disks, err := parseDisks(v.Disks)
	if err != nil {
		problems = append(problems, err.Error())
	}
	if v.Mode != "nbd" && v.Mode != "scan" {
		problems = append(problems, "choose a replication mode")
	}
	if v.Policy != "" && !slices.ContainsFunc(v.Policies, func(p api.PolicyJSON) bool { return p.Name == v.Policy }) {
		problems = append(problems, "no policy named "+v.Policy)
	}
	if len(problems) > 0 {
		v.Error = "Nothing was started: " + strings.Join(problems, "; ") + "."
		render(w, r, h.log, http.StatusUnprocessableEntity, protectPage(v))
		return
	}
	var again []protectTarget
	for _, t := range v.Targets {
		req := api.ProtectRequest{VCenter: t.VM.VCenter, VM: t.VM.Ref, SSH: t.SSH, Key: key, KnownHosts: v.KnownHosts,
			AcceptHostKey: t.Accept, Disks: disks, Mode: v.Mode, Policy: v.Policy, InstallDir: v.InstallDir, SkipUUIDCheck: v.SkipUUIDCheck}
		j, hostKey, err := h.backend.Protect(ctx, req)
		if err != nil {
			h.log.Warn("protect from the console", "vcenter", t.VM.VCenter, "vm", t.VM.Name, "err", err)
			t.Error = err.Error()
			if hostKey != "" {
				t.HostKey, t.Accept = hostKey, hostKey
			}
			again = append(again, t)
			continue
		}
		h.log.Info("protect job started from the console", "job", j.ID, "vcenter", t.VM.VCenter, "vm", t.VM.Name, "remote", r.RemoteAddr)
		v.Started = append(v.Started, j)
	}
	switch {
	case len(again) == 0 && len(v.Started) == 1:
		redirect(w, r, "/jobs/"+url.PathEscape(v.Started[0].ID))
		return
	case len(again) == 0:
		redirect(w, r, "/jobs")
		return
	}
	v.Targets = again
	status = http.StatusUnprocessableEntity
	if slices.ContainsFunc(again, func(t protectTarget) bool { return t.HostKey != "" }) {
		status = http.StatusPreconditionRequired
	}
	render(w, r, h.log, status, protectPage(v))
}

// powerState names a VM's power state.
func powerState(s string) string {
	switch s {
	case "poweredOn":
		return "On"
	case "poweredOff":
		return "Off"
	case "suspended":
		return "Suspended"
	default:
		return s
	}
}

// vmDisks is a VM's disks in a few words, e.g. "2 disks, 80 GiB".
func vmDisks(vm api.VM) string {
	var total int64
	for _, d := range vm.Disks {
		total += d.CapacityBytes
	}
	return strconv.Itoa(len(vm.Disks)) + " " + plural(len(vm.Disks), "disk", "disks") + ", " + humanBytes(total)
}

// hostCluster is where a VM runs, e.g. "esx-01 (cluster-a)".
func hostCluster(vm api.VM) string {
	switch {
	case vm.Cluster != "" && vm.Host != "":
		return vm.Host + " (" + vm.Cluster + ")"
	case vm.Host != "":
		return vm.Host
	default:
		return vm.Cluster
	}
}

func queryEscape(s string) string { return url.QueryEscape(s) }

// modeHelp explains what a replication mode means for the RPO.
const (
	nbdHelp = "Every write is captured as it happens: an RPO of seconds. The workload must use its disks through the " +
		"agent's NBD export (e.g. /dev/nbd0 attached to the agent's socket), not the devices directly."
	scanHelp = "The agent reads the disks, used directly by the workload, in periodic block scans and sends what changed: " +
		"the RPO is the scan interval plus the transfer. Nothing changes for the workload; its points are not crash-consistent."
)

// sshPlaceholder suggests an SSH target from the VM's first IP address.
func sshPlaceholder(vm api.VM) string {
	if len(vm.IPs) > 0 {
		return "root@" + vm.IPs[0]
	}
	return "root@HOST"
}
