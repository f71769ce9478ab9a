package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/asrdr/asr/azure"
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

func (o *opFlags) register(fs *flag.FlagSet, offline bool) {
	fs.StringVar(&o.group, "group", "", "replication group (instead of --machine)")
	fs.StringVar(&o.server, "server", "https://127.0.0.1:8443", "control URL of the asr server")
	fs.StringVar(&o.dataDir, "data", server.DefaultDataDir, "server data directory, for the default --token-file and --ca-file")
	fs.StringVar(&o.tokenFile, "token-file", "", "admin token file (default DATA/admin-token)")
	fs.StringVar(&o.caFile, "ca-file", "", "server CA certificate (default DATA/ca.pem)")
	fs.StringVar(&o.machine, "machine", "", "machine name or id")
	if offline {
		fs.StringVar(&o.target, "target", "", "read the target storage directly (no server), e.g. file:///srv/asr/target")
		fs.StringVar(&o.passFile, "passphrase-file", "", "vault passphrase file (with --target)")
	}
}

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

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

func runPoints(ctx context.Context, args []string, out io.Writer) error {
	var o opFlags
	fs := flag.NewFlagSet("asr points", flag.ContinueOnError)
	o.register(fs, true)
	asJSON := fs.Bool("json", false, "print JSON: [{id, time, kind}]")
	if err := parse(fs, args); err != nil {
		return err
	}
	if o.group != "" {
		gps, closeFn, err := groupPoints(ctx, &o, o.group)
		if err != nil {
			return err
		}
		defer closeFn()
		return printGroupPoints(out, gps, *asJSON)
	}
	if o.machine == "" {
		return errors.New("--machine (or --group) is required")
	}
	var points []api.PointJSON
	if o.target != "" {
		cat, closeFn, err := o.catalog(ctx)
		if err != nil {
			return err
		}
		defer closeFn()
		m, err := cat.FindMachine(ctx, o.machine)
		if err != nil {
			return err
		}
		ps, err := cat.Points(ctx, m.ID)
		if err != nil {
			return err
		}
		for _, p := range ps {
			points = append(points, api.PointJSON{ID: p.ID, Time: p.Time.UTC().Format(time.RFC3339Nano), Kind: p.Kind})
		}
	} else {
		c, err := o.client()
		if err != nil {
			return err
		}
		if err := c.Do(ctx, http.MethodGet, "/api/v1/machines/"+url.PathEscape(o.machine)+"/points", nil, &points); err != nil {
			return err
		}
	}
	if *asJSON {
		if points == nil {
			points = []api.PointJSON{}
		}
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(points)
	}
	if len(points) == 0 {
		fmt.Fprintln(out, "no recovery points yet")
		return nil
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTIME\tKIND")
	for _, p := range points {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", p.ID, p.Time, p.Kind)
	}
	return tw.Flush()
}

func runTag(ctx context.Context, args []string, out io.Writer) error {
	var o opFlags
	fs := flag.NewFlagSet("asr tag", flag.ContinueOnError)
	o.register(fs, false)
	wait := fs.Bool("wait", false, "wait until the point is durable and recoverable, then print its id")
	app := fs.Bool("app", false, "application-consistent point (flush the guest's disks first)")
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to wait for the point")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if o.group != "" {
		// A group cut is synchronous: it returns once every member's point is durable.
		var gp api.GroupPointJSON
		tctx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		if err := c.Do(tctx, http.MethodPost, "/api/v1/groups/"+url.PathEscape(o.group)+"/points", api.TagRequest{App: *app}, &gp); err != nil {
			return err
		}
		fmt.Fprintf(out, "group point %s (%s) at %s across %d machines\n", gp.ID, gp.Kind, gp.Time, len(gp.Members))
		fmt.Fprintln(out, gp.ID)
		return nil
	}
	if o.machine == "" {
		return errors.New("--machine (or --group) is required")
	}
	if !*wait {
		var resp map[string]string
		if err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(o.machine)+"/points",
			api.TagRequest{App: *app, NoWait: true}, &resp); err != nil {
			return err
		}
		fmt.Fprintln(out, "recovery point requested; it appears in `asr points` once durable")
		return nil
	}
	p, err := c.Tag(ctx, o.machine, *app, *timeout)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "recovery point %s (%s) at %s\n", p.ID, p.Kind, p.Time)
	fmt.Fprintln(out, p.ID)
	return nil
}

