package agent

import (
	"os"

	"golang.org/x/sys/unix"
)

// FIFREEZE and FITHAW from linux/fs.h: _IOWR('X', 119, int), _IOWR('X', 120, int).
const (
	ioctlFIFREEZE = 0xC0045877
	ioctlFITHAW   = 0xC0045878
)

func ioctlFreeze(f *os.File, freeze bool) error {
	req := uint(ioctlFITHAW)
	if freeze {
		req = ioctlFIFREEZE
	}
	return unix.IoctlSetInt(int(f.Fd()), req, 0)
}
