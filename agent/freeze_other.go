//go:build !linux

package agent

import (
	"errors"
	"os"
)

func ioctlFreeze(f *os.File, freeze bool) error {
	return errors.New("freezing file systems is supported on Linux only")
}
