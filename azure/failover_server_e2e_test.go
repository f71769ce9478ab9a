//go:build e2e

package azure_test

import (
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	azfake "github.com/Azure/azure-sdk-for-go/sdk/azcore/fake"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/azure/azuritetest"
	"github.com/asrdr/asr/azure/fakearm"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// A failover to Azure through the server: a real server replicating to
// Azurite, a real agent; the server writes each recovered disk as a fixed
// VHD page blob into the vault's account and creates managed disks (the
// fake ARM reads each blob back from Azurite and checks it is a fixed VHD
// of the disk's size), a NIC and a VM through the SDK's fake servers. A
// test failover's resources go at cleanup. This is as far as this path
// has run: never against real Azure.
// azureRig is a real server replicating to Azurite, with the fake ARM,
// and a real agent protecting web01's disk d0; a first point is taken.
type azureRig struct {
	az   *azuritetest.Azurite
	arm  *fakearm.ARM
	c    *api.Client
	ctx  context.Context
	disk string // the original disk d0
	// stopAgent stops the agent (once; the cleanup does it otherwise).
	stopAgent func()
	cfg       agent.Config // the agent's, to start it again
}

func startAzureRig(t *testing.T, size int) *azureRig {
	t.Helper()
	az := azuritetest.New(t)
	t.Setenv("AZURE_STORAGE_CONNECTION_STRING", az.ConnString())
	arm := fakearm.NewAzurite(t)
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := server.Open(context.Background(), server.Config{DataDir: filepath.Join(dir, "srv"), Listen: "127.0.0.1:0", DataListen: "127.0.0.1:0",
		Target: "azure://" + azuritetest.Account + "/failover-vault", ARMCredential: &azfake.TokenCredential{}, ARMOptions: arm.Options(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; srv.Close() })
	c, err := api.NewClient(srv.URL(), filepath.Join(dir, "srv", server.AdminTokenFile), filepath.Join(dir, "srv", "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "d0.img")
	b := make([]byte, size)
	rand.Read(b)
	if err := os.WriteFile(disk, b, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := agent.Config{Server: srv.URL(), PassphraseFile: filepath.Join(dir, "srv", server.PassphraseFile),
		StateDir: filepath.Join(dir, "agent"), Name: "web01", Disks: []agent.DiskSpec{{Name: "d0", Path: disk}},
		NBD: "unix:" + filepath.Join(dir, "web01.sock"), CrashInterval: time.Hour, SpoolMax: 16 << 20, Logger: log}
	stop := startRigAgent(t, cfg)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if _, err := c.Tag(ctx, "web01", false, time.Minute); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("no point: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return &azureRig{az: az, arm: arm, c: c, ctx: ctx, disk: disk, stopAgent: stop, cfg: cfg}
}

// startRigAgent runs an agent of cfg in process; the returned func stops
// it (once; the test's cleanup does it otherwise, before the server's).
func startRigAgent(t *testing.T, cfg agent.Config) func() {
	t.Helper()
	a, err := agent.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	actx, acancel := context.WithCancel(context.Background())
	adone := make(chan error, 1)
	go func() { adone <- a.Run(actx) }()
	var once sync.Once
	stop := func() { once.Do(func() { acancel(); <-adone; a.Close() }) }
	t.Cleanup(stop)
	return stop
}

// run starts a job and waits for its end (at most 3 minutes).
func (r *azureRig) run(t *testing.T, start func() (api.Job, error)) api.Job {
	t.Helper()
	j, err := start()
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(r.ctx, 3*time.Minute)
	defer wcancel()
	if j, err = r.c.WaitJob(wctx, j.ID, nil); err != nil {
		t.Fatal(err)
	}
	return j
}

func TestServerFailoverToAzure(t *testing.T) {
	r := startAzureRig(t, 3<<20+4096)
	c, arm, ctx := r.c, r.arm, r.ctx
	run := func(req api.FailoverRequest) api.Job {
		t.Helper()
		return r.run(t, func() (api.Job, error) { return c.StartFailover(ctx, req) })
	}
	target := &api.AzureTarget{Subscription: fakearm.Subscription, ResourceGroup: "net-rg", Location: "westeurope", VNet: "test-vnet", Subnet: "isolated"}
	j := run(api.FailoverRequest{Machine: "web01", Test: true, To: api.ToAzure, Azure: target})
	if j.State != api.JobSucceeded {
		t.Fatalf("test failover to Azure: %s %s %+v", j.State, j.Error, j.Steps)
	}
	if len(j.Output) != 1 || !strings.Contains(j.Output[0], "azure/net-rg/web01-test") {
		t.Fatalf("output %q", j.Output)
	}
	res := arm.Resources()
	if !slices.Contains(res, "vm net-rg/web01-test") || !slices.ContainsFunc(res, func(s string) bool { return strings.HasPrefix(s, "disk net-rg/") }) ||
		!slices.Contains(res, "nic net-rg/web01-test-nic") {
		t.Fatalf("ARM after the test failover: %v", res)
	}
	cl, err := c.FailoverAction(ctx, "cleanup", api.FailoverAction{Machine: "web01"})
	if err != nil {
		t.Fatal(err)
	}
	if cl, err = c.WaitJob(ctx, cl.ID, nil); err != nil || cl.State != api.JobSucceeded {
		t.Fatalf("cleanup: %+v %v", cl, err)
	}
	if res := arm.Resources(); len(res) != 0 {
		t.Fatalf("ARM after cleanup: %v", res)
	}
	// A bad request to ARM is refused by its job, and nothing is left.
	bad := *target
	bad.Subnet = "nosuchsubnet"
	if j := run(api.FailoverRequest{Machine: "web01", Test: true, To: api.ToAzure, Azure: &bad}); j.State != api.JobFailed {
		t.Fatalf("failover to a missing subnet: %s", j.State)
	}
	if res := arm.Resources(); len(res) != 0 {
		t.Fatalf("ARM after a failed failover: %v", res)
	}
	if fos, _ := c.Failovers(ctx, false); len(fos) != 0 {
		t.Fatalf("a failed failover is live: %+v", fos)
	}
	// A real failover: the VM stays.
	prod := *target
	prod.VNet, prod.Subnet = "dr-vnet", "app"
	if j := run(api.FailoverRequest{Machine: "web01", To: api.ToAzure, Azure: &prod}); j.State != api.JobSucceeded {
		t.Fatalf("failover to Azure: %s %s", j.State, j.Error)
	}
	if res := arm.Resources(); !slices.Contains(res, "vm net-rg/web01-recovered") {
		t.Fatalf("ARM after the failover: %v", res)
	}
}
