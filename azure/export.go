package azure

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	"github.com/asrdr/asr/replication"
)

// UploadVHD uploads the fixed VHD at path (as `asr recover --format vhd`
// writes it) to the page blob name in the target's container, outside the
// vault's own prefixes, ready to import as a managed disk: the page blob is
// the file byte for byte. All-zero 4 MiB ranges are not sent (a new page
// blob reads as zeros). An existing blob of that name is refused, so a
// failover never overwrites a disk. It returns the bytes sent.
func (t *Target) UploadVHD(ctx context.Context, path, name string) (int64, error) {
	if err := t.disks.CheckOpen(); err != nil {
		return 0, err
	}
	if err := checkKey(name); err != nil {
		return 0, err
	}
	if strings.HasPrefix(name, objectsPrefix) || strings.HasPrefix(name, disksPrefix) || name == lockBlob {
		return 0, fmt.Errorf("blob %q: that name is the vault's own", name)
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	size := st.Size()
	if size < replication.VHDFooterSize || size%512 != 0 {
		return 0, fmt.Errorf("%s: %d bytes is not a fixed VHD (a multiple of 512 bytes ending in a footer)", path, size)
	}
	footer := make([]byte, replication.VHDFooterSize)
	if _, err := f.ReadAt(footer, size-replication.VHDFooterSize); err != nil {
		return 0, err
	}
	if vsize, err := replication.CheckVHDFooter(footer); err != nil || vsize != size-replication.VHDFooterSize {
		return 0, fmt.Errorf("%s: not a fixed VHD of its own size (%v)", path, err)
	}
	pb := t.cc.NewPageBlobClient(name)
	if _, err := pb.Create(ctx, size, &pageblob.CreateOptions{AccessConditions: &blob.AccessConditions{
		ModifiedAccessConditions: &blob.ModifiedAccessConditions{IfNoneMatch: to.Ptr(azcore.ETagAny)}}}); err != nil {
		return 0, fmt.Errorf("create page blob %s: %w", name, azError(err))
	}
	buf := make([]byte, maxPut)
	var sent int64
	for off := int64(0); off < size; off += maxPut {
		b := buf[:min(maxPut, size-off)]
		if _, err := f.ReadAt(b, off); err != nil && err != io.EOF {
			return sent, err
		}
		if replication.IsZero(b) {
			continue
		}
		r := blob.HTTPRange{Offset: off, Count: int64(len(b))}
		if _, err := pb.UploadPages(ctx, streaming.NopCloser(bytes.NewReader(b)), r, nil); err != nil {
			return sent, fmt.Errorf("upload %s at %d: %w", name, off, azError(err))
		}
		sent += int64(len(b))
	}
	return sent, nil
}
