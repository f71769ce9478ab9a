// Package docs holds asr's design documents; its test keeps the file map
// of ARCHITECTURE.md complete.
package docs

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// TestFileMapNamesEveryPackage: every directory of the repository that
// holds Go files is in the file map ("Where things are"), by its own path
// (`dir/`) or by a file in it (`dir/file.go`), so any code is one hop from
// the map. The root is named by `main.go`.
func TestFileMapNamesEveryPackage(t *testing.T) {
	b, err := os.ReadFile("ARCHITECTURE.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	start := strings.Index(doc, "## Where things are")
	if start < 0 {
		t.Fatal(`no "## Where things are" section`)
	}
	section := doc[start+1:]
	if end := strings.Index(section, "\n## "); end >= 0 {
		section = section[:end]
	}
	named := map[string]bool{}
	for _, m := range regexp.MustCompile("`([^`\\s]+)`").FindAllStringSubmatch(section, -1) {
		p := m[1]
		switch {
		case strings.HasSuffix(p, "/"):
			named[strings.TrimSuffix(p, "/")] = true
		case strings.HasSuffix(p, ".go"):
			named[filepath.Dir(p)] = true
		}
	}
	dirs := map[string]bool{}
	err = filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() && path != ".." && (strings.HasPrefix(name, ".") || name == "testdata" || name == "node_modules" || name == "bin") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(name, ".go") {
			rel, err := filepath.Rel("..", filepath.Dir(path))
			if err != nil {
				return err
			}
			dirs[filepath.ToSlash(rel)] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var missing []string
	for d := range dirs {
		if d == "docs" { // this test
			continue
		}
		if !named[d] {
			missing = append(missing, d+"/")
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("not in the file map of docs/ARCHITECTURE.md (\"Where things are\"): %s", strings.Join(missing, ", "))
	}
}
