package replication

import "testing"

func TestParseSize(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"4096", 4096, true},
		{"0", 0, true},
		{"1GiB", 1 << 30, true},
		{"512MiB", 512 << 20, true},
		{"2TiB", 2 << 40, true},
		{"8K", 8 << 10, true},
		{"3G", 3 << 30, true},
		{"100B", 100, true},
		{" 16MiB ", 16 << 20, true},
		{"", 0, false},
		{"-1", 0, false},
		{"1.5GiB", 0, false},
		{"GiB", 0, false},
		{"12 MiB", 0, false},
		{"fast", 0, false},
	} {
		got, err := ParseSize(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d (ok %v)", tt.in, got, err, tt.want, tt.ok)
		}
	}
}
