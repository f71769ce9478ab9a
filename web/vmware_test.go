package web

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

// fakeVMware is the vCenter, inventory and job part of fakeBackend. Its
// vCenter answers like the server's: no thumbprint asks for the
// certificate's, another thumbprint is a changed certificate, a wrong
// password is refused. Its guests' host keys are unknown unless accepted.
type fakeVMware struct {
	vmMu      sync.Mutex
	vcenters  []api.VCenter
	vms       []api.VM
	policies  []api.PolicyJSON
	jobs      []api.Job
	protects  []api.ProtectRequest // every Protect call
	adds      []api.AddVCenterRequest
	removed   []string
	certTP    string            // the fake vCenter's certificate thumbprint
	vcPass    string            // its password
	hostKeys  map[string]string // SSH target -> host key fingerprint still to confirm
	protectFn func(api.ProtectRequest) error
}

const (
	fakeTP       = "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99"
	fakeVCPass   = "vc-secret-Password-42"
	fakeKey      = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAfakefakefake\n-----END OPENSSH PRIVATE KEY-----\n"
	fakeHostKey  = "SHA256:n4fGyZ0fcTmSzfE1OgKW6n3n7yYpN+qzRZcQ3wQxO3w"
	fakeJobStart = "job-"
)

func (f *fakeVMware) VCenters(context.Context) ([]api.VCenter, error) {
	f.vmMu.Lock()
	defer f.vmMu.Unlock()
	return append([]api.VCenter(nil), f.vcenters...), nil
}

func (f *fakeVMware) AddVCenter(_ context.Context, req api.AddVCenterRequest) (api.VCenter, string, error) {
	f.vmMu.Lock()
	defer f.vmMu.Unlock()
	f.adds = append(f.adds, req)
	tp := f.certTP
	if tp == "" {
		tp = fakeTP
	}
	switch {
	case req.Thumbprint == "":
		return api.VCenter{}, tp, errors.New("the certificate has the SHA-256 thumbprint " + tp + ": confirm it")
	case req.Thumbprint != tp:
		return api.VCenter{}, tp, errors.New("the vCenter's certificate changed: its thumbprint is " + tp + ", not the one confirmed; nothing was registered")
	case req.Password != fakeVCPass:
		return api.VCenter{}, "", errors.New("log in to the vCenter: incorrect user name or password; nothing was registered")
	}
	v := api.VCenter{Name: req.Name, URL: req.URL, User: req.User, Thumbprint: tp, Connected: true, AddedAt: testNow}
	f.vcenters = append(f.vcenters, v)
	return v, "", nil
}

func (f *fakeVMware) RemoveVCenter(_ context.Context, name string) error {
	f.vmMu.Lock()
	defer f.vmMu.Unlock()
	for i, v := range f.vcenters {
		if v.Name == name {
			f.vcenters = append(f.vcenters[:i], f.vcenters[i+1:]...)
			f.removed = append(f.removed, name)
			return nil
		}
	}
	return fmt.Errorf("vCenter %s: %w", name, ErrNotFound)
}

func (f *fakeVMware) VMs(context.Context) ([]api.VM, error) {
	f.vmMu.Lock()
	defer f.vmMu.Unlock()
	return append([]api.VM(nil), f.vms...), nil
}

func (f *fakeVMware) Policies(context.Context) ([]api.PolicyJSON, error) {
	f.vmMu.Lock()
	defer f.vmMu.Unlock()
	return f.policies, nil
}

func (f *fakeVMware) Protect(_ context.Context, req api.ProtectRequest) (api.Job, string, error) {
	f.vmMu.Lock()
	defer f.vmMu.Unlock()
	f.protects = append(f.protects, req)
	if hk := f.hostKeys[req.SSH]; hk != "" && req.AcceptHostKey != hk {
		return api.Job{}, hk, errors.New("the host key of " + req.SSH + " is not known: its fingerprint is " + hk)
	}
	if f.protectFn != nil {
		if err := f.protectFn(req); err != nil {
			return api.Job{}, "", err
		}
	}
	j := api.Job{ID: fmt.Sprintf("%s%d", fakeJobStart, len(f.jobs)+1), Kind: "protect", Subject: req.VCenter + "/" + req.VM,
		State: api.JobRunning, StartedAt: testNow, Steps: []api.JobStep{{Name: "connect", State: "running", Detail: req.SSH}}}
	f.jobs = append([]api.Job{j}, f.jobs...)
	return j, "", nil
}

