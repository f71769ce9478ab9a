package vmware

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// recorder keeps what a watcher's callbacks reported.
type recorder struct {
	mu       sync.Mutex
	changes  [][]VM
	statuses []Status
}

func (r *recorder) opts(buf *syncBuffer) WatchOptions {
	return WatchOptions{
		OnChange: func(vms []VM) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.changes = append(r.changes, vms)
		},
		OnStatus: func(st Status) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.statuses = append(r.statuses, st)
		},
		MinBackoff: 20 * time.Millisecond,
		MaxBackoff: 200 * time.Millisecond,
		MaxWait:    time.Second,
		Logger:     testLogger(buf),
	}
}

func (r *recorder) last() []VM {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.changes) == 0 {
		return nil
	}
	return r.changes[len(r.changes)-1]
}

// mustWatch starts a watcher on the simulator; the cleanup closes it and
// checks that the password was never logged.
func mustWatch(t *testing.T, ep Endpoint, r *recorder) (*Watcher, *syncBuffer) {
	t.Helper()
	buf := new(syncBuffer)
	w := Watch(context.Background(), ep, r.opts(buf))
	t.Cleanup(func() {
		w.Close()
		if strings.Contains(buf.String(), ep.Password) {
			t.Errorf("the log shows the password:\n%s", buf)
		}
	})
	return w, buf
}

// mustClient is a second, independent client of the simulator: it makes
// the changes the watcher must see, and reads the truth to compare with.
func mustClient(t *testing.T, ep Endpoint) (*govmomi.Client, *find.Finder) {
	t.Helper()
	c, err := Connect(ctxT(t), ep)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Logout(context.Background()) })
	f := find.NewFinder(c.Client)
	dc, err := f.DefaultDatacenter(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	f.SetDatacenter(dc)
	return c, f
}

func connected(st Status, _ []VM) bool { return st.Connected }

func byName(vms []VM, name string) *VM {
	for i := range vms {
		if vms[i].Name == name {
			return &vms[i]
		}
	}
	return nil
}

func byRef(vms []VM, ref string) *VM {
	for i := range vms {
		if vms[i].Ref == ref {
			return &vms[i]
		}
	}
	return nil
}

func mustTask(t *testing.T, task *object.Task, err error) {
	t.Helper()
	if err == nil {
		err = task.Wait(ctxT(t))
	}
	if err != nil {
		t.Fatal(err)
	}
}

