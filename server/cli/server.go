package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/asrdr/asr/azure"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
)

// runServer runs the configuration server and its process server until
// ctx ends.
func runServer(ctx context.Context, e *env, args []string) error {
	cfg, err := serverFlags(e, args)
	if err != nil {
		return err
	}
	cfg.Logger = e.log
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

// serverFlags parses `asr server` arguments.
func serverFlags(e *env, args []string) (server.Config, error) {
	var c server.Config
	fs := e.flags("asr server")
	fs.StringVar(&c.DataDir, "data", server.DefaultDataDir, "directory for the vault database, certificates, secrets and cache")
	fs.StringVar(&c.Listen, "listen", "127.0.0.1:8443", "address of the HTTPS control API and console")
	fs.StringVar(&c.DataListen, "data-listen", ":9443", "address of the agents' data listener (mutual TLS)")
	fs.DurationVar(&c.DrillCheckEvery, "drill-check-every", time.Minute, "how often the recovery plans' drill schedules are checked")
	fs.DurationVar(&c.HistoryEvery, "history-every", time.Minute, "how often every machine's RPO and churn are sampled for the console's charts")
	fs.StringVar(&c.NBDListen, "nbd-listen", server.DefaultNBDListen, "address of the failovers' NBD exports (unauthenticated: keep it on loopback or an isolated recovery network; off: only DATA/nbd.sock)")
	fs.StringVar(&c.Target, "target", "", "target storage URL (default file://DATA/target)")
	fs.StringVar(&c.AdminPasswordFile, "admin-password-file", "", "set the console password from this file at start")
	fs.StringVar(&c.TargetTier, "target-tier", replication.TierStandard, "storage tier of the target: standard (retention up to 72h) or premium (up to 24h)")
	fs.StringVar(&c.AdvertiseURL, "advertise-url", "", "control URL that guests reach the server at, given to pushed agents, https://HOST:PORT (default: the --listen address; add HOST with --host)")
	fs.DurationVar(&c.HeartbeatLost, "heartbeat-lost", 15*time.Minute, "alert when an agent has not been connected for this long (critical at 4 times it)")
	fs.DurationVar(&c.HealthHold, "health-hold", 15*time.Minute, "how long the process server's health figures, a vCenter outage or target errors must hold before they alert")
	fs.BoolVar(&c.AutoSwitch, "auto-switch", false, "move the machines of a scale-out process server with no heartbeat for --ps-heartbeat-lost to the healthy ones, the built-in one included, spread by churn (what its cache did not apply is resynced)")
	fs.StringVar(&c.Placement, "placement", server.PlacementBuiltin, "where a newly registered machine is served: builtin (this server's process server) or auto (the least loaded healthy process server, by upload rate, then machines)")
	fs.DurationVar(&c.PSHeartbeatLost, "ps-heartbeat-lost", 2*time.Minute, "raise a critical alert when a scale-out process server sends no heartbeat for this long")
	fs.DurationVar(&c.AlertClear, "alert-clear", 2*time.Minute, "how long a condition must be clearly false before its alert clears")
	cacheMax := cacheMaxFlag(fs) // the built-in process server's
	var cloud azure.Cloud
	fs.StringVar(&cloud.Name, "azure-cloud", "public", "the Azure of failovers to Azure: public, usgovernment or china (its Resource Manager endpoint and Microsoft Entra ID authority)")
	fs.StringVar(&cloud.ARMEndpoint, "azure-arm-endpoint", "", "Azure Resource Manager at this https URL instead of the cloud's (a disconnected cloud; the tests' fake ARM)")
	fs.StringVar(&cloud.AuthorityHost, "azure-authority-host", "", "Microsoft Entra ID at this https URL instead of the cloud's, without Microsoft's instance discovery")
	fs.StringVar(&cloud.CAFile, "azure-ca-file", "", "PEM file of CA certificates to trust, besides the system's, for the Azure Resource Manager and authority endpoints")
	fs.Func("host", "extra host name or address for the server certificate (repeatable)", func(v string) error {
		c.Hosts = append(c.Hosts, v)
		return nil
	})
	if err := parse(fs, args); err != nil {
		return c, err
	}
	if c.TargetTier != replication.TierStandard && c.TargetTier != replication.TierPremium {
		return c, fmt.Errorf("--target-tier %q: want standard or premium", c.TargetTier)
	}
	var err error
	if c.CacheMaxBytes, err = cacheMax(); err != nil {
		return c, err
	}
	opts, err := cloud.ARMOptions()
	if err != nil {
		return c, fmt.Errorf("--azure-*: %w", err)
	}
	c.ARMOptions = opts
	return c, nil
}
