package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"path/filepath"
	"slices"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// opFlags are the flags every operator command shares.
type opFlags struct {
	server, dataDir, tokenFile, caFile string
	target, passFile                   string
	machine, group                     string
}

// opCommand makes an operator command's flag set, with the shared flags
// (offline: with --target and --passphrase-file).
func (e *env) opCommand(name string, offline bool) (*flag.FlagSet, *opFlags) {
	o := &opFlags{}
	fs := e.flags(name)
	o.register(fs, offline)
	return fs, o
}

// register adds the shared flags to fs; offline adds --target and
// --passphrase-file, for the commands that can read the target directly.
func (o *opFlags) register(fs *flag.FlagSet, offline bool) {
	fs.StringVar(&o.group, "group", "", "replication group (instead of --machine)")
	o.registerConn(fs)
	fs.StringVar(&o.machine, "machine", "", "machine name or id")
	if offline {
		fs.StringVar(&o.target, "target", "", "read the target storage directly (no server), e.g. file:///srv/asr/target")
		fs.StringVar(&o.passFile, "passphrase-file", "", "vault passphrase file (with --target)")
	}
}

// registerConn adds only the flags that reach the server.
func (o *opFlags) registerConn(fs *flag.FlagSet) {
	fs.StringVar(&o.server, "server", "https://127.0.0.1:8443", "control URL of the asr server")
	fs.StringVar(&o.dataDir, "data", server.DefaultDataDir, "server data directory, for the default --token-file and --ca-file")
	fs.StringVar(&o.tokenFile, "token-file", "", "admin token file (default DATA/admin-token)")
	fs.StringVar(&o.caFile, "ca-file", "", "server CA certificate (default DATA/ca.pem)")
}

// client makes the API client of the server the flags name.
func (o *opFlags) client() (*api.Client, error) {
	if o.tokenFile == "" {
		o.tokenFile = filepath.Join(o.dataDir, server.AdminTokenFile)
	}
	if o.caFile == "" {
		o.caFile = filepath.Join(o.dataDir, "ca.pem")
	}
	return api.NewClient(o.server, o.tokenFile, o.caFile)
}

// catalog opens the target directly and checks the passphrase against it.
func (o *opFlags) catalog(ctx context.Context) (*replication.Catalog, func(), error) {
	if o.passFile == "" {
		return nil, nil, errors.New("--target needs --passphrase-file")
	}
	pass, err := api.ReadSecretFile(o.passFile)
	if err != nil {
		return nil, nil, err
	}
	// A reader creates nothing: a mistyped --target must not become an
	// empty vault.
	t, err := server.OpenTarget(ctx, o.target, "", server.ExistingTarget)
	if err != nil {
		return nil, nil, err
	}
	cat, _, err := replication.OpenVault(ctx, t, pass)
	if err != nil {
		t.Close()
		if errors.Is(err, replication.ErrNotFound) {
			return nil, nil, fmt.Errorf("%s holds no asr vault", o.target)
		}
		return nil, nil, err
	}
	return cat, func() { t.Close() }, nil
}

// parse parses a command's flags; it takes no positional arguments.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		// The flag package stops at the first argument that is not a
		// flag: a -h after it still asks for help.
		if slices.ContainsFunc(fs.Args(), func(a string) bool { return a == "-h" || a == "--help" || a == "-help" }) {
			fs.Usage()
			return flag.ErrHelp
		}
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

// machineOnTarget opens the target directly (catalog) and finds --machine
// in it; the caller calls closeFn.
func (o *opFlags) machineOnTarget(ctx context.Context) (*replication.Catalog, replication.MachineCatalog, func(), error) {
	cat, closeFn, err := o.catalog(ctx)
	if err != nil {
		return nil, replication.MachineCatalog{}, nil, err
	}
	m, err := cat.FindMachine(ctx, o.machine)
	if err != nil {
		closeFn()
		return nil, m, nil, err
	}
	return cat, m, closeFn, nil
}