func (f *fakeVMware) Jobs(_ context.Context, limit int) ([]api.Job, error) {
	f.vmMu.Lock()
	defer f.vmMu.Unlock()
	return f.jobs[:min(limit, len(f.jobs))], nil
}

func (f *fakeVMware) Job(_ context.Context, id string) (api.Job, error) {
	f.vmMu.Lock()
	defer f.vmMu.Unlock()
	for _, j := range f.jobs {
		if j.ID == id {
			return j, nil
		}
	}
	return api.Job{}, fmt.Errorf("job %s: %w", id, ErrNotFound)
}

// testVMs is an inventory of two vCenters.
func testVMs() []api.VM {
	return []api.VM{
		{VCenter: "vc1", Ref: "vm-10", Name: "web-01", BIOSUUID: "4211aaaa-0000-0000-0000-000000000001", PowerState: "poweredOn",
			GuestOS: "Ubuntu Linux (64-bit)", IPs: []string{"10.0.0.11"}, CPUs: 2, MemoryMiB: 4096,
			Disks: []api.VMDisk{{Label: "Hard disk 1", CapacityBytes: 20 * gib}, {Label: "Hard disk 2", CapacityBytes: 60 * gib}},
			Host:  "esx-01.lab", Cluster: "prod", Machine: "web-01"},
		{VCenter: "vc1", Ref: "vm-11", Name: "db-01", BIOSUUID: "4211aaaa-0000-0000-0000-000000000002", PowerState: "poweredOff",
			GuestOS: "Red Hat Enterprise Linux 9 (64-bit)", IPs: []string{"10.0.0.12"}, CPUs: 8, MemoryMiB: 32768,
			Disks: []api.VMDisk{{Label: "Hard disk 1", CapacityBytes: 100 * gib}}, Host: "esx-02.lab", Cluster: "prod"},
		{VCenter: "vc2", Ref: "vm-20", Name: "clone-a", BIOSUUID: "4211bbbb-0000-0000-0000-000000000003", PowerState: "poweredOn",
			GuestOS: "Debian GNU/Linux 12 (64-bit)", CPUs: 1, MemoryMiB: 1024, Host: "esx-09.dr", Duplicate: true, Stale: true},
		{VCenter: "vc2", Ref: "vm-21", Name: "clone-b", BIOSUUID: "4211bbbb-0000-0000-0000-000000000003", PowerState: "suspended",
			GuestOS: "Debian GNU/Linux 12 (64-bit)", CPUs: 1, MemoryMiB: 1024, Host: "esx-09.dr", Duplicate: true, Stale: true},
	}
}

func newVMwareBackend() *fakeBackend {
	b := newFakeBackend()
	b.vcenters = []api.VCenter{
		{Name: "vc1", URL: "https://vc1.lab/sdk", User: "asr@vsphere.local", Thumbprint: fakeTP, Connected: true,
			LastUpdate: testNow.Add(-5 * time.Second), About: "VMware vCenter Server 8.0.2", VMs: 2},
		{Name: "vc2", URL: "https://vc2.dr/sdk", User: "root", Thumbprint: fakeTP, Connected: false,
			LastUpdate: testNow.Add(-10 * time.Minute), LastError: "dial tcp 10.9.0.2:443: connect: connection refused", VMs: 2},
	}
	b.vms = testVMs()
	b.policies = []api.PolicyJSON{
		{Name: "default", RPOThreshold: "15m0s", Retention: "72h0m0s"},
		{Name: "gold", RPOThreshold: "5m0s", Retention: "168h0m0s"},
		{Name: "gold-failback", RPOThreshold: "5m0s", Retention: "168h0m0s", FailbackOf: "gold"},
	}
	b.hostKeys = map[string]string{}
	return b
}