func runRecover(ctx context.Context, args []string, out io.Writer) error {
	var o opFlags
	fs := flag.NewFlagSet("asr recover", flag.ContinueOnError)
	o.register(fs, true)
	point := fs.String("point", "", "recovery point id, or latest (the default)")
	atFlag := fs.String("time", "", "recover as of this instant instead (RFC 3339, the agent's clock), within the policy's any-point-in-time window")
	dir := fs.String("out", "", "directory for the recovered images, DIR/<disk>.img")
	format := fs.String("format", "raw", "image format: raw (DIR/<disk>.img) or vhd (DIR/<disk>.vhd, a fixed VHD Azure imports as a managed disk)")
	toBlob := fs.String("to-blob", "", "with --format vhd and an azure:// --target: also upload each VHD as a page blob NAME (NAME-<disk>.vhd for a machine of several disks) in the target's container, ready to import as a managed disk")
	accept := fs.Bool("accept-damage", false, "write blocks that fail their checksums as they are (listed) instead of failing the recovery")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *format != "raw" && *format != "vhd" {
		return fmt.Errorf("--format %q: want raw or vhd", *format)
	}
	if *toBlob != "" && (*format != "vhd" || o.target == "" || !strings.HasPrefix(o.target, "azure://")) {
		return errors.New("--to-blob needs --format vhd and an azure:// --target")
	}
	if o.group != "" && *dir != "" {
		if *atFlag != "" {
			return errors.New("--time is for one machine; a group recovers at a group point")
		}
		if *format != "raw" || *toBlob != "" {
			return errors.New("--format vhd and --to-blob are for one machine: recover the group's point machine by machine (asr points --group lists each member's point)")
		}
		return recoverGroup(ctx, &o, o.group, *point, *dir, replication.RecoverOptions{AcceptDamage: *accept}, out)
	}
	if o.machine == "" || *dir == "" {
		return errors.New("--machine (or --group) and --out are required")
	}
	var at time.Time
	if *atFlag != "" {
		if *point != "" {
			return errors.New("give --point or --time, not both")
		}
		var err error
		if at, err = time.Parse(time.RFC3339Nano, *atFlag); err != nil {
			return fmt.Errorf("--time %q: want RFC 3339, e.g. 2026-11-26T09:30:00Z", *atFlag)
		}
	}
	if *point == "" {
		*point = "latest"
	}
	opts := replication.RecoverOptions{AcceptDamage: *accept}
	start := time.Now()
	if o.target != "" {
		cat, closeFn, err := o.catalog(ctx)
		if err != nil {
			return err
		}
		defer closeFn()
		m, err := cat.FindMachine(ctx, o.machine)
		if err != nil {
			return err
		}
		if !at.IsZero() {
			plan, disks, last, err := replication.RecoverTime(ctx, cat, m, at, *dir, opts)
			if err != nil {
				return err
			}
			res := api.Recovered{Machine: m.Name, Point: api.PointJSON{ID: plan.Base.ID}, LastSeq: last, Disks: disks}
			if err := toFormat(res.Disks, *format); err != nil {
				return err
			}
			if *toBlob != "" {
				if err := uploadVHDs(ctx, cat.T, res.Disks, *toBlob, out); err != nil {
					return err
				}
			}
			printTime(out, res, *dir, at, start)
			return nil
		}
		p, err := cat.FindPoint(ctx, m.ID, *point)
		if err != nil {
			return err
		}
		disks, err := replication.RecoverPoint(ctx, cat, m, p, *dir, opts)
		if err != nil {
			return err
		}
		if err := toFormat(disks, *format); err != nil {
			return err
		}
		if *toBlob != "" {
			if err := uploadVHDs(ctx, cat.T, disks, *toBlob, out); err != nil {
				return err
			}
		}
		printDisks(out, disks)
		fmt.Fprintf(out, "recovered point %s (%s, %s) in %s\n", p.ID, p.Kind, p.Time.Format(time.RFC3339), time.Since(start).Round(time.Millisecond))
		fmt.Fprintln(out, p.ID)
		return nil
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if !at.IsZero() {
		res, err := c.RecoverTime(ctx, o.machine, at, *dir, opts)
		if err != nil {
			return err
		}
		if err := toFormat(res.Disks, *format); err != nil {
			return err
		}
		printTime(out, res, *dir, at, start)
		return nil
	}
	res, err := c.RecoverPoint(ctx, o.machine, *point, *dir, opts)
	if err != nil {
		return err
	}
	if err := toFormat(res.Disks, *format); err != nil {
		return err
	}
	printDisks(out, res.Disks)
	fmt.Fprintf(out, "recovered point %s (%s, %s) in %s\n", res.Point.ID, res.Point.Kind, res.Point.Time, time.Since(start).Round(time.Millisecond))
	fmt.Fprintln(out, res.Point.ID)
	return nil
}

// uploadVHDs uploads recovered VHDs to page blobs in an Azure target's
// container: name for a single disk, name-<disk>.vhd (name without .vhd)
// for several.
func uploadVHDs(ctx context.Context, t replication.Target, disks []replication.RecoveredDisk, name string, out io.Writer) error {
	az, ok := t.(*azure.Target)
	if !ok {
		return fmt.Errorf("--to-blob: %s is not an Azure target", t)
	}
	for _, d := range disks {
		blobName := name
		if len(disks) > 1 {
			blobName = strings.TrimSuffix(name, ".vhd") + "-" + d.Name + ".vhd"
		}
		sent, err := az.UploadVHD(ctx, d.Path, blobName)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "disk %s: page blob %s/%s (%d bytes, %d sent)\n", d.Name, az, blobName, d.Size+replication.VHDFooterSize, sent)
	}
	return nil
}

