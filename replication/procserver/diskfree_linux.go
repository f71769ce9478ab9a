package procserver

import "syscall"

// diskFree reports the bytes available to unprivileged users of the file
// system holding dir and its size as df counts it (used + available: the
// blocks reserved for root are not room the cache can have).
func diskFree(dir string) (free, total uint64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, err
	}
	bs := uint64(st.Bsize)
	return st.Bavail * bs, (st.Blocks - st.Bfree + st.Bavail) * bs, nil
}
