//go:build e2e

package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
	"github.com/chromedp/chromedp"

	"github.com/asrdr/asr/azure/azuritetest"
	"github.com/asrdr/asr/azure/fakearm"
)

// azureFailbackCase is machine "m" (one 32 MiB disk) protected by the
// real server to a container in Azurite, failed over to Azure (the
// Azure SDK's fake ARM, served over HTTPS by the test, its disks page
// blobs in Azurite) and committed. The server reaches ARM as it would a
// national cloud: --azure-arm-endpoint, --azure-authority-host and
// --azure-ca-file, with a client secret in its environment that the
// fake tenant's token endpoint takes. Never real Azure.
type azureFailbackCase struct {
	*failbackCase
	arm *fakearm.ARM
	srv *fakearm.Server
	// recovered is the page blob the recovered VM's managed disk was
	// imported from: the fake ARM's read SAS reads it, so it stands for
	// the managed disk, and the test writes into it as the recovered
	// guest would.
	recovered *pageblob.Client
	rnd       *rand.Rand
}

const azureFailbackSize = 32 << 20

func startAzureFailbackCase(t *testing.T) *azureFailbackCase {
	t.Helper()
	az := azuritetest.New(t)
	f := fakearm.NewAzurite(t)
	srv := fakearm.Serve(t, f)
	env := append([]string{"AZURE_STORAGE_CONNECTION_STRING=" + az.ConnString()}, srv.Env()...)
	c := newFailoverClusterEnv(t, env, "--target", "azure://"+azuritetest.Account+"/vault1",
		"--azure-arm-endpoint", srv.URL, "--azure-authority-host", srv.URL, "--azure-ca-file", srv.CAFile)
	fc := &failbackCase{c: c, disk: filepath.Join(c.dir, "d.img")}
	makeDisk(t, fc.disk, azureFailbackSize, 17)
	a := c.startAgent("m", nil, "d="+fc.disk)
	c.waitState("m", "protected", hungAfter)
	fc.fio(a.uri("d"), "fwd", 1<<20)
	point := c.tag("m")
	r := c.failover("--machine", "m", "--point", point, "--to", "azure", "--subscription", fakearm.Subscription,
		"--resource-group", "net-rg", "--location", "westeurope", "--vnet", "dr-vnet", "--subnet", "app")
	if len(r.lines) != 1 || !strings.HasPrefix(r.lines[0], "m azure/net-rg/m-recovered ") {
		t.Fatalf("failover to Azure:\n%s", r.out)
	}
	if res := f.Resources(); !slices.Contains(res, "vm net-rg/m-recovered") {
		t.Fatalf("the fake ARM after the failover: %v", res)
	}
	fc.written = 0 // counted from the failover on
	c.mustCLI("failover", "--machine", "m", "--commit")
	if st := c.status("m"); st.Direction != "failed-over" || st.Unprotected {
		t.Fatalf("after the commit: direction %q, unprotected %v", st.Direction, st.Unprotected)
	}
	fos := c.liveFailovers()
	if len(fos) != 1 || fos[0].To != "azure" {
		t.Fatalf("live failovers: %+v", fos)
	}
	cc, err := container.NewClientFromConnectionString(az.ConnString(), "vault1", nil)
	if err != nil {
		t.Fatal(err)
	}
	return &azureFailbackCase{failbackCase: fc, arm: f, srv: srv, rnd: rand.New(rand.NewPCG(17, 18)),
		recovered: cc.NewPageBlobClient(fmt.Sprintf("failover/m-%s-d.vhd", fos[0].ID))}
}

// write writes n random 64 KiB blocks into the recovered disk, at random
// places within the machine's disk.
func (ac *azureFailbackCase) write(n int) {
	t := ac.c.t
	t.Helper()
	buf := make([]byte, 64<<10)
	for range n {
		for i := range buf {
			buf[i] = byte(ac.rnd.IntN(256))
		}
		off := ac.rnd.Int64N(azureFailbackSize/int64(len(buf))) * int64(len(buf))
		if _, err := ac.recovered.UploadPages(t.Context(), streaming.NopCloser(bytes.NewReader(buf)), blob.HTTPRange{Offset: off, Count: int64(len(buf))}, nil); err != nil {
			t.Fatal(err)
		}
		ac.written += int64(len(buf))
	}
}

