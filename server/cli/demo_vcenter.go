package cli

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
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
	for i := 1; i <= guests+2; i++ {
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