// get serves a GET with the session and checks its status.
func get(t *testing.T, h *Handler, id, path string, status int) string {
	t.Helper()
	w := serve(h, withSession(httptest.NewRequest("GET", path, nil), id))
	if w.Code != status {
		t.Fatalf("GET %s: status %d, want %d; body:\n%s", path, w.Code, status, w.Body)
	}
	return w.Body.String()
}

// post serves a form POST with the session and checks its status.
func post(t *testing.T, h *Handler, id, path string, form url.Values, status int) *httptest.ResponseRecorder {
	t.Helper()
	w := serve(h, withSession(postForm(path, form), id))
	if w.Code != status {
		t.Fatalf("POST %s: status %d, want %d; body:\n%s", path, w.Code, status, w.Body)
	}
	return w
}

// vmNames are the VMs rows of an inventory page, in order.
func vmNames(body string) []string {
	var out []string
	for _, s := range strings.Split(body, `data-vm="`)[1:] {
		out = append(out, s[:strings.Index(s, `"`)])
	}
	return out
}

func TestNavigation(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for path, current := range map[string]string{"/vcenters": "vCenters", "/vms": "Inventory", "/jobs": "Jobs", "/": "Dashboard", "/machines": "Machines", "/policies": "Policies", "/groups": "Groups", "/infrastructure": "Infrastructure"} {
		body := get(t, h, id, path, http.StatusOK)
		for _, want := range []string{`href="/vcenters"`, `href="/vms"`, `href="/jobs"`} {
			if !strings.Contains(body, want) {
				t.Errorf("%s: nav lacks %s", path, want)
			}
		}
		if !strings.Contains(body, `aria-current="page">`+current+`</a>`) {
			t.Errorf("%s: %s is not the current page in the nav", path, current)
		}
	}
}

func TestVCentersPage(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	body := get(t, h, id, "/vcenters", http.StatusOK)
	for _, want := range []string{
		"vc1", "https://vc1.lab/sdk", "asr@vsphere.local", "Connected", "5 s ago", "VMware vCenter Server 8.0.2", fakeTP,
		"vc2", "Disconnected", "connection refused", "10 min ago",
		`href="/vcenters/vc1/remove"`, `href="/vms?vcenter=vc1"`, `id="vc-add"`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("vCenters page lacks %q", want)
		}
	}
}

// TestAddVCenterTwoSteps: a first submission shows the certificate's
// thumbprint and asks for the password again; the confirmation adds the
// vCenter with that thumbprint. The password never shows in a page.
func TestAddVCenterTwoSteps(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	form := url.Values{"csrf": {csrf}, "name": {"vc3"}, "url": {"https://vc3.lab/sdk"}, "user": {"admin"}, "password": {fakeVCPass}}

	w := post(t, h, id, "/vcenters", form, http.StatusOK)
	body := w.Body.String()
	for _, want := range []string{`id="thumbprint"`, fakeTP, `name="thumbprint" value="` + fakeTP + `"`, "Trust this certificate and add",
		`value="vc3"`, `value="https://vc3.lab/sdk"`, `value="admin"`, "Enter the password again"} {
		if !strings.Contains(body, want) {
			t.Errorf("confirmation step lacks %q", want)
		}
	}
	if strings.Contains(body, fakeVCPass) {
		t.Fatal("the confirmation step shows the password")
	}
	if len(b.vcenters) != 2 {
		t.Fatal("the first step registered the vCenter")
	}

	// Confirmed without the password: refused before the backend.
	form.Set("thumbprint", fakeTP)
	form.Set("password", "")
	post(t, h, id, "/vcenters", form, http.StatusUnprocessableEntity)

	// A wrong password: shown plainly, the thumbprint kept, the password not.
	form.Set("password", "wrong-password-123")
	w = post(t, h, id, "/vcenters", form, http.StatusUnprocessableEntity)
	if body := w.Body.String(); !strings.Contains(body, "incorrect user name or password") || strings.Contains(body, "wrong-password-123") ||
		!strings.Contains(body, `name="thumbprint" value="`+fakeTP+`"`) {
		t.Errorf("wrong password page:\n%s", body)
	}

	form.Set("password", fakeVCPass)
	w = post(t, h, id, "/vcenters", form, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/vcenters?added=vc3" {
		t.Errorf("redirect to %q", loc)
	}
	last := b.adds[len(b.adds)-1]
	if last.Thumbprint != fakeTP || last.Password != fakeVCPass || last.Name != "vc3" {
		t.Errorf("added with %+v", last)
	}
	body = get(t, h, id, "/vcenters?added=vc3", http.StatusOK)
	if !strings.Contains(body, "vCenter vc3 is registered") || strings.Contains(body, fakeVCPass) {
		t.Errorf("after adding:\n%s", body)
	}
}

