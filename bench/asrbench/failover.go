package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/server/api"
)

var (
	foRuns   = flag.Int("runs", 5, "failover benchmark: test failovers per disk (the median is reported)")
	foSparse = flag.String("sparse-size", "1TiB", "failover benchmark: size of the sparse disk")
)

// benchFailover measures the time to a usable test-failover export: from
// starting `asr failover --test --to nbd` until nbdinfo on the export it
// prints succeeds and a 4 KiB read of it returns the source's bytes, for a
// 1 GiB mixed disk and a large sparse one (-sparse-size, default 1 TiB);
// each is protected first (its initial replication timed) and failed over
// -runs times, cleaned up between runs.
func benchFailover(dir string) error {
	if _, err := exec.LookPath("nbdinfo"); err != nil {
		return fmt.Errorf("nbdinfo is needed (make peers)")
	}
	var rows []failoverRow
	disks := []struct {
		name string
		size int64
		make func(path string, size int64) error
	}{
		{"1 GiB mixed (1/3 zero, text, random)", 1 << 30, makeMixedDisk},
		{*foSparse + " sparse (8 MiB of data)", parseSize(*foSparse), sparseDisk},
	}
	for i, d := range disks {
		sub := filepath.Join(dir, fmt.Sprintf("fo%d", i))
		if err := os.MkdirAll(sub, 0o700); err != nil {
			return err
		}
		path := filepath.Join(sub, "d0.img")
		if err := d.make(path, d.size); err != nil {
			return err
		}
		r, err := failoverRuns(sub, path, i == 0)
		if err != nil {
			return fmt.Errorf("%s: %w", d.name, err)
		}
		r.name, r.size = d.name, d.size
		rows = append(rows, r)
		os.RemoveAll(sub)
	}
	fmt.Printf("time to a usable test-failover export: `asr failover --machine bench --test --point ID --to nbd` started,\n")
	fmt.Printf("until nbdinfo on the export it printed succeeds and a 4 KiB read returns the source's bytes; median of %d runs\n\n", *foRuns)
	fmt.Printf("%-40s %14s %12s %12s %16s %12s %22s\n", "disk", "initial repl.", "failover", "server RTO", "usable (median)", "min-max", "asr recover (full copy)")
	var rate float64 // bytes per second of the full copy, from the first disk
	for _, r := range rows {
		full := "-"
		switch {
		case r.recover > 0:
			rate = float64(r.size) / r.recover.Seconds()
			full = fmt.Sprintf("%.1fs (%.0fx)", r.recover.Seconds(), r.recover.Seconds()/r.usable.Seconds())
		case rate > 0:
			est := float64(r.size) / rate
			full = fmt.Sprintf("~%.0fs est. (%.0fx)", est, est/r.usable.Seconds())
		}
		fmt.Printf("%-40s %13.1fs %11.3fs %11.3fs %15.3fs %5.2f-%.2fs %22s\n", r.name, r.initial.Seconds(), r.cmd.Seconds(), r.rto.Seconds(),
			r.usable.Seconds(), r.minUse.Seconds(), r.maxUse.Seconds(), full)
	}
	fmt.Println("\n(initial repl.: from starting the server and agent until the disk is protected; failover: the CLI command until it")
	fmt.Println("printed the export; server RTO: the job's measured RTO; usable: failover + nbdinfo + the 4 KiB read. Nothing is copied:")
	fmt.Println("the export reads the point's snapshot on the target and writes to a copy-on-write overlay. asr recover: the whole")
	fmt.Println("point copied to a sparse image through the server, as a restore without instant exports does; for the sparse disk")
	fmt.Println("estimated at the 1 GiB disk's rate, since recovery through the server streams every byte, holes included.)")
	return nil
}

type failoverRow struct {
	recover          time.Duration // asr recover of the point (a full copy), 0 if not run
	name             string
	size             int64
	initial          time.Duration
	cmd, usable, rto time.Duration
	minUse, maxUse   time.Duration
}