// recoveredSum is the SHA-256 of the recovered disk's first bytes, the
// machine's disk (the VHD's footer after them is not the disk).
func (ac *azureFailbackCase) recoveredSum() string {
	t := ac.c.t
	t.Helper()
	dl, err := ac.recovered.DownloadStream(t.Context(), &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: 0, Count: azureFailbackSize}})
	if err != nil {
		t.Fatal(err)
	}
	defer dl.Body.Close()
	h := sha256.New()
	if n, err := io.Copy(h, dl.Body); err != nil || n != azureFailbackSize {
		t.Fatalf("read the recovered disk: %d bytes, %v", n, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// clean fails the test if a read SAS is still granted or a snapshot
// left in the fake ARM.
func (ac *azureFailbackCase) clean(when string) {
	t := ac.c.t
	t.Helper()
	if g := ac.arm.Grants(); len(g) != 0 {
		t.Fatalf("%s: read SAS not revoked: %v", when, g)
	}
	if res := ac.arm.Resources(); slices.ContainsFunc(res, func(s string) bool { return strings.HasPrefix(s, "snapshot ") }) {
		t.Fatalf("%s: a snapshot is left: %v", when, res)
	}
}

// TestE2EFailbackFromAzure: the real binary's failover to Azure (Azurite
// and the SDK's fake ARM over HTTPS, reached through --azure-arm-endpoint
// with a token from the fake tenant) committed; writes into the recovered
// disk; `asr reprotect` freezes the original agent and sends only the
// blocks that differ (read from a snapshot of the running VM's disk),
// more writes; `asr failback` deallocates the VM, sends the rest and
// verifies: the original disk's SHA-256 equals the recovered disk's final
// content, the bytes sent far below the disk's size, no read SAS or
// snapshot left; forward protection resumes and a new point recovers
// bit-exact.
func TestE2EFailbackFromAzure(t *testing.T) {
	t.Parallel()
	ac := startAzureFailbackCase(t)
	c := ac.c
	ac.write(32) // 2 MiB
	out := c.mustCLI("reprotect", "--machine", "m")
	m := reprotectedRE.FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, "freeze the original") || !strings.Contains(out, "find VM m-recovered") {
		t.Fatalf("reprotect:\n%s", out)
	}
	compared, _ := strconv.ParseInt(m[1], 10, 64)
	sent, _ := strconv.ParseInt(m[3], 10, 64)
	if compared != azureFailbackSize || sent <= 0 || sent > ac.written {
		t.Fatalf("reprotect compared %d bytes and sent %d, for %d written into the recovered disk", compared, sent, ac.written)
	}
	t.Logf("reprotect: %d bytes compared, %d sent, %d written", compared, sent, ac.written)
	if p := ac.arm.VMPower("net-rg", "m-recovered"); p != "running" {
		t.Fatalf("the recovered VM after reprotect: %q", p)
	}
	ac.clean("after reprotect")
	if st := c.status("m"); st.Direction != "reprotected" {
		t.Fatalf("after reprotect: direction %q", st.Direction)
	}

	ac.write(16)
	out = c.mustCLI("failback", "--machine", "m")
	for _, s := range []string{"m: stop the recovered VM", "m: send the last changes", "m: verify", "m: end the failover"} {
		if !strings.Contains(out, s) {
			t.Fatalf("failback output lacks %q:\n%s", s, out)
		}
	}
	ac.checkFailedBack(out, ac.recoveredSum())
	fb := failedBackRE.FindStringSubmatch(out)
	if total, _ := strconv.ParseInt(fb[1], 10, 64); total > azureFailbackSize/8 {
		t.Fatalf("%d bytes sent in all for a disk of %d: not far below it", total, azureFailbackSize)
	}
	if p := ac.arm.VMPower("net-rg", "m-recovered"); p != "deallocated" {
		t.Fatalf("the recovered VM after failback: %q", p)
	}
	ac.clean("after failback")
	if issued, refused := ac.srv.Tokens(); issued == 0 || refused != 0 {
		t.Fatalf("the fake tenant issued %d tokens; %d ARM requests came without one", issued, refused)
	}
	ac.checkForward()
}

// TestE2EConsoleFailbackAzure: a failover to Azure (Azurite and the fake
// ARM over HTTPS) committed, then Reprotect and Failback from the
// machine's page in Chromium, each confirmation naming the recovered VM,
// what happens to it in Azure and that this path has run only against
// the fakes; the original disk ends equal to the recovered disk, the VM
// deallocated, no read SAS or snapshot left.
func TestE2EConsoleFailbackAzure(t *testing.T) {
	t.Parallel()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is required for this test but is not installed: install it (apt-get install chromium)")
	}
	ac := startAzureFailbackCase(t)
	c := ac.c
	ac.write(16)
	p := openConsole(t, c, browser)

	p.machinePage(c, "m")
	if s := p.text("#machine-failback"); !strings.Contains(s, "Failed over") || !p.exists(`a.failback-action[data-failback="reprotect"]`) {
		t.Fatalf("the committed failover to Azure's machine page shows:\n%s", s)
	}
	p.do(chromedp.Click(chromedp.CSS(`a.failback-action[data-failback="reprotect"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-reprotect")))
	if s := p.text("#failback-steps"); !strings.Contains(s, "azure/net-rg/m-recovered") || !strings.Contains(s, "from a snapshot") {
		t.Fatalf("the reprotect confirmation says:\n%s", s)
	}
	if s := p.text("#failback-azure-untested"); !strings.Contains(s, "never against real Azure") {
		t.Fatalf("the reprotect confirmation does not say how far this ran: %q", s)
	}
	p.screenshot("fbaz-01-reprotect-confirm")
	p.do(chromedp.Click(chromedp.CSS("#confirm-reprotect")))
	out, steps := p.jobDone("reprotect")
	m := reprotectedRE.FindStringSubmatch(out)
	if m == nil || !strings.Contains(steps, "compare and send") {
		t.Fatalf("the reprotect job shows:\n%s\n%s", out, steps)
	}
	if sent, _ := strconv.ParseInt(m[3], 10, 64); sent <= 0 || sent > ac.written {
		t.Fatalf("reprotect sent %d bytes for %d written into the recovered disk", sent, ac.written)
	}
	ac.clean("after reprotect")
	ac.write(8)

	p.machinePage(c, "m")
	p.do(chromedp.Click(chromedp.CSS(`a.failback-action[data-failback="failback"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-failback")))
	if s := p.text("#failback-steps"); !strings.Contains(s, "azure/net-rg/m-recovered is deallocated") || !strings.Contains(s, "compared whole") {
		t.Fatalf("the failback confirmation says:\n%s", s)
	}
	p.screenshot("fbaz-02-failback-confirm")
	p.do(chromedp.Click(chromedp.CSS("#confirm-failback")))
	out, steps = p.jobDone("failback")
	if !strings.Contains(steps, "stop the recovered VM") || !strings.Contains(steps, "compared: equal") {
		t.Fatalf("the failback's steps:\n%s", steps)
	}
	p.screenshot("fbaz-03-failed-back-job")
	ac.checkFailedBack(out, ac.recoveredSum())
	if pw := ac.arm.VMPower("net-rg", "m-recovered"); pw != "deallocated" {
		t.Fatalf("the recovered VM after failback: %q", pw)
	}
	ac.clean("after failback")
	p.machinePage(c, "m")
	if s := p.text("#machine-failback"); !strings.Contains(s, "Failed back") || !p.exists(`a.failback-action[data-failback="reprotect"]`) {
		t.Fatalf("the failed-back machine's page shows:\n%s", s)
	}
}

// startAzureRecoveredAgent starts, in ac's recovered VM, the asr agent
// of the original installation: a real `asr agent` with a copy of the
// original agent's state (copied with that agent stopped), its BIOS UUID
// the VM's unique id as ARM reports it, its disk a file standing for the
// VM's managed disk (the recovered disk as the failover left it, plus
// 512 KiB the guest wrote before its agent started, counted as written);
// it waits until the server takes it as the reverse source.
func startAzureRecoveredAgent(t *testing.T, ac *azureFailbackCase) (ra *agentProc, recDisk string) {
	t.Helper()
	fc, c := ac.failbackCase, ac.c
	vm, ok := ac.arm.VM(ac.arm.ID("net-rg", "Microsoft.Compute/virtualMachines", "m-recovered"))
	if !ok || vm.Properties.VMID == nil {
		t.Fatalf("the recovered VM %+v", vm)
	}
	vmID := *vm.Properties.VMID
	// The managed disk as the failover made it, and the guest's writes
	// before its agent started.
	dl, err := ac.recovered.DownloadStream(t.Context(), &blob.DownloadStreamOptions{Range: blob.HTTPRange{Offset: 0, Count: azureFailbackSize}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(dl.Body)
	dl.Body.Close()
	if err != nil || len(b) != azureFailbackSize {
		t.Fatalf("download the recovered disk: %d bytes, %v", len(b), err)
	}
	for range 8 {
		off := ac.rnd.Int64N(azureFailbackSize/65536) * 65536
		for i := range 65536 {
			b[off+int64(i)] = byte(ac.rnd.IntN(256))
		}
		fc.written += 65536
	}
	recDisk = filepath.Join(c.dir, "recovered.img")
	if err := os.WriteFile(recDisk, b, 0o600); err != nil {
		t.Fatal(err)
	}
	orig := c.agents["m"]
	orig.stop()
	recState := filepath.Join(c.dir, "recovered-state")
	if err := os.CopyFS(recState, os.DirFS(orig.state)); err != nil {
		t.Fatal(err)
	}
	c.startAgent("m", nil)
	sock := filepath.Join(c.dir, "recovered.sock")
	c.agents["recovered"] = &agentProc{name: "recovered", state: recState, sock: sock,
		args: []string{"agent", "--server", c.url(), "--passphrase-file", filepath.Join(c.srvDir, "passphrase"),
			"--state", recState, "--name", "m", "--nbd", "unix:" + sock, "--crash-interval", "1h",
			"--disk", "d=" + recDisk, "--bios-uuid", vmID}}
	ra = c.startAgent("recovered", nil)
	st := c.waitStatus("m", "the recovered VM's agent taken as the reverse source", func(st machineStatus) bool {
		return st.ReverseSource != nil && st.ReverseSource.Connected && st.Connected
	})
	if st.ReverseSource.BIOSUUID != vmID || st.ReverseSource.VM != "m-recovered" || st.BIOSUUID == vmID {
		t.Fatalf("machine m: BIOS UUID %s, reverse source %+v", st.BIOSUUID, st.ReverseSource)
	}
	return ra, recDisk
}

// TestE2EFailbackFromAzureRecoveredAgent: the real binary's failover to
// Azure (Azurite and the fake ARM over HTTPS) committed; in the recovered
// VM the asr agent of the original installation starts: a real `asr
// agent` with a copy of the original agent's state, its BIOS UUID the
// VM's unique id as ARM reports it (vmId), its disk standing for the
// VM's managed disk (a file holding the recovered disk's content as the
// failover left it, plus writes made before the agent started, which
// are not in its log). Reprotect compares through the agent (its resync
// against the original disk: no snapshot, no read SAS, no ARM change),
// fio's writes through its splitter before and after reprotect reach the
// original disk; failback freezes and drains it, verifies by SHA-256
// through both agents before the deallocation and reads nothing of the
// stopped VM's disks: the original equals the agent's disk, within 2x of
// the bytes written; forward protection resumes and a new point
// recovers bit-exact. Never real Azure.
func TestE2EFailbackFromAzureRecoveredAgent(t *testing.T) {
	t.Parallel()
	ac := startAzureFailbackCase(t)
	fc, c := ac.failbackCase, ac.c
	ra, recDisk := startAzureRecoveredAgent(t, ac)
	fc.fio(ra.uri("d"), "recovered", 2<<20)

	armWrites := len(ac.arm.Writes())
	out := c.mustCLI("reprotect", "--machine", "m")
	m := reprotectedRE.FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, "path: the asr agent in VM m-recovered") || !strings.Contains(out, "m: compare through the recovered agent") {
		t.Fatalf("reprotect:\n%s", out)
	}
	compared, _ := strconv.ParseInt(m[1], 10, 64)
	sent, _ := strconv.ParseInt(m[3], 10, 64)
	if compared != azureFailbackSize || sent <= 0 || sent > 2*fc.written {
		t.Fatalf("reprotect compared %d bytes and sent %d, for %d written into the recovered disk", compared, sent, fc.written)
	}
	t.Logf("reprotect through the agent: %d bytes compared, %d sent, %d written", compared, sent, fc.written)
	if w := ac.arm.Writes()[armWrites:]; len(w) != 0 {
		t.Fatalf("ARM changes during reprotect through the agent: %v", w)
	}
	ac.clean("after reprotect")
	fc.fio(ra.uri("d"), "recovered-after-reprotect", 1<<20)
	c.waitStatus("m", "the recovered agent's writes on the original, the reverse RPO known", func(st machineStatus) bool {
		return st.ReverseSource != nil && st.ReverseSource.Live && st.ReverseSource.OldestPending.IsZero() &&
			st.Reverse != nil && st.Reverse.RPOKnown && st.Reverse.Pending == 0
	})
	// Shipped as they happen: equal before failback (the status read
	// above may predate fio's last writes).
	deadline := time.Now().Add(hungAfter)
	for sha256File(t, fc.disk) != sha256File(t, recDisk) {
		if time.Now().After(deadline) {
			t.Fatal("the original disk never equal to the recovered agent's before failback")
		}
		time.Sleep(100 * time.Millisecond)
	}

	fc.fio(ra.uri("d"), "recovered-before-failback", 1<<20)
	out = c.mustCLI("failback", "--machine", "m")
	for _, s := range []string{"m: freeze and drain the recovered agent", "m: verify through the recovered agent", "m: stop the recovered VM", "m: verify", "m: end the failover",
		"no pass over the stopped VM's disks"} {
		if !strings.Contains(out, s) {
			t.Fatalf("failback output lacks %q:\n%s", s, out)
		}
	}
	if strings.Contains(out, "m: send the last changes") {
		t.Fatalf("failback read the stopped VM's disks:\n%s", out)
	}
	fc.checkFailedBack(out, sha256File(t, recDisk))
	if p := ac.arm.VMPower("net-rg", "m-recovered"); p != "deallocated" {
		t.Fatalf("the recovered VM after failback: %q", p)
	}
	ac.clean("after failback")
	ra.stop()
	fc.checkForward()
}

// TestE2EFailbackFromAzureRecoveredAgentKilled: the same path with
// kills. Reprotected through the recovered agent; the original agent
// held by SIGSTOP while fio writes through the recovered agent (its
// writes wait in its spool); kill -9 of the server, restarted: the
// stream live again; kill -9 of the recovered agent, restarted (after a
// hard stop its stream is held); more fio; the original resumed;
// failback compares through the agent again (a resync of the held
// stream, not a pass through SAS), freezes, drains and verifies it: the
// original disk equals the agent's disk, nothing lost; forward
// protection resumes.
func TestE2EFailbackFromAzureRecoveredAgentKilled(t *testing.T) {
	t.Parallel()
	ac := startAzureFailbackCase(t)
	fc, c := ac.failbackCase, ac.c
	ra, recDisk := startAzureRecoveredAgent(t, ac)
	ra, out := fc.killedWhileReverseStreaming(ra, "m-recovered")
	for _, s := range []string{"m: verify through the recovered agent", "no pass over the stopped VM's disks"} {
		if !strings.Contains(out, s) {
			t.Fatalf("failback output lacks %q:\n%s", s, out)
		}
	}
	if want, got := sha256File(t, recDisk), sha256File(t, fc.disk); got != want {
		t.Fatalf("original disk sha256 %s, the recovered agent's disk %s", got, want)
	}
	if st := c.status("m"); st.Direction != "failed-back" || st.ReverseSource != nil {
		t.Fatalf("after failback: direction %q, reverse source %+v", st.Direction, st.ReverseSource)
	}
	ac.clean("after failback")
	ra.stop()
	fc.checkForward()
}
