package server

import (
	"context"
	"encoding/pem"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

func TestPickLeastLoaded(t *testing.T) {
	t.Parallel()
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

// The machines of a silent process server spread over the healthy ones by
// churn, the built-in one included: each machine placed counts on the one
// it goes to (its share of the silent one's churn, one machine more); a
// silent one is never chosen, even when it looks the least loaded.
func TestSpreadOver(t *testing.T) {
	t.Parallel()
	ps := func(name, state string, rate float64, machines int) api.ProcessServerInfo {
		return api.ProcessServerInfo{Name: name, State: state, Machines: machines, Figures: api.ProcessServer{UploadRate: rate}}
	}
	count := func(to []string) map[string]int {
		n := map[string]int{}
		for _, p := range to {
			n[p]++
		}
		return n
	}
	for _, tc := range []struct {
		name string
		l    []api.ProcessServerInfo
		n    int
		rate float64
		want map[string]int
	}{
		{"even load: one each in turn", []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 2e6, 2), ps("ps1", api.PSNoHeartbeat, 0, 4), ps("ps2", api.PSHealthy, 2e6, 2), ps("ps3", api.PSHealthy, 2e6, 2)},
			6, 6e6, map[string]int{"builtin": 2, "ps2": 2, "ps3": 2}},
		{"the idle one takes more, not all", []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 4e6, 2), ps("ps1", api.PSNoHeartbeat, 0, 4), ps("ps2", api.PSHealthy, 0, 0)},
			4, 8e6, map[string]int{"ps2": 3, "builtin": 1}},
		{"a second silent one is never chosen", []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 9e6, 5), ps("ps1", api.PSNoHeartbeat, 0, 3), ps("ps2", api.PSNoHeartbeat, 0, 0), ps("ps3", api.PSHealthy, 1e6, 1)},
			3, 3e6, map[string]int{"ps3": 3}},
		{"the silent one reported no churn: the healthy ones' mean per machine", []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 3e6, 3), ps("ps1", api.PSNoHeartbeat, 0, 2), ps("ps2", api.PSHealthy, 0, 0)},
			2, 0, map[string]int{"ps2": 2}},
		{"all idle: by machines", []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 0, 0), ps("ps1", api.PSNoHeartbeat, 0, 2), ps("ps2", api.PSHealthy, 0, 0)},
			2, 0, map[string]int{"builtin": 1, "ps2": 1}},
		{"only the built-in one is healthy", []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 5e6, 1), ps("ps1", api.PSNoHeartbeat, 0, 2)},
			2, 1e6, map[string]int{"builtin": 2}},
	} {
		to := spreadOver(tc.l, tc.n, tc.rate)
		if got := count(to); len(to) != tc.n || !maps.Equal(got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
	// The list given is not changed.
	l := []api.ProcessServerInfo{ps("builtin", api.PSHealthy, 1, 1), ps("ps2", api.PSHealthy, 1, 1)}
	spreadOver(l, 4, 4)
	if l[0].Machines != 1 || l[1].Figures.UploadRate != 1 {
		t.Fatalf("spreadOver changed its list: %+v", l)
	}
}

// A heartbeat's reports are bounded before anything of them is used:
// machines, points, events, damage blocks, resyncs, disks, results.
func TestCheckReportsBounds(t *testing.T) {
	t.Parallel()
	const id = "0123456789abcdef0123456789abcdef"
	one := func(n *api.PSNews) *api.ProcessServerHeartbeat {
		return &api.ProcessServerHeartbeat{Reports: []api.PSMachineReport{{MachineID: id, News: n}}}
	}
	if err := checkReports(one(&api.PSNews{Points: make([]replication.Point, api.MaxPSReportPoints), Events: make([]replication.AgentEvent, api.MaxPSReportEvents),
		State: &replication.MachineCatalog{ID: id}, Bytes: 5})); err != nil {
		t.Fatalf("at the bounds: %v", err)
	}
	for _, tc := range []struct {
		name string
		hb   *api.ProcessServerHeartbeat
		want string
	}{
		{"machines", &api.ProcessServerHeartbeat{Reports: make([]api.PSMachineReport, api.MaxPSReportMachines+1)}, "machines, at most"},
		{"results", &api.ProcessServerHeartbeat{Results: make([]api.PSCommandResult, api.MaxPSCommands+1)}, "command results"},
		{"no id", &api.ProcessServerHeartbeat{Reports: []api.PSMachineReport{{}}}, "not a machine id"},
		{"points", one(&api.PSNews{Points: make([]replication.Point, api.MaxPSReportPoints+1)}), "points in one heartbeat"},
		{"events", one(&api.PSNews{Events: make([]replication.AgentEvent, api.MaxPSReportEvents+1)}), "events"},
		{"damage blocks", one(&api.PSNews{Damage: []procserver.Damage{{Blocks: make([]int64, api.MaxPSDamageBlocks+1)}}}), "blocks"},
		{"resyncs", one(&api.PSNews{Resyncs: make([]replication.ResyncStatus, replication.MaxDisks+1)}), "resyncs"},
		{"another machine's catalog", one(&api.PSNews{State: &replication.MachineCatalog{ID: "ff"}}), "catalog view"},
		{"disks", one(&api.PSNews{State: &replication.MachineCatalog{ID: id, Disks: make([]replication.CatalogDisk, replication.MaxDisks+1)}}), "catalog view"},
		{"negative bytes", one(&api.PSNews{Bytes: -1}), "bytes received"},
		{"status", &api.ProcessServerHeartbeat{Reports: []api.PSMachineReport{{MachineID: id, Status: &replication.Status{Events: make([]replication.AgentEvent, replication.MaxStatusEvents+1)}}}}, "events"},
		{"scrub disks", &api.ProcessServerHeartbeat{Results: []api.PSCommandResult{{Scrub: &procserver.ScrubReport{Disks: make([]procserver.DiskScrub, api.MaxPSScrubEntries+1)}}}}, "a scrub report of"},
		{"scrub damaged", &api.ProcessServerHeartbeat{Results: []api.PSCommandResult{{Scrub: &procserver.ScrubReport{Points: []procserver.PointScrub{{Damaged: make([]int64, api.MaxPSScrubDamaged+1)}}}}}}, "damaged blocks"},
		{"image damaged", &api.ProcessServerHeartbeat{Results: []api.PSCommandResult{{Damaged: make([]int64, api.MaxPSImageDamaged+1)}}}, "an image's result"},
		{"scrub negative", &api.ProcessServerHeartbeat{Results: []api.PSCommandResult{{Scrub: &procserver.ScrubReport{Disks: []procserver.DiskScrub{{Checked: -1}}}}}}, "checked"},
	} {
		if err := checkReports(tc.hb); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
	}
}

// TestDamagedTrailerReachesTheClient: an image stream's damaged-block
// trailer at its largest (api.MaxPSImageDamaged offsets of a large disk,
// far past Go's default 4 KiB trailer read) reaches the API client whole,
// and the blocks past the list are counted, not dropped.
func TestDamagedTrailerReachesTheClient(t *testing.T) {
	t.Parallel()
	const size = 1 << 40
	d := make([]int64, api.MaxPSImageDamaged+5)
	for i := range d {
		d[i] = size - int64(len(d)-i)*4096
	}
	body := []byte("image")
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		startImage(w, int64(len(body)), true, "p1")
		w.Write(body)
		setDamagedTrailer(w, d, 7)
	}))
	defer srv.Close()
	dir := t.TempDir()
	caFile, tokFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "token")
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(caFile, ca, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokFile, []byte("token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := api.NewClient(srv.URL, tokFile, caFile)
	if err != nil {
		t.Fatal(err)
	}
	img, err := c.Image(context.Background(), "vm1", "p1", "d0", true)
	if err != nil {
		t.Fatal(err)
	}
	img.Size = size // the offsets are checked against the disk's size
	if _, err := io.Copy(io.Discard, img.Body); err != nil {
		t.Fatal(err)
	}
	got, more, err := img.Finish()
	if err != nil {
		t.Fatalf("the trailer of %d offsets: %v", api.MaxPSImageDamaged, err)
	}
	if len(got) != api.MaxPSImageDamaged || got[0] != d[0] || got[len(got)-1] != d[api.MaxPSImageDamaged-1] {
		t.Fatalf("listed %d damaged blocks, want the first %d", len(got), api.MaxPSImageDamaged)
	}
	if more != 5+7 {
		t.Fatalf("%d damaged blocks not listed, want 12", more)
	}
}
