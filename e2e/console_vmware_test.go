//go:build e2e

package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/mo"

	"github.com/asrdr/asr/vmware/vcsim"
)

// TestE2EConsoleVMware drives the VMware pages of the console in headless
// Chromium against the real server, govmomi's vCenter simulator and a real
// OpenSSH server standing for the guest: the vCenter is added through the
// form in its two steps (the certificate's thumbprint shown, the password
// asked again and never echoed), the inventory lists the simulator's VMs
// and filters them, and "Enable replication" of the guest's VM is refused
// for an SSH target nothing listens on, then asks to confirm the guest's
// unknown host key, then starts the push job, whose page follows its steps
// until initial replication has begun; the machines page shows the machine
// linked to its VM.
func TestE2EConsoleVMware(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	const vcPassword = "sim-Secret-pw-7331"
	sim, err := vcsim.Start("asr@vsphere.local", vcPassword)
	if err != nil {
		t.Fatal(err)
	}
	// Closed after the cluster's server has stopped (cleanups run last
	// first), so no discovery holds a connection to it.
	t.Cleanup(sim.Close)
	const size = 16 << 20
	{
		ctx := context.Background()
		gc, err := sim.Client(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sim.CreateVM(ctx, gc, vcsim.VMSpec{Name: "guest01", BIOSUUID: guestUUID, CPUs: 2, MemoryMiB: 2048, Disks: []int64{size}, PowerOn: true}); err != nil {
			t.Fatal(err)
		}
		gc.Logout(ctx)
	}
	wantVMs := simVMNames(t, sim)
	c := newCluster(t)

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("ignore-certificate-errors", true),
		chromedp.UserDataDir(t.TempDir()),
	)
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelA()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, 10*time.Minute) // a hung browser, not a pace
	defer cancelT()

	// A step that finds the page changing under it is done again
	// (runFresh, staleNode).
	do := func(steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		for _, step := range steps {
			_, err := runFresh(ctx, step)
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := runFresh(ctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	html := func() string {
		t.Helper()
		s, err := runFresh(ctx, chromedp.Evaluate[string]("document.documentElement.outerHTML"))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// waitFor polls what get returns until ok accepts it; the deadline
	// only ends a hung run.
	waitFor := func(what string, get func() string, ok func(string) bool) string {
		t.Helper()
		deadline := time.Now().Add(hungAfter)
		var got string
		for time.Now().Before(deadline) {
			if got = get(); ok(got) {
				return got
			}
			time.Sleep(250 * time.Millisecond)
		}
		t.Fatalf("never %s; the page shows:\n%s", what, got)
		return ""
	}

	token, err := os.ReadFile(filepath.Join(c.srvDir, "admin-token"))
	if err != nil {
		t.Fatal(err)
	}
	do(chromedp.Navigate(c.url()+"/login"),
		chromedp.WaitVisible(chromedp.CSS("#secret")),
		chromedp.SetValue(chromedp.CSS("#secret"), strings.TrimSpace(string(token))),
		chromedp.Submit(chromedp.CSS("#secret")),
		chromedp.WaitVisible(chromedp.CSS("#dashboard")))

	// Add the vCenter: the first step shows the certificate's thumbprint.
	do(chromedp.Click(chromedp.CSS(`nav a[href="/vcenters"]`)),
		chromedp.WaitVisible(chromedp.CSS("#vc-add")),
		chromedp.SetValue(chromedp.CSS("#vc-name"), "sim"),
		chromedp.SetValue(chromedp.CSS("#vc-url"), sim.URL),
		chromedp.SetValue(chromedp.CSS("#vc-user"), sim.User),
		chromedp.SetValue(chromedp.CSS("#vc-password"), vcPassword),
		chromedp.Click(chromedp.CSS("#vc-add")),
		chromedp.WaitVisible(chromedp.CSS("#thumbprint")))
	if got := text("#thumbprint"); !sameThumbprint(got, sim.Thumbprint) {
		t.Fatalf("the page shows thumbprint %q, the simulator's certificate has %s", got, sim.Thumbprint)
	}
	if strings.Contains(html(), vcPassword) {
		t.Fatal("the confirmation step puts the vCenter's password in the page")
	}
	if v, _ := chromedp.Run(ctx, chromedp.Value(chromedp.CSS("#vc-password"))); v != "" {
		t.Fatal("the password field is filled in the confirmation step")
	}
	// Confirmed with a wrong password: refused, shown plainly.
	do(chromedp.SetValue(chromedp.CSS("#vc-password"), "not-the-password"),
		chromedp.Click(chromedp.CSS("#vc-trust")),
		chromedp.WaitVisible(chromedp.CSS("#vcenter-error")))
	if e := text("#vcenter-error"); !strings.Contains(e, "not added") {
		t.Fatalf("a wrong password shows %q", e)
	}
	do(chromedp.SetValue(chromedp.CSS("#vc-password"), vcPassword),
		chromedp.Click(chromedp.CSS("#vc-trust")),
		chromedp.WaitVisible(chromedp.CSS("#vcenters")))
	if s := text("main"); !strings.Contains(s, "vCenter sim is registered") || !strings.Contains(s, sim.URL) {
		t.Fatalf("after adding, the vCenters page shows:\n%s", s)
	}
	if strings.Contains(html(), vcPassword) {
		t.Fatal("the vCenters page shows the password")
	}

	// The inventory lists the simulator's VMs once discovered (the page
	// is loaded again until then).
	inventory := func() string {
		t.Helper()
		do(chromedp.Navigate(c.url()+"/vms"), chromedp.WaitVisible(chromedp.CSS("#vm-filter")))
		return text("main")
	}
	waitFor("listed every VM of the simulator", inventory, func(s string) bool {
		return !slices.ContainsFunc(wantVMs, func(n string) bool { return !strings.Contains(s, n) })
	})
	const vm = "guest01"
	do(chromedp.SetValue(chromedp.CSS("#f-q"), vm),
		chromedp.Click(chromedp.CSS("#filter")))
	// The old page shows a count too until the filtered one replaces it:
	// wait for the filtered count, not for any count.
	waitFor("the list filtered on "+vm, func() string { return text("#vm-count") }, func(s string) bool { return strings.HasPrefix(s, "1 of ") })

	// The guest: a real sshd, root logging in with the test's key; its
	// disk a file, the agent installed in a directory of the test.
	sshd := startSSHD(t)
	keyPEM, err := os.ReadFile(sshd.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	key := string(keyPEM)
	keyBody := strings.Split(key, "\n")[1]
	guest := t.TempDir()
	disk := filepath.Join(guest, "disk0.img")
	makeDisk(t, disk, size, 11)
	install := filepath.Join(guest, "opt-asr")
	t.Cleanup(func() { killPidFile(filepath.Join(install, "agent.pid")) })

	// First to an SSH port nothing listens on: refused plainly, nothing
	// started, and the key is not sent back.
	do(chromedp.Click(chromedp.CSS(`tr[data-vm="`+vm+`"] input[type="checkbox"]`)),
		chromedp.Click(chromedp.CSS("#enable-replication")),
		chromedp.WaitVisible(chromedp.CSS("#protect-submit")))
	if n, _ := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("input[name^=ssh-]").length`)); n != 1 {
		t.Fatalf("one VM selected, %d SSH target fields", n)
	}
	do(chromedp.SetValue(chromedp.CSS("#ssh-0"), "root@127.0.0.1:"+freePort(t)),
		chromedp.SetValue(chromedp.CSS("#key"), key),
		chromedp.SetValue(chromedp.CSS("#disks"), "d0="+disk),
		chromedp.Click(chromedp.CSS("details.advanced summary")),
		chromedp.SetValue(chromedp.CSS("#install_dir"), install),
		chromedp.Click(chromedp.CSS("#skip_uuid_check")),
		chromedp.Click(chromedp.CSS("#protect-submit")),
		chromedp.WaitVisible(chromedp.CSS("#target-error-0")))
	if e := text("#target-error-0"); !strings.Contains(e, "nothing was done") {
		t.Fatalf("the push to a closed port shows %q", e)
	}
	if strings.Contains(html(), keyBody) {
		t.Fatal("the form shown again holds the private key")
	}
	if _, err := os.Stat(install); !os.IsNotExist(err) {
		t.Fatalf("a refused push left %s: %v", install, err)
	}

	// To the guest: its host key is not known, so the form comes back
	// with the fingerprint to confirm, filled in.
	do(chromedp.SetValue(chromedp.CSS("#ssh-0"), "root@"+sshd.Addr),
		chromedp.SetValue(chromedp.CSS("#key"), key),
		chromedp.Click(chromedp.CSS("#protect-submit")),
		chromedp.WaitVisible(chromedp.CSS("#hostkey-0")))
	fp := sshd.fingerprint()
	if s := text("#hostkey-0"); !strings.Contains(s, fp) {
		t.Fatalf("the host key confirmation shows %q, the guest's key is %s", s, fp)
	}
	if v, _ := chromedp.Run(ctx, chromedp.Value(chromedp.CSS("#accept-0"))); v != fp {
		t.Fatalf("the accepted host key field holds %q, want %s", v, fp)
	}
	if v, _ := chromedp.Run(ctx, chromedp.Value(chromedp.CSS("#key"))); v != "" || strings.Contains(html(), keyBody) {
		t.Fatal("the confirmation step sends the private key back")
	}
	if _, err := os.Stat(install); !os.IsNotExist(err) {
		t.Fatalf("an unconfirmed host left %s: %v", install, err)
	}
	// Confirmed (the key typed again): the job starts, its page follows it.
	do(chromedp.SetValue(chromedp.CSS("#key"), key),
		chromedp.Click(chromedp.CSS("#protect-submit")),
		chromedp.WaitVisible(chromedp.CSS("#job-steps")))
	loc, err := chromedp.Run(ctx, chromedp.Location())
	if err != nil || !strings.Contains(loc, "/jobs/") {
		t.Fatalf("after submitting, the browser is at %s (%v), not a job's page", loc, err)
	}
	if h := text("h1"); !strings.Contains(h, "protect") || !strings.Contains(h, vm) {
		t.Fatalf("the job page is titled %q", h)
	}
	state := func() string {
		s, err := runFresh(ctx, chromedp.AttributeValue(chromedp.CSS("#job"), "data-state"))
		if err != nil {
			t.Fatal(err)
		}
		return s.Value
	}
	// The page follows the job by itself (htmx polling) until it ends.
	waitFor("saw the job end", state, func(s string) bool { return s != "running" })
	steps := text("#job-steps")
	t.Logf("the job's steps:\n%s", steps)
	if s := state(); s != "succeeded" {
		t.Fatalf("the job ended %q: %s", s, text("#job"))
	}
	for _, step := range []string{"connect", "copy", "registration", "initial replication"} {
		if !strings.Contains(steps, step) {
			t.Fatalf("the job's steps lack %q", step)
		}
	}
	if after, _ := chromedp.Run(ctx, chromedp.Location()); after != loc {
		t.Fatalf("the page navigated (%s -> %s): the refresh should be in place", loc, after)
	}
	if strings.Contains(html(), keyBody) {
		t.Fatal("the job page shows the private key")
	}
	do(chromedp.Click(chromedp.CSS(`nav a[href="/jobs"]`)), chromedp.WaitVisible(chromedp.CSS("#jobs")))
	if s := text("#jobs"); !strings.Contains(s, vm) || !strings.Contains(s, "succeeded") {
		t.Fatalf("the jobs list shows:\n%s", s)
	}

	// The machines page shows the new machine with its VM.
	do(chromedp.Click(chromedp.CSS(`nav a[href="/machines"]`)), chromedp.WaitVisible(chromedp.CSS("#machines")))
	waitFor("showed the machine linked to its VM", func() string { return text("#machines") },
		func(s string) bool { return strings.Contains(s, "VM "+vm) })
	if b, err := os.ReadFile(filepath.Join(c.dir, "server.log")); err == nil && strings.Contains(string(b), keyBody) {
		t.Fatal("the server's log holds the private key")
	}
}

// simVMNames lists the simulator's VMs (not templates) by name.
func simVMNames(t *testing.T, sim *vcsim.Sim) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := sim.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Logout(ctx)
	m := view.NewManager(c.Client)
	v, err := m.CreateContainerView(ctx, c.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Destroy(ctx)
	var vms []mo.VirtualMachine
	if err := v.Retrieve(ctx, []string{"VirtualMachine"}, []string{"name", "config.template"}, &vms); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, vm := range vms {
		if vm.Config == nil || !vm.Config.Template {
			names = append(names, vm.Name)
		}
	}
	if len(names) == 0 {
		t.Fatal("the simulator has no VM")
	}
	slices.Sort(names)
	return names
}

// sameThumbprint compares SHA-256 thumbprints whatever their case and
// separators.
func sameThumbprint(a, b string) bool {
	norm := func(s string) string {
		return strings.ToUpper(strings.NewReplacer(":", "", " ", "", "\n", "").Replace(strings.TrimSpace(s)))
	}
	return norm(a) != "" && norm(a) == norm(b)
}
