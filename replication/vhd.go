package replication

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// A fixed VHD is the disk's bytes followed by a 512-byte footer: the format
// Azure imports as a managed disk (a page blob whose virtual size is a whole
// number of MiB). `asr recover --format vhd` writes one per disk.
//
// The footer's CHS geometry is set to its maximum (65535/16/255) rather than
// computed from the size: readers that take the size from the geometry (the
// VHD spec's Virtual PC behaviour, QEMU for creators it does not know) would
// otherwise see a disk rounded down to whole cylinders; with the maximum
// geometry they use the footer's current size, as Hyper-V and Azure do.

// VHDAlign is the alignment Azure requires of a VHD's virtual size.
const VHDAlign = 1 << 20

// VHDFooterSize is the size of a VHD footer.
const VHDFooterSize = 512

// vhdEpoch is the VHD timestamp origin.
var vhdEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// VHDSize is the virtual size of the VHD of a disk of size bytes: rounded up
// to VHDAlign. The file is that plus the footer.
func VHDSize(size int64) int64 { return (size + VHDAlign - 1) / VHDAlign * VHDAlign }

// VHDFooter makes the footer of a fixed VHD of the given virtual size.
func VHDFooter(size int64, created time.Time) []byte {
	f := make([]byte, VHDFooterSize)
	copy(f[0:], "conectix")
	binary.BigEndian.PutUint32(f[8:], 2)           // features: reserved bit, always set
	binary.BigEndian.PutUint32(f[12:], 0x00010000) // format version 1.0
	binary.BigEndian.PutUint64(f[16:], ^uint64(0)) // data offset: none (fixed disk)
	binary.BigEndian.PutUint32(f[24:], uint32(created.Sub(vhdEpoch)/time.Second))
	copy(f[28:], "asr ")
	binary.BigEndian.PutUint32(f[32:], 0x00010000)
	copy(f[36:], "Wi2k")
	binary.BigEndian.PutUint64(f[40:], uint64(size)) // original size
	binary.BigEndian.PutUint64(f[48:], uint64(size)) // current size
	binary.BigEndian.PutUint16(f[56:], 65535)        // cylinders
	f[58], f[59] = 16, 255                           // heads, sectors per track
	binary.BigEndian.PutUint32(f[60:], 2)            // disk type: fixed
	rand.Read(f[68:84])                              // unique id
	binary.BigEndian.PutUint32(f[64:], vhdChecksum(f))
	return f
}

// vhdChecksum is the one's complement of the sum of the footer's bytes,
// its checksum field taken as zero.
func vhdChecksum(f []byte) uint32 {
	var sum uint32
	for i, b := range f {
		if i < 64 || i >= 68 {
			sum += uint32(b)
		}
	}
	return ^sum
}

// CheckVHDFooter verifies a fixed-VHD footer and returns its virtual size.
func CheckVHDFooter(f []byte) (int64, error) {
	switch {
	case len(f) != VHDFooterSize || string(f[:8]) != "conectix":
		return 0, fmt.Errorf("not a VHD footer: %w", ErrCorrupt)
	case binary.BigEndian.Uint32(f[64:]) != vhdChecksum(f):
		return 0, fmt.Errorf("VHD footer checksum mismatch: %w", ErrCorrupt)
	case binary.BigEndian.Uint32(f[60:]) != 2:
		return 0, fmt.Errorf("VHD is not a fixed disk: %w", ErrCorrupt)
	}
	return int64(binary.BigEndian.Uint64(f[48:])), nil
}

// ConvertToVHD turns a raw image file (as recovery writes it) into a fixed
// VHD in place: the file grows to the aligned size (zeros, as a hole), gets
// the footer, and is renamed from NAME.img to NAME.vhd. It returns the new
// path and the virtual size.
func ConvertToVHD(path string) (string, int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return "", 0, err
	}
	st, err := f.Stat()
	if err == nil {
		vsize := VHDSize(st.Size())
		if err = f.Truncate(vsize); err == nil {
			if _, err = f.WriteAt(VHDFooter(vsize, time.Now()), vsize); err == nil {
				err = f.Sync()
			}
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			out := strings.TrimSuffix(path, filepath.Ext(path)) + ".vhd"
			return out, vsize, os.Rename(path, out)
		}
	} else {
		f.Close()
	}
	return "", 0, fmt.Errorf("make %s a VHD: %w", path, err)
}
