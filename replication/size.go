package replication

import (
	"fmt"
	"strings"
)

// ParseSize parses sizes like 1GiB, 512MiB, 4096: the size and rate flags
// of the agent, the demo and the benchmark driver.
func ParseSize(s string) (int64, error) {
	units := []struct {
		suf  string
		mult int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}}
	s = strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suf) {
			s, mult = strings.TrimSuffix(s, u.suf), u.mult
			break
		}
	}
	var n int64
	if _, err := fmt.Sscanf(s, "%d", &n); err != nil || n < 0 || fmt.Sprint(n) != s {
		return 0, fmt.Errorf("size %q: want a number with an optional KiB/MiB/GiB/TiB suffix", s)
	}
	return n * mult, nil
}
