package agent

import (
	"os"

	"golang.org/x/sys/unix"
)

// dropCache asks the kernel to drop clean cached pages of a range.
func dropCache(f *os.File, off, n int64) {
	unix.Fadvise(int(f.Fd()), off, n, unix.FADV_DONTNEED)
}
