package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
	"github.com/asrdr/asr/vmware"
)

// vCenters: the server keeps one discovery (vmware.Watcher) per
// registered vCenter, started at Open and when one is added. What
// discovery finds is written to the database (the vms table), so the
// inventory outlives a vCenter outage (its VMs marked stale) and a restart.

// vcenterSecretKind is the sealed object kind of a vCenter's password; its
// key is "vcenter/NAME", so a sealed password moved to another row does not
// open.
const vcenterSecretKind = "vcenter-password"

// vcenterNameRE is the rule of a vCenter's name (it is a URL path segment
// and a command-line argument).
var vcenterNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// maxInventoryVMs bounds the VMs kept per vCenter (the discovery's list is
// written whole at each change): vSphere 8 manages at most 40,000 VMs per
// vCenter.
const maxInventoryVMs = 50000

// vcenterState is the server's running discoveries.
type vcenterState struct {
	mu       sync.Mutex
	watchers map[string]*vmware.Watcher
	// minBackoff, maxBackoff, maxWait: the discovery's retry schedule
	// (zero: the package's defaults); tests shorten them.
	minBackoff, maxBackoff, maxWait time.Duration
}

func (s *Server) sealPassword(name, password string) ([]byte, error) {
	return s.cat.Codec.Seal("vcenter/"+name, vcenterSecretKind, []byte(password))
}

func (s *Server) openPassword(v store.VCenter) (string, error) {
	b, err := s.cat.Codec.Open("vcenter/"+v.Name, vcenterSecretKind, v.Secret)
	if err != nil {
		return "", fmt.Errorf("vCenter %s: the sealed password does not open with this vault's key: %w", v.Name, err)
	}
	return string(b), nil
}

// startDiscovery starts the discoveries of every registered vCenter.
func (s *Server) startDiscovery(ctx context.Context) error {
	vs, err := s.db.VCenters(ctx)
	if err != nil {
		return err
	}
	for _, v := range vs {
		if err := s.watch(v); err != nil {
			s.log.Warn("vCenter discovery not started", "vcenter", v.Name, "err", err)
		}
	}
	return nil
}

// watch starts the discovery of one vCenter.
func (s *Server) watch(v store.VCenter) error {
	pw, err := s.openPassword(v)
	if err != nil {
		return err
	}
	ep := vmware.Endpoint{Name: v.Name, URL: v.URL, User: v.User, Password: pw, Thumbprint: v.Thumbprint}
	name := v.Name
	log := s.log.With("vcenter", name)
	inv := &inventoryWriter{}
	s.vc.mu.Lock()
	defer s.vc.mu.Unlock()
	if s.vc.watchers == nil {
		s.vc.watchers = map[string]*vmware.Watcher{}
	}
	if old := s.vc.watchers[name]; old != nil {
		old.Close()
	}
	s.vc.watchers[name] = vmware.Watch(s.ctx, ep, vmware.WatchOptions{
		OnChange: func(vms []vmware.VM) {
			if len(vms) > maxInventoryVMs {
				log.Warn("vCenter has more VMs than asr keeps; the rest are left out", "vms", len(vms), "kept", maxInventoryVMs)
				vms = vms[:maxInventoryVMs]
			}
			if err := inv.write(s.ctx, s.db, name, vms); err != nil && s.ctx.Err() == nil {
				log.Warn("record the VM inventory", "err", err)
			}
		},
		OnStatus: func(st vmware.Status) {
			if err := s.db.SetVCenterStatus(s.ctx, name, st.Connected, st.LastUpdate, st.LastError, st.About); err != nil && s.ctx.Err() == nil {
				log.Warn("record the vCenter's state", "err", err)
			}
		},
		MinBackoff: s.vc.minBackoff, MaxBackoff: s.vc.maxBackoff, MaxWait: s.vc.maxWait,
		Logger: s.log,
	})
	return nil
}

// inventoryWriter writes a discovery's VM lists to the database: the whole
// list the first time (rows of VMs removed while asr was not watching go),
// then only the VMs that changed and those gone. It is used on the
// discovery's goroutine only.
type inventoryWriter struct {
	written map[string]string // ref -> the JSON last written; nil: nothing yet
}

