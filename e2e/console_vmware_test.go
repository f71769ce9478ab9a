//go:build e2e

package e2e

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
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
	"golang.org/x/crypto/ssh"

	"github.com/asrdr/asr/vmware/vcsim"
)

// TestE2EConsoleVMware drives the VMware pages of the console in headless
// Chromium against the real server and govmomi's vCenter simulator: the
// vCenter is added through the form in its two steps (the certificate's
// thumbprint shown, the password asked again and never echoed), the
// inventory lists the simulator's VMs and filters them, and "Enable
// replication" of one VM starts a protect job whose page shows its steps.
// The job's SSH target is a loopback port nothing listens on, so the job
// fails for real in its connect step, and the page says so.
func TestE2EConsoleVMware(t *testing.T) {
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

	// The job page's section is swapped by htmx's polling: a node found can
	// be gone when it is read. That read is done again.
	stale := func(err error) bool { return err != nil && strings.Contains(err.Error(), "node with given id") }
	do := func(steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		for _, step := range steps {
			_, err := chromedp.Run(ctx, step)
			for stale(err) {
				_, err = chromedp.Run(ctx, step)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
		for stale(err) {
			s, err = chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
		}
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	html := func() string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Evaluate[string]("document.documentElement.outerHTML"))
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
		chromedp.WaitVisible(chromedp.CSS("#machines")))

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
	vm := wantVMs[0]
	do(chromedp.SetValue(chromedp.CSS("#f-q"), vm),
		chromedp.Click(chromedp.CSS("#filter")),
		chromedp.WaitVisible(chromedp.CSS("#vm-count")))
	if s := text("#vm-count"); !strings.HasPrefix(s, "1 of ") {
		t.Fatalf("filtering on %s: %s", vm, s)
	}

	// Enable replication of that VM, over SSH to a port nothing listens on.
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	key := string(pem.EncodeToMemory(block))
	keyBody := strings.Split(key, "\n")[1]
	target := "root@127.0.0.1:" + freePort(t)
	do(chromedp.Click(chromedp.CSS(`tr[data-vm="`+vm+`"] input[type="checkbox"]`)),
		chromedp.Click(chromedp.CSS("#enable-replication")),
		chromedp.WaitVisible(chromedp.CSS("#protect-submit")),
		chromedp.SetValue(chromedp.CSS("#ssh-0"), target),
		chromedp.SetValue(chromedp.CSS("#key"), key),
		chromedp.SetValue(chromedp.CSS("#disks"), "data=/dev/sdb"),
		chromedp.Click(chromedp.CSS("#protect-submit")),
		chromedp.WaitVisible(chromedp.CSS("#job-steps")))
	loc, err := chromedp.Run(ctx, chromedp.Location())
	if err != nil || !strings.Contains(loc, "/jobs/") {
		t.Fatalf("after submitting, the browser is at %s (%v), not a job's page", loc, err)
	}
	if h := text("h1"); !strings.Contains(h, "protect") || !strings.Contains(h, vm) {
		t.Fatalf("the job page is titled %q", h)
	}
	// The page follows the job by itself (htmx polling) until it ends.
	state := func() string {
		s, err := chromedp.Run(ctx, chromedp.AttributeValue(chromedp.CSS("#job"), "data-state"))
		for stale(err) {
			s, err = chromedp.Run(ctx, chromedp.AttributeValue(chromedp.CSS("#job"), "data-state"))
		}
		if err != nil {
			t.Fatal(err)
		}
		return s.Value
	}
	waitFor("saw the job end", state, func(s string) bool { return s != "running" })
	if s := state(); s != "failed" {
		t.Fatalf("the job to a closed port ended %q", s)
	}
	steps := text("#job-steps")
	t.Logf("the job's steps:\n%s\nerror: %s", steps, text("#job-error"))
	if !strings.Contains(steps, "connect") || !strings.Contains(steps, "failed") {
		t.Fatalf("the job's steps do not show the failed connect step:\n%s", steps)
	}
	if e := text("#job-error"); !strings.Contains(e, "refused") && !strings.Contains(e, "127.0.0.1") {
		t.Fatalf("the job's error does not say why: %s", e)
	}
	if after, _ := chromedp.Run(ctx, chromedp.Location()); after != loc {
		t.Fatalf("the page navigated (%s -> %s): the refresh should be in place", loc, after)
	}
	if strings.Contains(html(), keyBody) {
		t.Fatal("the job page shows the private key")
	}
	// The jobs list has it too.
	do(chromedp.Click(chromedp.CSS(`nav a[href="/jobs"]`)), chromedp.WaitVisible(chromedp.CSS("#jobs")))
	if s := text("#jobs"); !strings.Contains(s, vm) || !strings.Contains(s, "failed") {
		t.Fatalf("the jobs list shows:\n%s", s)
	}
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
