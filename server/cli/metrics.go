package cli

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/asrdr/asr/server/api"
)

const metricsUsage = `usage: asr metrics token [--rotate] [--json]

Prints the read-only token of the server's Prometheus endpoint (GET /metrics
on the console's port, Authorization: Bearer TOKEN); the server keeps it in
DATA/metrics-token, which a Prometheus on the same host can name as its
authorization.credentials_file. --rotate replaces it: the old token stops
working at once. The admin token also reads /metrics; the metrics token
reads nothing else.`

// runMetrics shows or rotates the metrics token.
func runMetrics(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 && isHelp(args[0]) {
		fmt.Fprintln(e.out, metricsUsage)
		return nil
	}
	if len(args) == 0 || args[0] != "token" {
		return errors.New(metricsUsage)
	}
	fs := e.flags("asr metrics token")
	o := &opFlags{}
	o.registerConn(fs)
	rotate := fs.Bool("rotate", false, "replace the token (the old one stops working)")
	asJSON := fs.Bool("json", false, "print JSON (the token and the server's file holding it)")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	var tok api.MetricsToken
	if *rotate {
		err = c.Do(ctx, http.MethodPost, "/api/v1/metrics/token", api.MetricsTokenRequest{Rotate: true}, &tok)
	} else {
		err = c.Do(ctx, http.MethodGet, "/api/v1/metrics/token", nil, &tok)
	}
	if err != nil {
		return err
	}
	if *asJSON {
		return output(e.out, true, tok, nil)
	}
	fmt.Fprintln(e.out, tok.Token)
	if *rotate {
		fmt.Fprintf(e.errOut, "metrics token replaced; the server's %s holds the new one\n", tok.File)
	}
	return nil
}
