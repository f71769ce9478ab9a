// Package cli is asr's command line: every subcommand of the one binary
// (server, agent, demo and the operator commands), its flags, its output
// and its exit status. main only calls [Main]. It is the one place where
// concrete types are wired together for a role.
//
// The operator commands talk to a running server through [api.Client], or,
// with --target and --passphrase-file, read the target storage directly.
// Each command group has its file: server.go, agent.go, demo.go, status.go,
// points.go (points, tag), recover.go, policy.go, events.go, group.go,
// resync.go, verify.go, unprotect.go, metrics.go, alerts.go, procserver.go
// (process-server, ps); op.go holds
// what the operator commands share.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/pprof"
	"runtime/trace"
	"syscall"
	"text/tabwriter"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/vmware/push"
)

const usage = `asr — disaster recovery for VMware virtual machines

Usage:
  asr server   [--data DIR] [--listen ADDR] [--data-listen ADDR] [--target URL]
  asr agent    --server URL --passphrase-file F --state DIR --name NAME --disk NAME=PATH... --nbd ADDR
  asr process-server --config https://CS:8443 --passphrase-file F --name NAME [--data DIR] [--data-listen ADDR] [--target URL]
  asr ps       list [--json] | switch --machine M|--from PS --to PS|builtin | remove NAME
  asr demo     [--data DIR] [--listen ADDR]
  asr status   [--machine M] [--json] | --process-server [--json]
  asr points   --machine M [--json] [--target URL --passphrase-file F]
  asr tag      --machine M [--wait] [--app]
  asr policy   list|show|create|set|assign ...
  asr events   [--machine M]
  asr alerts   [list] [--all] [--json] | ack ID | test | webhook --url URL | webhook --off | email --off
  asr alerts   email --smtp HOST:PORT --from ADDR --to ADDR[,ADDR...] [--starttls=false] [--user U --password-file F] [--smtp-ca-file F | --no-smtp-ca]
               [--min-severity warning|critical] [--digest 5m]
  asr group    set --machine M --group G | clear --machine M
  asr resync   --machine M [--disk D] [--wait] | --machine M --status | --window HH:MM-HH:MM [--policy P]
  (points, tag and recover take --group G instead of --machine M for a replication group)
  asr recover  --machine M --point latest|ID --out DIR [--format raw|vhd [--to-blob NAME]] [--accept-damage] [--target URL --passphrase-file F]
  asr verify   --machine M [--point P] [--no-source] [--wait] [--target URL --passphrase-file F] | --every 168h|off
  asr vcenter  add --name N --url https://HOST/sdk --user U --password-file F [--thumbprint T] | list | remove NAME
  asr vms      [--vcenter NAME] [--json]
  asr protect  --vm NAME --ssh USER@HOST[:PORT] --ssh-key FILE --disk NAME=DEVICE... [--policy P] [--mode nbd|scan]
  asr unprotect --vm NAME --ssh USER@HOST[:PORT] --ssh-key FILE [--delete-replica] | --machine M [--delete-replica]
  asr jobs     [ID] [--json]
  asr job      show|confirm|cancel ID
  asr failover --machine M|--group G|--plan P [--test] [--planned] [--point ID|latest|latest-app | --time T] --to nbd|qemu|vsphere|azure
               [--boot-check REGEX] [--boot-port N] [--vcenter N --datastore DS [--host H|--pool P] [--folder F] [--network N]]
               [--subscription S --resource-group RG --location L --vnet V --subnet SN [--size SIZE]]
  asr failover --machine M|--group G|--plan P --cleanup | --commit | --change-point ID  |  --list [--all] [--json]
  asr reprotect --machine M|--plan P|--group G  (after a committed failover to nbd, vsphere or azure: send its changes back, an unplanned
                                        one or a VM's after a checksum compare; after failback: protect forward again)
  asr failback  --machine M|--plan P|--group G  (stop the failed-over machine or recovered VM, drain, verify, thaw the original, power its
                                        linked VM on; a plan: shut down last group first, drain and verify all, switch all at once,
                                        power on in plan order with its failback actions, resumed there after a server restart;
                                        a replication group: every member drained and verified, all switched at once)
  asr failback  --machine M --alternate --vcenter N --datastore DS [--vm-name NAME] [--host H|--pool P] [--folder F] [--network N]
               (a new VM with a full, verified copy of the failed-over disks; the original is not touched)
  asr plan     create NAME --group 1=M1,M2 [--group 2=M3] [--pre N=[failback:]script:PATH] [--post N=manual:TEXT] [--drill-every 168h --boot-check RE]
               | list | show NAME | delete NAME [--json]
  asr metrics  token [--rotate] [--json]   (the read-only token of GET /metrics, Prometheus)
  asr version

Operator commands talk to a running server (--server, --token-file, --ca-file,
defaulting to a local server with --data ./asr-data), or, with --target and
--passphrase-file, straight to the target storage when the site is gone.
Run "asr COMMAND -h" for a command's flags.
`