// TestAddVCenterChangedCertificate: a certificate that is not the one
// confirmed is shown as such, with the new thumbprint to trust or not.
func TestAddVCenterChangedCertificate(t *testing.T) {
	b := newVMwareBackend()
	b.certTP = strings.Replace(fakeTP, "AA", "11", 1)
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	w := post(t, h, id, "/vcenters", url.Values{"csrf": {csrf}, "name": {"vc3"}, "url": {"https://vc3.lab/sdk"}, "user": {"admin"},
		"password": {fakeVCPass}, "thumbprint": {fakeTP}}, http.StatusConflict)
	body := w.Body.String()
	for _, want := range []string{"certificate changed", "now presented", b.certTP, `name="thumbprint" value="` + b.certTP + `"`} {
		if !strings.Contains(body, want) {
			t.Errorf("changed certificate page lacks %q", want)
		}
	}
	if strings.Contains(body, fakeVCPass) {
		t.Error("the page shows the password")
	}
}

func TestRemoveVCenter(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	body := get(t, h, id, "/vcenters/vc2/remove", http.StatusOK)
	if !strings.Contains(body, `action="/vcenters/vc2/remove"`) || !strings.Contains(body, "stay protected") {
		t.Errorf("confirmation page:\n%s", body)
	}
	get(t, h, id, "/vcenters/nope/remove", http.StatusNotFound)
	// The GET removed nothing; a POST without the CSRF token neither.
	post(t, h, id, "/vcenters/vc2/remove", url.Values{}, http.StatusForbidden)
	if len(b.removed) != 0 {
		t.Fatalf("removed %v without a confirmed POST", b.removed)
	}
	w := post(t, h, id, "/vcenters/vc2/remove", url.Values{"csrf": {csrf}}, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/vcenters?removed=vc2" || len(b.removed) != 1 {
		t.Errorf("redirect to %q, removed %v", loc, b.removed)
	}
	post(t, h, id, "/vcenters/vc2/remove", url.Values{"csrf": {csrf}}, http.StatusNotFound)
}

func TestVMwareCSRFRequired(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for _, path := range []string{"/vcenters", "/vcenters/vc1/remove", "/protect"} {
		for _, token := range []string{"", "csrf-999"} {
			post(t, h, id, path, url.Values{"csrf": {token}, "name": {"x"}, "vm": {"vc1/vm-11"}}, http.StatusForbidden)
		}
	}
	if len(b.adds) != 0 || len(b.removed) != 0 || len(b.protects) != 0 {
		t.Errorf("a request without the CSRF token did something: %v %v %v", b.adds, b.removed, b.protects)
	}
	// Signed out: to the login page.
	w := serve(h, httptest.NewRequest("GET", "/vms", nil))
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/login" {
		t.Errorf("signed out /vms: %d %s", w.Code, w.Header().Get("Location"))
	}
}

