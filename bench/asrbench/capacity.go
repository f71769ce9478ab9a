package main

import (
	"crypto/rand"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/asrdr/asr/server/api"
)

var (
	capacities = flag.String("capacities", "1,16,64", "capacity benchmark: total TiB of sparse protected disks, per run")
	capDisks   = flag.Int("cap-disks", 8, "capacity benchmark: disks per run (two per agent), sharing the capacity")
)

// benchCapacity measures the server's memory against the capacity it
// protects: for each total (in TiB), a fresh server protects the same
// number of sparse disks (-cap-disks, two per agent) sharing that capacity
// (at most 8 TiB each, the most an Azure page blob holds; ext4 files stop
// at 16 TiB), each with 8 MiB of random data in four places, takes a point
// of every machine, and reports the server's resident memory. Only the
// capacity changes between rows. The replicas' block checksums live on the
// target, so the figure should not grow with it.
func benchCapacity(dir string) error {
	fmt.Printf("server memory against protected capacity: %d sparse disks sharing it, 2 per agent, 8 MiB of data each, local target\n", *capDisks)
	fmt.Printf("\n%9s %6s %7s %12s %14s %14s %12s\n", "capacity", "disks", "agents", "protected in", "server RSS", "server peak", "target used")
	for _, f := range strings.Split(*capacities, ",") {
		tib, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || tib <= 0 {
			return fmt.Errorf("-capacities %q", *capacities)
		}
		if err := capacityRun(filepath.Join(dir, fmt.Sprintf("cap%d", tib)), int64(tib)<<40); err != nil {
			return err
		}
	}
	fmt.Println("\n(RSS read from /proc/PID/status after every machine is protected and has a point: VmRSS now, VmHWM the peak since start)")
	return nil
}

func capacityRun(dir string, total int64) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	const maxDisk = 8 << 40
	per := (total / int64(*capDisks)) &^ (1<<20 - 1)
	if per > maxDisk || per < 16<<20 {
		return fmt.Errorf("%d TiB over %d disks: %d bytes each, want 16 MiB to 8 TiB (set -cap-disks)", total>>40, *capDisks, per)
	}
	sizes := make([]int64, *capDisks)
	for i := range sizes {
		sizes[i] = per
	}
	c, err := startServer(dir)
	if err != nil {
		return err
	}
	defer c.stop()
	start := time.Now()
	var names []string
	for i := 0; i < len(sizes); i += 2 {
		disks := map[string]string{}
		for j := i; j < min(i+2, len(sizes)); j++ {
			path := filepath.Join(dir, fmt.Sprintf("d%d.img", j))
			if err := sparseDisk(path, sizes[j]); err != nil {
				return err
			}
			disks[fmt.Sprintf("d%d", j)] = path
		}
		name := fmt.Sprintf("cap%d", i/2)
		if _, err := c.addAgent(name, filepath.Join(dir, name+".sock"), disks, "--crash-interval", "1h"); err != nil {
			return err
		}
		names = append(names, name)
	}
	for _, n := range names {
		if err := c.waitMachine(n, 30*time.Minute); err != nil {
			return err
		}
	}
	took := time.Since(start)
	for _, n := range names {
		if err := c.api(http.MethodPost, "/api/v1/machines/"+n+"/points", api.TagRequest{}, nil); err != nil {
			return err
		}
	}
	cur, peak := rssKiB(c.server)
	fmt.Printf("%6d TiB %6d %7d %11.1fs %10.1f MiB %10.1f MiB %8.1f MiB\n", total>>40, len(sizes), len(names), took.Seconds(),
		float64(cur)/1024, float64(peak)/1024, float64(duBytes(filepath.Join(c.srvDir, "target")))/(1<<20))
	return nil
}

// sparseDisk makes a sparse disk file of size bytes with 2 MiB of random
// data at four places.
func sparseDisk(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	buf := make([]byte, 2<<20)
	for _, at := range []int64{0, size / 3, size / 2, size - int64(len(buf))} {
		rand.Read(buf)
		if _, err := f.WriteAt(buf, at&^(1<<20-1)); err != nil {
			return err
		}
	}
	return f.Sync()
}
