package web

import (
	"bytes"
	"log/slog"
	"net/http"

	"github.com/a-h/templ"
)

// render writes c with the given status, or only its fragments with the given
// ids if any. The output is buffered so that a failing component yields a
// clean 500 rather than half a page.
func render(w http.ResponseWriter, r *http.Request, log *slog.Logger, status int, c templ.Component, fragments ...any) {
	var buf bytes.Buffer
	var err error
	if len(fragments) > 0 {
		err = templ.RenderFragments(r.Context(), &buf, c, fragments...)
	} else {
		err = c.Render(r.Context(), &buf)
	}
	if err != nil {
		log.Error("render page", "path", r.URL.Path, "err", err)
		httpError(w, r, http.StatusInternalServerError, "The page could not be rendered; see the server log.")
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}
