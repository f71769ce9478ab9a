package web

import (
	"bytes"
	"errors"
	"net/http"
)

// statusTitle names an error status for its page.
func statusTitle(status int) string {
	switch status {
	case http.StatusNotFound:
		return "Not found"
	case http.StatusForbidden:
		return "Forbidden"
	case http.StatusInternalServerError:
		return "Server error"
	}
	return http.StatusText(status)
}

// statusHelp says what an operator can do about an error.
func statusHelp(status int) string {
	switch status {
	case http.StatusNotFound:
		return "The page or the object it names does not exist (any more): it may have been deleted or renamed."
	case http.StatusForbidden:
		return "The form was sent without this session's security token, or from an old page. Reload the page and try again."
	case http.StatusInternalServerError:
		return "The server could not answer; the server's log says why. Nothing was changed by this request."
	}
	return "Go back and try again."
}

// httpError answers with the styled error page (plain text if even that
// cannot be rendered, or to htmx, which swaps no error responses).
func httpError(w http.ResponseWriter, r *http.Request, status int, msg string) {
	if isHTMX(r) {
		http.Error(w, msg, status)
		return
	}
	var buf bytes.Buffer
	if err := errorPage(status, msg, sessionFrom(r.Context())).Render(r.Context(), &buf); err != nil {
		http.Error(w, msg, status)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// notFoundPage is the console's 404.
func notFoundPage(w http.ResponseWriter, r *http.Request) {
	httpError(w, r, http.StatusNotFound, "There is no page "+r.URL.Path+".")
}

// errorStatus is the status of a backend error: 404 for ErrNotFound, else
// the given one.
func errorStatus(err error, otherwise int) int {
	if errors.Is(err, ErrNotFound) {
		return http.StatusNotFound
	}
	return otherwise
}
