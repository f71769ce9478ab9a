package localfs

import (
	"os"
	"syscall"
	"testing"
)

// blocksUsed returns the bytes of storage a file occupies.
func blocksUsed(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}
