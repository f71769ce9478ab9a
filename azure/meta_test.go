package azure

import (
	"strconv"
	"testing"
)

// FuzzMetaInt checks the sizes read from page-blob metadata, which the
// service (or whoever can write the container) controls: a size is
// accepted only between 0 and 8 TiB, so the page arithmetic on it cannot
// overflow.
func FuzzMetaInt(f *testing.F) {
	for _, v := range []string{"0", "4096", strconv.Itoa(maxDiskSize), strconv.Itoa(maxDiskSize + 1),
		"9223372036854775807", "-1", "1e9", " 12", ""} {
		f.Add(v)
	}
	f.Fuzz(func(t *testing.T, v string) {
		n, err := metaInt(map[string]*string{"Asrsize": &v}, metaSize)
		if err != nil {
			return
		}
		if n < 0 || n > maxDiskSize || pagesUp(n)*pageSize < n {
			t.Fatalf("metadata %q accepted as size %d", v, n)
		}
	})
}
