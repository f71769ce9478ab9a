package web

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"net/http"
	"path"
	"time"
)

// staticFS holds the console's stylesheet, icon and the vendored htmx.
//
//go:embed static
var staticFS embed.FS

// staticFile is an embedded file with the hash that versions its URL.
type staticFile struct {
	data []byte
	hash string // first 12 hex digits of the SHA-256 of data
}

// staticFiles maps names under static/ to their contents. They are read once:
// the set is fixed at build time.
var staticFiles = mustLoadStatic()

func mustLoadStatic() map[string]staticFile {
	files := map[string]staticFile{}
	err := fs.WalkDir(staticFS, "static", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := staticFS.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(data)
		files[p[len("static/"):]] = staticFile{data: data, hash: hex.EncodeToString(sum[:])[:12]}
		return nil
	})
	if err != nil {
		panic("web: read embedded static files: " + err.Error())
	}
	return files
}

// asset returns the URL of a static file, versioned by its content so that
// browsers may cache it for good.
func asset(name string) string {
	f, ok := staticFiles[name]
	if !ok {
		panic("web: no static file " + name)
	}
	return "/static/" + name + "?v=" + f.hash
}

// staticHandler serves the embedded files. A request carrying the current
// version (as [asset] writes it) may be cached for a year; others, e.g. from
// a page rendered before an upgrade, must be revalidated with the ETag.
func staticHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "405 method not allowed", http.StatusMethodNotAllowed)
			return
		}
		name := path.Clean("/" + r.URL.Path)[1:]
		f, ok := staticFiles[name]
		if !ok {
			http.Error(w, "404 page not found", http.StatusNotFound)
			return
		}
		h := w.Header()
		h.Set("ETag", `"`+f.hash+`"`)
		if r.URL.Query().Get("v") == f.hash {
			h.Set("Cache-Control", "public, max-age=31536000, immutable")
		} else {
			h.Set("Cache-Control", "public, no-cache")
		}
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(f.data))
	})
}