// TestDiscoverFields checks every field of every simulator VM against
// what an independent client reads from the simulator.
func TestDiscoverFields(t *testing.T) {
	s := mustSim(t)
	r := new(recorder)
	w, _ := mustWatch(t, s.ep, r)
	vms := waitFor(t, w, "connected", connected)
	ctx := ctxT(t)
	c, _ := mustClient(t, s.ep)

	st := w.Status()
	if !strings.Contains(st.About, "VMware vCenter Server") || st.VMs != len(vms) || st.LastError != "" ||
		st.LastUpdate.IsZero() || st.Since.IsZero() {
		t.Fatalf("status %+v", st)
	}
	if len(vms) != 4 {
		t.Fatalf("%d VMs, want the VPX model's 4", len(vms))
	}
	if !slices.IsSortedFunc(vms, func(a, b VM) int { return strings.Compare(a.Name, b.Name) }) {
		t.Fatal("VMs not sorted by name")
	}
	if got := r.last(); !slicesEqualJSON(got, vms) {
		t.Fatal("OnChange's last list differs from VMs()")
	}

	name := func(ref types.ManagedObjectReference) string {
		t.Helper()
		n, err := object.NewCommon(c.Client, ref).ObjectName(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	for _, v := range vms {
		var m mo.VirtualMachine
		ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: v.Ref}
		if err := c.RetrieveOne(ctx, ref, nil, &m); err != nil {
			t.Fatal(err)
		}
		if v.VCenter != "vc1" || v.Name != m.Name || v.BIOSUUID != strings.ToLower(m.Config.Uuid) ||
			v.InstanceUUID != strings.ToLower(m.Config.InstanceUuid) || v.BIOSUUID == "" || v.InstanceUUID == "" {
			t.Errorf("%s: identity %+v", m.Name, v)
		}
		if v.PowerState != string(m.Runtime.PowerState) || v.PowerState != "poweredOn" {
			t.Errorf("%s: power state %q, want %q", m.Name, v.PowerState, m.Runtime.PowerState)
		}
		// The simulator gives no guestFullName: the guest id stands in.
		if want := cmpOr(m.Config.GuestFullName, m.Config.GuestId); v.GuestOS != want || v.GuestOS == "" {
			t.Errorf("%s: guest OS %q, want %q", m.Name, v.GuestOS, want)
		}
		if v.CPUs != m.Config.Hardware.NumCPU || v.MemoryMiB != m.Config.Hardware.MemoryMB || v.CPUs == 0 || v.MemoryMiB == 0 {
			t.Errorf("%s: %d CPUs %d MiB", m.Name, v.CPUs, v.MemoryMiB)
		}
		// Without VMware Tools the simulator reports no guest network
		// or host name: nothing to show, and nothing invented.
		if wantIPs := ips(m.Guest.IpAddress, types.ArrayOfGuestNicInfo{GuestNicInfo: m.Guest.Net}); !slices.Equal(v.IPs, wantIPs) ||
			v.GuestHostName != m.Guest.HostName {
			t.Errorf("%s: IPs %v host name %q, want %v %q", m.Name, v.IPs, v.GuestHostName, wantIPs, m.Guest.HostName)
		}
		if v.Host != name(*m.Runtime.Host) || v.Folder != name(*m.Parent) || v.ResourcePool != name(*m.ResourcePool) ||
			v.Folder != "vm" || v.ResourcePool != "Resources" {
			t.Errorf("%s: host %q folder %q pool %q", m.Name, v.Host, v.Folder, v.ResourcePool)
		}
		wantCluster := ""
		if strings.HasPrefix(m.Name, "DC0_C0_") {
			wantCluster = "DC0_C0"
		}
		if v.Cluster != wantCluster {
			t.Errorf("%s: cluster %q, want %q", m.Name, v.Cluster, wantCluster)
		}
		if !slices.Equal(v.Datastores, []string{"LocalDS_0"}) || len(m.Datastore) != 1 || v.Datastores[0] != name(m.Datastore[0]) {
			t.Errorf("%s: datastores %v", m.Name, v.Datastores)
		}
		if len(v.Networks) != 1 || len(m.Network) != 1 || v.Networks[0] != name(m.Network[0]) {
			t.Errorf("%s: networks %v, want %v", m.Name, v.Networks, m.Network)
		}
		if v.Template {
			t.Errorf("%s: a template", m.Name)
		}
		devs := object.VirtualDeviceList(m.Config.Hardware.Device)
		wantDisks := devs.SelectByType((*types.VirtualDisk)(nil))
		if len(v.Disks) != len(wantDisks) || len(v.Disks) == 0 {
			t.Fatalf("%s: %d disks, want %d", m.Name, len(v.Disks), len(wantDisks))
		}
		for i, d := range v.Disks {
			vd := wantDisks[i].(*types.VirtualDisk)
			ctl := devs.FindByKey(vd.ControllerKey)
			path := vd.Backing.(types.BaseVirtualDeviceFileBackingInfo).GetVirtualDeviceFileBackingInfo().FileName
			if d.Key != vd.Key || d.Label != vd.DeviceInfo.GetDescription().Label || d.CapacityBytes != vd.CapacityInBytes ||
				d.CapacityBytes == 0 || d.Path != path || d.Datastore != "LocalDS_0" || !strings.HasPrefix(d.Path, "[LocalDS_0] ") ||
				d.ControllerKey != vd.ControllerKey || ctl == nil || d.Controller != ctl.GetVirtualDevice().DeviceInfo.GetDescription().Label ||
				d.Controller == "" || d.Unit != *vd.UnitNumber {
				t.Errorf("%s: disk %+v\nwant %+v", m.Name, d, vd)
			}
		}
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func slicesEqualJSON(a, b []VM) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Ref != b[i].Ref || a[i].Name != b[i].Name || len(a[i].Disks) != len(b[i].Disks) {
			return false
		}
	}
	return true
}

// TestDiscoverLiveUpdates makes changes with a second client and waits,
// on the watcher's events, for each to show.
func TestDiscoverLiveUpdates(t *testing.T) {
	s := mustSim(t)
	r := new(recorder)
	w, _ := mustWatch(t, s.ep, r)
	vms := waitFor(t, w, "connected", connected)
	ctx := ctxT(t)
	c, f := mustClient(t, s.ep)

	// Rename.
	vm0, err := f.VirtualMachine(ctx, "DC0_H0_VM0")
	if err != nil {
		t.Fatal(err)
	}
	ref0 := vm0.Reference().Value
	task, err := vm0.Rename(ctx, "A-renamed-vm")
	mustTask(t, task, err)
	vms = waitFor(t, w, "the rename", func(_ Status, vms []VM) bool {
		v := byRef(vms, ref0)
		return v != nil && v.Name == "A-renamed-vm"
	})
	if vms[0].Ref != ref0 {
		t.Fatalf("the renamed VM is not first by name: %v", vms[0].Name)
	}

	// Power off.
	vm1, err := f.VirtualMachine(ctx, "DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	task, err = vm1.PowerOff(ctx)
	mustTask(t, task, err)
	waitFor(t, w, "power off", func(_ Status, vms []VM) bool {
		v := byName(vms, "DC0_H0_VM1")
		return v != nil && v.PowerState == "poweredOff"
	})

	// Create a VM with a controller and a disk.
	folder, err := f.Folder(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	pool, err := f.ResourcePool(ctx, "DC0_H0/Resources")
	if err != nil {
		t.Fatal(err)
	}
	var devs object.VirtualDeviceList
	scsi, err := devs.CreateSCSIController("pvscsi")
	if err != nil {
		t.Fatal(err)
	}
	devs = append(devs, scsi)
	disk := devs.CreateDisk(scsi.(types.BaseVirtualController), types.ManagedObjectReference{}, "")
	disk.CapacityInKB = 1 << 20 // 1 GiB
	devs = append(devs, disk)
	changes, err := devs.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range changes {
		if ch.GetVirtualDeviceConfigSpec().Device == disk {
			ch.GetVirtualDeviceConfigSpec().FileOperation = types.VirtualDeviceConfigSpecFileOperationCreate
		}
	}
	spec := types.VirtualMachineConfigSpec{
		Name:         "new-vm",
		GuestId:      "otherGuest64",
		NumCPUs:      2,
		MemoryMB:     64,
		Files:        &types.VirtualMachineFileInfo{VmPathName: "[LocalDS_0]"},
		DeviceChange: changes,
	}
	task, err = folder.CreateVM(ctx, spec, pool, nil)
	if err != nil {
		t.Fatal(err)
	}
	info, err := task.WaitForResult(ctx)
	if err != nil {
		t.Fatal(err)
	}
	newRef := info.Result.(types.ManagedObjectReference)
	vms = waitFor(t, w, "the new VM", func(_ Status, vms []VM) bool {
		v := byRef(vms, newRef.Value)
		return v != nil && v.Name == "new-vm" && len(v.Disks) == 1 && v.Host != ""
	})
	nv := byRef(vms, newRef.Value)
	if nv.CPUs != 2 || nv.MemoryMiB != 64 || nv.GuestOS == "" || nv.BIOSUUID == "" || nv.Folder != "vm" ||
		nv.Host != "DC0_H0" || nv.Cluster != "" || nv.ResourcePool != "Resources" ||
		nv.Disks[0].CapacityBytes != 1<<30 || nv.Disks[0].Datastore != "LocalDS_0" || nv.Disks[0].Controller == "" {
		t.Fatalf("new VM %+v", nv)
	}
	if len(vms) != 5 {
		t.Fatalf("%d VMs, want 5", len(vms))
	}

	// Grow its disk to 2 GiB.
	newVM := object.NewVirtualMachine(c.Client, newRef)
	cur, err := newVM.Device(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d := cur.SelectByType((*types.VirtualDisk)(nil))[0].(*types.VirtualDisk)
	d.CapacityInKB = 2 << 20
	d.CapacityInBytes = 2 << 30
	task, err = newVM.Reconfigure(ctx, types.VirtualMachineConfigSpec{DeviceChange: []types.BaseVirtualDeviceConfigSpec{
		&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationEdit, Device: d},
	}})
	mustTask(t, task, err)
	waitFor(t, w, "the grown disk", func(_ Status, vms []VM) bool {
		v := byRef(vms, newRef.Value)
		return v != nil && len(v.Disks) == 1 && v.Disks[0].CapacityBytes == 2<<30
	})

	// Add a second disk.
	cur, err = newVM.Device(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ctl, err := cur.FindDiskController("scsi")
	if err != nil {
		t.Fatal(err)
	}
	d2 := cur.CreateDisk(ctl, types.ManagedObjectReference{}, "")
	d2.CapacityInKB = 3 << 20
	task, err = newVM.Reconfigure(ctx, types.VirtualMachineConfigSpec{DeviceChange: []types.BaseVirtualDeviceConfigSpec{
		&types.VirtualDeviceConfigSpec{
			Operation:     types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
			Device:        d2,
		},
	}})
	mustTask(t, task, err)
	vms = waitFor(t, w, "the added disk", func(_ Status, vms []VM) bool {
		v := byRef(vms, newRef.Value)
		return v != nil && len(v.Disks) == 2
	})
	nd := byRef(vms, newRef.Value).Disks
	if nd[0].Key >= nd[1].Key || nd[1].CapacityBytes != 3<<30 || nd[1].ControllerKey != nd[0].ControllerKey ||
		nd[1].Unit == nd[0].Unit || nd[1].Path == nd[0].Path || nd[1].Controller != nd[0].Controller {
		t.Fatalf("disks after the add: %+v", nd)
	}

	// Destroy it.
	task, err = newVM.Destroy(ctx)
	mustTask(t, task, err)
	waitFor(t, w, "the destroyed VM gone", func(_ Status, vms []VM) bool {
		return len(vms) == 4 && byRef(vms, newRef.Value) == nil
	})

	if got := r.last(); len(got) != 4 || byRef(got, newRef.Value) != nil {
		t.Fatalf("OnChange's last list: %d VMs", len(got))
	}
	if st := w.Status(); !st.Connected || st.VMs != 4 {
		t.Fatalf("status %+v", st)
	}
}

// restart serves the simulator's model again on the same address, with
// tlsConf (nil: the certificate it had). The simulator cannot register
// its handlers twice on one mux, so the restart gets a fresh mux with
// the SDK's two paths.
func (s *sim) restart(t *testing.T, tlsConf *tls.Config) {
	t.Helper()
	svc := s.model.Service
	path := s.server.URL.Path
	mux := http.NewServeMux()
	mux.HandleFunc(path, svc.ServeSDK)
	mux.HandleFunc(path+"/vimService", svc.ServeSDK)
	svc.ServeMux = mux
	if tlsConf != nil {
		svc.TLS = tlsConf
	}
	addr := s.server.URL.Host
	s.server = svc.NewServer() // listens on svc.Listen: the old address
	if s.server.URL.Host != addr {
		t.Fatalf("restarted on %s, not %s", s.server.URL.Host, addr)
	}
}

// stop ends the simulator's server and its connections (the watcher's
// long poll included) at once.
func (s *sim) stop() {
	s.server.CloseClientConnections()
	s.server.Close()
}

// mustOtherCert is a self-signed certificate for 127.0.0.1 other than the
// simulator's.
func mustOtherCert(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42),
		Subject:      pkix.Name{CommonName: "vcsim"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestDiscoverOutage stops the vCenter, checks the watcher keeps its VMs
// and says it is disconnected, brings the vCenter back on the same
// address, then back with another certificate, then with the pinned one.
func TestDiscoverOutage(t *testing.T) {
	s := mustSim(t)
	r := new(recorder)
	w, _ := mustWatch(t, s.ep, r)
	before := waitFor(t, w, "connected", connected)
	since := w.Status().Since

	s.stop()
	waitFor(t, w, "disconnected", func(st Status, _ []VM) bool { return !st.Connected && st.LastError != "" })
	if vms := w.VMs(); len(vms) != len(before) || len(vms) != 4 {
		t.Fatalf("%d VMs kept through the outage, want %d", len(vms), len(before))
	}
	if st := w.Status(); st.VMs != 4 || !st.Since.After(since) || st.About == "" {
		t.Fatalf("status in the outage %+v", st)
	}
	r.mu.Lock()
	for _, ch := range r.changes {
		if len(ch) == 0 {
			t.Error("OnChange was called with an empty list")
		}
	}
	sawDown := slices.ContainsFunc(r.statuses, func(st Status) bool { return !st.Connected && st.LastError != "" })
	r.mu.Unlock()
	if !sawDown {
		t.Fatal("OnStatus did not report the outage")
	}

	// Back, same certificate: the watcher reconnects and updates flow.
	s.restart(t, nil)
	waitFor(t, w, "reconnected", connected)
	ctx := ctxT(t)
	_, f := mustClient(t, s.ep)
	vm, err := f.VirtualMachine(ctx, "DC0_C0_RP0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	task, err := vm.Rename(ctx, "after-the-outage")
	mustTask(t, task, err)
	waitFor(t, w, "a rename after the reconnection", func(_ Status, vms []VM) bool {
		return byRef(vms, vm.Reference().Value) != nil && byRef(vms, vm.Reference().Value).Name == "after-the-outage"
	})

	// Back with another certificate: the watcher says so, and what to do.
	s.stop()
	other := mustOtherCert(t)
	pinned := s.model.Service.TLS
	s.restart(t, &tls.Config{Certificates: []tls.Certificate{other}})
	leaf, _ := x509.ParseCertificate(other.Certificate[0])
	newTP := certThumbprint(leaf)
	st := waitFor(t, w, "the certificate change reported", func(st Status, _ []VM) bool {
		return !st.Connected && strings.Contains(st.LastError, "changed")
	})
	_ = st
	msg := w.Status().LastError
	if !strings.Contains(msg, "the certificate of "+s.server.URL.Host+" changed: expected "+s.ep.Thumbprint+", got "+newTP) ||
		!strings.Contains(msg, "--thumbprint "+newTP) {
		t.Fatalf("LastError %q", msg)
	}
	if len(w.VMs()) != 4 {
		t.Fatal("VMs lost on a certificate change")
	}

	// The operator puts the pinned certificate back: the watcher retried
	// all along and connects again.
	s.stop()
	s.restart(t, pinned)
	waitFor(t, w, "reconnected after the certificate came back", connected)
}

// TestWatchBadLogin: a refused login is the watcher's status (retried on
// the backoff), and neither the status nor the log shows the password.
func TestWatchBadLogin(t *testing.T) {
	s := mustSim(t)
	ep := s.ep
	ep.Password = "Wr0ng-Secret-Passw0rd"
	r := new(recorder)
	w, buf := mustWatch(t, ep, r)
	waitFor(t, w, "the login failure", func(st Status, _ []VM) bool {
		return !st.Connected && strings.Contains(st.LastError, ErrLogin.Error())
	})
	if st := w.Status(); strings.Contains(st.LastError, ep.Password) || w.VMs() != nil {
		t.Fatalf("status %+v", st)
	}
	w.Close()
	if strings.Contains(buf.String(), ep.Password) || !strings.Contains(buf.String(), "login failed") {
		t.Fatalf("log:\n%s", buf)
	}
}

// TestWatchClose: Close ends the goroutine and the session even while the
// watcher is in a long poll, and no callback runs after it.
func TestWatchClose(t *testing.T) {
	s := mustSim(t)
	r := new(recorder)
	buf := new(syncBuffer)
	opts := r.opts(buf)
	opts.MaxWait = time.Minute // Close must not wait for the poll to end
	w := Watch(context.Background(), s.ep, opts)
	waitFor(t, w, "connected", connected)
	start := time.Now()
	w.Close()
	if took := time.Since(start); took > 30*time.Second {
		t.Fatalf("Close took %s", took)
	}
	r.mu.Lock()
	n := len(r.changes) + len(r.statuses)
	r.mu.Unlock()
	w.Close() // twice is harmless
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.changes)+len(r.statuses) != n {
		t.Fatal("a callback ran after Close")
	}
}