var uriLineRE = regexp.MustCompile(`(?m)^d0 (nbd://\S+)$`)
var jobRE = regexp.MustCompile(`(?m)^job ([0-9a-f]+) succeeded`)

func failoverRuns(dir, disk string, recoverToo bool) (failoverRow, error) {
	var r failoverRow
	start := time.Now()
	c, err := startServer(dir, "--nbd-listen", "127.0.0.1:"+freePort())
	if err != nil {
		return r, err
	}
	defer c.stop()
	if c.agent, err = c.addAgent("bench", c.sock, map[string]string{"d0": disk}, "--crash-interval", "1h"); err != nil {
		return r, err
	}
	if err := c.waitMachine("bench", 2*time.Hour); err != nil {
		return r, err
	}
	r.initial = time.Since(start)
	var p api.PointJSON
	if err := c.api(http.MethodPost, "/api/v1/machines/bench/points", api.TagRequest{Timeout: "10m"}, &p); err != nil {
		return r, err
	}
	head := make([]byte, 4096)
	f, err := os.Open(disk)
	if err != nil {
		return r, err
	}
	_, err = f.ReadAt(head, 0)
	f.Close()
	if err != nil {
		return r, err
	}
	cli := func(args ...string) (string, error) {
		out, err := exec.Command(*asrBin, append(args, "--data", c.srvDir, "--server", c.url)...).CombinedOutput()
		if err != nil {
			return string(out), fmt.Errorf("asr %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out), nil
	}
	var cmds, usables, rtos []time.Duration
	for range *foRuns {
		t0 := time.Now()
		out, err := cli("failover", "--machine", "bench", "--test", "--point", p.ID, "--to", "nbd")
		if err != nil {
			return r, err
		}
		tCmd := time.Since(t0)
		m := uriLineRE.FindStringSubmatch(out)
		if m == nil {
			return r, fmt.Errorf("no export in the failover's output:\n%s", out)
		}
		uri := m[1]
		if out, err := exec.Command("nbdinfo", uri).CombinedOutput(); err != nil {
			return r, fmt.Errorf("nbdinfo %s: %v\n%s", uri, err, out)
		}
		u, err := url.Parse(uri)
		if err != nil {
			return r, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		nc, err := nbd.Dial(ctx, u.Host, strings.TrimPrefix(u.Path, "/"))
		cancel()
		if err != nil {
			return r, err
		}
		got := make([]byte, 4096)
		err = nc.ReadAt(got, 0)
		nc.Close()
		if err != nil {
			return r, fmt.Errorf("read 4 KiB of %s: %w", uri, err)
		}
		tUse := time.Since(t0)
		if !bytes.Equal(got, head) {
			return r, fmt.Errorf("the export's first 4 KiB differ from the source's")
		}
		var rto time.Duration
		if m := jobRE.FindStringSubmatch(out); m != nil {
			if j, err := c.ctl.Job(context.Background(), m[1]); err == nil {
				rto = time.Duration(j.RTO * float64(time.Second))
			}
		}
		cmds, usables, rtos = append(cmds, tCmd), append(usables, tUse), append(rtos, rto)
		if _, err := cli("failover", "--machine", "bench", "--cleanup"); err != nil {
			return r, err
		}
	}
	med := func(ds []time.Duration) time.Duration {
		s := slices.Clone(ds)
		slices.Sort(s)
		return s[len(s)/2]
	}
	r.cmd, r.usable, r.rto = med(cmds), med(usables), med(rtos)
	if recoverToo {
		// What an operator runs without instant exports: a full copy of
		// the point (asr recover through the server, sparse output).
		out := filepath.Join(dir, "recovered")
		t0 := time.Now()
		if _, err := cli("recover", "--machine", "bench", "--point", p.ID, "--out", out); err != nil {
			return r, err
		}
		r.recover = time.Since(t0)
		os.RemoveAll(out)
	}
	r.minUse, r.maxUse = slices.Min(usables), slices.Max(usables)
	return r, nil
}
