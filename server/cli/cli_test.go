package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/vmware/vcsim"
)

// TestMain makes the passphrase key derivation cheap: every server start
// derives the vault and registration keys at the vault's cost otherwise.
func TestMain(m *testing.M) {
	replication.VaultKDF = replication.KDFParams{Time: 1, Memory: 1 << 10, Threads: 1}
	// The vCenter simulators the tests run side by side, created before
	// any runs (vcsim.Prepare says why); a test past the count fails.
	if err := vcsim.Prepare(4); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	vcsim.Discard()
	os.Exit(code)
}

// result is what one run of the command line did.
type result struct {
	code           int
	stdout, stderr string
}

// runCLI runs the command line in-process.
func runCLI(t *testing.T, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	code := Main(args, &out, &errOut, "test")
	return result{code, out.String(), errOut.String()}
}

// mustRun runs the command line and fails the test unless it succeeds.
func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	r := runCLI(t, args...)
	if r.code != 0 {
		t.Fatalf("asr %s: exit %d, stderr:\n%s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r.stdout
}

// mustFail runs the command line and fails the test unless it exits 1 with
// an error message containing want.
func mustFail(t *testing.T, want string, args ...string) {
	t.Helper()
	r := runCLI(t, args...)
	if r.code != 1 || !strings.Contains(r.stderr, "asr: ") || !strings.Contains(r.stderr, want) {
		t.Fatalf("asr %s: exit %d, stderr %q; want exit 1 and an error containing %q", strings.Join(args, " "), r.code, r.stderr, want)
	}
}

func TestHelpExitsZero(t *testing.T) {
	cases := [][]string{{"help"}, {"-h"}, {"--help"}, {"policy", "-h"}, {"policy", "help"}, {"group", "--help"}}
	for cmd := range commands {
		cases = append(cases, []string{cmd, "-h"}, []string{cmd, "--help"})
	}
	for _, verb := range []string{"list", "show", "create", "set", "assign"} {
		cases = append(cases, []string{"policy", verb, "-h"})
	}
	cases = append(cases, []string{"group", "set", "-h"}, []string{"group", "clear", "-h"})
	// Every verb of the commands that take one, with and without its
	// positional argument.
	for cmd, verbs := range map[string][]string{
		"vcenter": {"add", "list", "remove"},
		"plan":    {"create", "list", "show", "delete"},
		"job":     {"show", "confirm", "cancel"},
		"policy":  {"list", "show", "create", "set", "assign"},
		"group":   {"set", "clear"},
		"ps":      {"list", "switch", "remove"},
	} {
		for _, verb := range verbs {
			for _, h := range []string{"-h", "--help"} {
				cases = append(cases, []string{cmd, verb, h}, []string{cmd, verb, "x", h})
			}
		}
	}
	for _, args := range cases {
		r := runCLI(t, args...)
		if r.code != 0 {
			t.Errorf("asr %s: exit %d, stderr %q; want 0", strings.Join(args, " "), r.code, r.stderr)
		}
		if r.stdout == "" && !strings.Contains(r.stderr, "Usage of asr") {
			t.Errorf("asr %s printed no help (stdout %q, stderr %q)", strings.Join(args, " "), r.stdout, r.stderr)
		}
	}
}

func TestVersion(t *testing.T) {
	for _, arg := range []string{"version", "--version", "-v"} {
		if got := mustRun(t, arg); got != "asr test\n" {
			t.Errorf("asr %s = %q", arg, got)
		}
	}
}

// Bad usage exits 1 with the reason, before anything is contacted or
// started (no server runs here; --data points nowhere).
func TestBadUsage(t *testing.T) {
	nowhere := filepath.Join(t.TempDir(), "none")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "no command given"},
		{[]string{"bogus"}, `unknown command "bogus"`},
		{[]string{"status", "--bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"status", "extra"}, `unexpected argument "extra"`},
		{[]string{"status", "--data", nowhere}, "admin token"},
		{[]string{"points"}, "--machine (or --group) is required"},
		{[]string{"recover", "--machine", "vm1"}, "--machine (or --group) and --out are required"},
		{[]string{"recover", "--machine", "vm1", "--out", nowhere, "--format", "qcow2"}, `--format "qcow2": want raw or vhd`},
		{[]string{"recover", "--machine", "vm1", "--out", nowhere, "--point", "1", "--time", "2026-11-26T09:30:00Z"}, "give --point or --time, not both"},
		{[]string{"recover", "--machine", "vm1", "--out", nowhere, "--time", "yesterday"}, "want RFC 3339"},
		{[]string{"recover", "--machine", "vm1", "--out", nowhere, "--to-blob", "x"}, "--to-blob needs --format vhd"},
		{[]string{"points", "--machine", "vm1", "--target", "file://" + nowhere}, "--target needs --passphrase-file"},
		{[]string{"points", "--group", "web", "--point", "latest"}, "--point goes with --machine, not --group"},
		{[]string{"policy"}, "asr policy list"},
		{[]string{"policy", "show"}, "give the policy name first"},
		{[]string{"group"}, "usage: asr group set"},
		{[]string{"group", "set", "--machine", "vm1"}, "--machine (and, for set, --group) are required"},
		{[]string{"server", "--target-tier", "gold"}, `--target-tier "gold"`},
		{[]string{"server", "--cache-max", "lots"}, "--cache-max"},
		{[]string{"server", "--cache-max", "0"}, "--cache-max 0: want a positive size"},
		{[]string{"server", "--azure-cloud", "mars"}, `Azure cloud "mars"`},
		{[]string{"server", "--azure-arm-endpoint", "http://arm.example.test"}, "want an https URL"},
		{[]string{"server", "--azure-authority-host", "login.example.test"}, "want an https URL"},
		{[]string{"server", "--azure-ca-file", nowhere}, "Azure CA file"},
		{[]string{"agent", "--nbd", "unix:/tmp/x.sock"}, "at least one --disk NAME=PATH is required"},
		{[]string{"agent", "--disk", "d"}, "want NAME=PATH"},
		{[]string{"agent", "--disk", "d=/dev/null", "--nbd", "unix:/x", "--name", "vm1", "--spool-max", "lots"}, "--spool-max"},
		{[]string{"agent", "--disk", "d=/dev/null", "--nbd", "unix:/x", "--name", "vm1", "--memory-limit", "lots"}, "--memory-limit"},
		{[]string{"agent", "--disk", "d=/dev/null", "--nbd", "unix:/x", "--name", "vm1", "--memory-log", "lots"}, "--memory-log"},
		{[]string{"agent", "--disk", "d=/dev/null", "--nbd", "unix:/x", "--name", "vm1", "--memory-log", "1KiB"}, "--memory-log 1024: want 0 (none) or 1MiB to half of --spool-max"},
		{[]string{"agent", "--disk", "d=/dev/null", "--nbd", "unix:/x", "--name", "vm1", "--memory-limit", "8MiB"}, "--memory-limit 8388608: the minimum is 16MiB (0: none)"},
		{[]string{"demo", "--machines", "0"}, "--machines: 1 to 16"},
		{[]string{"demo", "--disk-size", "big"}, `size "big"`},
		{[]string{"verify"}, "--machine is required"},
		{[]string{"unprotect"}, "--machine is required"},
		{[]string{"unprotect", "--group", "web"}, "unprotect takes --machine, not --group"},
		{[]string{"unprotect", "--machine", "vm1", "extra"}, `unexpected argument "extra"`},
		{[]string{"failback"}, "name the machine (--machine M), the recovery plan (--plan P) or the replication group (--group G)"},
		{[]string{"failback", "--plan", "p", "--group", "g"}, "one of them"},
		{[]string{"failback", "--machine", "vm1", "--vcenter", "vc1"}, "go with --alternate"},
		{[]string{"failback", "--machine", "vm1", "--alternate", "--vcenter", "vc1"}, "--vcenter N --datastore DS"},
		{[]string{"failback", "--machine", "vm1", "--alternate", "--datastore", "ds1"}, "--vcenter N --datastore DS"},
		{[]string{"reprotect"}, "name the machine (--machine M), the recovery plan (--plan P) or the replication group (--group G)"},
		{[]string{"failback", "--machine", "vm1", "--plan", "app"}, "one of them"},
		{[]string{"failback", "--plan", "app", "--alternate", "--vcenter", "vc1", "--datastore", "ds1"}, "not a plan"},
		{[]string{"process-server"}, "--config https://HOST:PORT is required"},
		{[]string{"process-server", "--config", "https://x:1"}, "--passphrase-file is required"},
		{[]string{"process-server", "--config", "https://x:1", "--passphrase-file", nowhere}, "--name is required"},
		{[]string{"process-server", "--config", "https://x:1", "--passphrase-file", nowhere, "--name", "p", "--cache-max", "lots"}, "--cache-max"},
		{[]string{"process-server", "--config", "https://x:1", "--passphrase-file", nowhere, "--name", "p", "--cache-max", "0KiB"}, "want a positive size"},
		{[]string{"ps"}, "no verb given"},
		{[]string{"ps", "bogus"}, `unknown verb "bogus"`},
		{[]string{"ps", "remove"}, "give the process server's name"},
		{[]string{"ps", "switch", "--machine", "vm1"}, "--machine M or --from PS, and --to, are required"},
		{[]string{"ps", "switch", "--machine", "vm1", "--from", "ps1", "--to", "builtin"}, "--machine M or --from PS, and --to, are required"},
		{[]string{"ps", "list", "extra"}, `unexpected argument "extra"`},
	} {
		mustFail(t, tc.want, tc.args...)
	}
}

// startServer starts a real server in-process on loopback ports and
// returns the flags that point the operator commands at it.
func startServer(t *testing.T) (*server.Server, []string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "srv")
	srv, err := server.Open(context.Background(), server.Config{DataDir: dir, Listen: "127.0.0.1:0", DataListen: "127.0.0.1:0",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		srv.Close()
	})
	return srv, []string{"--server", srv.URL(), "--data", dir}
}

