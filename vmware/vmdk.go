package vmware

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"sync"
)

// vmdkDescriptor is the descriptor of a monolithic flat disk on VMFS
// (createType "vmfs"): one RW extent, NAME-flat.vmdk, of size/512
// sectors, as VMware's KB 1002511 recreates one. The geometry is what
// ESXi gives a disk of its adapter type: 255 heads of 63 sectors (SCSI,
// NVMe), 16 heads of 63 sectors capped at 16,383 cylinders (IDE, SATA).
func vmdkDescriptor(name string, size int64, controller string) []byte {
	sectors := size / 512
	adapter, heads := "lsilogic", int64(255)
	switch controller {
	case ControllerBusLogic:
		adapter = "buslogic"
	case ControllerIDE, ControllerSATA:
		adapter, heads = "ide", 16
	}
	cylinders := max(1, sectors/(heads*63))
	if adapter == "ide" {
		cylinders = min(cylinders, 16383)
	}
	var id [4]byte
	var uuid [16]byte
	var long [16]byte
	_, _ = rand.Read(id[:]) // crypto/rand.Read never fails
	_, _ = rand.Read(uuid[:])
	_, _ = rand.Read(long[:])
	uuidHex := make([]string, len(uuid))
	for i, b := range uuid {
		uuidHex[i] = fmt.Sprintf("%02x", b)
	}
	var b strings.Builder
	fmt.Fprintf(&b, `# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%s
parentCID=ffffffff
isNativeSnapshot="no"
createType="vmfs"

# Extent description
RW %d VMFS "%s-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "%s"
ddb.encoding = "UTF-8"
ddb.geometry.cylinders = "%d"
ddb.geometry.heads = "%d"
ddb.geometry.sectors = "63"
ddb.longContentID = "%s"
ddb.uuid = "%s"
ddb.virtualHWVersion = "13"
`, hex.EncodeToString(id[:]), sectors, name, adapter, cylinders, heads, hex.EncodeToString(long[:]), strings.Join(uuidHex, " "))
	return []byte(b.String())
}

// diskReader streams a disk's size bytes from its ReaderAt, as the body
// of an upload, counting them. The HTTP transport reads it on its own
// goroutine.
type diskReader struct {
	src    io.ReaderAt
	size   int64
	onRead func(n int64)

	off int64 // the transport's goroutine only

	mu  sync.Mutex
	err error // the source's first error: clearer than the transport's
}

func (r *diskReader) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	if rest := r.size - r.off; int64(len(p)) > rest {
		p = p[:rest]
	}
	n, err := r.src.ReadAt(p, r.off)
	r.off += int64(n)
	if n > 0 {
		r.onRead(int64(n))
	}
	switch {
	case err == io.EOF && r.off >= r.size:
		err = nil // ReaderAt may say EOF with the last bytes
	case err == io.EOF || (err == nil && n < len(p)):
		err = fmt.Errorf("the source ends at byte %d of %d: %w", r.off, r.size, io.ErrUnexpectedEOF)
	}
	if err != nil {
		r.mu.Lock()
		if r.err == nil {
			r.err = err
		}
		r.mu.Unlock()
	}
	return n, err
}

func (r *diskReader) srcErr() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}
