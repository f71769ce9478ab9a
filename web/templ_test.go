package web

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestTemplOutputIsCurrent: the committed *_templ.go files are exactly what
// the templ pinned in go.mod (a tool dependency) makes of the *.templ
// files, so a .templ edited without `make generate` fails here. It
// generates into a copy laid out like the module (web/ under a go.mod), so
// the file names templ writes into its error values match. The tool's
// modules come from the module cache, or the module proxy on a machine
// that has not built the tool yet (a fresh clone: nothing else needs
// them); go.mod and go.sum are read only.
func TestTemplOutputIsCurrent(t *testing.T) {
	templs, err := filepath.Glob("*.templ")
	if err != nil || len(templs) == 0 {
		t.Fatalf("no .templ files: %v", err)
	}
	root := t.TempDir()
	mustCopy(t, filepath.Join("..", "go.mod"), filepath.Join(root, "go.mod"))
	for _, f := range templs {
		mustCopy(t, f, filepath.Join(root, "web", f))
	}
	cmd := exec.Command("go", "tool", "templ", "generate", "-path", root)
	cmd.Env = append(os.Environ(), "GOTOOLCHAIN=local", "GOFLAGS=-mod=readonly")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go tool templ generate: %v\n%s", err, out)
	}
	committed, _ := filepath.Glob("*_templ.go")
	want := map[string]bool{}
	for _, f := range templs {
		g := strings.TrimSuffix(f, ".templ") + "_templ.go"
		want[g] = true
		got, err := os.ReadFile(filepath.Join(root, "web", g))
		if err != nil {
			t.Fatal(err)
		}
		have, err := os.ReadFile(g)
		if err != nil {
			t.Errorf("%s is not committed: run make generate", g)
			continue
		}
		if !bytes.Equal(got, have) {
			t.Errorf("%s is not what templ generates from %s: run make generate", g, f)
		}
	}
	for _, g := range committed {
		if !want[g] {
			t.Errorf("%s has no .templ file: delete it", g)
		}
	}
}

func mustCopy(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestStylesheetStylesEveryInputType: every type of text-like input a
// page uses is styled by asr.css. An input type the stylesheet does not
// name is drawn by the browser as a bare box beside the styled fields
// (the notifications' From and webhook URL were).
func TestStylesheetStylesEveryInputType(t *testing.T) {
	css, err := os.ReadFile(filepath.Join("static", "asr.css"))
	if err != nil {
		t.Fatal(err)
	}
	templs, err := filepath.Glob("*.templ")
	if err != nil {
		t.Fatal(err)
	}
	typeAttr := regexp.MustCompile(`<input[^>]*\btype="([a-z-]+)"`)
	notText := map[string]bool{"hidden": true, "checkbox": true, "radio": true, "submit": true, "button": true, "file": true}
	for _, f := range templs {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range typeAttr.FindAllSubmatch(b, -1) {
			typ := string(m[1])
			if !notText[typ] && !bytes.Contains(css, []byte(`input[type="`+typ+`"]`)) {
				t.Errorf("%s: an input of type %q, which asr.css does not style", f, typ)
			}
		}
	}
}