// toFormat converts recovered raw images to the format asked for.
func toFormat(disks []replication.RecoveredDisk, format string) error {
	if format != "vhd" {
		return nil
	}
	for i, d := range disks {
		path, vsize, err := replication.ConvertToVHD(d.Path)
		if err != nil {
			return err
		}
		disks[i].Path, disks[i].Size = path, vsize
	}
	return nil
}

// printDisks prints each recovered disk: where, how big, and whether its
// blocks were checked against the point's checksums (and any damage
// accepted).
func printDisks(out io.Writer, disks []replication.RecoveredDisk) {
	for _, d := range disks {
		check := "every block checked"
		if !d.Checked {
			check = "not checked: the point predates block checksums"
		}
		fmt.Fprintf(out, "disk %s: %s (%d bytes, %d of data; %s)\n", d.Name, d.Path, d.Size, d.Data, check)
		if len(d.Damaged) > 0 {
			offs := make([]string, 0, 8)
			for _, off := range d.Damaged[:min(len(d.Damaged), 8)] {
				offs = append(offs, fmt.Sprint(off))
			}
			more := ""
			if len(d.Damaged) > 8 {
				more = fmt.Sprintf(" and %d more", len(d.Damaged)-8)
			}
			fmt.Fprintf(out, "  WARNING: %d damaged blocks of 4 KiB written as they are (accepted), at offsets %s%s\n", len(d.Damaged), strings.Join(offs, ", "), more)
		}
	}
}

func printTime(out io.Writer, res api.Recovered, dir string, at, start time.Time) {
	printDisks(out, res.Disks)
	fmt.Fprintf(out, "recovered machine %s as of %s: point %s plus changes up to seq %d, in %s\n",
		res.Machine, at.UTC().Format(time.RFC3339Nano), res.Point.ID, res.LastSeq, time.Since(start).Round(time.Millisecond))
	fmt.Fprintln(out, res.LastSeq)
}

func runStatus(ctx context.Context, args []string, out io.Writer) error {
	var o opFlags
	fs := flag.NewFlagSet("asr status", flag.ContinueOnError)
	o.register(fs, false)
	asJSON := fs.Bool("json", false, "print JSON")
	psOnly := fs.Bool("process-server", false, "print the process server's figures instead: backlog, upload rate, compression, cache disk")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if *psOnly {
		var ps api.ProcessServer
		if err := c.Do(ctx, http.MethodGet, "/api/v1/process-server", nil, &ps); err != nil {
			return err
		}
		if *asJSON {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			return enc.Encode(ps)
		}
		cache := fmt.Sprintf("%.0f%% free (%d bytes), %s", ps.CacheFree*100, ps.CacheFreeB, ps.CacheState)
		if ps.CacheError != "" {
			cache = "unknown: " + ps.CacheError
		}
		fmt.Fprintf(out, "target:       %s\nbacklog:      %d bytes, oldest %s\nupload rate:  %.0f bytes/s\ncompression:  %.2fx\ncache disk:   %s\n",
			ps.Target, ps.BacklogBytes, ps.BacklogAge.Round(time.Millisecond), ps.UploadRate, ps.Compression, cache)
		return nil
	}
	var ms []api.Machine
	if o.machine != "" {
		var m api.Machine
		if err := c.Do(ctx, http.MethodGet, "/api/v1/machines/"+url.PathEscape(o.machine), nil, &m); err != nil {
			return err
		}
		ms = []api.Machine{m}
	} else if err := c.Do(ctx, http.MethodGet, "/api/v1/machines", nil, &ms); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(ms)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MACHINE\tAGENT\tSTATE\tRPO\tLAST POINT\tDISKS")
	for _, m := range ms {
		agentState := "disconnected"
		if m.Connected {
			agentState = "connected"
		}
		state := m.State
		switch m.State {
		case "initial":
			state = fmt.Sprintf("initial replication %.0f%%", m.Progress*100)
		case "resync":
			state = "needs resync: " + m.Reason
		}
		rpo := "-"
		if m.RPOKnown {
			rpo = m.RPO.Round(100 * time.Millisecond).String()
		}
		last := "-"
		if m.LastPoint != nil {
			last = m.LastPoint.ID + " (" + m.LastPoint.Time.Format(time.RFC3339) + ")"
		}
		var disks []string
		for _, d := range m.Disks {
			disks = append(disks, fmt.Sprintf("%s:%s", d.Name, d.State))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, agentState, state, rpo, last, strings.Join(disks, ","))
	}
	return tw.Flush()
}
