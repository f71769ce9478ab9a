//go:build e2e

package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"

	"github.com/asrdr/asr/server/api"
)

// TestE2EProcessServerAzure: a real `asr server` and a real `asr
// process-server` share an Azure target (Azurite): the configuration
// server holds the container's lease, the process server opens it shared.
// vm1, under fio, is switched to ps1, whose lease on the machine the
// container shows (leases/<id>, labelled ps1); ps1 is killed (kill -9) and
// started again, and takes its machine back (its lease id is kept in its
// data directory); vm1 is switched back to the built-in process server,
// which takes the lease ps1 let go. With fio stopped, the latest point
// recovers bit-exact: no write acknowledged to fio is lost, whichever
// process server wrote it.
func TestE2EProcessServerAzure(t *testing.T) {
	t.Parallel()
	c, az, target := azureCluster(t)
	disk := filepath.Join(c.dir, "vm1.img")
	makeDisk(t, disk, 24<<20, 17)
	a := c.startAgent("vm1", nil, "d0="+disk)
	id := c.waitState("vm1", "protected", 3*time.Minute).ID

	// The lease blob of vm1 is the built-in process server's.
	holder := func() (string, lease.StateType) {
		t.Helper()
		bc, err := blob.NewClientFromConnectionString(az.ConnString(), "vault1", "leases/"+id, nil)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), hungAfter)
		defer cancel()
		p, err := bc.GetProperties(ctx, nil)
		if err != nil {
			t.Fatalf("the lease blob of vm1: %v", err)
		}
		var h string
		for k, v := range p.Metadata {
			if strings.EqualFold(k, "asrholder") && v != nil {
				h = *v
			}
		}
		var st lease.StateType
		if p.LeaseState != nil {
			st = *p.LeaseState
		}
		return h, st
	}
	waitHolder := func(want string) {
		t.Helper()
		deadline := time.Now().Add(hungAfter)
		for {
			h, st := holder()
			if h == want && st == lease.StateTypeLeased {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("vm1's lease: held by %q (%s), want %q", h, st, want)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitHolder("asr server")

	ps1 := c.startPS("ps1")
	c.waitPS("ps1 healthy on the Azure target", func(m map[string]api.ProcessServerInfo) bool {
		p, ok := m["ps1"]
		return ok && p.State == api.PSHealthy && strings.Contains(p.Figures.Target, strings.TrimPrefix(target, "azure://"))
	})
	if _, err := os.Stat(filepath.Join(c.dir, "ps1", "target-lease")); err != nil {
		t.Fatalf("ps1's lease id: %v", err)
	}
	stop := make(chan struct{})
	var bg background
	fioRounds(t, &bg, stop, "vm1", a.uri("d0"), 17)
	c.switchTo("vm1", "ps1")
	waitHolder("ps1")

	// kill -9 under fio: started again with the same data directory, it
	// takes its own lease back at once and its agent reconnects.
	ps1.kill()
	os.Remove(c.psLog("ps1"))
	c.startPS("ps1")
	waitConnected(t, c.psLog("ps1"), "vm1", 0)
	c.waitPS("records reaching ps1 after its restart", func(l map[string]api.ProcessServerInfo) bool {
		return l["ps1"].Figures.RawBytes > 0
	})
	waitHolder("ps1")

	// Back to the built-in process server: ps1 applies its cache and lets
	// the lease go.
	c.switchTo("vm1", api.BuiltinProcessServer)
	waitHolder("asr server")
	close(stop)
	if err := bg.wait(); err != nil {
		t.Fatal(err)
	}
	var point string
	deadline := time.Now().Add(hungAfter)
	for {
		out, err := c.cli("tag", "--machine", "vm1", "--wait", "--timeout", tagTimeout)
		if err == nil {
			lines := strings.Split(strings.TrimSpace(out), "\n")
			point = lines[len(lines)-1]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no point of vm1 after switching back: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.recoverAndCheck("vm1", point, map[string]string{"d0": sha256File(t, disk)})
}
