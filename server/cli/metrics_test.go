package cli

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/asrdr/asr/server"
	"github.com/asrdr/asr/server/api"
)

// asr metrics token shows the server's metrics token; --rotate replaces it
// in the server's file.
func TestMetricsTokenCommand(t *testing.T) {
	_, conn := startServer(t)
	with := func(args ...string) []string { return append(args, conn...) }
	file := filepath.Join(conn[3], server.MetricsTokenFile) // conn: --server URL --data DIR
	read := func() string {
		t.Helper()
		b, err := api.ReadSecretFile(file)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	old := read()
	if got := mustRun(t, with("metrics", "token")...); got != old+"\n" {
		t.Errorf("asr metrics token = %q, the file holds %q", got, old)
	}
	var tok api.MetricsToken
	mustJSON(t, mustRun(t, with("metrics", "token", "--json")...), &tok)
	if tok.Token != old || tok.File != file {
		t.Errorf("asr metrics token --json = %+v, want %q in %s", tok, old, file)
	}
	r := runCLI(t, with("metrics", "token", "--rotate")...)
	if r.code != 0 {
		t.Fatalf("asr metrics token --rotate: exit %d: %s", r.code, r.stderr)
	}
	if got := strings.TrimSpace(r.stdout); got == old || got != read() || !strings.Contains(r.stderr, file) {
		t.Errorf("asr metrics token --rotate printed %q (stderr %q); the old token %q, the file's %q", got, r.stderr, old, read())
	}
	mustFail(t, "usage: asr metrics token", "metrics")
	mustFail(t, "usage: asr metrics token", "metrics", "rotate")
	mustFail(t, `unexpected argument "extra"`, with("metrics", "token", "extra")...)
}
