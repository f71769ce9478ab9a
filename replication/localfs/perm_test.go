package localfs

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/asrdr/asr/replication"
)

// checkPrivate fails unless every directory under root (root included) is
// 0700 and every regular file 0600.
func checkPrivate(t *testing.T, root string) {
	t.Helper()
	n := 0
	err := filepath.WalkDir(root, func(path string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := os.Lstat(path)
		if err != nil {
			return err
		}
		want := fs.FileMode(0o600)
		switch {
		case info.IsDir():
			want = 0o700
		case !info.Mode().IsRegular():
			return nil
		}
		if got := info.Mode().Perm(); got != want {
			t.Errorf("%s: mode %04o, want %04o", path, got, want)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 2 {
		t.Fatalf("only %d entries under %s", n, root)
	}
}

// fillTarget gives a target an object, a disk with data, two snapshots and
// a deleted snapshot kept for its reader: every kind of file it makes.
func fillTarget(t *testing.T, tg *Target) {
	t.Helper()
	ctx := t.Context()
	if err := tg.PutObject(ctx, "machines/m1/points/0001", []byte("point")); err != nil {
		t.Fatal(err)
	}
	d := mustDisk(t, tg, "m1/disks/0", 1<<20)
	if err := d.WriteAt([]byte("guest data"), 4096); err != nil {
		t.Fatal(err)
	}
	mustFlushSnap(t, d, "a")
	if err := d.WriteAt([]byte("more guest data"), 4096); err != nil {
		t.Fatal(err)
	}
	mustFlushSnap(t, d, "b")
	r, err := d.OpenSnapshot(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if err := d.DeleteSnapshot(ctx, "a"); err != nil {
		t.Fatal(err)
	}
}

// A new target keeps guest data and the catalog private to its user:
// directories 0700, files 0600, whatever the umask lets through.
func TestNewTargetIsPrivate(t *testing.T) {
	root := filepath.Join(t.TempDir(), "target")
	tg := mustOpen(t, root)
	fillTarget(t, tg)
	if fs, _ := filepath.Glob(filepath.Join(root, "disks", "m1", "disks", "0.disk", "snap", "*.deleted")); len(fs) != 1 {
		t.Fatalf("deleted snapshot logs: %v", fs)
	}
	checkPrivate(t, root)
}

// A target made before modes were private (0755 directories, 0644 files)
// is tightened when opened; a symbolic link inside is not followed.
func TestOpenTightensExistingTarget(t *testing.T) {
	root := filepath.Join(t.TempDir(), "target")
	tg := mustOpen(t, root)
	fillTarget(t, tg)
	tg.Close()
	outside := filepath.Join(t.TempDir(), "outside")
	if err := os.WriteFile(outside, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(outside, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(root, "objects", "link")); err != nil {
		t.Fatal(err)
	}
	err := filepath.WalkDir(root, func(path string, de fs.DirEntry, err error) error {
		switch {
		case err != nil:
			return err
		case de.IsDir():
			return os.Chmod(path, 0o755)
		case de.Type().IsRegular():
			return os.Chmod(path, 0o644)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	tg = mustOpen(t, root)
	checkPrivate(t, root)
	if st, err := os.Stat(outside); err != nil || st.Mode().Perm() != 0o644 {
		t.Fatalf("the link's target outside: %v, %v (want 0644, untouched)", st.Mode(), err)
	}
	// The target still reads as before.
	if b, err := tg.GetObject(t.Context(), "machines/m1/points/0001"); err != nil || string(b) != "point" {
		t.Fatalf("object after tightening: %q, %v", b, err)
	}
}

// A NoCreate open is for readers: a path that holds no target is an error
// wrapping ErrNotFound that says so, and the path is left as it was.
func TestOpenNoCreate(t *testing.T) {
	base := t.TempDir()
	file := filepath.Join(base, "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(base, "empty")
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, path, why string
	}{
		{"missing", filepath.Join(base, "mistyped"), "no such directory"},
		{"missing parent", filepath.Join(base, "no", "such", "path"), "no such directory"},
		{"file", file, "not a directory"},
		{"below a file", filepath.Join(file, "target"), "no such directory"},
		{"empty directory", empty, "no asr layout file in it"},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := snapshotTree(t, base)
			tg, err := Open(c.path, NoCreate())
			if err == nil {
				tg.Close()
				t.Fatalf("Open(%s, NoCreate) opened", c.path)
			}
			if !errors.Is(err, replication.ErrNotFound) || !strings.Contains(err.Error(), "holds no asr vault ("+c.why+")") {
				t.Fatalf("Open(%s, NoCreate) = %v, want an ErrNotFound that says it holds no asr vault (%s)", c.path, err, c.why)
			}
			if after := snapshotTree(t, base); after != before {
				t.Fatalf("Open(%s, NoCreate) changed the tree:\nbefore %s\nafter  %s", c.path, before, after)
			}
		})
	}

	t.Run("existing", func(t *testing.T) {
		root := filepath.Join(base, "target")
		tg := mustOpen(t, root)
		if err := tg.PutObject(t.Context(), "vault", []byte("v")); err != nil {
			t.Fatal(err)
		}
		tg.Close()
		if err := os.Chmod(root, 0o755); err != nil {
			t.Fatal(err)
		}
		tg, err := Open(root, NoCreate())
		if err != nil {
			t.Fatal(err)
		}
		defer tg.Close()
		if b, err := tg.GetObject(t.Context(), "vault"); err != nil || string(b) != "v" {
			t.Fatalf("GetObject: %q, %v", b, err)
		}
		// A reader changes no modes (it may not own the target).
		if st, err := os.Stat(root); err != nil || st.Mode().Perm() != 0o755 {
			t.Fatalf("target directory after a NoCreate open: %v, %v", st.Mode(), err)
		}
		// It still takes the lock: a server cannot write meanwhile.
		if _, err := Open(root); !errors.Is(err, replication.ErrLocked) {
			t.Fatalf("Open while a reader has the target: %v", err)
		}
	})
}

// snapshotTree lists every path under root with its mode.
func snapshotTree(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(root, func(path string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := de.Info()
		if err != nil {
			return err
		}
		b.WriteString(path + " " + info.Mode().String() + "; ")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}