func mustJSON(t *testing.T, s string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(s), v); err != nil {
		t.Fatalf("%v in %q", err, s)
	}
}

// The operator commands against a real server: tables, --json, errors.
func TestOperatorCommands(t *testing.T) {
	srv, conn := startServer(t)
	with := func(args ...string) []string { return append(args, conn...) }

	// No machine yet.
	if got := mustRun(t, with("status")...); !strings.HasPrefix(got, "MACHINE  AGENT  STATE  RPO  LAST POINT  DISKS\n") {
		t.Errorf("status = %q", got)
	}
	if got := mustRun(t, with("status", "--json")...); got != "[]\n" {
		t.Errorf("status --json = %q", got)
	}
	if _, _, err := srv.DB().CreateMachine(context.Background(), "id-vm1", "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	got := mustRun(t, with("status")...)
	lines := strings.Split(strings.TrimSpace(got), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[1], "vm1 ") || !strings.Contains(lines[1], "disconnected") {
		t.Errorf("status with one machine = %q", got)
	}
	var ms []api.Machine
	mustJSON(t, mustRun(t, with("status", "--json")...), &ms)
	if len(ms) != 1 || ms[0].Name != "vm1" || ms[0].ID != "id-vm1" {
		t.Errorf("status --json = %+v", ms)
	}
	mustJSON(t, mustRun(t, with("status", "--machine", "vm1", "--json")...), &ms)
	if len(ms) != 1 || ms[0].Name != "vm1" {
		t.Errorf("status --machine vm1 --json = %+v", ms)
	}
	mustFail(t, `no machine named "vm2"`, with("status", "--machine", "vm2")...)

	// The process server.
	if got := mustRun(t, with("status", "--process-server")...); !strings.HasPrefix(got, "target:       localfs:") || !strings.Contains(got, "\ncache disk:   ") ||
		!strings.Contains(got, "\ncache bound:  8589934592 bytes (--cache-max)") {
		t.Errorf("status --process-server = %q", got)
	}
	var ps api.ProcessServer
	mustJSON(t, mustRun(t, with("status", "--process-server", "--json")...), &ps)
	if !strings.HasPrefix(ps.Target, "localfs:") {
		t.Errorf("status --process-server --json: target %q", ps.Target)
	}

	// Points.
	if got := mustRun(t, with("points", "--machine", "vm1")...); got != "no recovery points yet\n" {
		t.Errorf("points = %q", got)
	}
	if got := mustRun(t, with("points", "--machine", "vm1", "--json")...); got != "[]\n" {
		t.Errorf("points --json = %q", got)
	}
	if got := mustRun(t, with("points", "--group", "web")...); got != "no group points yet\n" {
		t.Errorf("points --group = %q", got)
	}
	if got := mustRun(t, with("points", "--group", "web", "--json")...); got != "[]\n" {
		t.Errorf("points --group --json = %q", got)
	}
	mustFail(t, `no machine named "vm2"`, with("points", "--machine", "vm2")...)
	mustFail(t, "not connected", with("tag", "--machine", "vm1")...)

	// Policies.
	got = mustRun(t, with("policy", "list")...)
	if !strings.HasPrefix(got, "NAME ") || !strings.Contains(got, "\ndefault ") {
		t.Errorf("policy list = %q", got)
	}
	var pols []api.PolicyJSON
	mustJSON(t, mustRun(t, with("policy", "list", "--json")...), &pols)
	if len(pols) == 0 {
		t.Error("policy list --json: no policy")
	}
	var p api.PolicyJSON
	mustJSON(t, mustRun(t, with("policy", "create", "gold", "--rpo-threshold", "10m")...), &p)
	if p.Name != "gold" || p.RPOThreshold != "10m0s" {
		t.Errorf("policy create = %+v", p)
	}
	mustJSON(t, mustRun(t, with("policy", "set", "gold", "--retention", "48h")...), &p)
	if p.Retention != "48h0m0s" {
		t.Errorf("policy set = %+v", p)
	}
	mustJSON(t, mustRun(t, with("policy", "show", "gold")...), &p)
	if p.Name != "gold" || p.Retention != "48h0m0s" {
		t.Errorf("policy show = %+v", p)
	}
	mustFail(t, `rpo_threshold "soon": not a duration`, with("policy", "set", "gold", "--rpo-threshold", "soon")...)
	mustFail(t, `unknown command "frob"`, with("policy", "frob")...)
	mustFail(t, "--machine and --policy are required", with("policy", "assign", "--policy", "gold")...)
	if got := mustRun(t, with("policy", "assign", "--machine", "vm1", "--policy", "gold")...); got != "machine vm1 now replicates under policy gold\n" {
		t.Errorf("policy assign = %q", got)
	}

	// Groups.
	if got := mustRun(t, with("group", "set", "--machine", "vm1", "--group", "web")...); got != "machine vm1 is in replication group web: its points are now the group's\n" {
		t.Errorf("group set = %q", got)
	}
	if got := mustRun(t, with("group", "clear", "--machine", "vm1")...); got != "machine vm1 is in no replication group\n" {
		t.Errorf("group clear = %q", got)
	}

	// Events.
	if got := mustRun(t, with("events")...); strings.Join(strings.Fields(strings.SplitN(got, "\n", 2)[0]), " ") != "TIME MACHINE SEVERITY KIND MESSAGE" {
		t.Errorf("events = %q", got)
	}
	var evs []api.EventJSON
	mustJSON(t, mustRun(t, with("events", "--json", "--machine", "vm1")...), &evs)

	// Resync and verify settings.
	if got := mustRun(t, with("resync", "--window", "always")...); got != "resync window set to always\n" {
		t.Errorf("resync --window = %q", got)
	}
	mustFail(t, "--machine is required", with("resync")...)
	if got := mustRun(t, with("resync", "--machine", "vm1", "--status")...); got != "machine vm1: no resync needed or running\n" {
		t.Errorf("resync --status = %q", got)
	}
	if got := mustRun(t, with("verify", "--every", "168h")...); got != "scrub interval set to 168h\n" {
		t.Errorf("verify --every = %q", got)
	}

	// A wrong token is refused.
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("wrong\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustFail(t, "HTTP 401", with("status", "--token-file", tok)...)
}

// asr unprotect against a real server: the replica kept (the machine
// listed as unprotected), again (nothing to do), then deleted.
func TestUnprotectCommand(t *testing.T) {
	srv, conn := startServer(t)
	with := func(args ...string) []string { return append(args, conn...) }
	const id = "0123456789abcdef0123456789abcdef"
	if _, _, err := srv.DB().CreateMachine(context.Background(), id, "vm1", "1"); err != nil {
		t.Fatal(err)
	}
	mustFail(t, `no machine named "vm2"`, with("unprotect", "--machine", "vm2")...)
	for range 2 {
		got := mustRun(t, with("unprotect", "--machine", "vm1")...)
		if !strings.HasPrefix(got, "machine vm1 is unprotected: its agent is refused; its replica and recovery points are kept") {
			t.Errorf("unprotect = %q", got)
		}
	}
	var ms []api.Machine
	mustJSON(t, mustRun(t, with("status", "--machine", "vm1", "--json")...), &ms)
	if len(ms) != 1 || !ms[0].Unprotected || ms[0].State != api.StateUnprotected {
		t.Errorf("status after unprotect = %+v", ms)
	}
	if got := mustRun(t, with("status")...); !strings.Contains(strings.Join(strings.Fields(got), " "), "vm1 refused unprotected - -") {
		t.Errorf("status after unprotect = %q", got)
	}
	mustFail(t, "is unprotected", with("tag", "--machine", "vm1")...)
	got := mustRun(t, with("unprotect", "--machine", id, "--delete-replica")...)
	if got != "machine "+id+" is unprotected: its agent is refused, and its replica, recovery points and records are deleted\n" {
		t.Errorf("unprotect --delete-replica = %q", got)
	}
	mustFail(t, `no machine named "vm1"`, with("status", "--machine", "vm1")...)
	mustFail(t, `no machine named "vm1"`, with("unprotect", "--machine", "vm1", "--delete-replica")...)
}

// The VMware commands against a real server and govmomi's simulator:
// vcenter add (the thumbprint asked for, then pinned), list, vms --json
// (the fields an operator scripts against), protect's refusals before any
// job, jobs, vcenter remove.
func TestVMwareCommands(t *testing.T) {
	_, conn := startServer(t)
	with := func(args ...string) []string { return append(args, conn...) }
	sim, err := vcsim.Start("administrator@vsphere.local", "cli-Vc-Pw-77")
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte(sim.Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	add := []string{"vcenter", "add", "--name", "vc1", "--url", sim.URL, "--user", sim.User, "--password-file", pw}
	mustFail(t, "--thumbprint "+sim.Thumbprint, with(add...)...)
	mustFail(t, "--name, --url, --user and --password-file are required", with("vcenter", "add", "--name", "vc1")...)
	if got := mustRun(t, with(append(add, "--thumbprint", sim.Thumbprint)...)...); !strings.Contains(got, "certificate pinned: "+sim.Thumbprint) {
		t.Errorf("vcenter add = %q", got)
	}
	var vcs []api.VCenter
	mustJSON(t, mustRun(t, with("vcenter", "list", "--json")...), &vcs)
	if len(vcs) != 1 || vcs[0].Name != "vc1" || vcs[0].Thumbprint != sim.Thumbprint || strings.Contains(fmt.Sprint(vcs), sim.Password) {
		t.Fatalf("vcenter list = %+v", vcs)
	}
	var vms []map[string]any
	deadline := time.Now().Add(time.Minute)
	for len(vms) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("vms lists nothing")
		}
		time.Sleep(50 * time.Millisecond)
		mustJSON(t, mustRun(t, with("vms", "--vcenter", "vc1", "--json")...), &vms)
	}
	for _, k := range []string{"name", "bios_uuid", "power_state", "vcenter", "machine", "disks"} {
		if _, ok := vms[0][k]; !ok {
			t.Errorf("vms --json lacks %q: %v", k, vms[0])
		}
	}
	if got := mustRun(t, with("vms")...); !strings.Contains(got, "BIOS UUID") || !strings.Contains(got, vms[0]["name"].(string)) {
		t.Errorf("vms = %q", got)
	}
	key := filepath.Join(t.TempDir(), "key")
	os.WriteFile(key, []byte("not a key"), 0o600)
	mustFail(t, "--vm, --ssh and --ssh-key are required", with("protect", "--vm", "x")...)
	mustFail(t, `no VM named "nope"`, with("protect", "--vm", "nope", "--ssh", "root@127.0.0.1:1", "--ssh-key", key, "--disk", "d0=/dev/sdb")...)
	name := vms[0]["name"].(string)
	mustFail(t, "name the disks to protect", with("protect", "--vm", name, "--ssh", "root@127.0.0.1:1", "--ssh-key", key)...)
	mustFail(t, "not a valid PEM private key", with("protect", "--vm", name, "--ssh", "root@127.0.0.1:1", "--ssh-key", key, "--disk", "d0=/dev/sdb")...)
	mustFail(t, "want NAME=DEVICE", with("protect", "--vm", name, "--disk", "d0")...)
	if got := mustRun(t, with("jobs")...); !strings.HasPrefix(got, "ID") || strings.Count(got, "\n") != 1 {
		t.Errorf("a refused protect started a job: %q", got)
	}
	if got := mustRun(t, with("vcenter", "remove", "vc1")...); got != "vCenter vc1 removed\n" {
		t.Errorf("vcenter remove = %q", got)
	}
	mustFail(t, `no vCenter named "vc1"`, with("vcenter", "remove", "vc1")...)
}

// `asr server --cache-max` is the built-in process server's cache bound,
// parsed as `asr process-server`'s (8GiB by default).
func TestServerCacheMax(t *testing.T) {
	e := &env{out: io.Discard, errOut: io.Discard}
	for _, tc := range []struct {
		args []string
		want int64
	}{{nil, 8 << 30}, {[]string{"--cache-max", "64MiB"}, 64 << 20}, {[]string{"--cache-max", "1TiB"}, 1 << 40}} {
		c, err := serverFlags(e, tc.args)
		if err != nil || c.CacheMaxBytes != tc.want {
			t.Errorf("asr server %v: cache bound %d, %v; want %d", tc.args, c.CacheMaxBytes, err, tc.want)
		}
	}
}
