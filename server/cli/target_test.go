package cli

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Reading a target directly (--target) creates nothing: a mistyped path, or
// a directory without a vault, is a clear error and stays as it was.
func TestTargetReadersCreateNothing(t *testing.T) {
	base := t.TempDir()
	pass := filepath.Join(base, "passphrase")
	if err := os.WriteFile(pass, []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(base, "empty")
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(base, "out")
	commands := []struct {
		name string
		run  func(context.Context, *env, []string) error
		args []string
	}{
		{"recover", runRecover, []string{"--machine", "vm1", "--out", out}},
		{"recover --time", runRecover, []string{"--machine", "vm1", "--out", out, "--time", "2026-11-26T09:30:00Z"}},
		{"recover --group", runRecover, []string{"--group", "web", "--point", "1", "--out", out}},
		{"points", runPoints, []string{"--machine", "vm1"}},
		{"points --group", runPoints, []string{"--group", "web"}},
	}
	for _, c := range commands {
		for _, tc := range []struct {
			what, path string
		}{
			{"mistyped path", filepath.Join(base, "mistyped")},
			{"missing parents", filepath.Join(base, "no", "such", "path")},
			{"directory without a vault", empty},
		} {
			t.Run(c.name+"/"+tc.what, func(t *testing.T) {
				target := "file://" + tc.path
				args := append(append([]string{}, c.args...), "--target", target, "--passphrase-file", pass)
				err := c.run(context.Background(), &env{out: io.Discard, errOut: io.Discard}, args)
				if err == nil || !strings.Contains(err.Error(), "holds no asr vault") {
					t.Fatalf("asr %s --target %s: %v, want an error saying it holds no asr vault", c.name, target, err)
				}
				if tc.path == empty {
					if ents, err := os.ReadDir(empty); err != nil || len(ents) != 0 {
						t.Fatalf("asr %s left %v in %s (%v)", c.name, ents, empty, err)
					}
				} else if _, err := os.Lstat(tc.path); !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("asr %s created %s (%v)", c.name, tc.path, err)
				}
				if _, err := os.Lstat(out); !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("asr %s created %s (%v)", c.name, out, err)
				}
			})
		}
	}
}
