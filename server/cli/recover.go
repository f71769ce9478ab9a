package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/asrdr/asr/azure"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
)

// runRecover writes a machine's (or a group's) disks at a point, or as of
// an instant, as images: through the server or straight from the target.
func runRecover(ctx context.Context, e *env, args []string) error {
	out := e.out
	fs, o := e.opCommand("asr recover", true)
	point := fs.String("point", "", "recovery point id, or latest (the default)")
	atFlag := fs.String("time", "", "recover as of this instant instead (RFC 3339, the agent's clock), within the policy's any-point-in-time window")
	dir := fs.String("out", "", "directory for the recovered images, DIR/<disk>.img")
	format := fs.String("format", "raw", "image format: raw (DIR/<disk>.img) or vhd (DIR/<disk>.vhd, a fixed VHD Azure imports as a managed disk)")
	toBlob := fs.String("to-blob", "", "with --format vhd and an azure:// --target: also upload each VHD as a page blob NAME (NAME-<disk>.vhd for a machine of several disks) in the target's container, ready to import as a managed disk")
	accept := fs.Bool("accept-damage", false, "write blocks that fail their checksums as they are (listed) instead of failing the recovery")
	force := fs.Bool("force", false, "replace images that already exist in --out (without it, an existing image is refused and nothing is written)")
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
		opts, done := recoverOptions(e, *accept)
		defer done()
		return recoverGroup(ctx, o, o.group, *point, *dir, opts, *force, out)
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
	opts, done := recoverOptions(e, *accept)
	defer done()
	start := time.Now()
	if o.target != "" {
		cat, m, closeFn, err := o.machineOnTarget(ctx)
		if err != nil {
			return err
		}
		defer closeFn()
		if err := refuseOverwrite(*dir, catalogDiskNames(m), *format, *force); err != nil {
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
			done()
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
		done()
		printDisks(out, disks)
		fmt.Fprintf(out, "recovered point %s (%s, %s) in %s\n", p.ID, p.Kind, p.Time.Format(time.RFC3339), time.Since(start).Round(time.Millisecond))
		fmt.Fprintln(out, p.ID)
		return nil
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if err := refuseOverwriteOf(ctx, c, o.machine, *dir, *format, *force); err != nil {
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
		done()
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
	done()
	printDisks(out, res.Disks)
	fmt.Fprintf(out, "recovered point %s (%s, %s) in %s\n", res.Point.ID, res.Point.Kind, res.Point.Time, time.Since(start).Round(time.Millisecond))
	fmt.Fprintln(out, res.Point.ID)
	return nil
}

// recoverGroup writes every member's disks at a group point to
// DIR/<machine>/<disk>.img.
func recoverGroup(ctx context.Context, o *opFlags, group, point, dir string, opts replication.RecoverOptions, force bool, out io.Writer) error {
	start := time.Now()
	if o.target != "" {
		cat, closeFn, err := o.catalog(ctx)
		if err != nil {
			return err
		}
		defer closeFn()
		gp, err := cat.FindGroupPoint(ctx, group, point)
		if err != nil {
			return err
		}
		for id := range gp.Members {
			m, err := cat.FindMachine(ctx, id)
			if err != nil {
				return err
			}
			if err := refuseOverwrite(filepath.Join(dir, m.Name), catalogDiskNames(m), "raw", force); err != nil {
				return err
			}
		}
		for id, pid := range gp.Members {
			m, err := cat.FindMachine(ctx, id)
			if err != nil {
				return err
			}
			p, err := cat.FindPoint(ctx, m.ID, pid)
			if err != nil {
				return err
			}
			mdir := filepath.Join(dir, m.Name)
			if _, err := replication.RecoverPoint(ctx, cat, m, p, mdir, machineProgress(opts, m.Name)); err != nil {
				return fmt.Errorf("machine %s: %w", m.Name, err)
			}
			fmt.Fprintf(out, "machine %s: point %s in %s\n", m.Name, pid, mdir)
		}
		fmt.Fprintf(out, "recovered group %s at point %s (%s, %s) in %s\n", group, gp.ID, gp.Kind, gp.Time.Format(time.RFC3339Nano), time.Since(start).Round(time.Millisecond))
		fmt.Fprintln(out, gp.ID)
		return nil
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	var gps []api.GroupPointJSON
	if err := c.Do(ctx, http.MethodGet, "/api/v1/groups/"+url.PathEscape(group)+"/points", nil, &gps); err != nil {
		return err
	}
	var gp *api.GroupPointJSON
	for i := range gps {
		if gps[i].ID == point || ((point == "" || point == "latest") && i == len(gps)-1) {
			gp = &gps[i]
		}
	}
	if gp == nil {
		return fmt.Errorf("group %s has no point %q (see asr points --group %s)", group, point, group)
	}
	for name := range gp.Members {
		if err := refuseOverwriteOf(ctx, c, name, filepath.Join(dir, name), "raw", force); err != nil {
			return err
		}
	}
	for name, pid := range gp.Members {
		mdir := filepath.Join(dir, name)
		if _, err := c.RecoverPoint(ctx, name, pid, mdir, machineProgress(opts, name)); err != nil {
			return fmt.Errorf("machine %s: %w", name, err)
		}
		fmt.Fprintf(out, "machine %s: point %s in %s\n", name, pid, mdir)
	}
	fmt.Fprintf(out, "recovered group %s at point %s (%s, %s) in %s\n", group, gp.ID, gp.Kind, gp.Time, time.Since(start).Round(time.Millisecond))
	fmt.Fprintln(out, gp.ID)
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
		if total := int64(len(d.Damaged)) + d.DamagedNotListed; total > 0 {
			offs := make([]string, 0, 8)
			for _, off := range d.Damaged[:min(len(d.Damaged), 8)] {
				offs = append(offs, fmt.Sprint(off))
			}
			more := ""
			if shown := int64(len(offs)); total > shown {
				more = fmt.Sprintf(" and %d more", total-shown)
			}
			fmt.Fprintf(out, "  WARNING: %d damaged blocks of 4 KiB written as they are (accepted), at offsets %s%s\n", total, strings.Join(offs, ", "), more)
		}
	}
}

func printTime(out io.Writer, res api.Recovered, dir string, at, start time.Time) {
	printDisks(out, res.Disks)
	fmt.Fprintf(out, "recovered machine %s as of %s: point %s plus changes up to seq %d, in %s\n",
		res.Machine, at.UTC().Format(time.RFC3339Nano), res.Point.ID, res.LastSeq, time.Since(start).Round(time.Millisecond))
	fmt.Fprintln(out, res.LastSeq)
}

// recoverOptions are a recovery's options, with its progress shown on
// stderr; done ends the last disk's bar.
func recoverOptions(e *env, accept bool) (replication.RecoverOptions, func()) {
	fn, done := diskProgress(e.errOut, "recover")
	return replication.RecoverOptions{AcceptDamage: accept, Progress: fn}, done
}

// refuseOverwrite fails, before anything is written, if an image a
// recovery of these disks would write in dir exists already, unless force.
func refuseOverwrite(dir string, disks []string, format string, force bool) error {
	if force {
		return nil
	}
	exts := []string{".img"}
	if format == "vhd" {
		exts = append(exts, ".vhd")
	}
	for _, d := range disks {
		for _, ext := range exts {
			path := filepath.Join(dir, d+ext)
			if _, err := os.Lstat(path); err == nil {
				return fmt.Errorf("%s exists: asr recover does not replace an image (nothing was written); remove it, choose another --out, or give --force", path)
			}
		}
	}
	return nil
}

// refuseOverwriteOf is refuseOverwrite for the disks the server lists for
// machine (a recovery through the server writes each of them).
func refuseOverwriteOf(ctx context.Context, c *api.Client, machine, dir, format string, force bool) error {
	if force {
		return nil
	}
	var m api.Machine
	if err := c.Do(ctx, http.MethodGet, "/api/v1/machines/"+url.PathEscape(machine), nil, &m); err != nil {
		return err
	}
	names := make([]string, len(m.Disks))
	for i, d := range m.Disks {
		names[i] = d.Name
	}
	return refuseOverwrite(dir, names, format, force)
}

// catalogDiskNames lists the names of a machine's disks on the target.
func catalogDiskNames(m replication.MachineCatalog) []string {
	names := make([]string, len(m.Disks))
	for i, d := range m.Disks {
		names[i] = d.Name
	}
	return names
}

// machineProgress labels a group member's disks with its name.
func machineProgress(opts replication.RecoverOptions, machine string) replication.RecoverOptions {
	if fn := opts.Progress; fn != nil {
		opts.Progress = func(disk string, done, size int64) { fn(machine+"/"+disk, done, size) }
	}
	return opts
}