func TestInventory(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)

	body := get(t, h, id, "/vms", http.StatusOK)
	if got := strings.Join(vmNames(body), ","); got != "web-01,db-01,clone-a,clone-b" {
		t.Errorf("VMs %s", got)
	}
	for _, want := range []string{
		"Ubuntu Linux (64-bit)", "10.0.0.11", "4 GiB", "2 disks, 80 GiB", "esx-01.lab (prod)", `href="/machines/web-01"`,
		"duplicate UUID", ">stale</span>", `value="vc1/vm-11"`, `action="/protect"`, "Suspended",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("inventory lacks %q", want)
		}
	}
	// The clones cannot be selected.
	if !strings.Contains(body, `value="vc2/vm-20" aria-label="Select clone-a" disabled>`) {
		t.Error("a VM with a duplicate UUID can be selected")
	}

	for _, tt := range []struct{ query, want string }{
		{"q=web", "web-01"},
		{"q=10.0.0.12", "db-01"},
		{"q=REDHAT", ""},
		{"q=red+hat", "db-01"},
		{"q=esx-09", "clone-a,clone-b"},
		{"vcenter=vc2", "clone-a,clone-b"},
		{"power=poweredOn", "web-01,clone-a"},
		{"power=suspended", "clone-b"},
		{"protection=protected", "web-01"},
		{"protection=unprotected", "db-01,clone-a,clone-b"},
		{"vcenter=vc1&protection=unprotected&q=db", "db-01"},
	} {
		body := get(t, h, id, "/vms?"+tt.query, http.StatusOK)
		if got := strings.Join(vmNames(body), ","); got != tt.want {
			t.Errorf("?%s: VMs %q, want %q", tt.query, got, tt.want)
		}
		if !strings.Contains(body, `href="/vms">Clear</a>`) {
			t.Errorf("?%s: no way to clear the filters", tt.query)
		}
	}
	// The filter form keeps its values.
	body = get(t, h, id, "/vms?vcenter=vc2&power=suspended&q=clone", http.StatusOK)
	for _, want := range []string{`<option value="vc2" selected>`, `<option value="suspended" selected>`, `value="clone"`} {
		if !strings.Contains(body, want) {
			t.Errorf("filter form lacks %q", want)
		}
	}
}

func TestProtectForm(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)

	one := get(t, h, id, "/protect?vm=vc1/vm-11", http.StatusOK)
	for _, want := range []string{`id="ssh-0"`, `placeholder="root@10.0.0.12"`, `name="key"`, `name="known_hosts"`, `id="accept-0"`,
		`name="disks"`, `value="nbd" checked`, `value="scan"`, "every write", "scan interval plus the transfer",
		`<option value="gold">`, "Built-in (this server)", "file:///var/lib/asr/target"} {
		if !strings.Contains(one, want) {
			t.Errorf("protect form lacks %q", want)
		}
	}
	if strings.Contains(one, `id="ssh-1"`) || strings.Contains(one, "gold-failback") {
		t.Error("one VM gets several SSH fields, or a failback policy is offered")
	}
	two := get(t, h, id, "/protect?vm=vc1/vm-11&vm=vc1/vm-10", http.StatusOK)
	if !strings.Contains(two, `id="ssh-0"`) || !strings.Contains(two, `id="ssh-1"`) || !strings.Contains(two, "Enable replication of 2 VMs") {
		t.Error("two VMs do not get an SSH field each")
	}
	get(t, h, id, "/protect", http.StatusBadRequest)
	get(t, h, id, "/protect?vm=vc9/vm-1", http.StatusBadRequest)
}

func protectForm(csrf string, vms ...string) url.Values {
	f := url.Values{"csrf": {csrf}, "key": {fakeKey}, "disks": {"data=/dev/sdb\n\nlogs = /dev/sdc\n"}, "mode": {"scan"}, "policy": {"gold"},
		"known_hosts": {"10.0.0.12 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKnown"}}
	for i, vm := range vms {
		f.Add("vm", vm)
		f.Set(fmt.Sprintf("ssh-%d", i), fmt.Sprintf("root@10.0.0.%d:22", 12+i))
	}
	return f
}

