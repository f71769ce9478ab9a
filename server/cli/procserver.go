package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/psnode"
)

// runProcessServer runs a scale-out process server until ctx ends.
func runProcessServer(ctx context.Context, e *env, args []string) error {
	var c psnode.Config
	var passFile string
	fs := e.flags("asr process-server")
	cacheMax := cacheMaxFlag(fs)
	fs.StringVar(&c.ConfigURL, "config", "", "the configuration server's control URL, https://HOST:PORT")
	fs.StringVar(&passFile, "passphrase-file", "", "file holding the vault passphrase (to register, and to open the vault on the target)")
	fs.StringVar(&c.DataDir, "data", "./asr-ps-data", "directory for the process server's cache")
	fs.StringVar(&c.DataListen, "data-listen", ":9443", "address of its agents' data listener (mutual TLS)")
	fs.StringVar(&c.AdvertiseData, "advertise-data", "", "data address its agents dial, HOST:PORT (default: the listener's, with this host's address towards the configuration server)")
	fs.StringVar(&c.Name, "name", "", "the process server's name (letters, digits, '.', '_', '-')")
	fs.StringVar(&c.Target, "target", "", "target storage URL (default: the configuration server's, handed over at registration; an azure:// target takes its credentials from this host's environment)")
	if err := parse(fs, args); err != nil {
		return err
	}
	switch {
	case c.ConfigURL == "":
		return errors.New("--config https://HOST:PORT is required (the configuration server)")
	case passFile == "":
		return errors.New("--passphrase-file is required")
	case c.Name == "":
		return errors.New("--name is required")
	}
	var err error
	if c.CacheMaxBytes, err = cacheMax(); err != nil {
		return err
	}
	if c.Passphrase, err = api.ReadSecretFile(passFile); err != nil {
		return fmt.Errorf("--passphrase-file: %w", err)
	}
	c.OpenTarget = func(ctx context.Context, url string) (replication.Target, error) {
		// The id of its machines' leases on an Azure target, kept so
		// that once restarted it takes them back at once.
		lease, err := server.LeaseID(c.DataDir)
		if err != nil {
			return nil, err
		}
		return server.OpenTarget(ctx, url, lease, server.SharedTarget)
	}
	c.Logger = e.log
	n, err := psnode.Open(ctx, c)
	if err != nil {
		return err
	}
	err = n.Run(ctx)
	if cerr := n.Close(); err == nil {
		err = cerr
	}
	return err
}

// cacheMaxFlag defines --cache-max, the bound of a process server's cache
// (`asr process-server`'s, and the built-in one's of `asr server`), and
// returns its parser: a positive size (8GiB by default), past which the
// process server stops reading from its agents, which spool.
func cacheMaxFlag(fs *flag.FlagSet) func() (int64, error) {
	v := fs.String("cache-max", "8GiB", "stop reading from agents while the process server's cache holds more (agents spool); a size such as 64GiB")
	return func() (int64, error) {
		n, err := replication.ParseSize(*v)
		if err != nil {
			return 0, fmt.Errorf("--cache-max: %w", err)
		}
		if n <= 0 {
			return 0, fmt.Errorf("--cache-max %s: want a positive size (e.g. 8GiB)", *v)
		}
		return n, nil
	}
}

const psUsage = `usage: asr ps list [--json] | switch --machine M|--from PS --to PS | remove NAME

list: the built-in process server and the scale-out ones (asr process-server),
with their state (healthy, or no-heartbeat), last heartbeat and figures.
switch: moves a machine (or every machine of --from) to another process server
(a scale-out one's name, builtin, or auto: the least loaded healthy one, by
upload rate, then machines): the old one applies what its cache holds and lets the machine
go, the agent connects to the new one and re-sends what was not
acknowledged; it returns once the old one has let go.
remove: ends a scale-out process server's registration (its certificate no
longer authenticates); refused while machines are assigned to it.`

// runPS lists or removes process servers.
func runPS(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || isHelp(args[0]) {
		fmt.Fprintln(e.out, psUsage)
		if len(args) == 0 {
			return errors.New("no verb given")
		}
		return nil
	}
	verb := args[0]
	fs := e.flags("asr ps " + verb)
	o := &opFlags{}
	o.registerConn(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	machine := fs.String("machine", "", "the machine to switch (switch)")
	from := fs.String("from", "", "switch every machine of this process server (switch; instead of --machine)")
	to := fs.String("to", "", "the process server to switch it to: a scale-out one's name, builtin, or auto (the least loaded healthy one) (switch)")
	wait := fs.Duration("timeout", 10*time.Minute, "how long switch waits for the old process server to let the machine go")
	rest, name := args[1:], ""
	if verb == "remove" && len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		name, rest = rest[0], rest[1:]
	}
	if err := parse(fs, rest); err != nil {
		return err
	}
	switch verb {
	case "list":
		if fs.NArg() != 0 {
			return errors.New(psUsage)
		}
		c, err := o.client()
		if err != nil {
			return err
		}
		l, err := c.ProcessServers(ctx)
		if err != nil {
			return err
		}
		return output(e.out, *asJSON, l, func(tw *tabwriter.Writer) {
			fmt.Fprintln(tw, "NAME\tSTATE\tDATA\tLAST HEARTBEAT\tMACHINES\tCPU\tMEMORY\tCACHE FREE\tBACKLOG\tUPLOAD")
			for _, p := range l {
				last := "-"
				if !p.LastHeartbeat.IsZero() {
					last = p.LastHeartbeat.UTC().Format(time.RFC3339)
				}
				f := p.Figures
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%d B\t%.0f B/s\n", p.Name, p.State, p.DataAddr, last, p.Machines,
					ratio(f.CPU), ratio(f.Memory), ratio(f.CacheFree), f.BacklogBytes, f.UploadRate)
			}
		})
	case "switch":
		if (*machine == "") == (*from == "") || *to == "" {
			return fmt.Errorf("asr ps switch: --machine M or --from PS, and --to, are required\n%s", psUsage)
		}
		c, err := o.client()
		if err != nil {
			return err
		}
		wctx, cancel := context.WithTimeout(ctx, *wait)
		defer cancel()
		if *from != "" {
			moved, err := c.SwitchAll(wctx, *from, *to)
			if err != nil {
				return err
			}
			fmt.Fprintf(e.out, "%d machines moved from process server %s to %s: %s\n", len(moved), *from, *to, strings.Join(moved, ", "))
			return nil
		}
		now, err := c.SwitchProcessServer(wctx, *machine, *to)
		if err != nil {
			return err
		}
		fmt.Fprintf(e.out, "machine %s is served by process server %s\n", *machine, now)
		return nil
	case "remove":
		if name == "" || fs.NArg() != 0 {
			return fmt.Errorf("asr ps remove: give the process server's name\n%s", psUsage)
		}
		c, err := o.client()
		if err != nil {
			return err
		}
		if err := c.RemoveProcessServer(ctx, name); err != nil {
			return err
		}
		fmt.Fprintf(e.out, "process server %s removed\n", name)
		return nil
	}
	return fmt.Errorf("unknown verb %q\n%s", verb, psUsage)
}

// ratio prints a 0..1 figure as a percentage ("-" when not measured).
func ratio(v float64) string {
	if v < 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", v*100)
}
