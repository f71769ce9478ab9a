package replication_test

import (
	"strings"
	"testing"

	"github.com/asrdr/asr/replication"
)

func TestValidMachineName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"m1", true},
		{"web-01.example_com", true},
		{"A", true},
		{"9", true},
		{strings.Repeat("a", 64), true},
		{"", false},
		{strings.Repeat("a", 65), false},
		{"a/b", false},                        // a path separator: recovery writes NAME/
		{`a\b`, false},                        // the other one
		{"x'; DROP TABLE machines;--", false}, // quotes, spaces, semicolons
		{"\x1b[31mred\x1b[0m", false},         // an ESC sequence, printed raw by `asr status`
		{"m1 ", false},                        // would sit beside "m1" looking the same
		{" m1", false},
		{"m1\n", false},
		{"m\x00", false},
		{"-m1", false}, // read as a flag
		{".hidden", false},
		{"..", false},
		{"_m1", false}, // a valid disk name, but not a machine name
		{"mé", false},  // non-ASCII letters look like ASCII ones
	} {
		if got := replication.ValidMachineName(tc.name); got != tc.ok {
			t.Errorf("ValidMachineName(%q) = %v, want %v", tc.name, got, tc.ok)
		}
	}
}