func TestProtectValidation(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	for _, tt := range []struct {
		name string
		edit func(url.Values)
		want string
	}{
		{"no key", func(f url.Values) { f.Set("key", " ") }, "paste the SSH private key"},
		{"no disks", func(f url.Values) { f.Set("disks", "") }, "name the disks"},
		{"bad disk", func(f url.Values) { f.Set("disks", "data") }, "want NAME=DEVICE"},
		{"bad ssh", func(f url.Values) { f.Set("ssh-0", "10.0.0.12") }, "want USER@HOST"},
		{"bad mode", func(f url.Values) { f.Set("mode", "fast") }, "choose a replication mode"},
		{"failback policy", func(f url.Values) { f.Set("policy", "gold-failback") }, "no policy named gold-failback"},
	} {
		f := protectForm(csrf, "vc1/vm-11")
		tt.edit(f)
		w := post(t, h, id, "/protect", f, http.StatusUnprocessableEntity)
		body := w.Body.String()
		if !strings.Contains(body, tt.want) {
			t.Errorf("%s: the page does not say %q", tt.name, tt.want)
		}
		if strings.Contains(body, "b3BlbnNzaC1rZXktdjEAAAAAfakefakefake") {
			t.Errorf("%s: the page shows the private key", tt.name)
		}
	}
	if len(b.protects) != 0 {
		t.Errorf("invalid forms started jobs: %v", b.protects)
	}
	post(t, h, id, "/protect", protectForm(csrf), http.StatusBadRequest)
}

// TestProtectOneVM: one VM, one job, to its page; the request carries the
// form's values.
func TestProtectOneVM(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	f := protectForm(csrf, "vc1/vm-11")
	f.Set("install_dir", " /srv/asr ")
	f.Set("skip_uuid_check", "1")
	w := post(t, h, id, "/protect", f, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/jobs/job-1" {
		t.Errorf("redirect to %q", loc)
	}
	if len(b.protects) != 1 {
		t.Fatalf("%d Protect calls", len(b.protects))
	}
	got := b.protects[0]
	want := api.ProtectRequest{VCenter: "vc1", VM: "vm-11", SSH: "root@10.0.0.12:22", Key: fakeKey,
		KnownHosts: "10.0.0.12 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKnown", Mode: "scan", Policy: "gold",
		InstallDir: "/srv/asr", SkipUUIDCheck: true,
		Disks: []api.ProtectDisk{{Name: "data", Device: "/dev/sdb"}, {Name: "logs", Device: "/dev/sdc"}}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("request\n%+v\nwant\n%+v", got, want)
	}
}

// TestProtectHostKey: a guest whose host key is unknown starts nothing; the
// form comes back with the fingerprint to accept and without the key, the
// other VM's job started; submitting again with the key accepts it.
func TestProtectHostKey(t *testing.T) {
	b := newVMwareBackend()
	b.hostKeys["root@10.0.0.13:22"] = fakeHostKey
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)

	w := post(t, h, id, "/protect", protectForm(csrf, "vc1/vm-11", "vc1/vm-10"), http.StatusPreconditionRequired)
	body := w.Body.String()
	for _, want := range []string{`href="/jobs/job-1"`, "vc1/vm-11", `id="hostkey-0"`, fakeHostKey,
		`name="accept-0" type="text" class="mono" value="` + fakeHostKey + `"`, `name="vm" value="vc1/vm-10"`,
		`value="root@10.0.0.13:22"`, "data=/dev/sdb"} {
		if !strings.Contains(body, want) {
			t.Errorf("host key page lacks %q", want)
		}
	}
	if strings.Contains(body, `name="vm" value="vc1/vm-11"`) {
		t.Error("the VM whose job started is in the form again")
	}
	if strings.Contains(body, "b3BlbnNzaC1rZXktdjEAAAAAfakefakefake") {
		t.Error("the page shows the private key")
	}

	f := protectForm(csrf, "vc1/vm-10")
	f.Set("ssh-0", "root@10.0.0.13:22")
	f.Set("accept-0", fakeHostKey)
	w = post(t, h, id, "/protect", f, http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/jobs/job-2" {
		t.Errorf("redirect to %q", loc)
	}
	if last := b.protects[len(b.protects)-1]; last.AcceptHostKey != fakeHostKey {
		t.Errorf("accepted %q", last.AcceptHostKey)
	}
}

