package nbd

import (
	"errors"
	"os"
	"syscall"
)

// fallocate(2) modes, from linux/falloc.h.
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

func fallocate(f *os.File, mode uint32, off, n int64) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	err = rc.Control(func(fd uintptr) {
		for {
			ferr = syscall.Fallocate(int(fd), mode, off, n)
			if !errors.Is(ferr, syscall.EINTR) {
				return
			}
		}
	})
	if err != nil {
		return err
	}
	return ferr
}

// zeroRangeFast zeroes the range without writing data, reporting whether
// it could.
func zeroRangeFast(f *os.File, off, n int64) bool {
	if fallocate(f, fallocZeroRange|fallocKeepSize, off, n) == nil {
		return true
	}
	return fallocate(f, fallocPunchHole|fallocKeepSize, off, n) == nil
}

func punchHole(f *os.File, off, n int64) bool {
	return fallocate(f, fallocPunchHole|fallocKeepSize, off, n) == nil
}

func datasync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		for {
			serr = syscall.Fdatasync(int(fd))
			if !errors.Is(serr, syscall.EINTR) {
				return
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}
