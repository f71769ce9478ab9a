//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"

	"github.com/asrdr/asr/azure/azuritetest"
)

// azureCluster is a cluster whose server replicates to a container in a
// real Azurite it started; credentials reach every asr process of the
// cluster through the environment, as the Azure CLI names them.
func azureCluster(t *testing.T) (*cluster, *azuritetest.Azurite, string) {
	az := azuritetest.New(t)
	target := "azure://" + azuritetest.Account + "/vault1"
	c := newClusterEnv(t, []string{"AZURE_STORAGE_CONNECTION_STRING=" + az.ConnString()}, "--target", target)
	return c, az, target
}

// TestE2EAzureReplicateFailover: replication to Azure Blob Storage
// (Azurite), recovery through the server, then failover from scratch: with
// the site gone (server stopped, its data directory deleted) and only the
// storage credentials and the passphrase, the points are listed and a point
// is written as raw images and as a fixed VHD page blob in the container,
// both the source disk at that point byte for byte.
func TestE2EAzureReplicateFailover(t *testing.T) {
	t.Parallel()
	c, az, target := azureCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeDisk(t, disk, 24<<20, 41) // a whole number of MiB: the VHD holds exactly the disk
	a := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", 3*time.Minute)
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x61 1M 3M", "-c", "write -P 0x62 17M 64k")
	id := c.tag("vm1")
	want := sha256File(t, disk)
	c.recoverAndCheck("vm1", id, map[string]string{"d": want})
	if ps := c.processServer(); ps.Compression <= 0 {
		t.Fatalf("process server figures: %+v", ps)
	}
	// A write after the point, applied to the replica before the site goes:
	// the point must not hold it.
	from := c.status("vm1").BytesReceived
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x63 2M 1M")
	c.waitReceived("vm1", from+1)
	c.waitBacklog("the write after the point applied", func(n int64) bool { return n == 0 })

	// The site is gone.
	pass := filepath.Join(c.dir, "passphrase")
	b, err := os.ReadFile(filepath.Join(c.srvDir, "passphrase"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(pass, b, 0o600)
	a.kill()
	c.server.stop()
	os.RemoveAll(c.srvDir)

	out, err := c.asr("points", "--machine", "vm1", "--target", target, "--passphrase-file", pass)
	if err != nil || !strings.Contains(out, id) {
		t.Fatalf("points from the target: %v\n%s", err, out)
	}
	c.recoverAndCheck("vm1", id, map[string]string{"d": want}, "--target", target, "--passphrase-file", pass)

	// A VHD in the container, ready to become a managed disk.
	dir := filepath.Join(c.dir, "vhd")
	out, err = c.asr("recover", "--machine", "vm1", "--point", id, "--out", dir, "--format", "vhd",
		"--to-blob", "failover/vm1-d.vhd", "--target", target, "--passphrase-file", pass)
	if err != nil {
		t.Fatalf("recover to a VHD blob: %v\n%s", err, out)
	}
	vhd := filepath.Join(c.dir, "vm1-d.vhd")
	if err := az.Download("vault1", "failover/vm1-d.vhd", vhd); err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(c.dir, "from-vhd.img")
	if out, err := exec.Command("qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert -f vpc: %v\n%s", err, out)
	}
	if got := sha256File(t, raw); got != want {
		t.Fatalf("the VHD blob converted back differs from the source at point %s", id)
	}

	// A wrong passphrase opens nothing.
	bad := filepath.Join(c.dir, "bad")
	os.WriteFile(bad, []byte("not the passphrase\n"), 0o600)
	if out, err := c.asr("points", "--machine", "vm1", "--target", target, "--passphrase-file", bad); err == nil ||
		!strings.Contains(err.Error(), "passphrase") {
		t.Fatalf("wrong passphrase: %v\n%s", err, out)
	}
}

// TestE2EAzureWrongKey: a storage key the account refuses is a clear error
// at once, not a crash loop or a long retry.
func TestE2EAzureWrongKey(t *testing.T) {
	t.Parallel()
	az := azuritetest.New(t)
	env := []string{"AZURE_STORAGE_CONNECTION_STRING=" + strings.Replace(az.ConnString(), azuritetest.Key, "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkgd3Jvbmcga2V5IHdyb25nIGtleQ==", 1)}
	dir := t.TempDir()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := runAsrEnv(ctx, env, "server", "--data", filepath.Join(dir, "srv"), "--listen", "127.0.0.1:"+freePort(t),
		"--data-listen", "127.0.0.1:"+freePort(t), "--target", "azure://"+azuritetest.Account+"/vault1")
	if err == nil || !strings.Contains(err.Error(), "rejected the credentials") {
		t.Fatalf("server with a wrong key: %v\n%s", err, out)
	}
	t.Logf("wrong key refused in %s: %v", time.Since(start).Round(time.Millisecond), err)
}

// TestE2EAzureOutage: Azurite is killed in the middle of replication and
// restarted a while later. Nothing acknowledged is lost: the process
// server's cache absorbs the outage (its backlog shows it) and drains
// afterwards; the latest point equals the source. (Azurite is stopped with
// SIGTERM: killed with SIGKILL it loses blobs it had acknowledged, which the
// real service never does.)
func TestE2EAzureOutage(t *testing.T) {
	t.Parallel()
	c, az, _ := azureCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeDisk(t, disk, 16<<20, 42)
	a := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", 3*time.Minute)

	az.Kill()
	// 6 MiB of incompressible writes while the storage is down.
	src := randomFile(t, c.dir, 6<<20, 43)
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", fmt.Sprintf("write -s %s 4M 6M", src))
	ps := c.waitBacklog("storage down: the 6 MiB written in the cache", func(n int64) bool { return n >= 5<<20 })
	if st := c.status("vm1"); st.Error == "" {
		t.Logf("machine while storage is down: %+v", st)
	}
	t.Logf("storage down: backlog %d bytes", ps.BacklogBytes)

	az.Restart()
	deadline := time.Now().Add(hungAfter)
	for c.processServer().BacklogBytes != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the backlog did not drain: %+v\n%s", c.processServer(), c.server.logTail())
		}
		time.Sleep(500 * time.Millisecond)
	}
	id := c.tag("vm1")
	c.recoverAndCheck("vm1", id, map[string]string{"d": sha256File(t, disk)})
}

