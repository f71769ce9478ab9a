// Command asr is open-source disaster recovery for VMware virtual machines:
// one static binary that runs as the configuration/process server, as the
// agent on protected guests, as a self-contained demo, and as the operator
// CLI. See README.md and docs/ARCHITECTURE.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/pprof"
	"syscall"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/server"
)

// version is set at build time with -ldflags "-X main.version=...", or read
// from the module's build information.
var version = ""

func buildVersion() string {
	if version != "" {
		return version
	}
	v := "dev"
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

const usage = `asr — disaster recovery for VMware virtual machines

Usage:
  asr server   [--data DIR] [--listen ADDR] [--data-listen ADDR] [--target URL]
  asr agent    --server URL --passphrase-file F --state DIR --name NAME --disk NAME=PATH... --nbd ADDR
  asr demo     [--data DIR] [--listen ADDR]
  asr status   [--machine M] [--json] | --process-server [--json]
  asr points   --machine M [--json] [--target URL --passphrase-file F]
  asr tag      --machine M [--wait] [--app]
  asr policy   list|show|create|set|assign ...
  asr events   [--machine M]
  asr group    set --machine M --group G | clear --machine M
  asr resync   --machine M [--disk D] [--wait] | --machine M --status | --window HH:MM-HH:MM [--policy P]
  (points, tag and recover take --group G instead of --machine M for a replication group)
  asr recover  --machine M --point latest|ID --out DIR [--format raw|vhd [--to-blob NAME]] [--accept-damage] [--target URL --passphrase-file F]
  asr verify   --machine M [--point P] [--no-source] [--wait] [--target URL --passphrase-file F] | --every 168h|off
  asr version

Operator commands talk to a running server (--server, --token-file, --ca-file,
defaulting to a local server with --data ./asr-data), or, with --target and
--passphrase-file, straight to the target storage when the site is gone.
Run "asr COMMAND -h" for a command's flags.
`

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "asr:", err)
		}
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	v := buildVersion()
	agent.Version, server.Version = v, v
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd, rest := args[0], args[1:]
	// ASR_CPUPROFILE=PREFIX writes a CPU profile of the command to
	// PREFIX.COMMAND (for performance work; see BENCHMARKS.md).
	if path := os.Getenv("ASR_CPUPROFILE"); path != "" {
		f, err := os.Create(path + "." + cmd)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: logLevel()}))
	slog.SetDefault(log)
	switch cmd {
	case "server":
		return runServer(ctx, rest, log)
	case "agent":
		return runAgent(ctx, rest, log)
	case "demo":
		return runDemo(ctx, rest, stdout, log)
	case "status":
		return runStatus(ctx, rest, stdout)
	case "points":
		return runPoints(ctx, rest, stdout)
	case "tag":
		return runTag(ctx, rest, stdout)
	case "recover":
		return runRecover(ctx, rest, stdout)
	case "policy":
		return runPolicy(ctx, rest, stdout)
	case "events":
		return runEvents(ctx, rest, stdout)
	case "group":
		return runGroup(ctx, rest, stdout)
	case "resync":
		return runResync(ctx, rest, stdout)
	case "verify":
		return runVerify(ctx, rest, stdout)
	case "version", "--version", "-v":
		fmt.Fprintln(stdout, "asr", v)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", cmd)
}

func logLevel() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(os.Getenv("ASR_LOG_LEVEL"))); err != nil {
		return slog.LevelInfo
	}
	return l
}

func runServer(ctx context.Context, args []string, log *slog.Logger) error {
	cfg, err := server.ParseFlags(args)
	if err != nil {
		return err
	}
	cfg.Logger = log
	s, err := server.Open(ctx, cfg)
	if err != nil {
		return err
	}
	err = s.Run(ctx)
	if cerr := s.Close(); err == nil {
		err = cerr
	}
	return err
}

func runAgent(ctx context.Context, args []string, log *slog.Logger) error {
	cfg, err := agent.ParseFlags(args)
	if err != nil {
		return err
	}
	cfg.Logger = log
	a, err := agent.New(ctx, cfg)
	if err != nil {
		return err
	}
	err = a.Run(ctx)
	if cerr := a.Close(); err == nil {
		err = cerr
	}
	return err
}
