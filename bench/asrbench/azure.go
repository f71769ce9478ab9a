package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"

	"github.com/asrdr/asr/azure/azuritetest"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
)

var azureSize = flag.String("azure-size", "2GiB", "disk size for the Azure upload benchmark")

// The Azure upload benchmark (issue 5): asr's upload path to Azure Blob
// Storage (Azurite here) against a bare azblob upload of the same bytes
// from this process, and the compression ratio the process server reports
// on the mixed disk. Both contenders put the disk's non-zero 4 MiB ranges
// in a page blob with 4 uploads in flight; asr also keeps every segment
// on the target (any-point-in-time recovery), and does it all end to end:
// agent, wire, cache, apply.
func benchAzure(dir string) error {
	size := parseSize(*azureSize)
	disk := filepath.Join(dir, "disk.img")
	if err := makeMixedDisk(disk, size); err != nil {
		return err
	}
	az, err := azuritetest.Run(filepath.Join(dir, "azurite"))
	if err != nil {
		return err
	}
	defer az.Kill()
	conn := az.ConnString()

	// Bare upload from this process.
	cc, err := container.NewClientFromConnectionString(conn, "bare", nil)
	if err != nil {
		return err
	}
	ctx := context.Background()
	if _, err := cc.Create(ctx, nil); err != nil {
		return err
	}
	start := time.Now()
	bareBytes, err := bareUpload(ctx, cc, disk, size)
	if err != nil {
		return fmt.Errorf("bare upload: %w", err)
	}
	bareT := time.Since(start)

	// asr end to end.
	os.Setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
	start = time.Now()
	c, err := startServer(dir, "--target", "azure://"+azuritetest.Account+"/vault")
	if err != nil {
		return err
	}
	defer c.stop()
	if c.agent, err = c.addAgent("bench", c.sock, map[string]string{"d0": disk}); err != nil {
		return err
	}
	if err := c.waitProtected(time.Hour); err != nil {
		return err
	}
	asrT := time.Since(start)
	var ps api.ProcessServer
	if err := c.api("GET", "/api/v1/process-server", nil, &ps); err != nil {
		return err
	}
	mib := func(n int64) float64 { return float64(n) / (1 << 20) }
	fmt.Printf("upload of a %s disk (1/3 zero, 1/3 text-like, 1/3 random) to Azurite %s on loopback\n\n", *azureSize, "(Azure Storage emulator, Node)")
	fmt.Printf("%-52s %9s %12s %9s\n", "contender", "seconds", "MiB sent", "time vs")
	fmt.Printf("%-52s %9.2f %12.1f %8.2fx\n", "bare azblob: Put Page of the non-zero 4 MiB ranges", bareT.Seconds(), mib(bareBytes), 1.0)
	fmt.Printf("%-52s %9.2f %12.1f %8.2fx\n", "asr: agent -> process server -> page blob + segments", asrT.Seconds(), mib(ps.Uploaded), asrT.Seconds()/bareT.Seconds())
	fmt.Printf("\nprocess server: compression %.2fx (record bytes / wire bytes) on this disk; backlog %d bytes at the end\n", ps.Compression, ps.BacklogBytes)
	fmt.Println("(asr time: from starting the server and agent until the disk is protected: every block applied to the page blob, every segment kept on the target)")
	return nil
}

// bareUpload writes the non-zero 4 MiB ranges of the file at path to a new
// page blob with 4 uploads in flight, and returns the bytes sent.
func bareUpload(ctx context.Context, cc *container.Client, path string, size int64) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	pb := cc.NewPageBlobClient("disk.img")
	if _, err := pb.Create(ctx, (size+511)/512*512, nil); err != nil {
		return 0, err
	}
	const chunk = 4 << 20
	offs := make(chan int64)
	var sent atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for w := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for off := range offs {
				b := buf[:min(chunk, size-off)]
				if _, err := f.ReadAt(b, off); err != nil && err != io.EOF {
					errs[w] = err
					continue
				}
				if replication.IsZero(b) || errs[w] != nil {
					continue
				}
				if _, err := pb.UploadPages(ctx, streaming.NopCloser(bytes.NewReader(b)), blob.HTTPRange{Offset: off, Count: int64(len(b))}, nil); err != nil {
					errs[w] = err
					continue
				}
				sent.Add(int64(len(b)))
			}
		}()
	}
	for off := int64(0); off < size; off += chunk {
		offs <- off
	}
	close(offs)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return sent.Load(), err
		}
	}
	return sent.Load(), nil
}
