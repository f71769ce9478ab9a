package cli

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
	"github.com/asrdr/asr/vmware/push/sshguest"
	"github.com/asrdr/asr/vmware/vcsim"
)

// demoVCenter is the demo's vCenter's name in asr.
const demoVCenter = "demo-vcenter"

// demoUUID is a demo guest's BIOS UUID: fixed by its name, so the guest's
// agent and its VM in the simulator agree across runs.
func demoUUID(name string) string {
	h := sha256.Sum256([]byte("asr demo guest " + name))
	h[6] = h[6]&0x0f | 0x40 // version 4
	h[8] = h[8]&0x3f | 0x80 // RFC 4122 variant
	x := hex.EncodeToString(h[:16])
	return x[0:8] + "-" + x[8:12] + "-" + x[12:16] + "-" + x[16:20] + "-" + x[20:32]
}

func demoNames(n int) string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("demo-vm%d", i+1)
	}
	return strings.Join(names, ", ")
}

// startDemoVCenter starts the simulator, adds a VM per demo guest (and two
// spare ones), and registers it with the server, replacing the
// registration of an earlier run (the simulator listens on a new port
// each time). The password is new at each run and never shown.
func startDemoVCenter(ctx context.Context, srv *server.Server, guests int, diskSize int64, guestDir string) (*vcsim.Sim, error) {
	pw := make([]byte, 12)
	rand.Read(pw)
	sim, err := vcsim.Start("administrator@vsphere.local", hex.EncodeToString(pw))
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			sim.Close()
		}
	}()
	gc, err := sim.Client(ctx)
	if err != nil {
		return nil, err
	}
	defer gc.Logout(context.Background())
	for i := 1; i <= guests+demoSpares; i++ {
		name := fmt.Sprintf("demo-vm%d", i)
		spec := vcsim.VMSpec{Name: name, BIOSUUID: demoUUID(name), CPUs: 2, MemoryMiB: 4096, Disks: []int64{diskSize}, PowerOn: true}
		if i > guests {
			spec.Name = fmt.Sprintf("demo-spare%d", i-guests)
			spec.BIOSUUID = demoUUID(spec.Name)
			spec.PowerOn = i%2 == 0
		}
		if _, err := sim.CreateVM(ctx, gc, spec); err != nil {
			return nil, err
		}
	}
	if err := srv.RemoveVCenter(ctx, demoVCenter); err != nil && !errors.Is(err, store.ErrNotFound) {
		return nil, err
	}
	if _, err := srv.AddVCenter(ctx, api.AddVCenterRequest{Name: demoVCenter, URL: sim.URL, User: sim.User,
		Password: sim.Password, Thumbprint: sim.Thumbprint}); err != nil {
		return nil, err
	}
	ok = true
	return sim, nil
}

// demoSpares is how many VMs of the demo's vCenter are not protected at
// start, for the newcomer to protect.
const demoSpares = 2

// demoSpare is a spare VM's guest side: its disk and where its agent goes.
type demoSpare struct {
	name, disk, installDir string
}

// startDemoGuest starts the demo's SSH guest (vmware/push/sshguest) and
// makes the spare VMs' disks, so that enabling replication of a spare VM
// from the console runs a real push install on this machine.
func startDemoGuest(dir string, size int64, log *slog.Logger) (*sshguest.Guest, []demoSpare, error) {
	g, err := sshguest.Start(filepath.Join(dir, "guest-ssh"), log)
	if err != nil {
		return nil, nil, err
	}
	var spares []demoSpare
	for i := 1; i <= demoSpares; i++ {
		name := fmt.Sprintf("demo-spare%d", i)
		gdir, err := filepath.Abs(filepath.Join(dir, "guests", name))
		if err == nil {
			err = os.MkdirAll(gdir, 0o700)
		}
		if err != nil {
			g.Close()
			return nil, nil, err
		}
		sp := demoSpare{name: name, disk: filepath.Join(gdir, "disk0.img"), installDir: filepath.Join(gdir, "opt-asr")}
		if err := prepareDemoDisk(sp.disk, size, int64(100+i)); err != nil {
			g.Close()
			return nil, nil, err
		}
		spares = append(spares, sp)
	}
	return g, spares, nil
}

// stopDemoGuest stops the guest and the agents pushed through it (they run
// detached, as on a real guest; the demo ends them with itself; enabling
// replication again starts them again).
func stopDemoGuest(g *sshguest.Guest, spares []demoSpare) {
	g.Close()
	for _, sp := range spares {
		b, err := os.ReadFile(filepath.Join(sp.installDir, "agent.pid"))
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
			syscall.Kill(pid, syscall.SIGTERM)
		}
	}
}

// demoGuestHelp says how to enable replication of a spare VM.
func demoGuestHelp(asr string, g *sshguest.Guest, spares []demoSpare, srvDir, url string) string {
	sp := spares[0]
	var b strings.Builder
	fmt.Fprintf(&b, `
  To enable replication of %s (Inventory page, or the CLI), its guest is an
  SSH server inside this demo that runs commands on this machine as you:
    SSH:          %s@%s   host key %s
    private key:  %s
    disk:         disk0=%s   install dir: %s
    and skip the BIOS UUID check (this machine's UUID is not the VM's).
    %s protect --data %s --server %s --vm %s --ssh %s@%s \
      --ssh-key %s --accept-host-key %s --disk disk0=%s \
      --install-dir %s --skip-uuid-check`,
		sp.name, g.User, g.Addr, g.Fingerprint, g.LoginKey, sp.disk, sp.installDir,
		asr, srvDir, url, sp.name, g.User, g.Addr, g.LoginKey, g.Fingerprint, sp.disk, sp.installDir)
	if os.Geteuid() != 0 {
		b.WriteString("\n  (A push install needs root on the guest: run the demo as root to try it; as another user it stops at its prerequisites.)")
	}
	return b.String()
}
