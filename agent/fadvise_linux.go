package agent

import (
	"os"

	"golang.org/x/sys/unix"
)

// dropCache asks the kernel to drop clean cached pages of a range.
func dropCache(f *os.File, off, n int64) {
	unix.Fadvise(int(f.Fd()), off, n, unix.FADV_DONTNEED)
}

// nextData returns the first offset at or after off that may hold data in
// f (the end of the file if none), and false if f cannot tell (a block
// device, a file system without SEEK_DATA).
func nextData(f *os.File, off int64) (int64, bool) {
	pos, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		st, err := f.Stat()
		if err != nil {
			return 0, false
		}
		return max(st.Size(), off), true
	}
	if err != nil {
		return 0, false
	}
	return pos, true
}