// TestE2EAzureContainerDeleted: the vault's container disappears while the
// server runs (deleted by hand, a wrong script): a permanent error. The
// server does not crash or loop: the machine shows a clear error, the
// agent's writes are still acknowledged into the cache, and nothing is
// written to a container it no longer owns.
func TestE2EAzureContainerDeleted(t *testing.T) {
	t.Parallel()
	c, az, _ := azureCluster(t)
	disk := filepath.Join(c.dir, "d.img")
	makeDisk(t, disk, 8<<20, 44)
	a := c.startAgent("vm1", nil, "d="+disk)
	c.waitState("vm1", "protected", 3*time.Minute)
	cc, err := container.NewClientFromConnectionString(az.ConnString(), "vault1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cc.Delete(t.Context(), nil); err != nil {
		t.Fatal(err)
	}
	nbdPeerRun(t, "qemu-io", "-f", "raw", a.uri("d"), "-c", "write -P 0x55 1M 1M")
	deadline := time.Now().Add(hungAfter)
	var st machineStatus
	for st = c.status("vm1"); st.Error == ""; st = c.status("vm1") {
		if time.Now().After(deadline) {
			t.Fatalf("no error on the machine after its container was deleted: %+v", st)
		}
		time.Sleep(300 * time.Millisecond)
	}
	t.Logf("machine error: %s", st.Error)
	if c.server.exited() {
		t.Fatalf("the server exited: %v", c.server.err)
	}
	if ps := c.processServer(); ps.BacklogBytes == 0 {
		t.Fatalf("the write is not in the cache: %+v", ps)
	}
	// The container was not silently re-created by the running server.
	time.Sleep(3 * time.Second)
	if _, err := cc.GetProperties(t.Context(), nil); err == nil {
		t.Fatal("the running server re-created the deleted container")
	}
}
