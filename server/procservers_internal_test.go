package server

import (
	"testing"

	"github.com/asrdr/asr/server/api"
)

func TestPickLeastLoaded(t *testing.T) {
	ps := func(name, state string, rate float64, machines int) api.ProcessServerInfo {
		return api.ProcessServerInfo{Name: name, State: state, Machines: machines, Figures: api.ProcessServer{UploadRate: rate}}
	}
	for _, tc := range []struct {
		name string
		l    []api.ProcessServerInfo
		want string
	}{
		{"none", nil, ""},
		{"only unhealthy", []api.ProcessServerInfo{ps("ps1", api.PSNoHeartbeat, 0, 0)}, ""},
		{"lowest upload rate", []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 5e6, 1), ps("ps1", api.PSHealthy, 1e6, 9), ps("ps2", api.PSHealthy, 3e6, 0)}, "ps1"},
		{"a silent one is never picked", []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 5e6, 1), ps("ps1", api.PSNoHeartbeat, 0, 0)}, "builtin"},
		{"same rate: fewer machines", []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 0, 3), ps("ps1", api.PSHealthy, 0, 1), ps("ps2", api.PSHealthy, 0, 2)}, "ps1"},
	} {
		got, ok := pickLeastLoaded(tc.l)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("%s: %q, %v; want %q", tc.name, got, ok, tc.want)
		}
	}
}