// env is what a command runs with: where its output and its diagnostics
// (flag errors, usage, logs) go, and the logger of the long-running roles.
type env struct {
	out, errOut io.Writer
	log         *slog.Logger
}

// flags makes a command's flag set, reporting to the command's stderr.
func (e *env) flags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.errOut)
	return fs
}

// commands maps each subcommand to the function that runs it.
var commands = map[string]func(ctx context.Context, e *env, args []string) error{
	"server":    runServer,
	"agent":     runAgent,
	"demo":      runDemo,
	"status":    runStatus,
	"points":    runPoints,
	"tag":       runTag,
	"recover":   runRecover,
	"policy":    runPolicy,
	"events":    runEvents,
	"group":     runGroup,
	"resync":    runResync,
	"verify":    runVerify,
	"vcenter":   runVCenter,
	"vms":       runVMs,
	"protect":   runProtect,
	"jobs":      runJobs,
	"unprotect": runUnprotect,
	"failover":  runFailover,
	"reprotect": runReprotect,
	"failback":  runFailback,
	"plan":      runPlan,
	"job":       runJob,
	"metrics":   runMetrics,
	"alerts":    runAlerts,

	"process-server": runProcessServer,
	"ps":             runPS,
}

// Main runs the asr command line with args (without the program name) and
// returns the exit status: 0 on success and for help (-h, --help), 1 for
// any error, which is printed to stderr. version is the build's version
// ("" reads it from the module's build information).
func Main(args []string, stdout, stderr io.Writer, version string) int {
	// The reachability probe a push install runs on a guest with the
	// copied binary (vmware/push): its own output and exit status.
	if len(args) > 0 && args[0] == push.ProbeCommand {
		return push.ProbeMain(args[1:])
	}
	err := run(args, stdout, stderr, buildVersion(version))
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintln(stderr, "asr:", err)
	return 1
}

func run(args []string, stdout, stderr io.Writer, version string) error {
	// Written only when they change: a test runs commands beside an agent
	// in this process, which reads agent.Version.
	if agent.Version != version || server.Version != version {
		agent.Version, server.Version = version, version
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "version", "--version", "-v":
		fmt.Fprintln(stdout, "asr", version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	runCmd, ok := commands[cmd]
	if !ok {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// ASR_CPUPROFILE=PREFIX writes a CPU profile of the command to
	// PREFIX.COMMAND (for performance work; see BENCHMARKS.md), and
	// ASR_TRACE=PREFIX an execution trace (where goroutines wait: go tool
	// trace -pprof=sync).
	for _, p := range []struct {
		env   string
		start func(io.Writer) error
		stop  func()
	}{{"ASR_CPUPROFILE", pprof.StartCPUProfile, pprof.StopCPUProfile}, {"ASR_TRACE", trace.Start, trace.Stop}} {
		path := os.Getenv(p.env)
		if path == "" {
			continue
		}
		f, err := os.Create(path + "." + cmd)
		if err != nil {
			return err
		}
		if err := p.start(f); err != nil {
			f.Close()
			return err
		}
		defer func() {
			p.stop()
			f.Close()
		}()
	}
	// ASR_MEMPROFILE=PREFIX writes a heap profile of the command to
	// PREFIX.COMMAND when it ends (memory work; see BENCHMARKS.md).
	if path := os.Getenv("ASR_MEMPROFILE"); path != "" {
		defer func() {
			if f, err := os.Create(path + "." + cmd); err == nil {
				pprof.Lookup("heap").WriteTo(f, 0)
				f.Close()
			}
		}()
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: logLevel()}))
	slog.SetDefault(log)
	return runCmd(ctx, &env{out: stdout, errOut: stderr, log: log}, rest)
}

// buildVersion is v, or else the module's version and VCS revision.
func buildVersion(v string) string {
	if v != "" {
		return v
	}
	v = "dev"
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += "+" + s.Value[:12]
			}
		}
	}
	return v
}

func logLevel() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(os.Getenv("ASR_LOG_LEVEL"))); err != nil {
		return slog.LevelInfo
	}
	return l
}

// isHelp reports whether arg asks for help.
func isHelp(arg string) bool {
	return arg == "-h" || arg == "--help" || arg == "-help" || arg == "help"
}

// output writes v as indented JSON with asJSON, or else what text writes,
// through a tabwriter: tab-separated cells are aligned in columns, lines
// without tabs are written as they are.
func output(w io.Writer, asJSON bool, v any, text func(tw *tabwriter.Writer)) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	text(tw)
	return tw.Flush()
}
