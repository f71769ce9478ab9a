package vmware

import (
	"context"
	"fmt"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// isolatedNetwork returns the isolated port group name on a host,
// creating it (and the vSwitch IsolatedSwitch, without uplink) if the
// host has no port group of that name. A port group of that name on a
// vSwitch with an uplink is refused: it would not isolate anything.
func isolatedNetwork(ctx context.Context, c *govmomi.Client, dc *object.Datacenter, host *object.HostSystem, hostName, name string) (object.NetworkReference, error) {
	ns, err := host.ConfigManager().NetworkSystem(ctx)
	if err != nil {
		return nil, fmt.Errorf("host %s: network system: %w", hostName, err)
	}
	var m mo.HostNetworkSystem
	if err := ns.Properties(ctx, ns.Reference(), []string{"networkInfo"}, &m); err != nil {
		return nil, fmt.Errorf("host %s: network info: %w", hostName, err)
	}
	vswitch := func(name string) *types.HostVirtualSwitch {
		if m.NetworkInfo == nil {
			return nil
		}
		for i := range m.NetworkInfo.Vswitch {
			if m.NetworkInfo.Vswitch[i].Name == name {
				return &m.NetworkInfo.Vswitch[i]
			}
		}
		return nil
	}
	uplinked := func(vs *types.HostVirtualSwitch) bool {
		return len(vs.Pnic) > 0 || (vs.Spec.Bridge != nil)
	}

	var existing *types.HostPortGroup
	if m.NetworkInfo != nil {
		for i := range m.NetworkInfo.Portgroup {
			if m.NetworkInfo.Portgroup[i].Spec.Name == name {
				existing = &m.NetworkInfo.Portgroup[i]
			}
		}
	}
	if existing != nil {
		vs := vswitch(existing.Spec.VswitchName)
		if vs == nil || uplinked(vs) {
			return nil, fmt.Errorf("host %s: port group %s is on vSwitch %q, which has an uplink (or is unknown): not isolated",
				hostName, name, existing.Spec.VswitchName)
		}
	} else {
		if vs := vswitch(IsolatedSwitch); vs == nil {
			// No Bridge: a vSwitch without physical NICs.
			if err := ns.AddVirtualSwitch(ctx, IsolatedSwitch, &types.HostVirtualSwitchSpec{NumPorts: 128}); err != nil && !types.IsAlreadyExists(err) {
				return nil, fmt.Errorf("host %s: add vSwitch %s: %w", hostName, IsolatedSwitch, err)
			}
		} else if uplinked(vs) {
			return nil, fmt.Errorf("host %s: vSwitch %s has an uplink: not isolated", hostName, IsolatedSwitch)
		}
		if err := ns.AddPortGroup(ctx, types.HostPortGroupSpec{Name: name, VswitchName: IsolatedSwitch, Policy: types.HostNetworkPolicy{}}); err != nil {
			return nil, fmt.Errorf("host %s: add port group %s on %s: %w", hostName, name, IsolatedSwitch, err)
		}
	}
	fd := find.NewFinder(c.Client, false)
	fd.SetDatacenter(dc)
	net, err := fd.Network(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("port group %s: %w", name, err)
	}
	return net, nil
}