func TestProtectSeveralVMs(t *testing.T) {
	b := newVMwareBackend()
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	w := post(t, h, id, "/protect", protectForm(csrf, "vc1/vm-11", "vc1/vm-10"), http.StatusSeeOther)
	if loc := w.Header().Get("Location"); loc != "/jobs" {
		t.Errorf("redirect to %q", loc)
	}
	if len(b.protects) != 2 || b.protects[0].SSH != "root@10.0.0.12:22" || b.protects[1].SSH != "root@10.0.0.13:22" {
		t.Errorf("requests %+v", b.protects)
	}

	// A refusal shows plainly.
	b.protectFn = func(r api.ProtectRequest) error {
		return errors.New("VM db-01 shares its BIOS UUID with another VM")
	}
	w = post(t, h, id, "/protect", protectForm(csrf, "vc1/vm-11"), http.StatusUnprocessableEntity)
	if !strings.Contains(w.Body.String(), "shares its BIOS UUID") {
		t.Error("the refusal is not shown")
	}
}

func TestJobs(t *testing.T) {
	b := newVMwareBackend()
	b.jobs = []api.Job{
		{ID: "j-run", Kind: "protect", Subject: "vc1/db-01", State: api.JobRunning, StartedAt: testNow.Add(-30 * time.Second),
			Steps: []api.JobStep{{Name: "connect", State: "done", Detail: "root@10.0.0.12:22"},
				{Name: "copy", State: "running", Detail: "the agent's binary", Done: 12 << 20, Total: 48 << 20}}},
		{ID: "j-fail", Kind: "protect", Subject: "vc1/web-01", State: api.JobFailed, Error: "connect: connection refused",
			StartedAt: testNow.Add(-time.Hour), EndedAt: testNow.Add(-time.Hour + 3*time.Second),
			Steps: []api.JobStep{{Name: "connect", State: "failed", Detail: "dial tcp 127.0.0.1:1: connect: connection refused"}}},
	}
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)

	list := get(t, h, id, "/jobs", http.StatusOK)
	for _, want := range []string{`href="/jobs/j-run"`, `href="/jobs/j-fail"`, "vc1/db-01", "running for 30 s", "failed", "connect: connection refused", "1 h ago"} {
		if !strings.Contains(list, want) {
			t.Errorf("jobs list lacks %q", want)
		}
	}

	if !strings.Contains(list, `hx-get="/fragments/jobs"`) {
		t.Error("the jobs list does not refresh while a job runs")
	}
	if frag := get(t, h, id, "/fragments/jobs", http.StatusOK); !strings.HasPrefix(frag, `<section id="jobs-list"`) || !strings.Contains(list, frag) {
		t.Errorf("the jobs fragment is not the list of the page:\n%.300s", frag)
	}

	run := get(t, h, id, "/jobs/j-run", http.StatusOK)
	for _, want := range []string{`hx-get="/fragments/jobs/j-run"`, `hx-trigger="every 1s"`, `<progress value="12582912" max="50331648"`, "12 MiB of 48 MiB", "connect", "copy"} {
		if !strings.Contains(run, want) {
			t.Errorf("running job page lacks %q", want)
		}
	}
	frag := get(t, h, id, "/fragments/jobs/j-run", http.StatusOK)
	if !strings.HasPrefix(frag, `<section id="job"`) || !strings.Contains(run, frag) {
		t.Errorf("the fragment is not the job section of the page:\n%.300s", frag)
	}

	failed := get(t, h, id, "/jobs/j-fail", http.StatusOK)
	if strings.Contains(failed, "hx-trigger") || !strings.Contains(failed, "dial tcp 127.0.0.1:1") || !strings.Contains(failed, `id="job-error"`) {
		t.Errorf("an ended job still polls, or its error is not shown:\n%s", failed)
	}
	// The job ends while the page polls: the fragment stops the polling.
	b.jobs[0].State, b.jobs[0].EndedAt = api.JobSucceeded, testNow
	if frag := get(t, h, id, "/fragments/jobs/j-run", http.StatusOK); strings.Contains(frag, "hx-trigger") || !strings.Contains(frag, "succeeded") {
		t.Errorf("ended job's fragment:\n%s", frag)
	}
	if list := get(t, h, id, "/jobs", http.StatusOK); strings.Contains(list, "hx-trigger") {
		t.Error("the jobs list still refreshes with no job running")
	}
	get(t, h, id, "/jobs/nope", http.StatusNotFound)
}

