//go:build !linux

package procserver

import "errors"

// diskFree is not implemented off Linux: the cache's free space is then
// unknown (shown as an error) and never throttles.
func diskFree(string) (free, total uint64, err error) {
	return 0, 0, errors.New("cache free space is only measured on Linux")
}
