package server_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// The alternate location of a committed failover to vSphere: the
// recovered VM's flat files copied into a new VM. A failback cancelled
// once its copy is verified (the last moment it can be) removes the new
// VM and its folder and powers the recovered VM on again; the recovered
// machine runs on (writes), and the next failback powers it off, copies
// its final state (the new VM's flat files equal the recovered VM's),
// records the failback and powers the new VM on; the recovered VM stays
// off and the original disks are not touched.
func TestFailbackAlternateFromVSphere(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	vr := startVSphereRig(t)
	gc := vr.rec.Client()
	dsDir := filepath.Dir(filepath.Dir(vr.flats["d0"]))
	const ds = "LocalDS_0"
	vr.writeRecovered("d0", 4)
	orig := map[string][32]byte{}
	for d, p := range vr.disks {
		orig[d] = fileSHA(t, p)
	}
	var once sync.Once
	server.SetAlternateVerifiedHook(vr.srv, func(jctx context.Context, id string) {
		once.Do(func() {
			if powerState(t, vr.rec) != types.VirtualMachinePowerStatePoweredOff {
				t.Errorf("the recovered VM runs while its disks are copied")
			}
			if err := vr.srv.CancelJob(ctx, id); err != nil {
				t.Errorf("cancel the failback once verified: %v", err)
				return
			}
			<-jctx.Done()
		})
	})
	req := api.FailbackRequest{Alternate: true, VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: ds}}
	j := vr.runJob(vr.client.FailbackTo(ctx, "app01", req))
	if j.State != api.JobCancelled || !slices.Contains(stepNames(j), "app01: power the recovered VM on again=done") {
		t.Fatalf("the cancelled failback: %s %s (steps %v)", j.State, j.Error, stepNames(j))
	}
	if _, err := vcsim.FindVM(ctx, &govmomi.Client{Client: gc}, "app01-failback"); err == nil {
		t.Fatal("a cancelled failback left its VM")
	}
	if _, err := os.Stat(filepath.Join(dsDir, "app01-failback")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a cancelled failback left its folder: %v", err)
	}
	if powerState(t, vr.rec) != types.VirtualMachinePowerStatePoweredOn {
		t.Fatal("the recovered VM is not running again after the cancel")
	}
	if m := vr.machine("app01"); m.Direction != "failed-over" {
		t.Fatalf("after a cancelled failback: direction %q", m.Direction)
	}
	// A bad request changes nothing.
	bad := api.FailbackRequest{Alternate: true, VSphere: &api.VSphereTarget{VCenter: "vc1", Datastore: "nosuch"}}
	if _, err := vr.client.FailbackTo(ctx, "app01", bad); statusOf(err) != http.StatusBadRequest {
		t.Fatalf("an alternate failback to a datastore that does not exist: %v", err)
	}
	vr.writeRecovered("d1", 3) // the recovered machine runs on
	want := map[string][32]byte{}
	server.SetAlternateVerifiedHook(vr.srv, func(context.Context, string) {
		for d, p := range vr.flats { // its final state, stopped
			want[d] = fileSHA(t, p)
		}
	})
	j = vr.mustJob(vr.client.FailbackTo(ctx, "app01", req))
	for _, s := range []string{"app01: stop the recovered VM=done", "app01: find VM app01-recovered=done"} {
		if !slices.Contains(stepNames(j), s) {
			t.Fatalf("steps %v lack %s", stepNames(j), s)
		}
	}
	vr.failbackRig.checkAlternateOf("app01", "app01: stop the recovered VM", j, &govmomi.Client{Client: gc}, dsDir, "app01-failback", want)
	if len(j.Output) < 3 || !strings.Contains(j.Output[len(j.Output)-1], "app01-recovered") || !strings.Contains(j.Output[len(j.Output)-1], "stays powered off") {
		t.Fatalf("alternate failback output %q", j.Output)
	}
	for d, p := range vr.flats {
		if fileSHA(t, p) != want[d] {
			t.Fatalf("disk %s of the recovered VM changed after its copy", d)
		}
	}
	if powerState(t, vr.rec) != types.VirtualMachinePowerStatePoweredOff {
		t.Fatal("the recovered VM runs after the failback")
	}
	for d, p := range vr.disks {
		if fileSHA(t, p) != orig[d] {
			t.Fatalf("disk %s: an alternate-location failback wrote the original", d)
		}
	}
	all, err := vr.client.Failovers(ctx, true)
	if err != nil || len(all) == 0 || all[0].State != "ended" || all[0].Failback == nil || all[0].Failback.State != "failed-back" {
		t.Fatalf("the failover after the failback: %+v %v", all, err)
	}
	if m := vr.machine("app01"); m.Direction != "failed-back" {
		t.Fatalf("after failback: direction %q", m.Direction)
	}
	if _, err := vr.client.FailbackTo(ctx, "app01", req); statusOf(err) != http.StatusConflict {
		t.Fatalf("a second alternate failback: %v", err)
	}
}