func TestMachineVMLink(t *testing.T) {
	linked := protectedMachine
	linked.VM = &api.VMLink{VCenter: "vc1", Ref: "vm-11", Name: "sql-prod-vm", Host: "esx-02.lab", IPs: []string{"10.0.0.12", "fe80::1"}, Stale: true}
	linked.Disks = append([]api.Disk(nil), linked.Disks...)
	linked.Disks[0].Mode, linked.Disks[1].Mode = api.DiskModeScan, api.DiskModeNBD
	unlinked := disconnectedMachine
	unlinked.LinkProblem = api.LinkDuplicate
	b := newFakeBackend(linked, unlinked)
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	body := get(t, h, id, "/machines", http.StatusOK)
	for _, want := range []string{"VM sql-prod-vm", "on esx-02.lab", "10.0.0.12, fe80::1", ">stale</span>", api.LinkDuplicate, `id="machine-sql-prod"`,
		`<span class="disk-mode" title="periodic block scans: the RPO is the scan interval plus the transfer">scan</span>`,
		`<span class="disk-mode" title="every write, through the agent's NBD export">NBD</span>`} {
		if !strings.Contains(body, want) {
			t.Errorf("machines page lacks %q", want)
		}
	}
}

// TestVMwarePagesNoInlineCode keeps the new pages to the CSP, like
// TestNoInlineCode.
func TestVMwarePagesNoInlineCode(t *testing.T) {
	b := newVMwareBackend()
	b.jobs = []api.Job{{ID: "j1", Kind: "protect", State: api.JobRunning, StartedAt: testNow}}
	h := newTestHandler(t, b)
	id, _ := mustLogin(t, h, b)
	for _, path := range []string{"/vcenters", "/vcenters/vc1/remove", "/vms", "/protect?vm=vc1/vm-11", "/jobs", "/jobs/j1"} {
		body := get(t, h, id, path, http.StatusOK)
		for _, bad := range []string{" style=", " onclick=", " onsubmit=", "hx-on", "<style", "javascript:", "<script>"} {
			if strings.Contains(body, bad) {
				t.Errorf("%s: page contains %q", path, bad)
			}
		}
	}
}

// TestRenderVMwarePages compares the vCenter, inventory and job pages with
// testdata/page_*.golden.
func TestRenderVMwarePages(t *testing.T) {
	b := newVMwareBackend()
	b.jobs = []api.Job{{ID: "j-run", Kind: "protect", Subject: "vc1/db-01", State: api.JobRunning, StartedAt: testNow.Add(-30 * time.Second),
		Steps: []api.JobStep{{Name: "connect", State: "done", Detail: "root@10.0.0.12:22"},
			{Name: "copy", State: "running", Detail: "the agent's binary", Done: 12 << 20, Total: 48 << 20}}}}
	h := newTestHandler(t, b)
	id, csrf := mustLogin(t, h, b)
	for name, path := range map[string]string{
		"vcenters": "/vcenters", "vcenter_remove": "/vcenters/vc1/remove", "inventory": "/vms", "protect": "/protect?vm=vc1/vm-11",
		"jobs": "/jobs", "job": "/jobs/j-run",
	} {
		checkGolden(t, "page_"+name, get(t, h, id, path, http.StatusOK))
	}
	w := post(t, h, id, "/vcenters", url.Values{"csrf": {csrf}, "name": {"vc3"}, "url": {"https://vc3.lab/sdk"}, "user": {"admin"}, "password": {fakeVCPass}}, http.StatusOK)
	checkGolden(t, "page_vcenter_confirm", w.Body.String())
}