func (w *inventoryWriter) write(ctx context.Context, db *store.DB, vcenter string, vms []vmware.VM) error {
	now := make(map[string]string, len(vms))
	var put []store.VMRow
	for _, vm := range vms {
		b, err := json.Marshal(vm)
		if err != nil {
			continue
		}
		now[vm.Ref] = string(b)
		if w.written == nil || w.written[vm.Ref] != string(b) {
			put = append(put, store.VMRow{Ref: vm.Ref, Name: vm.Name, BIOSUUID: vm.BIOSUUID, Data: string(b)})
		}
	}
	var err error
	if w.written == nil {
		err = db.ReplaceVMs(ctx, vcenter, put)
	} else {
		var gone []string
		for ref := range w.written {
			if _, ok := now[ref]; !ok {
				gone = append(gone, ref)
			}
		}
		err = db.UpdateVMs(ctx, vcenter, put, gone)
	}
	if err != nil {
		w.written = nil // write it whole next time
		return err
	}
	w.written = now
	return nil
}

// stopDiscovery stops every discovery (Close).
func (s *Server) stopDiscovery() {
	s.vc.mu.Lock()
	ws := s.vc.watchers
	s.vc.watchers = nil
	s.vc.mu.Unlock()
	for _, w := range ws {
		w.Close()
	}
}

// AddVCenter registers a vCenter: it checks the URL, the pinned
// thumbprint and the credentials (a login), seals the password, and starts
// discovery. An empty thumbprint is refused with the certificate's, for
// the operator to confirm.
func (s *Server) AddVCenter(ctx context.Context, req api.AddVCenterRequest) (api.VCenter, error) {
	if !vcenterNameRE.MatchString(req.Name) {
		return api.VCenter{}, errorf(http.StatusBadRequest, "vCenter name %q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", req.Name)
	}
	u, err := url.Parse(req.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil {
		return api.VCenter{}, errorf(http.StatusBadRequest, "vCenter URL %q: want https://HOST[:PORT]/sdk (no user in the URL)", req.URL)
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/sdk"
	}
	req.URL = u.String()
	if req.User == "" || req.Password == "" {
		return api.VCenter{}, errorf(http.StatusBadRequest, "a vCenter needs a user and a password")
	}
	if _, err := s.db.VCenter(ctx, req.Name); err == nil {
		return api.VCenter{}, errorf(http.StatusConflict, "a vCenter named %q is registered already (remove it first)", req.Name)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if req.Thumbprint == "" {
		tp, err := vmware.Thumbprint(cctx, req.URL)
		if err != nil {
			return api.VCenter{}, errorf(http.StatusBadGateway, "read the certificate of %s: %v", u.Host, err)
		}
		return api.VCenter{}, &apiError{status: http.StatusPreconditionRequired, thumbprint: tp,
			msg: fmt.Sprintf("the certificate of %s has the SHA-256 thumbprint %s: check it against the vCenter's (vSphere Client, or the appliance console) and register again with that thumbprint; nothing was registered", u.Host, tp)}
	}
	tp, err := vmware.NormalizeThumbprint(req.Thumbprint)
	if err != nil {
		return api.VCenter{}, errorf(http.StatusBadRequest, "thumbprint: %v", err)
	}
	ep := vmware.Endpoint{Name: req.Name, URL: req.URL, User: req.User, Password: req.Password, Thumbprint: tp}
	c, err := vmware.Connect(cctx, ep)
	var mm *vmware.ThumbprintMismatchError
	switch {
	case errors.As(err, &mm):
		return api.VCenter{}, &apiError{status: http.StatusConflict, thumbprint: mm.Got, msg: err.Error() + "; nothing was registered"}
	case errors.Is(err, vmware.ErrLogin):
		return api.VCenter{}, errorf(http.StatusBadRequest, "%v; nothing was registered", err)
	case err != nil:
		return api.VCenter{}, errorf(http.StatusBadGateway, "connect to %s: %v; nothing was registered", u.Host, err)
	}
	c.Logout(context.Background())
	secret, err := s.sealPassword(req.Name, req.Password)
	if err != nil {
		return api.VCenter{}, err
	}
	v := store.VCenter{Name: req.Name, URL: req.URL, User: req.User, Secret: secret, Thumbprint: tp}
	if err := s.db.AddVCenter(ctx, v); errors.Is(err, store.ErrConflict) {
		return api.VCenter{}, errorf(http.StatusConflict, "a vCenter named %q is registered already", req.Name)
	} else if err != nil {
		return api.VCenter{}, err
	}
	s.log.Info("vCenter registered", "vcenter", req.Name, "url", req.URL, "user", req.User, "thumbprint", tp)
	if err := s.watch(v); err != nil {
		return api.VCenter{}, err
	}
	return s.VCenter(ctx, req.Name)
}

// RemoveVCenter stops a vCenter's discovery and forgets it and its
// inventory (the machines linked to its VMs stay protected).
func (s *Server) RemoveVCenter(ctx context.Context, name string) error {
	s.vc.mu.Lock()
	w := s.vc.watchers[name]
	delete(s.vc.watchers, name)
	s.vc.mu.Unlock()
	if w != nil {
		w.Close()
	}
	if err := s.db.RemoveVCenter(ctx, name); err != nil {
		return err
	}
	s.log.Info("vCenter removed", "vcenter", name)
	return nil
}

// VCenter returns one vCenter as the API shows it.
func (s *Server) VCenter(ctx context.Context, name string) (api.VCenter, error) {
	v, err := s.db.VCenter(ctx, name)
	if err != nil {
		return api.VCenter{}, err
	}
	vms, err := s.db.VMs(ctx, name)
	if err != nil {
		return api.VCenter{}, err
	}
	return vcenterView(v, len(vms)), nil
}

// VCenters lists the registered vCenters.
func (s *Server) VCenters(ctx context.Context) ([]api.VCenter, error) {
	vs, err := s.db.VCenters(ctx)
	if err != nil {
		return nil, err
	}
	vms, err := s.db.VMs(ctx, "")
	if err != nil {
		return nil, err
	}
	count := map[string]int{}
	for _, vm := range vms {
		count[vm.VCenter]++
	}
	out := make([]api.VCenter, 0, len(vs))
	for _, v := range vs {
		out = append(out, vcenterView(v, count[v.Name]))
	}
	return out, nil
}

func vcenterView(v store.VCenter, vms int) api.VCenter {
	return api.VCenter{Name: v.Name, URL: v.URL, User: v.User, Thumbprint: v.Thumbprint, AddedAt: v.AddedAt,
		Connected: v.Connected, LastUpdate: v.LastUpdate, LastError: v.LastError, About: v.About, VMs: vms}
}

// links is the matching of machines to VMs by BIOS UUID: a VM and a
// machine are linked only when the UUID names exactly one of each.
type links struct {
	vcenters  int
	vmsByUUID map[string][]api.VM
	machines  map[string][]string // BIOS UUID -> machine names
}

// links matches machines to VMs. With all set it reads the whole
// inventory (and returns it decoded, for the inventory's listing);
// otherwise only the VMs whose BIOS UUID a machine reports (the index
// vms_bios_uuid), which is all a machine's view needs.
func (s *Server) links(ctx context.Context, all bool) (*links, []api.VM, error) {
	l := &links{vmsByUUID: map[string][]api.VM{}, machines: map[string][]string{}}
	vcs, err := s.db.VCenters(ctx)
	if err != nil {
		return nil, nil, err
	}
	l.vcenters = len(vcs)
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return nil, nil, err
	}
	var uuids []string
	for _, m := range ms {
		if m.BIOSUUID != "" {
			if len(l.machines[m.BIOSUUID]) == 0 {
				uuids = append(uuids, m.BIOSUUID)
			}
			l.machines[m.BIOSUUID] = append(l.machines[m.BIOSUUID], m.Name)
		}
	}
	if l.vcenters == 0 {
		return l, nil, nil
	}
	var rows []store.VMRow
	if all {
		rows, err = s.db.VMs(ctx, "")
	} else {
		rows, err = s.db.VMsWithUUIDs(ctx, uuids)
	}
	if err != nil {
		return nil, nil, err
	}
	vms := make([]api.VM, 0, len(rows))
	for _, r := range rows {
		vm, err := vmFromRow(r)
		if err != nil {
			s.log.Warn("a VM of the inventory does not decode", "vcenter", r.VCenter, "ref", r.Ref, "err", err)
			continue
		}
		if vm.BIOSUUID != "" && !vm.Template {
			l.vmsByUUID[vm.BIOSUUID] = append(l.vmsByUUID[vm.BIOSUUID], vm)
		}
		vms = append(vms, vm)
	}
	return l, vms, nil
}

func vmFromRow(r store.VMRow) (api.VM, error) {
	var vm api.VM
	if err := json.Unmarshal([]byte(r.Data), &vm); err != nil {
		return vm, err
	}
	vm.VCenter, vm.Ref, vm.BIOSUUID = r.VCenter, r.Ref, strings.ToLower(vm.BIOSUUID)
	vm.Stale, vm.UpdatedAt = r.Stale, r.UpdatedAt
	if vm.Disks == nil {
		vm.Disks = []api.VMDisk{}
	}
	return vm, nil
}

// link sets a machine's VM, or why it has none.
func (l *links) link(v *api.Machine, uuid string) {
	v.BIOSUUID = uuid
	if l.vcenters == 0 {
		return
	}
	vms := l.vmsByUUID[uuid]
	switch {
	case uuid == "":
		v.LinkProblem = api.LinkNoUUID
	case len(vms) == 0:
		v.LinkProblem = api.LinkNoVM
	case len(vms) > 1:
		v.LinkProblem = api.LinkDuplicate
	case len(l.machines[uuid]) > 1:
		v.LinkProblem = api.LinkShared
	default:
		vm := vms[0]
		v.VM = &api.VMLink{VCenter: vm.VCenter, Ref: vm.Ref, Name: vm.Name, Host: vm.Host, IPs: vm.IPs, Stale: vm.Stale}
	}
}

// vm completes an inventory VM with the machine protecting it.
func (l *links) vm(vm *api.VM) {
	vm.Duplicate = vm.BIOSUUID != "" && len(l.vmsByUUID[vm.BIOSUUID]) > 1
	if ms := l.machines[vm.BIOSUUID]; vm.BIOSUUID != "" && !vm.Duplicate && len(ms) == 1 {
		vm.Machine = ms[0]
	}
}

// VMs lists the inventory (of one vCenter unless vcenter is ""), each VM
// with the machine protecting it.
func (s *Server) VMs(ctx context.Context, vcenter string) ([]api.VM, error) {
	// The whole inventory even for one vCenter: a clone's twin may be in
	// another.
	l, vms, err := s.links(ctx, true)
	if err != nil {
		return nil, err
	}
	out := make([]api.VM, 0, len(vms))
	for _, vm := range vms {
		if vcenter != "" && vm.VCenter != vcenter {
			continue
		}
		l.vm(&vm)
		out = append(out, vm)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// findVM resolves a VM by name (and vCenter, if given): exactly one must
// match.
func (s *Server) findVM(ctx context.Context, vcenter, name string) (api.VM, error) {
	vms, err := s.VMs(ctx, vcenter)
	if err != nil {
		return api.VM{}, err
	}
	var found []api.VM
	for _, vm := range vms {
		if vm.Name == name || vm.Ref == name {
			found = append(found, vm)
		}
	}
	switch len(found) {
	case 0:
		if vcenter != "" {
			return api.VM{}, errorf(http.StatusNotFound, "no VM named %q in vCenter %s", name, vcenter)
		}
		return api.VM{}, errorf(http.StatusNotFound, "no VM named %q in the inventory", name)
	case 1:
		return found[0], nil
	}
	return api.VM{}, errorf(http.StatusConflict, "%d VMs are named %q: name the vCenter (--vcenter), or use the VM's id (%s, %s, ...)", len(found), name, found[0].Ref, found[1].Ref)
}

func (s *Server) handleVCenters(w http.ResponseWriter, r *http.Request) error {
	vs, err := s.VCenters(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, vs)
	return nil
}

func (s *Server) handleAddVCenter(w http.ResponseWriter, r *http.Request) error {
	var req api.AddVCenterRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	v, err := s.AddVCenter(r.Context(), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, v)
	return nil
}

func (s *Server) handleRemoveVCenter(w http.ResponseWriter, r *http.Request) error {
	name := chi.URLParam(r, "vcenter")
	if err := s.RemoveVCenter(r.Context(), name); errors.Is(err, store.ErrNotFound) {
		return errorf(http.StatusNotFound, "no vCenter named %q", name)
	} else if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) handleVMs(w http.ResponseWriter, r *http.Request) error {
	vs, err := s.VMs(r.Context(), r.URL.Query().Get("vcenter"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, vs)
	return nil
}
